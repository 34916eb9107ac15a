"""The report's panels, registered in page order: a new figure is one ``@panel`` function here.

A comparison panel draws ``(data, rows)`` (the report's ``ReportData`` and the compared
settings) into a new figure; a summary panel draws ``(data, k, method)`` once per report; a
directions panel draws ``(data)`` once, in the "direction probes" section, when the results
hold direction probes (PROTOCOL.md section 9.7); a correspondence panel draws ``(data,
dataset, split)`` once per keypoint dataset and split, in its "zero-shot correspondence"
section, when the results hold the ``correspondence`` table (section 11.6). Each carries its
caption and how to read it, which the page prints beneath the figure, and may carry
``when(*args)``: the panel is drawn only where that holds (d5 needs several probed blocks, d4
the stored masks, c3 the stored heatmaps, c4 a before/after pair of the final norm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import figures


@dataclass
class Row:
    """One compared setting: its label and its segmentation row."""

    label: str
    setting: dict[str, Any]


@dataclass(frozen=True)
class Panel:
    key: str
    file: str
    caption: str
    reading: str
    draw: Callable[..., Any]
    when: Callable[..., bool] | None = None  # drawn only where it holds (same arguments as draw)

    def applies(self, *args: Any) -> bool:
        return self.when is None or bool(self.when(*args))


COMPARISON_PANELS: tuple[Panel, ...] = ()
SUMMARY_PANELS: tuple[Panel, ...] = ()
DIRECTION_PANELS: tuple[Panel, ...] = ()
CORRESPONDENCE_PANELS: tuple[Panel, ...] = ()


def panel(key: str, file: str, caption: str, reading: str, *, summary: bool = False, directions: bool = False,
          correspondence: bool = False, when: Callable[..., bool] | None = None) -> Callable:
    """Register the decorated ``draw(...) -> Figure`` as a panel of every comparison (or, with
    ``summary``, of the report's summary section; with ``directions``, of its direction-probe
    section; with ``correspondence``, of each zero-shot correspondence section), drawn only where
    ``when`` (if given) holds."""
    kinds = [name for name, on in (("summary", summary), ("directions", directions),
                                   ("correspondence", correspondence)) if on]
    if len(kinds) > 1:
        raise ValueError(f"panel {key!r}: one of summary, directions or correspondence, not {' and '.join(kinds)}")

    def register(draw: Callable[..., Any]) -> Callable[..., Any]:
        global COMPARISON_PANELS, SUMMARY_PANELS, DIRECTION_PANELS, CORRESPONDENCE_PANELS
        p = Panel(key, file, caption, reading, draw, when)
        if summary:
            SUMMARY_PANELS += (p,)
        elif directions:
            DIRECTION_PANELS += (p,)
        elif correspondence:
            CORRESPONDENCE_PANELS += (p,)
        else:
            COMPARISON_PANELS += (p,)
        return draw
    return register


@panel("a1", "a1_examples", "(a1) exemplary segmentations",
       "Columns are the same test images; the first rows show the image and its ground truth, then one row per "
       "compared setting with its cluster map after Hungarian matching, in the dataset palette. Look for object "
       "shapes (semantic clusters) versus stripes and blocks that follow the image grid (positional clusters).")
def examples(data: Any, rows: list[Row]) -> Any:
    n = min(len(data.gt_images), len(data.gt_labels))
    preds = [(r.label, data.setting_map(r.setting, "examples")[:n]) for r in rows]
    return figures.plot_example_grid(data.gt_images[:n], data.gt_labels[:n], preds, data.palette, data.classes)


@panel("a2", "a2_aggregate", "(a2) aggregate maps",
       "Each pixel mixes the palette colours of the classes predicted there, weighted by how often over the whole "
       "test split. A sharp layout (bands, a frame) that the ground truth's map lacks means the clusters encode "
       "position.")
def aggregate(data: Any, rows: list[Row]) -> Any:
    return figures.plot_aggregate_maps([(r.label, data.setting_map(r.setting, "aggregate")) for r in rows],
                                       data.gt_aggregate)


@panel("b1", "b1_nmi", "(b1) positional effect, NMI",
       "NMI between pixel position and predicted class; the grey bar is the same figure for the ground truth. "
       "Bars far above it mean position explains more of the segmentation than of the labels.")
def nmi_bars(data: Any, rows: list[Row]) -> Any:
    return figures.plot_bars([r.label for r in rows], [r.setting["nmi"] for r in rows],
                             ylabel="NMI (position; class)", reference=data.gt["nmi"]).figure


@panel("b2", "b2_miou", "(b2) mIoU", "mIoU of each setting after matching clusters to classes.")
def miou_bars(data: Any, rows: list[Row]) -> Any:
    return figures.plot_bars([r.label for r in rows], [r.setting["miou"] for r in rows], ylabel="mIoU").figure


@panel("curves", "layer_curves", "layer-wise mIoU",
       "mIoU per layer, one line per embedding type: where in depth the semantic structure peaks.")
def layer_curves(data: Any, rows: list[Row]) -> Any:
    models = sorted({r.setting["model"] for r in rows})
    k, method = rows[0].setting["k"], rows[0].setting["method"]
    seg = data.rows(f"SELECT model, embedding, layer, miou FROM segmentation WHERE k = {int(k)} AND method = "
                    f"'{method}' ORDER BY model, embedding, layer")
    fig = figures.pyplot().figure(figsize=(4.2 * len(models), 2.8), layout="constrained")
    for ax, model in zip(fig.subplots(1, len(models), squeeze=False)[0], models):
        curves: dict[str, tuple[list[int], list[float]]] = {}
        for r in (r for r in seg if r["model"] == model):
            curves.setdefault(r["embedding"], ([], []))
            curves[r["embedding"]][0].append(r["layer"])
            curves[r["embedding"]][1].append(r["miou"])
        figures.plot_layer_curves(curves, title=model, ax=ax)
    return fig


def _setting_condition(s: dict[str, Any]) -> str:
    return (f"source = 'prediction' AND model = '{s['model']}' AND embedding = '{s['embedding']}' "
            f"AND layer = {s['layer']} AND k = {s['k']} AND method = '{s['method']}' AND seed = {s['seed']}")


@panel("classwise", "classwise_mi", "class-wise MI, top classes",
       "Class-wise MI I_c for the classes whose ground-truth position dependence is highest.")
def classwise(data: Any, rows: list[Row]) -> Any:
    series = [(r.label, data.classwise(_setting_condition(r.setting))) for r in rows]
    return figures.plot_classwise_mi(data.classes, data.gt_classwise, series).figure


@panel("attention", "attention", "attention matrices and I(K,Q)",
       "Image- and head-averaged patch attention of the compared layer, binarised at its 95th percentile: a "
       "diagonal band is local attention. Beside it, I(K,Q) per layer.")
def attention(data: Any, rows: list[Row]) -> Any:
    models = sorted({r.setting["model"] for r in rows})
    kq = data.rows("SELECT model, layer, avg(mean) AS kq FROM attention_mi GROUP BY ALL ORDER BY ALL")
    fig = figures.pyplot().figure(figsize=(2.7 * len(rows) + 4.2, 2.8))
    axes = fig.subplots(1, len(rows) + 1, squeeze=False, width_ratios=[1] * len(rows) + [1.5],
                        gridspec_kw={"wspace": 0.45})[0]
    for ax, r in zip(axes, rows):
        figures.plot_attention(data.attention(r.setting["model"], r.setting["layer"]), title=r.label, ax=ax)
    figures.plot_layer_curves({m: ([a["layer"] for a in kq if a["model"] == m], [a["kq"] for a in kq if a["model"] == m])
                               for m in models}, ylabel="I(K,Q) (nats)", title="attention locality", ax=axes[-1])
    return fig


@panel("correlations", "correlations", "correlation scatter plots",
       "Across every evaluated (model, layer, embedding): NMI against log mIoU, and the NMI of keys and queries "
       "against the attention's I(K,Q).", summary=True)
def correlations(data: Any, k: int, method: str) -> Any:
    pts = data.rows(f"SELECT model, embedding, layer, miou, nmi FROM segmentation WHERE k = {int(k)} AND "
                    f"method = '{method}' ORDER BY ALL")
    kq_by = {(a["model"], a["layer"]): a["kq"] for a in
             data.rows("SELECT model, layer, avg(mean) AS kq FROM attention_mi GROUP BY ALL")}
    rho = {c["name"]: c["rho"] for c in data.rows(f"SELECT name, rho FROM correlations WHERE k = {int(k)} AND "
                                                  f"method = '{method}'")}
    fig = figures.pyplot().figure(figsize=(7.4, 2.9), layout="constrained")
    a, b = fig.subplots(1, 2)
    figures.plot_scatter([p["nmi"] for p in pts], np.log([max(p["miou"], 1e-9) for p in pts]), xlabel="NMI",
                         ylabel="log mIoU", rho=rho.get("nmi_vs_log_miou"), groups=[p["embedding"] for p in pts], ax=a)
    kq = [p for p in pts if p["embedding"] in ("keys", "queries") and (p["model"], p["layer"]) in kq_by]
    figures.plot_scatter([kq_by[(p["model"], p["layer"])] for p in kq], [p["nmi"] for p in kq],
                         xlabel="I(K,Q) (nats)", ylabel="NMI of keys/queries", rho=rho.get("kq_nmi_vs_attention_mi"),
                         groups=[p["embedding"] for p in kq], ax=b)
    return fig


# -- direction probes (PROTOCOL.md section 9.7) --------------------------------------------------
_TOKENS = ("Token types: q, k, v = queries, keys, values; x1 = the block's mid tokens (after attention), "
           "x2 = its output tokens, x_n = the normed mid tokens. Block numbers count from 0 (the paper's layer = "
           "block + 1).")
_PROBE_METRICS = ("accuracy", "f1", "precision", "recall")


def _groups(rows: list[dict[str, Any]], *keys: str) -> list[tuple[Any, ...]]:
    return list(dict.fromkeys(tuple(r[k] for k in keys) for r in rows))


def _setting(obj: str, rule: str, k: int | None = None) -> str:
    return f"{obj.replace('_', ' ')}, {rule}" + (f", k = {k}" if rule == "cosine" and k is not None else "")


def _series(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows labelled by model and block, for a legend: '<model> (block <b>)'."""
    return [dict(r, series=f"{r['model']} (block {r['layer']})") for r in rows]


