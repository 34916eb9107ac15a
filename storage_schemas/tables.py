"""Parquet tables rep-pipeline writes, as pyarrow schemas with column docs.

Writers cast to these schemas (a missing or mistyped column fails loudly); readers, DuckDB
included, see the docs in each field's metadata. Where each table's parts lie is
``storage_schemas.results``; ``TABLES_VERSION`` is the version of the whole results folder.
"""
from __future__ import annotations

import pyarrow as pa

TABLES_VERSION = 1


SCHEMAS: dict[str, pa.Schema] = {}  # every table by name, filled by ``_table``


def _table(name: str, *fields: pa.Field) -> pa.Schema:
    """The schema of table ``name``, registered in ``SCHEMAS`` (a new table is one ``_table``)."""
    if name in SCHEMAS:
        raise ValueError(f"table {name!r} declared twice")
    SCHEMAS[name] = pa.schema(list(fields), metadata={"table": name, "version": str(TABLES_VERSION)})
    return SCHEMAS[name]


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


_SETTING = (
    _field("model", pa.string(), "model key in the feature store (alias or timm name)"),
    _field("dataset", pa.string(), "dataset name"),
    _field("split", pa.string(), "split the codebook was trained on"),
    _field("embedding", pa.string(), "queries | keys | values | tokens"),
    _field("layer", pa.int16(), "block number (0-based)"),
    _field("k", pa.int32(), "number of clusters"),
    _field("method", pa.string(), "online | lloyd; ULTra's segments clustered by descriptors: ultra_s | ultra_e | "
                                  "ultra_w (PROTOCOL.md s. 10.4)"),
    _field("seed", pa.int32(), "k-means seed"),
)

TRAINING_CURVES = _table(
    "training_curves",
    *_SETTING,
    _field("step", pa.int32(), "online: Adam step (1-based); lloyd: pass over the data (1-based)"),
    _field("loss", pa.float64(), "batch k-means loss -mean max_k cos(f, c_k) (online: of this "
                                 "step's batch; lloyd: over the whole pass)"),
    _field("changed_fraction", pa.float64(), "lloyd: fraction of assignments that changed in the "
                                             "pass; null for online", nullable=True),
    _field("store_fingerprint", pa.string(), "hash of the feature group's fingerprint"),
    _field("codebook_fingerprint", pa.string(), "hash of the codebook's training fingerprint"))

# evaluation rows: a codebook (trained on train_split) applied to the test split ``split``
_EVAL_SETTING = (*_SETTING[:3],
                 _field("train_split", pa.string(), "split the codebook was trained on"),
                 *_SETTING[3:])
_FINGERPRINTS = (
    _field("store_fingerprint", pa.string(), "hash of the test split's feature-group fingerprint"),
    _field("codebook_fingerprint", pa.string(), "hash of the codebook's training fingerprint"),
)


def _nullable(fields: tuple[pa.Field, ...]) -> tuple[pa.Field, ...]:
    return tuple(f.with_nullable(True) for f in fields)


def _interval(metric: str, unit: str = "test images") -> tuple[pa.Field, pa.Field]:
    """``<metric>_lo`` and ``<metric>_hi``: its 95 % bootstrap interval (1,000 draws of the
    ``unit`` resampled with replacement, docs/uncertainty.md); null where undefined."""
    return (_field(f"{metric}_lo", pa.float64(), f"95 % bootstrap interval of {metric} over {unit} (1,000 draws; "
                                                 f"docs/uncertainty.md), low end", nullable=True),
            _field(f"{metric}_hi", pa.float64(), "its high end", nullable=True))


