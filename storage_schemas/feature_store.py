"""The feature store's Zarr v3 layout, as data (``pipeline.store`` creates, reads and validates it).

::

    <store>.zarr/                         attrs: rep_pipeline = {kind, schema_version, ...}
      datasets/<dataset>/<split>/         attrs: dataset fingerprint (DATASET_ATTRS)
        image_ids     (image,)                    string
        labels        (image, y, x)               uint8, 255 = ignore, S x S grid
        labels_<map>  (image, y, x)               uint8, a further label map (Pascal-Part's parts)
        geometry      (image, field)              int32, [W, H, W', H', ox, oy]: how each image
                                                  lies on the grid (PROTOCOL.md s. 8.2)
        done          (chunk,)                    bool, labels of image chunk i written
        keypoint_pairs.parquet                    keypoint datasets: one row per (pair, keypoint)
                                                  (KEYPOINT_PAIRS; zarr ignores the file)
        example_images (example, y, x, rgb)       uint8, the first EXAMPLE_IMAGES crops, for figures
      models/<model>/<dataset>/<split>/   attrs: model fingerprint (MODEL_ATTRS), and the
                                          request that produced it (REQUEST_ATTRS)
        provenance    (chunk,)                    string, who wrote image chunk i (JSON)
        queries|keys|values|tokens|mid_tokens|mid_normed
                      (layer, image, y, x, channel) float16, one chunk = one layer x one run
                                                  of ``chunk_images`` images
        class_<embedding> (layer, image, channel) float16, the class token's, for each of
                                                  ``class_embeddings`` (class_tokens: tokens)
        attention_mi  (layer, image, head)        float32, I(K,Q) in nats (PROTOCOL.md s. 5)
        attention_sum (chunk, layer, query, key)  float32, while extracting: head-averaged
                                                  patch attention summed over a chunk's images
        attention_map (layer, query, key)         float32, when finished: its image mean
        example_attention (layer, example, query, key)  float32, on request (extract option
                                                  ``example_attention``): the head-averaged patch
                                                  attention of each of the split's example images
                                                  (its first EXAMPLE_IMAGES; ids in the attrs)
        done          (chunk,)                    bool, image chunk i complete for this model
        codebooks/<method>-k<K>-s<seed>/  attrs: training fingerprint (CODEBOOK_ATTRS)
          <embedding>       (layer, cluster, channel) float32, unit centroids
          <embedding>_done  (layer,)                  bool, layer trained to the end
        explanations/<f>-<embedding>/     attrs: ULTra's choices and the features' fingerprint
                                          (EXPLANATION_ATTRS; PROTOCOL.md s. 8.4, 10.2)
          maps        (layer, image, query, key)  float16, row i = S_i of patch token i (self-filled)
          class_maps  (layer, image, key)         float16, the class token's map
          done        (layer, chunk)              bool, the chunk's rows of that layer written
          projections (layer, token, channel)     float32, learned only: ULTra_W's w_i (s. 10.7)
        templates/hyperplane-s<seed>/     attrs: concepts, training fingerprint (TEMPLATE_ATTRS)
          <embedding>       (layer, concept, channel) float32, w of w.z - b >= 0
          <embedding>_bias  (layer, concept)          float32, b
          <embedding>_done  (layer,)                  bool

``layer`` indexes the captured layers, whose block numbers are the ``layers`` attribute.
Every array carries ``dimension_names``, so ``xarray.open_zarr`` names the axes itself.

Schema version 2 (PROTOCOL.md section 8.1) added ``mid_tokens`` (x1, the residual stream
between a block's attention and MLP branches: the input of ``norm2``), ``mid_normed``
(norm2(x1), on request), the class token of every captured embedding (``class_embeddings``)
and further label maps. A version-1 store (no ``class_embeddings`` attribute: class tokens of
``tokens`` only) stays readable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
STORE_KIND = "rep-pipeline feature store"

# Codecs were chosen with bench/codecs.py (docs/feature-store.md says why): float16 features
# take bit-shuffled LZ4, the float32 attention arrays byte-shuffled LZ4, labels Zstandard.
FEATURE_CODEC: dict[str, Any] = {"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}}
ATTENTION_CODEC: dict[str, Any] = {"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}}
LABEL_CODEC: dict[str, Any] = {"name": "zstd", "configuration": {"level": 3, "checksum": False}}
# Chunk files lie flat in their array's folder (``c.<layer>.<chunk>.0.0.0``): a folder per
# index (zarr's default ``/``) costs a directory creation for every new chunk.
CHUNK_KEY_ENCODING: dict[str, Any] = {"name": "default", "separator": "."}

# chunk rules per dimension: "full" = whole extent, "images" = chunk_images, an int = that size
FULL, IMAGES = "full", "images"


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dims: tuple[str, ...]
    dtype: str
    chunks: tuple[str | int, ...]
    doc: str
    codec: dict[str, Any] | None = None

    def chunk_shape(self, shape: tuple[int, ...], chunk_images: int) -> tuple[int, ...]:
        rule = {FULL: None, IMAGES: chunk_images}
        out = []
        for extent, c in zip(shape, self.chunks):
            size = rule[c] if isinstance(c, str) else c
            out.append(max(1, extent if size is None else min(size, extent)))
        return tuple(out)


DATASET_ARRAYS: dict[str, ArraySpec] = {a.name: a for a in (
    ArraySpec("image_ids", ("image",), "str", (FULL,), "image ids in list order"),
    ArraySpec("labels", ("image", "y", "x"), "uint8", (IMAGES, FULL, FULL),
              "class id per pixel on the S x S grid; 255 = ignore", LABEL_CODEC),
    ArraySpec("geometry", ("image", "field"), "int32", (IMAGES, FULL),
              "[W, H, W', H', ox, oy] of each image: original size, resized size, offset on the grid"),
    ArraySpec("done", ("chunk",), "bool", (1,), "labels of image chunk i are written"),
    ArraySpec("example_images", ("example", "y", "x", "rgb"), "uint8", (1, FULL, FULL, FULL),
              "RGB crops of the first images of the split, as the model saw them, for figures"),
)}

EXAMPLE_IMAGES = 8  # crops kept per split for the report's image grids
# the columns of ``geometry`` (PROTOCOL.md section 8.2); a version-2 split written before it
# existed has none, and a stage that needs it says so
GEOMETRY_FIELDS = ("W", "H", "W_resized", "H_resized", "ox", "oy")
DEFAULT_GEOMETRY = "crop"  # what a split whose options name no geometry was placed by


def dataset_options(attrs: dict[str, Any]) -> dict[str, Any]:
    """A dataset split's ``options`` attribute, with the geometry it was placed by (splits
    written before the option existed: ``crop``)."""
    return {"geometry": DEFAULT_GEOMETRY, **dict(attrs.get("options") or {})}


# keypoint pairs of a split (PROTOCOL.md section 8.3): ``<split group>/keypoint_pairs.parquet``
KEYPOINT_PAIRS_FILE = "keypoint_pairs.parquet"


def _kp_field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


KEYPOINT_PAIRS = pa.schema([
    _kp_field("pair_id", pa.string(), "the pair's id (SPair: its annotation file's name)"),
    _kp_field("category", pa.string(), "object category of the pair"),
    _kp_field("src_image_id", pa.string(), "source image, an id of the split's image_ids"),
    _kp_field("trg_image_id", pa.string(), "target image, an id of the split's image_ids"),
    _kp_field("kp_id", pa.int16(), "keypoint id within the category"),
    _kp_field("kp_name", pa.string(), "keypoint name, where the dataset names it", nullable=True),
    *(_kp_field(f"{side}_{axis}", pa.float64(), f"{side} keypoint {axis}, original pixels")
      for side in ("src", "trg") for axis in ("x", "y")),
    *(_kp_field(f"{side}_bbox_{c}", pa.float64(), f"{side} object box {c}, original pixels")
      for side in ("src", "trg") for c in ("x1", "y1", "x2", "y2")),
    *(_kp_field(flag, pa.int8(), f"SPair's {flag} flag", nullable=True)
      for flag in ("viewpoint_variation", "scale_variation", "truncation", "occlusion")),
    _kp_field("dataset_fingerprint", pa.string(), "hash of the dataset split's fingerprint"),
], metadata={"table": "keypoint_pairs"})

# Per-image attention rows of the example images, on request (PROTOCOL.md 12.5, A37): the array,
# and the model attribute (True) of a group that holds it; a group without it has no attribute,
# so its fingerprint is the one it had before the option existed. The array's ``image_ids``
# attribute names its examples.
EXAMPLE_ATTENTION = "example_attention"

# the embeddings a model group may hold (PROTOCOL.md sections 2 and 8.1)
FEATURE_EMBEDDINGS = ("queries", "keys", "values", "tokens", "mid_tokens", "mid_normed")
_FEATURE_DIMS = ("layer", "image", "y", "x", "channel")


def class_array(embedding: str) -> str:
    """The array of the class token's ``embedding``: ``class_<embedding>``."""
    return f"class_{embedding}"