def _grid(n: int, width: float, height: float, columns: int = 4) -> tuple[Any, list[Any]]:
    cols = min(columns, max(n, 1))
    rows = -(-max(n, 1) // cols)
    fig = figures.pyplot().figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


@panel("d1", "d1_token_types", "(d1) direction probes per token type",
       "Balanced accuracy, F1, precision and recall of the concept templates per token type, the mean over "
       "concepts of every category, models side by side; one row per object (patch tokens: segmentation; class "
       "token: classification) and rule (hyperplane: a trained linear template; cosine: the mean direction of k "
       "support images with the F1-best threshold, at the largest k probed, error bars = std over trials). Each "
       "model at its last probed block. " + _TOKENS, directions=True)
def direction_token_types(data: Any) -> Any:
    rows = _series(data.direction_rows())
    groups = _groups(rows, "object", "rule")
    fig, subs = _rows_of_panels(len(groups), 2.7 * len(_PROBE_METRICS) + 1.6)
    for sub, (obj, rule) in zip(subs, groups):
        mine = [r for r in rows if (r["object"], r["rule"]) == (obj, rule)]
        sub.suptitle(_setting(obj, rule, mine[0]["k_shot"]), fontsize=9)
        for j, (ax, metric) in enumerate(zip(sub.subplots(1, len(_PROBE_METRICS)), _PROBE_METRICS)):
            figures.plot_token_bars(mine, metric=metric, hue="series", legend=j == len(_PROBE_METRICS) - 1, ax=ax)
    return fig


def _rows_of_panels(n: int, width: float, height: float = 2.5) -> tuple[Any, list[Any]]:
    """A figure of ``n`` rows, each a subfigure with its own title."""
    fig = figures.pyplot().figure(figsize=(width, height * n), layout="constrained")
    return fig, list(fig.subfigures(n, 1, squeeze=False)[:, 0])


@panel("d2", "d2_categories", "(d2) direction probes per category",
       "F1, precision and recall per category of concepts (one category per label map), one bar per token type; "
       "one row per model, object and rule, as in (d1) (last probed block; cosine at the largest k, error bars = "
       "std over trials). " + _TOKENS, directions=True)
def direction_categories(data: Any) -> Any:
    rows = data.direction_rows(per_category=True)
    groups = _groups(rows, "model", "object", "rule")
    n_bars = len({r["category"] for r in rows}) * len({r["embedding"] for r in rows})
    fig, subs = _rows_of_panels(len(groups), 3 * max(2.8, 0.2 * n_bars + 1.0) + 1.0, 2.7)
    for sub, (model, obj, rule) in zip(subs, groups):
        mine = [r for r in rows if (r["model"], r["object"], r["rule"]) == (model, obj, rule)]
        sub.suptitle(f"{model} (block {mine[0]['layer']}): {_setting(obj, rule, mine[0]['k_shot'])}", fontsize=9)
        for j, (ax, metric) in enumerate(zip(sub.subplots(1, 3), ("f1", "precision", "recall"))):
            figures.plot_token_bars(mine, metric=metric, x="category", hue="embedding", legend=j == 2, ax=ax)
    return fig


def _has_cosine(data: Any) -> bool:
    return any(r["rule"] == "cosine" for r in data.direction_rows())


@panel("d3", "d3_shots", "(d3) cosine templates against the number of support images",
       "Balanced accuracy of the cosine templates against k, the support images per trial (log scale), one line "
       "per token type, error bars = std over trials; one panel per model and object, each model at its last "
       "probed block. " + _TOKENS, directions=True, when=_has_cosine)
def direction_shots(data: Any) -> Any:
    rows = [r for r in data.direction_rows(every_shot=True) if r["rule"] == "cosine"]
    groups = _groups(rows, "model", "object")
    fig, axes = _grid(len(groups), 3.4, 2.6)
    for ax, (model, obj) in zip(axes, groups):
        mine = [r for r in rows if (r["model"], r["object"]) == (model, obj)]
        figures.plot_metric_curves(mine, x="k_shot", metric="accuracy", log_x=True, xlabel="k (support images)",
                                   title=f"{model} (block {mine[0]['layer']}): {obj.replace('_', ' ')}", ax=ax)
    return fig


def _has_masks(data: Any) -> bool:
    return bool(data.direction_masks())


@panel("d4", "d4_masks", "(d4) concept masks of the hyperplane templates",
       "Per model and category, up to five concepts spanning the range of the hyperplane templates' F1 (row label: "
       "the concept and its F1), each on the test image where it covers the largest area: the image, the concept's "
       "ground-truth mask (white) and the patch decisions (white: positive) of the hyperplane template on keys and, "
       "where queries were probed with the cosine rule, of the cosine template on queries (trial 0, the largest k "
       "the concept allows), nearest-upsampled from the patch grid to the image ([D] Sec. 4.5). At the model's "
       "last probed block; keys' hyperplanes where keys were probed, else the first token type's. Images "
       "beyond the few the store keeps are shown black. " + _TOKENS, directions=True, when=_has_masks)
def direction_masks(data: Any) -> Any:
    masks = data.direction_masks()
    models = list(dict.fromkeys(m["model"] for m in masks))
    categories = list(dict.fromkeys(m["category"] for m in masks))
    heights = [max(len(m["names"]) for m in masks if m["model"] == model) for model in models]
    fig = figures.pyplot().figure(figsize=(5.2 * len(categories), 1.25 * sum(heights) + 0.6 * len(models)))
    subs = fig.subfigures(len(models), len(categories), squeeze=False, height_ratios=[h + 0.5 for h in heights])
    for i, model in enumerate(models):
        for j, category in enumerate(categories):
            m = next((m for m in masks if (m["model"], m["category"]) == (model, category)), None)
            if m is None:
                continue
            labels = [f"{name}\nF1 {f1:.2f}" for name, f1 in zip(m["names"], m["f1"])]
            figures.plot_concept_masks(
                m["images"], m["truth"], m["decisions"], labels, fig=subs[i, j], cosine=m["cosine"],
                decision_titles=(f"hyperplane ({figures.token_label(m['embedding'])})",
                                 f"cosine ({figures.token_label(m['cosine_embedding'] or '')})"),
                title=f"{model}: {category} (block {m['layer']})")
    return fig


def _several_layers(data: Any) -> bool:
    rows = data.direction_rows(every_layer=True)
    return any(len({r["layer"] for r in rows if r["model"] == model}) > 1 for model in {r["model"] for r in rows})


@panel("d5", "d5_layers", "(d5) direction probes against the block",
       "F1 of the templates (mean over the concepts of every category) against the block, one line per token type; "
       "one panel per model, object and rule (cosine at the largest k, error bars = std over trials). " + _TOKENS,
       directions=True, when=_several_layers)
def direction_layers(data: Any) -> Any:
    rows = data.direction_rows(every_layer=True)
    groups = _groups(rows, "model", "object", "rule")
    fig, axes = _grid(len(groups), 3.4, 2.6)
    for ax, (model, obj, rule) in zip(axes, groups):
        mine = [r for r in rows if (r["model"], r["object"], r["rule"]) == (model, obj, rule)]
        figures.plot_metric_curves(mine, x="layer", metric="f1", xlabel="block (0-based)",
                                   title=f"{model}: {_setting(obj, rule, mine[0]['k_shot'])}", ax=ax)
    return fig


# -- zero-shot correspondence (PROTOCOL.md section 11.6) -----------------------------------------
_LAYERS = ("Layers are numbered from 1 as in [U] (layer = block + 1). Embeddings: keys (K), queries (Q), values "
           "(V) and tokens (T, the block's output; the last block's after the final norm unless stated), heads "
           "concatenated.")


def _model_rows(data: Any, dataset: str, split: str) -> list[list[Any]]:
    """The models' subplot layout: a row per family, Base left of Large, where any family has
    both (``correspondence_pairs``); else every model in rows of four."""
    models = [m["model"] for m in data.correspondence_models(dataset, split)]
    pairs = data.correspondence_pairs(dataset, split)
    if not pairs:
        return [models[i:i + 4] for i in range(0, len(models), 4)]
    paired = {m for pair in pairs for m in pair}
    return [list(pair) for pair in pairs] + [[m, None] for m in models if m not in paired]


@panel("c1", "c1_pck_layers", "(c1) PCK@0.10 against the layer",
       "PCK per point (%, correct keypoints of every pair pooled; a keypoint is correct when the cosine argmax "
       "lands within alpha max(w_bb, h_bb) of the target's ground truth, alpha = 0.10 or, where 0.10 was not "
       "scored, the nearest alpha, named in the titles) against the layer, one line per embedding, the larger "
       "dot at each line's best layer; one panel per model, Base and Large of a family side by side, on one "
       "y scale ([U] Fig. 15). Look for where in depth each embedding peaks, and whether the last layer drops. "
       + _LAYERS, correspondence=True)
def pck_layers(data: Any, dataset: str, split: str) -> Any:
    rows = data.correspondence_rows(dataset, split)
    alpha = data.correspondence_alpha(dataset, split)
    grid = _model_rows(data, dataset, split)
    cols = max(len(r) for r in grid)
    fig = figures.pyplot().figure(figsize=(3.5 * cols, 2.7 * len(grid)), layout="constrained")
    axes = fig.subplots(len(grid), cols, squeeze=False, sharey=True)
    for i, models in enumerate(grid):
        for j in range(cols):
            model = models[j] if j < len(models) else None
            if model is None:
                axes[i, j].set_visible(False)
                continue
            figures.plot_pck_layers([r for r in rows if r["model"] == model], title=model, legend=(i, j) == (0, 0),
                                    ylabel=f"PCK@{alpha:.2f} (%)", ax=axes[i, j])
    top = max([100 * r["pck_point"] for r in rows if r["pck_point"] is not None] + [1.0])
    axes[0, 0].set_ylim(0, min(100.0, top * 1.1))
    return fig


@panel("c2", "c2_best_layers", "(c2) best-layer PCK@0.10 per embedding (Table 3)",
       "Per model, PCK@0.10 per point (%) of each embedding at its own best layer (K / Q / V / T), the row's "
       "highest in bold, and the model's best layer (1-based, over the model's depth: '9/12' is block 8 of 12); "
       "below, for each family with a Base and a Large model (aliases '<family>-b<patch>' and '<family>-l<patch>'), "
       "Large minus Base in percentage points, green where Large is better. [U] finds Large better for every "
       "model and embedding, and tokens best for most models. The best layer is selected on the evaluated split. "
       + _LAYERS, correspondence=True)
def best_layers(data: Any, dataset: str, split: str) -> Any:
    best = data.correspondence_best(dataset, split)
    embeddings = figures.embedding_order([e for b in best for e in b["pck"]])
    letter = lambda e: figures.CORRESPONDENCE_LETTERS.get(e, e)  # noqa: E731
    rows = [{"label": b["model"] if b["alias"] == b["model"] else f"{b['model']} ({b['alias']})", "pck": b["pck"],
             "best": f"{b['best_layer'] + 1}/{b['depth']} ({letter(b['best_embedding'])})"} for b in best]
    differences = [{"label": f"{d['family']}: Large - Base", "pck": d["pck"]}
                   for d in data.correspondence_differences(dataset, split)]
    n = len(rows) + len(differences)
    fig = figures.pyplot().figure(figsize=(1.0 * len(embeddings) + 4.2, 0.28 * (n + 1) + 0.5))
    figures.plot_pck_table(rows, embeddings, differences=differences,
                           title=f"PCK@{data.correspondence_alpha(dataset, split):.2f} per point (%), best layer "
                                 f"per embedding", ax=fig.subplots())
    return fig


def _has_heatmaps(data: Any, dataset: str, split: str) -> bool:
    return bool(data.correspondence_examples(dataset, split))


@panel("c3", "c3_heatmaps", "(c3) cosine heatmaps of example keypoints",
       "One row per model, embedding and stored example keypoint: the source image with the keypoint (red dot), "
       "then per layer the target image under the cosine similarity between the keypoint's upsampled feature and "
       "every target pixel's (colour map 'plasma', dark blue low to yellow high, scaled to each map's own range; "
       "padding transparent). The ground truth is the green circle, the prediction (the cosine argmax) the green "
       "cross, and the white circle of radius alpha max(w_bb, h_bb) (alpha = 0.10) around the ground truth is the "
       "region where a prediction counts as correct; the embedding's best layer (highest PCK@0.10) is framed "
       "and titled red ([U] Figs. 16-19). At most 12 evenly spaced layers are shown, plus the best. " + _LAYERS,
       correspondence=True, when=_has_heatmaps)
def heatmaps(data: Any, dataset: str, split: str) -> Any:
    return figures.plot_correspondence_heatmaps(data.correspondence_examples(dataset, split))


def _has_ablation(data: Any, dataset: str, split: str) -> bool:
    return bool(data.ln_ablation(dataset, split))


@panel("c4", "c4_final_norm", "(c4) last-layer tokens before and after the final norm (Table 5)",
       "Per model, the score of its last block's tokens taken before (grey) and after (blue) the model's final "
       "LayerNorm, with the difference (after minus before, points) above each pair; one panel per task: "
       "segmentation mIoU (%, K and method in the title, the report's dataset) and correspondence PCK@0.10 "
       "(%, this keypoint dataset) ([U] App. 0.A.11, Table 5; PROTOCOL.md section 12.1). Models are paired by "
       "alias and weights (the view ln_ablation). [U] finds the norm lifts DINOv3's segmentation by about 15 "
       "mIoU points and moves its correspondence by a few.", correspondence=True, when=_has_ablation)
def final_norm(data: Any, dataset: str, split: str) -> Any:
    rows = data.ln_ablation(dataset, split)
    groups = _groups(rows, "task", "measure", "dataset")
    fig, axes = _grid(len(groups), 0.75 * max(len({r["model"] for r in rows}), 2) + 2.4, 2.7, columns=2)
    for ax, (task, measure, ds) in zip(axes, groups):
        mine = [r for r in rows if (r["task"], r["measure"], r["dataset"]) == (task, measure, ds)]
        name = measure.replace("miou", "mIoU").replace("pck_point@", "PCK@")
        figures.plot_ln_ablation(mine, title=f"{task}: {name}, {ds}", ylabel=f"{name.split(' ')[0]} (%)", ax=ax)
    return fig