SEGMENTATION = _table(
    "segmentation", *_EVAL_SETTING,
    _field("miou", pa.float64(), "mean IoU over classes with a non-empty union, after matching"),
    *_interval("miou"),
    _field("pixel_accuracy", pa.float64(), "correct / labelled pixels, after matching"),
    *_interval("pixel_accuracy"),
    _field("mi", pa.float64(), "MI between pixel position and predicted (mapped) class, nats"),
    _field("nmi", pa.float64(), "mi / H(predicted class)"),
    *_interval("nmi"),
    _field("mi_null", pa.float64(), "mi of the same maps, each cyclically shifted at random: the "
                                    "plug-in estimator's bias on this many images"),
    _field("nmi_bias_aware", pa.float64(), "(mi - mi_null) / H(predicted class)"),
    *_interval("nmi_bias_aware"),
    _field("n_images", pa.int32(), "test images"),
    *_FINGERPRINTS)
PER_CLASS_IOU = _table(
    "per_class_iou", *_EVAL_SETTING,
    _field("class_id", pa.int16(), "class index"), _field("class_name", pa.string(), "class name"),
    _field("iou", pa.float64(), "IoU; null where the class is neither predicted nor present", nullable=True),
    *_FINGERPRINTS)
CLASSWISE_MI = _table(
    "classwise_mi",
    *_SETTING[:3], *_nullable((_EVAL_SETTING[3],) + _SETTING[3:]),
    _field("source", pa.string(), "prediction | ground_truth (setting columns null)"),
    _field("class_id", pa.int16(), "class index"), _field("class_name", pa.string(), "class name"),
    _field("mi", pa.float64(), "I_c = sum_p P(p,c) log(P(p,c) / (P(p) P(c))), nats"),
    _field("store_fingerprint", pa.string(), "hash of the test split's feature-group fingerprint"),
    _field("codebook_fingerprint", pa.string(), "codebook fingerprint; null for ground truth", nullable=True))
GROUND_TRUTH = _table(
    "ground_truth", _field("dataset", pa.string(), "dataset name"), _field("split", pa.string(), "test split"),
    _field("mi", pa.float64(), "MI between pixel position and true class, nats"),
    _field("nmi", pa.float64(), "mi / H(true class)"),
    *_interval("nmi"),
    _field("mi_null", pa.float64(), "mi after random cyclic shifts of every label map"),
    _field("nmi_bias_aware", pa.float64(), "(mi - mi_null) / H(true class)"),
    *_interval("nmi_bias_aware"),
    _field("n_images", pa.int32(), "test images"),
    _field("dataset_fingerprint", pa.string(), "hash of the dataset split's fingerprint"))
CONFUSION = _table(
    "confusion", *_EVAL_SETTING, _field("cluster", pa.int16(), "cluster index"),
    _field("class_id", pa.int16(), "true class"), _field("pixels", pa.int64(), "pixels (ignore dropped)"),
    *_FINGERPRINTS)
MATCHING = _table(
    "matching", *_EVAL_SETTING, _field("cluster", pa.int16(), "cluster index"),
    _field("class_id", pa.int16(), "class the cluster is mapped to"),
    _field("hungarian", pa.bool_(), "true: one-to-one Hungarian match; false: majority class (K > C)"),
    *_FINGERPRINTS)
ATTENTION_MI = _table(
    "attention_mi", *_SETTING[:3], _field("layer", pa.int16(), "block number"),
    _field("head", pa.int16(), "attention head"),
    _field("mean", pa.float64(), "mean over images of I(K,Q), nats"),
    *_interval("mean"),
    _field("std", pa.float64(), "standard deviation over images"),
    _field("n_images", pa.int32(), "images"),
    _field("store_fingerprint", pa.string(), "hash of the feature-group fingerprint"))
_BEST_LAYER_UNIT = "test images (that layer's; the choice of the layer not included)"
BEST_LAYERS = _table(
    "best_layers", *_SETTING[:3], _EVAL_SETTING[3], *_SETTING[3:4], *_SETTING[5:],
    _field("best_layer", pa.int16(), "block with the highest mIoU"),
    _field("miou", pa.float64(), "its mIoU"), *_interval("miou", _BEST_LAYER_UNIT),
    _field("nmi", pa.float64(), "its NMI"), *_interval("nmi", _BEST_LAYER_UNIT),
    _field("n_layers", pa.int16(), "layers compared"))