MODEL_ARRAYS: dict[str, ArraySpec] = {a.name: a for a in (
    *(ArraySpec(e, _FEATURE_DIMS, "float16", (1, IMAGES, FULL, FULL, FULL),
                f"patch {e} per captured layer (PROTOCOL.md s. 2, 8.1)", FEATURE_CODEC)
      for e in FEATURE_EMBEDDINGS),
    *(ArraySpec(class_array(e), ("layer", "image", "channel"), "float16", (FULL, IMAGES, FULL),
                f"the class token's {e} per captured layer", FEATURE_CODEC) for e in FEATURE_EMBEDDINGS),
    ArraySpec("attention_mi", ("layer", "image", "head"), "float32", (FULL, IMAGES, FULL),
              "attention key-query mutual information I(K,Q), nats", ATTENTION_CODEC),
    ArraySpec("attention_sum", ("chunk", "layer", "query", "key"), "float32", (1, FULL, FULL, FULL),
              "head-averaged patch attention summed over the chunk's images (while extracting)", ATTENTION_CODEC),
    ArraySpec("attention_map", ("layer", "query", "key"), "float32", (1, FULL, FULL),
              "image- and head-averaged patch-to-patch attention (once finished)", ATTENTION_CODEC),
    # the example axis is chunked like the images, so each image chunk writes its own files
    ArraySpec(EXAMPLE_ATTENTION, ("layer", "example", "query", "key"), "float32", (1, IMAGES, FULL, FULL),
              "head-averaged patch-to-patch attention (rows renormalised) of the split's example images, "
              "the first EXAMPLE_IMAGES (extract option example_attention; PROTOCOL.md s. 12.5)", ATTENTION_CODEC),
    ArraySpec("done", ("chunk",), "bool", (1,), "image chunk i is complete for this model"),
)}