CORRELATIONS = _table(
    "correlations", _field("dataset", pa.string(), "dataset name"), _field("split", pa.string(), "test split"),
    _field("k", pa.int32(), "number of clusters"), _field("method", pa.string(), "online | lloyd"),
    _field("name", pa.string(), "nmi_vs_log_miou | kq_nmi_vs_attention_mi"),
    _field("rho", pa.float64(), "Spearman rank correlation", nullable=True),
    _field("p_value", pa.float64(), "two-sided p-value of rho = 0 (scipy.stats.spearmanr)", nullable=True),
    _field("n_pairs", pa.int32(), "(model, layer, embedding) points used"))
# the online k-means' sensitivity to its PCA initialisation and batch size (PROTOCOL.md 12.2)
KMEANS_SENSITIVITY = _table(
    "kmeans_sensitivity",
    _field("model", pa.string(), "model key in the feature store"),
    _field("dataset", pa.string(), "dataset name"),
    _field("split", pa.string(), "test split"),
    _field("train_split", pa.string(), "split the codebook was trained on"),
    _field("embedding", pa.string(), "queries | keys | values | tokens"),
    _field("layer", pa.int16(), "block number (0-based)"),
    _field("k", pa.int32(), "number of clusters"),
    _field("seed", pa.int32(), "k-means seed"),
    _field("batch_images", pa.int32(), "images per Adam batch"),
    _field("pca_batches", pa.int32(), "batches whose patches the PCA initialisation takes (init_batches)"),
    _field("pca_interval", pa.int32(), "every n-th batch is taken for the PCA initialisation (1 = the first "
                                       "pca_batches batches, the default)"),
    _field("codebook", pa.string(), "the codebook's name in the store"),
    _field("miou", pa.float64(), "mean IoU over classes with a non-empty union, after matching"),
    *_interval("miou"),
    _field("pixel_accuracy", pa.float64(), "correct / labelled pixels, after matching"),
    _field("nmi", pa.float64(), "MI between pixel position and predicted class / H(predicted class)"),
    _field("n_images", pa.int32(), "test images"),
    *_FINGERPRINTS)


# -- direction probes (PROTOCOL.md section 9.7) ------------------------------------------------
_PROBE_SETTING = (
    _field("model", pa.string(), "model key in the feature store"),
    _field("dataset", pa.string(), "dataset name"),
    _field("split", pa.string(), "test split the templates are evaluated on"),
    _field("train_split", pa.string(), "split the templates are fitted on (cosine: supports drawn from)"),
    _field("embedding", pa.string(), "queries (q) | keys (k) | values (v) | mid_tokens (x1) | tokens (x2) | "
                                     "mid_normed (x_n)"),
    _field("layer", pa.int16(), "block number (0-based; the paper's layer + 1)"),
    _field("object", pa.string(), "patch | class_token"),
    _field("rule", pa.string(), "hyperplane | cosine"),
    _field("k_shot", pa.int32(), "cosine: support images k; null for hyperplane", nullable=True),
)
_CONCEPT = (
    _field("concept_id", pa.int32(), "class id of the concept in its label map"),
    _field("concept_name", pa.string(), "class name"),
    _field("category", pa.string(), "the label map the concept comes from (section 9.2)"),
)
_PROBE_METRICS = tuple(
    _field(name, pa.float64(), doc) for name, doc in (
        ("accuracy", "balanced accuracy (TPR + TNR) / 2 (section 9.5)"),
        ("precision", "balanced precision TPR / (TPR + FPR); 0 when both are 0"),
        ("recall", "TPR"),
        ("f1", "2 precision recall / (precision + recall); 0 when both are 0")))
DIRECTION_PROBES = _table(
    "direction_probes", *_PROBE_SETTING,
    _field("trial", pa.int16(), "cosine: trial 0..N-1 (its supports and queries); 0 for hyperplane"),
    *_CONCEPT,
    _field("n_pos", pa.int64(), "positive test objects"), _field("n_neg", pa.int64(), "negative test objects"),
    _field("tp", pa.int64(), "true positives"), _field("fp", pa.int64(), "false positives"),
    _field("tn", pa.int64(), "true negatives"), _field("fn", pa.int64(), "false negatives"),
    *_PROBE_METRICS,
    _field("threshold", pa.float64(), "hyperplane: b of w.z - b >= 0; cosine: t = cos(theta)"),
    _field("seed", pa.int64(), "seed of this template's sampling and training"),
    _field("store_fingerprint", pa.string(), "hash of the test split's feature-group fingerprint"),
    _field("train_store_fingerprint", pa.string(), "hash of the train split's feature-group fingerprint"))
DIRECTION_SUMMARY = _table(
    "direction_summary", *_PROBE_SETTING,
    _field("category", pa.string(), "'all' or a category name"),
    _field("n_concepts", pa.int32(), "concepts evaluated"),
    *(f for m in _PROBE_METRICS for f in (
        _field(m.name, pa.float64(), f"mean over concepts of {m.name} (cosine: then the mean over trials)"),
        _field(f"{m.name}_std", pa.float64(), f"cosine: standard deviation over trials of the concept-mean "
                                                f"{m.name}; null for hyperplane", nullable=True))),
    _field("store_fingerprint", pa.string(), "hash of the test split's feature-group fingerprint"),
    _field("train_store_fingerprint", pa.string(), "hash of the train split's feature-group fingerprint"))
DIRECTION_SKIPPED = _table(
    "direction_skipped", *_PROBE_SETTING, *_CONCEPT,
    _field("reason", pa.string(), "why the concept was not evaluated (section 9.2, 9.4)"))


# -- zero-shot correspondence (PROTOCOL.md section 11.6) ------------------------------------------
_CORRESPONDENCE_SETTING = (
    _field("model", pa.string(), "model key in the feature store"),
    _field("dataset", pa.string(), "dataset name"),
    _field("split", pa.string(), "split whose keypoint pairs are transferred"),
    _field("embedding", pa.string(), "queries | keys | values | tokens (or another captured embedding)"),
    _field("layer", pa.int16(), "block number (0-based; the paper's layer + 1)"),
    _field("alpha", pa.float64(), "PCK threshold: alpha max(w_bb, h_bb) of the target box"),
)
_PCK = (
    _field("pck_point", pa.float64(), "correct keypoints / keypoints, pooled over pairs (Table 3's 'per point')"),
    *_interval("pck_point", "pairs"),
    _field("pck_image", pa.float64(), "mean over pairs of each pair's fraction of correct keypoints"),
    *_interval("pck_image", "pairs"),
    _field("n_pairs", pa.int32(), "pairs"),
    _field("n_keypoints", pa.int32(), "keypoints"),
)
_CORRESPONDENCE_RUN = (
    _field("image_size", pa.int32(), "S, the grid the features are upsampled to"),
    _field("geometry", pa.string(), "crop | pad: how the images lie on the grid"),
    _field("last_norm", pa.string(), "last-layer tokens before or after the final norm"),
    _field("rope", pa.string(), "RoPE models: q and k before or after the rotation"),
    _field("store_fingerprint", pa.string(), "hash of the feature group's fingerprint"),
    _field("pairs_fingerprint", pa.string(), "hash of keypoint_pairs.parquet's rows"),
)
CORRESPONDENCE = _table("correspondence", *_CORRESPONDENCE_SETTING, *_PCK, *_CORRESPONDENCE_RUN)
CORRESPONDENCE_BY_CATEGORY = _table(
    "correspondence_by_category", *_CORRESPONDENCE_SETTING,
    _field("category", pa.string(), "object category"), *_PCK, *_CORRESPONDENCE_RUN)