# Who wrote each image chunk (JSON: Ray node id, host, pid, when, seconds), so that a bad or
# slow node can be found after the fact. Groups written before it existed have none.
PROVENANCE = ArraySpec("provenance", ("chunk",), "str", (1,),
                       "who wrote image chunk i: node, host, pid, written (UTC), seconds (JSON)")

CODEBOOK_ARRAYS: dict[str, ArraySpec] = {a.name: a for a in (
    ArraySpec("centroids", ("layer", "cluster", "channel"), "float32", (1, FULL, FULL),
              "unit-norm centroids of each captured layer (stored under the embedding's name)"),
    ArraySpec("done", ("layer",), "bool", (1,), "the layer's codebook is trained to the end"),
)}

def extra_labels_array(label_map: str) -> str:
    """The dataset split's array of a further label map (``labels_<map>``)."""
    return f"labels_{label_map}"


EXTRA_LABELS = ArraySpec("labels_<map>", ("image", "y", "x"), "uint8", (IMAGES, FULL, FULL),
                         "class id per pixel of a further label map (its classes: the label_maps attribute)",
                         LABEL_CODEC)

# hyperplane templates of the direction probes (PROTOCOL.md section 8.5), beside the codebooks:
# ``<model group>/templates/hyperplane-s<seed>/``; the concept axis lists (object, category,
# class id, name) in the ``concepts`` attribute
TEMPLATE_ARRAYS: dict[str, ArraySpec] = {a.name: a for a in (
    ArraySpec("weights", ("layer", "concept", "channel"), "float32", (1, FULL, FULL),
              "w of each concept's template w.z - b >= 0 (stored under the embedding's name)"),
    ArraySpec("bias", ("layer", "concept"), "float32", (1, FULL), "b (stored as <embedding>_bias)"),
    ArraySpec("done", ("layer",), "bool", (1,), "the layer's templates are trained (<embedding>_done)"),
)}
TEMPLATE_ATTRS = ("concepts", "seed", "hyperparameters", "features_fingerprint", "schema_version", "package_version")
TEMPLATE_FINGERPRINT_KEYS = ("concepts", "seed", "hyperparameters", "features_fingerprint")