CORRESPONDENCE_BEST = _table(
    "correspondence_best", *_CORRESPONDENCE_SETTING[:4], _CORRESPONDENCE_SETTING[5],
    _field("best_layer", pa.int16(), "block with the highest pck_point for this embedding"),
    _field("pck_point", pa.float64(), "its pck_point"),
    *_interval("pck_point", "pairs (that layer's; the choice of the layer not included)"),
    _field("model_best", pa.bool_(), "this (embedding, best_layer) is the model's best over all embeddings"),
    _field("n_layers", pa.int16(), "layers compared"),
    _field("store_fingerprint", pa.string(), "hash of the feature group's fingerprint"))
CORRESPONDENCE_MATCHES = _table(
    "correspondence_matches",
    _field("model", pa.string(), "model key in the feature store"),
    _field("dataset", pa.string(), "dataset name"), _field("split", pa.string(), "split"),
    _field("pair_id", pa.string(), "pair id of keypoint_pairs"), _field("kp_id", pa.int16(), "keypoint id"),
    _field("category", pa.string(), "object category"),
    _field("embedding", pa.string(), "embedding"), _field("layer", pa.int16(), "block number"),
    _field("pred_x", pa.float64(), "predicted target x, original pixels"),
    _field("pred_y", pa.float64(), "predicted target y, original pixels"),
    _field("gt_x", pa.float64(), "ground-truth target x, original pixels"),
    _field("gt_y", pa.float64(), "ground-truth target y, original pixels"),
    _field("error", pa.float64(), "||pred - gt||_2, original pixels"),
    _field("threshold", pa.float64(), "max(w_bb, h_bb) of the target box: correct at alpha iff "
                                      "error <= alpha * threshold"),
    _field("score", pa.float64(), "the cosine at the prediction"))

# -- ULTra (PROTOCOL.md section 10.9) ------------------------------------------------------------------
_ULTRA_RUN = (
    _field("run_id", pa.string(), "hash of the run's choices and features (ultra_runs)"),
    _field("model", pa.string(), "model key in the feature store"),
    _field("dataset", pa.string(), "dataset name"),
    _field("split", pa.string(), "split the maps explain"),
)
ULTRA_RUNS = _table(
    "ultra_runs", *_ULTRA_RUN,
    _field("embedding", pa.string(), "the explained embedding (tokens by default)"),
    _field("f", pa.string(), "sum (ULTra_S) | energy (ULTra_E) | learned (ULTra_W)"),
    _field("layers", pa.list_(pa.int16()), "explained blocks (0-based)"),
    _field("zeta", pa.float64(), "cut distance of the per-image clustering", nullable=True),
    _field("k_img", pa.int32(), "clusters per image instead of a cut distance", nullable=True),
    _field("linkage", pa.string(), "average"), _field("metric", pa.string(), "cosine"),
    _field("aggregate", pa.string(), "sum | mean: concept maps of the clusters (Eq. 7)"),
    _field("self_fill", pa.string(), "max_other"), _field("order", pa.string(), "latest_left"),
    _field("n_images", pa.int32(), "explained images"),
    _field("store_fingerprint", pa.string(), "hash of the feature group's fingerprint"))
ULTRA_ORACLE = _table(
    "ultra_oracle", *_ULTRA_RUN, _field("layer", pa.int16(), "block number"),
    _field("miou", pa.float64(), "per-image Hungarian matching, pixels pooled (an optimistic bound, s. 10.4)"),
    _field("pixel_accuracy", pa.float64(), "the same matching's pixel accuracy"),
    _field("mean_segments_per_image", pa.float64(), "segments per image"),
    _field("n_images", pa.int32(), "images"))
ULTRA_ITIOU = _table(
    "ultra_itiou", *_ULTRA_RUN, _field("layer", pa.int16(), "block number"),
    _field("tau", pa.float64(), "threshold of the min-max scaled upsampled map"),
    _field("itiou", pa.float64(), "mean over images of the image's token-class IoU (s. 10.5)", nullable=True),
    _field("n_images", pa.int32(), "images with a labelled token"),
    _field("n_tokens", pa.int64(), "labelled tokens"))
ULTRA_PERTURBATION = _table(
    "ultra_perturbation", *_ULTRA_RUN, _field("layer", pa.int16(), "block number"),
    _field("perturbation", pa.string(), "mask | noise"),
    _field("fraction", pa.float64(), "rho: the fraction of the other patches perturbed"),
    _field("tokens_per_image", pa.int32(), "tokens drawn per image"),
    *(_field(name, pa.float64(), doc, nullable=True) for name, doc in (
        ("neg_mean", "mean over images of the mean distance, least relevant patches perturbed"),
        ("neg_std", "standard deviation over images of that"),
        ("pos_mean", "the same, most relevant patches perturbed"), ("pos_std", "its standard deviation"),
        ("diff_mean", "mean over images of positive - negative"),
        ("diff_ci_low", "95 % bootstrap interval of diff_mean over images (1,000 draws), low end"),
        ("diff_ci_high", "its high end"))),
    _field("n_images", pa.int32(), "images"), _field("seed", pa.int64(), "seed of the token draws and noise"))


# which feature group a model key of the results is (what the ln_ablation view pairs by)
FEATURE_GROUPS = _table(
    "feature_groups",
    _field("model", pa.string(), "model key in the feature store"),
    _field("dataset", pa.string(), "dataset name"), _field("split", pa.string(), "split"),
    _field("alias", pa.string(), "the registry alias (or timm name) the group's features come from"),
    _field("timm_name", pa.string(), "timm model name"),
    _field("weights_sha256", pa.string(), "hash of the weights", nullable=True),
    _field("last_norm", pa.string(), "last-layer tokens before or after the final norm"),
    _field("rope", pa.string(), "RoPE q and k before or after the rotation"),
    _field("depth", pa.int16(), "blocks of the model"),
    _field("image_size", pa.int32(), "S"),
    _field("store_fingerprint", pa.string(), "hash of the feature group's fingerprint"))


# -- views: derived tables DuckDB computes on the fly from the tables above ---------------------------
# The final-LayerNorm ablation (PROTOCOL.md section 12.1): last-block tokens of two groups of one
# model (same alias and weights), extracted with last_norm before and after the final norm, on
# both tasks. ``{scores}`` is the UNION ALL of LN_ABLATION_SCORES over the tables present.
LN_ABLATION_SCORES = {
    "segmentation": """
        SELECT g.alias, g.weights_sha256, s.dataset, 'segmentation' AS task,
               'miou (K=' || s.k || ', ' || s.method || ')' AS measure, g.last_norm, avg(s.miou) AS value
        FROM segmentation s JOIN feature_groups g ON s.model = g.model AND s.dataset = g.dataset
        WHERE s.embedding = 'tokens' AND s.layer = g.depth - 1 GROUP BY ALL""",
    "correspondence": """
        SELECT g.alias, g.weights_sha256, c.dataset, 'correspondence' AS task, 'pck_point@0.10' AS measure,
               g.last_norm, avg(c.pck_point) AS value
        FROM correspondence c JOIN feature_groups g ON c.model = g.model AND c.dataset = g.dataset
            AND c.split = g.split
        WHERE c.embedding = 'tokens' AND c.layer = g.depth - 1 AND abs(c.alpha - 0.10) < 1e-9 GROUP BY ALL""",
}
LN_ABLATION = """
    WITH scores AS ({scores})
    SELECT b.alias AS model, b.dataset, b.task, b.measure, b.value AS before, a.value AS after,
           a.value - b.value AS diff, a.value - b.value AS difference
    FROM scores b JOIN scores a ON a.alias = b.alias AND a.weights_sha256 IS NOT DISTINCT FROM b.weights_sha256
        AND a.dataset = b.dataset AND a.task = b.task AND a.measure = b.measure
    WHERE b.last_norm = 'before' AND a.last_norm = 'after'"""
VIEWS = {"ln_ablation": ("feature_groups", LN_ABLATION, LN_ABLATION_SCORES)}  # name: (needs, sql, parts by table)