# ULTra explanation maps (PROTOCOL.md section 8.4), beside the codebooks:
# ``<model group>/explanations/<f>-<embedding>/``; ``layer`` indexes the ``layers`` attribute and
# ``image`` the first ``n_images`` images of the split
EXPLANATION_ARRAYS: dict[str, ArraySpec] = {a.name: a for a in (
    ArraySpec("maps", ("layer", "image", "query", "key"), "float16", (1, IMAGES, FULL, FULL),
              "row i: S_i of patch token i over the P patch columns, after the self-fill, before min-max scaling",
              FEATURE_CODEC),
    ArraySpec("class_maps", ("layer", "image", "key"), "float16", (1, IMAGES, FULL),
              "the class token's map S_0 over the P patch columns", FEATURE_CODEC),
    ArraySpec("done", ("layer", "chunk"), "bool", (1, 1), "the chunk's maps of that layer are written"),
    ArraySpec("projections", ("layer", "token", "channel"), "float32", (1, FULL, FULL),
              "ULTra_W (f = learned): the unit vectors w_i of f_w(z_i) = <z_i, w_i>, fitted first (s. 10.7)"),
)}
EXPLANATION_ATTRS = ("f", "embedding", "layers", "order", "self_fill", "hyperparameters", "n_images",
                     "features_fingerprint", "schema_version", "package_version")
EXPLANATION_FINGERPRINT_KEYS = ("f", "embedding", "layers", "order", "self_fill", "hyperparameters", "n_images",
                                "features_fingerprint")


def explanations_name(f: str, embedding: str) -> str:
    """``sum-tokens``: the group of ULTra_S maps of ``tokens`` (f: sum | energy | learned)."""
    return f"{f}-{embedding}"


def templates_name(seed: int) -> str:
    return f"hyperplane-s{seed}"


DATASET_ATTRS = ("dataset", "split", "n_images", "image_size", "classes", "palette", "ignore_index",
                 "image_ids_sha256", "chunk_images", "options")
MODEL_ATTRS = ("model", "timm_name", "family", "weights_source", "weights_sha256", "image_size",
               "input_size", "patch_size", "grid", "num_prefix_tokens", "embed_dim", "num_heads",
               "depth", "mean", "std", "layers", "embeddings", "rope", "last_norm", "chunk_images",
               "dataset_fingerprint", "schema_version", "package_version", "finished")
CODEBOOK_ATTRS = ("method", "k", "seed", "hyperparameters", "features_fingerprint", "schema_version",
                  "package_version")
CODEBOOK_FINGERPRINT_KEYS = ("method", "k", "seed", "hyperparameters", "features_fingerprint")
# The extract request a finished group answers (model, weights identity, geometry, capture
# options, limit, chunk size, dataset fingerprint) and its hash: what ``extract`` checks to
# call a group done without building the model. Written once a run completes the group.
REQUEST_ATTRS = ("request", "request_sha256")
# Set by ``store check --repair`` on a finished group whose feature chunks were marked pending:
# its ``attention_map`` stands (a chunk's attention is determined by the fingerprint), so the
# recomputed chunks write features only, and the group is finished again once all are done.
ATTENTION_FINAL = "attention_final"
# version 2: which class-token arrays the group holds (absent in version 1: tokens only)
CLASS_EMBEDDINGS_ATTR = "class_embeddings"
# what must match for a writer to add to an existing model group (package_version may differ)
MODEL_FINGERPRINT_KEYS = (*(k for k in MODEL_ATTRS if k not in ("package_version", "finished")), CLASS_EMBEDDINGS_ATTR,
                          EXAMPLE_ATTENTION)
# fingerprint keys a group may lack (version 1: class_embeddings; no example_attention): left out
# of its fingerprint hash when absent, so the hash stays the one the group had
OPTIONAL_FINGERPRINT_KEYS = (CLASS_EMBEDDINGS_ATTR, EXAMPLE_ATTENTION)


def class_embeddings(attrs: dict[str, Any]) -> tuple[str, ...]:
    """The embeddings whose class token a group holds (version 1: tokens)."""
    return tuple(attrs.get(CLASS_EMBEDDINGS_ATTR) or ("tokens",))


def dataset_path(dataset: str, split: str) -> str:
    return f"datasets/{dataset}/{split}"


def model_path(model: str, dataset: str, split: str) -> str:
    return f"models/{model}/{dataset}/{split}"


def codebook_name(method: str, k: int, seed: int, variant: str | None = None) -> str:
    """``online-k27-s0``; a variant (PROTOCOL.md 12.2: the same codebook trained with other
    hyperparameters, beside the main one) adds ``-h<short hash of those hyperparameters>``."""
    return f"{method}-k{k}-s{seed}" + (f"-h{variant}" if variant else "")


def codebook_path(model_group: str, name: str) -> str:
    """``<model group>/codebooks/<name>``: where a codebook (or its replacement) lives."""
    return f"{model_group}/codebooks/{name}"


# ``cluster --force`` trains a replacement beside the finished codebook and swaps it in once complete
REPLACEMENT_SUFFIX = ".replacing"


def parse_codebook_name(name: str) -> tuple[str, int, int, str | None]:
    """``"online-k27-s0"`` -> ``("online", 27, 0, None)``; ``"online-k27-s1-h3fa2c1d0"`` ->
    ``("online", 27, 1, "3fa2c1d0")``."""
    head, _, last = name.rpartition("-")
    variant = None
    if last.startswith("h") and head.rpartition("-")[2].startswith("s"):
        name, variant = head, last[1:]
    method, k, seed = name.rsplit("-", 2)
    return method, int(k[1:]), int(seed[1:]), variant


def n_chunks(n_images: int, chunk_images: int) -> int:
    return -(-n_images // chunk_images)


def chunk_bounds(chunk: int, chunk_images: int, n_images: int) -> tuple[int, int]:
    """[start, stop) of the images of image chunk ``chunk``."""
    start = chunk * chunk_images
    return start, min(start + chunk_images, n_images)


def model_array_shapes(attrs: dict[str, Any], n_images: int) -> dict[str, tuple[int, ...]]:
    """The shape of every array of a model group, from its attributes."""
    L, G, D, H = len(attrs["layers"]), attrs["grid"], attrs["embed_dim"], attrs["num_heads"]
    P, C = G * G, n_chunks(n_images, attrs["chunk_images"])
    shapes = {e: (L, n_images, G, G, D) for e in attrs["embeddings"]}
    shapes.update({class_array(e): (L, n_images, D) for e in class_embeddings(attrs)})
    shapes.update(attention_mi=(L, n_images, H), done=(C,))
    final = attrs.get("finished") or attrs.get(ATTENTION_FINAL)
    shapes["attention_map" if final else "attention_sum"] = (L, P, P) if final else (C, L, P, P)
    if attrs.get(EXAMPLE_ATTENTION):
        shapes[EXAMPLE_ATTENTION] = (L, n_examples(n_images), P, P)
    return shapes


def n_examples(n_images: int) -> int:
    """The example images of a split of ``n_images``: its first EXAMPLE_IMAGES."""
    return min(n_images, EXAMPLE_IMAGES)
