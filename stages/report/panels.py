"""The report's panels, registered in page order: a new figure is one ``@panel`` function here.

A comparison panel draws ``(data, rows)`` (the report's ``ReportData`` and the compared
settings) into a new figure; a summary panel draws ``(data, k, method)`` once per report; a
directions panel draws ``(data)`` once, in the "direction probes" section, when the results
hold direction probes (PROTOCOL.md section 9.7); a correspondence panel draws ``(data,
dataset, split)`` once per keypoint dataset and split, in its "zero-shot correspondence"
section, when the results hold the ``correspondence`` table (section 11.6); an ULTra panel
draws ``(data, run_id)`` once per ULTra run, in its subsection of the "ULTra explanations"
section, when the results hold the ``ultra_runs`` table (section 10.9); a sensitivity panel
draws ``(data)`` once, in the "k-means sensitivity" section, when the results hold the
``kmeans_sensitivity`` table (section 12.2). ``rows`` is a ``Selection``: the settings and what
the section shows of them (K, method, the example images, the colouring of the maps). Each
carries its caption and how to read it, which the page prints beneath the figure, may carry
``note(*args)``, a sentence the page adds to the caption for these arguments, and may carry
``when(*args)``: the panel is drawn only where that holds (d5 needs several probed blocks, d4
the stored masks, c3 the stored heatmaps, c4 a before/after pair of the final norm, u1-u3 the
run's stored example maps, u4 its 'dataset' scoring; the training curves, per-class IoU and
confusion matrix their tables).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from rep_pipeline.pipeline.relevance import relevance_sets

from . import figures


@dataclass
class Row:
    """One compared setting: its label and its segmentation row."""

    label: str
    setting: dict[str, Any]


class Selection(list):
    """The rows of one comparison (a list of ``Row``) with what the section shows of them: the
    K and method and how they were chosen (``k_reason``, ``method_reason``), the ``colour`` of
    the example maps (classes or clusters), ``examples`` (indices of the stored example images
    shown; None: all), the class they were picked for (``images_with_class``) and ``layer_k``
    (the K each model's best layer was selected at, where it differs from K)."""

    def __init__(self, rows: Any = (), *, comparison: Any = None, k: int | None = None, method: str | None = None,
                 k_reason: str = "", method_reason: str = "", colour: str = "classes",
                 examples: list[int] | None = None, images_with_class: str | None = None,
                 layer_k: int | None = None):
        super().__init__(rows)
        self.comparison, self.k, self.method = comparison, k, method
        self.k_reason, self.method_reason = k_reason, method_reason
        self.colour, self.examples, self.images_with_class, self.layer_k = colour, examples, images_with_class, layer_k


@dataclass(frozen=True)
class Panel:
    key: str
    file: str
    caption: str
    reading: str
    draw: Callable[..., Any]
    when: Callable[..., bool] | None = None  # drawn only where it holds (same arguments as draw)
    note: Callable[..., str] | None = None  # a sentence added to the caption (same arguments as draw)

    def applies(self, *args: Any) -> bool:
        return self.when is None or bool(self.when(*args))

    def notes(self, *args: Any) -> str:
        return "" if self.note is None else self.note(*args)


COMPARISON_PANELS: tuple[Panel, ...] = ()
SUMMARY_PANELS: tuple[Panel, ...] = ()
DIRECTION_PANELS: tuple[Panel, ...] = ()
CORRESPONDENCE_PANELS: tuple[Panel, ...] = ()
ULTRA_PANELS: tuple[Panel, ...] = ()
SENSITIVITY_PANELS: tuple[Panel, ...] = ()


def panel(key: str, file: str, caption: str, reading: str, *, summary: bool = False, directions: bool = False,
          correspondence: bool = False, ultra: bool = False, sensitivity: bool = False,
          when: Callable[..., bool] | None = None, note: Callable[..., str] | None = None) -> Callable:
    """Register the decorated ``draw(...) -> Figure`` as a panel of every comparison (or, with
    ``summary``, of the report's summary section; with ``directions``, of its direction-probe
    section; with ``correspondence``, of each zero-shot correspondence section; with ``ultra``, of
    each ULTra run's subsection; with ``sensitivity``, of the k-means sensitivity section), drawn
    only where ``when`` (if given) holds; ``note`` (if given) adds a sentence to its caption."""
    kinds = [name for name, on in (("summary", summary), ("directions", directions),
                                   ("correspondence", correspondence), ("ultra", ultra),
                                   ("sensitivity", sensitivity)) if on]
    if len(kinds) > 1:
        raise ValueError(f"panel {key!r}: one of summary, directions, correspondence, ultra or sensitivity, not "
                         f"{' and '.join(kinds)}")

    def register(draw: Callable[..., Any]) -> Callable[..., Any]:
        global COMPARISON_PANELS, SUMMARY_PANELS, DIRECTION_PANELS, CORRESPONDENCE_PANELS, ULTRA_PANELS
        global SENSITIVITY_PANELS
        p = Panel(key, file, caption, reading, draw, when, note)
        if summary:
            SUMMARY_PANELS += (p,)
        elif directions:
            DIRECTION_PANELS += (p,)
        elif correspondence:
            CORRESPONDENCE_PANELS += (p,)
        elif ultra:
            ULTRA_PANELS += (p,)
        elif sensitivity:
            SENSITIVITY_PANELS += (p,)
        else:
            COMPARISON_PANELS += (p,)
        return draw
    return register


def _shown_examples(data: Any, rows: list[Row]) -> list[int]:
    """Indices of the stored example images a1 shows: the selection's (images with a class), else all."""
    n = min(len(data.gt_images), len(data.gt_labels))
    picked = getattr(rows, "examples", None)
    return [i for i in picked if i < n] if picked is not None else list(range(n))


def _by_clusters(data: Any, rows: list[Row]) -> bool:
    return getattr(rows, "colour", "classes") == "clusters"


def _has_clusters(data: Any, rows: list[Row]) -> list[bool]:
    return [data.has_setting_map(r.setting, "clusters") for r in rows]


def _examples_note(data: Any, rows: list[Row]) -> str:
    shown = _shown_examples(data, rows)
    ids = data.example_ids(shown)
    which = (f"Shown: the stored example test images {', '.join(map(str, ids))}" if ids else
             f"Shown: stored example images {', '.join(map(str, shown))}")
    cls = getattr(rows, "images_with_class", None)
    if cls is not None:
        which += (f" (those of the {len(data.gt_images)} stored examples whose ground truth shows '{cls}')"
                  if getattr(rows, "examples", None) is not None and shown else
                  f" (none of the stored examples shows '{cls}': all of them are shown)")
    text = which + "."
    if _by_clusters(data, rows):
        have = _has_clusters(data, rows)
        if all(have):
            text += (" The setting rows are coloured by raw cluster id (a palette of K distinct colours, arbitrary "
                     "and unrelated to the class palette; one colour is one cluster within a row), not by matched "
                     "class, so that clusters mapped to one class stay apart (PROTOCOL.md 12.3).")
        else:
            missing = [r.label for r, h in zip(rows, have) if not h]
            text += (" Colouring by cluster was requested, but the results keep no raw cluster maps ('clusters', "
                     f"written by a newer `rep-pipeline evaluate`) for {', '.join(missing)}: "
                     + ("the rows are" if not any(have) else "that row is" if len(missing) == 1 else
                        "those rows are") + " coloured by matched class instead.")
    return text


@panel("a1", "a1_examples", "(a1) exemplary segmentations",
       "Columns are the same test images; the first rows show the image and its ground truth, then one row per "
       "compared setting with its cluster map after Hungarian matching, in the dataset palette. Look for object "
       "shapes (semantic clusters) versus stripes and blocks that follow the image grid (positional clusters).",
       note=_examples_note)
def examples(data: Any, rows: list[Row]) -> Any:
    clusters = _by_clusters(data, rows)
    maps, palettes = [], []
    for r, have in zip(rows, _has_clusters(data, rows) if clusters else [False] * len(rows)):
        maps.append(data.setting_map(r.setting, "clusters" if have else "examples"))
        palettes.append(figures.cluster_palette(int(r.setting["k"])) if have else None)
    shown = [i for i in _shown_examples(data, rows) if all(i < len(m) for m in maps)]
    return figures.plot_example_grid(data.gt_images[shown], data.gt_labels[shown],
                                     [(r.label, m[shown]) for r, m in zip(rows, maps)], data.palette, data.classes,
                                     palettes=palettes, column_titles=[str(i) for i in data.example_ids(shown)])


def _aggregate_note(data: Any, rows: list[Row]) -> str:
    return (" The aggregate maps are of matched classes even where (a1) colours clusters: the results keep no "
            "per-cluster counts." if _by_clusters(data, rows) else "")


@panel("a2", "a2_aggregate", "(a2) aggregate maps",
       "Each pixel mixes the palette colours of the classes predicted there, weighted by how often over the whole "
       "test split (the legend gives the classes of the ground truth); maps and legend are shown brightened (each "
       f"colour channel c -> 255 (c / 255) ** {figures.AGGREGATE_GAMMA:g}), as the dark palette's mixtures read "
       "as black otherwise. A sharp "
       "layout (bands, a frame) that the "
       "ground truth's map lacks means the clusters encode position; a dark, muddy map mixes many classes.",
       note=_aggregate_note)
def aggregate(data: Any, rows: list[Row]) -> Any:
    return figures.plot_aggregate_maps([(r.label, data.setting_map(r.setting, "aggregate")) for r in rows],
                                       data.gt_aggregate, class_names=data.classes, palette=data.palette,
                                       present=data.gt_present)


_INTERVALS = ("Error bars: 95 % bootstrap intervals over test images, where the results hold them (results written "
              "before intervals were kept have none).")


@panel("b1", "b1_nmi", "(b1) positional effect, NMI",
       "NMI between pixel position and predicted class; the grey bar is the same figure for the ground truth. "
       "Bars far above it mean position explains more of the segmentation than of the labels. " + _INTERVALS)
def nmi_bars(data: Any, rows: list[Row]) -> Any:
    return figures.plot_bars([r.label for r in rows], [r.setting["nmi"] for r in rows],
                             ylabel="NMI (position; class)", reference=data.gt["nmi"],
                             intervals=[figures.interval(r.setting, "nmi") for r in rows],
                             reference_interval=figures.interval(data.gt, "nmi")).figure


@panel("b2", "b2_miou", "(b2) mIoU", "mIoU of each setting after matching clusters to classes. " + _INTERVALS)
def miou_bars(data: Any, rows: list[Row]) -> Any:
    return figures.plot_bars([r.label for r in rows], [r.setting["miou"] for r in rows], ylabel="mIoU",
                             intervals=[figures.interval(r.setting, "miou") for r in rows]).figure


@panel("curves", "layer_curves", "layer-wise mIoU",
       "mIoU per layer, one line per embedding type: where in depth the semantic structure peaks. The panels "
       "share one y scale; bands: 95 % bootstrap intervals over test images, where the results hold them.")
def layer_curves(data: Any, rows: list[Row]) -> Any:
    models = sorted({r.setting["model"] for r in rows})
    k, method = rows[0].setting["k"], rows[0].setting["method"]
    seg = [r for r in data.segmentation_rows() if r["k"] == k and r["method"] == method]
    fig = figures.pyplot().figure(figsize=(4.2 * len(models), 2.8), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False, sharey=True)[0]
    for ax, model in zip(axes, models):
        curves: dict[str, tuple[list[int], list[float], list[Any]]] = {}
        for r in sorted((r for r in seg if r["model"] == model), key=lambda r: (r["embedding"], r["layer"])):
            curves.setdefault(r["embedding"], ([], [], []))
            curves[r["embedding"]][0].append(r["layer"])
            curves[r["embedding"]][1].append(r["miou"])
            curves[r["embedding"]][2].append(figures.interval(r, "miou"))
        figures.plot_layer_curves(curves, title=f"{model} (K = {k}, {method})", ax=ax)
    tops = [v for r in seg if r["model"] in models for v in (r["miou"], (figures.interval(r, "miou") or (0, 0))[1])
            if v is not None and np.isfinite(v)]
    axes[0].set_ylim(0, max(tops + [0.0]) * 1.1 or 1.0)
    return fig


_CLASSWISE_KEYS = ("model", "embedding", "layer", "k", "method", "seed")  # a setting's classwise_mi rows


@panel("classwise", "classwise_mi", "class-wise MI, top classes",
       "Class-wise MI I_c for the classes whose ground-truth position dependence is highest.")
def classwise(data: Any, rows: list[Row]) -> Any:
    series = [(r.label, data.classwise(source="prediction", **{c: r.setting[c] for c in _CLASSWISE_KEYS}))
              for r in rows]
    return figures.plot_classwise_mi(data.classes, data.gt_classwise, series).figure


def _kq_curves(data: Any, models: list[str]) -> dict[str, tuple[list[int], list[float], list[Any]]]:
    """I(K,Q) per layer of each model, the mean over heads, with the heads' 95 % intervals
    averaged where the results hold them."""
    by: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for a in data.attention_rows():
        by.setdefault((a["model"], a["layer"]), []).append(a)
    curves = {}
    for m in models:
        layers = sorted(layer for model, layer in by if model == m)
        values, spans = [], []
        for layer in layers:
            heads = by[(m, layer)]
            values.append(float(np.mean([h["mean"] for h in heads])))
            found = [figures.interval(h, "mean") for h in heads]
            spans.append(None if any(f is None for f in found) else
                         (float(np.mean([f[0] for f in found])), float(np.mean([f[1] for f in found]))))
        curves[m] = (layers, values, spans)
    return curves


@panel("attention", "attention", "attention matrices and I(K,Q)",
       "Image- and head-averaged patch attention of the compared layer, binarised at its 95th percentile: a "
       "diagonal band is local attention. Beside it, I(K,Q) per layer (the mean over heads; band: the heads' 95 % "
       "bootstrap intervals over images, averaged over heads, where the results hold them).")
def attention(data: Any, rows: list[Row]) -> Any:
    models = sorted({r.setting["model"] for r in rows})
    fig = figures.pyplot().figure(figsize=(2.4 * len(rows) + 4.4, 2.9), layout="constrained")
    axes = fig.subplots(1, len(rows) + 1, squeeze=False, width_ratios=[1] * len(rows) + [1.7])[0]
    for ax, r in zip(axes, rows):
        figures.plot_attention(data.attention(r.setting["model"], r.setting["layer"]), title=r.label, ax=ax)
    figures.plot_layer_curves(_kq_curves(data, models), ylabel="I(K,Q) (nats)", title="attention locality",
                              ax=axes[-1])
    axes[-1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    return fig


MAX_QUERY_LAYERS = 4   # single-query maps: at most this many layers per model
MAX_QUERY_IMAGES = 4   # and this many example images


def _query_layers(data: Any, rows: list[Row]) -> dict[str, list[int]]:
    """Per model of the section, the layers whose single-query maps are drawn: the compared
    layer(s) and the model's last (at most ``MAX_QUERY_LAYERS``, evenly spaced, the last kept)."""
    out: dict[str, list[int]] = {}
    for r in rows:
        out.setdefault(r.setting["model"], []).append(int(r.setting["layer"]))
    for model, layers in out.items():
        stored = data.attention_layers(model)
        picked = sorted({*layers, stored[-1]} & set(stored)) if stored else sorted(set(layers))
        if len(picked) > MAX_QUERY_LAYERS:
            picked = [picked[i] for i in figures.shown_layers(len(picked), len(picked) - 1, MAX_QUERY_LAYERS)]
        out[model] = picked
    return out


def _queries_note(data: Any, rows: list[Row]) -> str:
    parts = []
    for model, layers in _query_layers(data, rows).items():
        grid = data.attention_grid(model)
        places = "; ".join(f"{name}: patch (row {q[0]}, col {q[1]})" for name, q in figures.query_positions(grid))
        per_image = " and per example image" if data.has_example_attention(model) else \
            " (per-image rows need `example_attention`, written by `rep-pipeline extract` on request; not stored)"
        parts.append(f"{model}: {grid} x {grid} patch grid, {places}; blocks {', '.join(map(str, layers))}"
                     f"{per_image}")
    return "Queries, rows and columns 0-based: " + ". ".join(parts) + "."


@panel("attention_queries", "attention_queries", "attention maps of single queries",
       "The attention of two query patches over every key patch ([U] Fig. 8b; PROTOCOL.md 12.5): the query's row "
       "of the patch-to-patch attention (head-averaged, rows renormalised) reshaped to the patch grid, each map "
       "scaled to its own range (dark: its least attended keys, yellow: its most attended); the red dot is the "
       "query. The top "
       "rows use the image-averaged matrix, one row per model, columns per query and block; where the results keep "
       "the example images' own attention, rows below lay it over each image. Attention that stays around the dot "
       "is local (positional); attention spread over an object is semantic.", note=_queries_note)
def attention_queries(data: Any, rows: list[Row]) -> Any:
    chosen = _query_layers(data, rows)
    models = list(chosen)
    n_cols = max(2 * len(layers) for layers in chosen.values())
    per_image = {m: data.example_attention(m) for m in models if data.has_example_attention(m)}
    n_images = {m: min(MAX_QUERY_IMAGES, per_image[m][1].shape[1]) for m in per_image}
    heights = [len(models)] + [n_images[m] for m in per_image if n_images[m]]
    fig = figures.pyplot().figure(figsize=(1.45 * n_cols + 1.6, 1.6 * sum(heights) + 0.45 * len(heights)),
                                  layout="constrained")
    subs = fig.subfigures(len(heights), 1, squeeze=False, height_ratios=[h + 0.3 for h in heights])[:, 0]
    top = subs[0].subplots(len(models), n_cols, squeeze=False)
    subs[0].suptitle("image-averaged attention", fontsize=8)
    for i, model in enumerate(models):
        grid = data.attention_grid(model)
        cells = [(name, q, layer) for name, q in figures.query_positions(grid) for layer in chosen[model]]
        for j, (name, q, layer) in enumerate(cells):
            att = data.attention(model, layer)
            figures.plot_query_attention(att[q[0] * grid + q[1]], grid, q, title=f"{name}, block {layer}",
                                         ax=top[i, j])
        for ax in top[i, len(cells):]:
            ax.set_visible(False)
        top[i, 0].set_ylabel(model, fontsize=8)
    for sub, model in zip(subs[1:], [m for m in per_image if n_images[m]]):
        layers, maps, where = per_image[model]
        grid = data.attention_grid(model)
        picked = [layer for layer in chosen[model] if layer in layers] or [layers[-1]]
        picked = picked[:n_cols // 2]
        cells = [(name, q, layer) for name, q in figures.query_positions(grid) for layer in picked]
        axes = sub.subplots(n_images[model], n_cols, squeeze=False)
        sub.suptitle(f"{model}: per example image", fontsize=8)
        for e in range(n_images[model]):
            image = data.gt_images[where[e]] if where[e] is not None else None
            for j, (name, q, layer) in enumerate(cells):
                figures.plot_query_attention(maps[layers.index(layer), e, q[0] * grid + q[1]], grid, q, image=image,
                                             title=f"{name}, block {layer}" if e == 0 else "", ax=axes[e, j])
            for ax in axes[e, len(cells):]:
                ax.set_visible(False)
            ids = data.example_ids([where[e]]) if where[e] is not None else []
            axes[e, 0].set_ylabel(f"image {ids[0] if ids else e}", fontsize=7)
    return fig


def _has_table(table: str) -> Callable[[Any, list[Row]], bool]:
    """A panel's ``when``: the results hold ``table``."""
    return lambda data, rows: data.has_table(table)


@panel("training", "training_curves", "k-means training curves",
       "The loss -mean max_k cos(f, c_k) of each compared setting's codebook against the training step (online: "
       "the batch loss of each Adam step, thin, with its running mean; lloyd: per pass over the data), on the "
       "codebook's train split. A curve still falling at its end means the codebook was not trained to convergence; "
       "curves far apart in their final value fit their features very differently well.", when=_has_table("training_curves"))
def training(data: Any, rows: list[Row]) -> Any:
    series = []
    for r in rows:
        points = data.training_curve(r.setting)
        series.append({"label": r.label, "step": [p["step"] for p in points], "loss": [p["loss"] for p in points]})
    method = rows[0].setting["method"]
    last = max([s["step"][-1] for s in series if s["step"]] + [1])
    fig = figures.pyplot().figure(figsize=(6.4, 3.0), layout="constrained")
    figures.plot_training_curves(series, xlabel="Adam step" if method == "online" else "pass over the data",
                                 log_x=method == "online" and last >= 100,
                                 title=f"{rows[0].setting['train_split']}, K = {rows[0].setting['k']}, {method}",
                                 ax=fig.subplots())
    return fig


@panel("per_class_iou", "per_class_iou", "per-class IoU",
       "IoU of every class after matching, one strip per compared setting on one y scale (0 to 1), the bars in the "
       "class palette; '-' marks a class neither predicted nor present. mIoU is the mean of the strip: look for "
       "which classes carry it and which no cluster finds.", when=_has_table("per_class_iou"))
def per_class_iou(data: Any, rows: list[Row]) -> Any:
    return figures.plot_per_class_iou(data.classes, [(r.label, data.per_class_iou(r.setting)) for r in rows],
                                      data.palette)


def confusion_row(rows: list[Row]) -> Row:
    """The setting whose confusion matrix is shown: the section's best mIoU (the first of equals)."""
    return max(rows, key=lambda r: (np.nan_to_num(r.setting["miou"], nan=-1.0), -rows.index(r)))


def _confusion_note(data: Any, rows: list[Row]) -> str:
    return f"Shown for {confusion_row(rows).label}, the section's best mIoU."


@panel("confusion", "confusion", "confusion matrix, cluster to class",
       "Rows are the clusters of one setting, labelled with the class each is mapped to (Hungarian; '*': by "
       "majority, where K > C), ordered by that class; columns the true classes. Each row is normalised: the share "
       "of the cluster's labelled test pixels in each class (blank: an empty cluster). A clean diagonal is a "
       "semantic codebook; a row spread over many classes is a cluster that follows something else, such as "
       "position.", when=_has_table("confusion"), note=_confusion_note)
def confusion(data: Any, rows: list[Row]) -> Any:
    row = confusion_row(rows)
    matrix, mapped, hungarian = data.confusion(row.setting)
    order = sorted(range(len(matrix)), key=lambda c: (mapped[c] if mapped[c] >= 0 else len(data.classes), c))
    names = [f"c{c} -> " + (data.classes[mapped[c]] if 0 <= mapped[c] < len(data.classes) else "?")
             + ("" if hungarian[c] else "*") for c in order]
    fig = figures.pyplot().figure(figsize=(0.24 * len(data.classes) + 3.2, 0.17 * len(order) + 2.0),
                                  layout="constrained")
    figures.plot_confusion(matrix[order], data.classes, names,
                           title=f"{row.label} (K = {row.setting['k']}, {row.setting['method']})", ax=fig.subplots())
    return fig


def _correlation_rows(data: Any, k: int, method: str) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in data.rows("SELECT * FROM correlations WHERE k = ? AND method = ?",
                                            [int(k), method])} if data.has_table("correlations") else {}


@panel("correlations", "correlations", "correlation scatter plots",
       "Across every evaluated (model, layer, embedding): NMI against log mIoU, and the NMI of keys and queries "
       "against the attention's I(K,Q) (the mean over heads). Titles: Spearman rho with the number of points n and "
       "its two-sided p-value, where the results hold them.", summary=True)
def correlations(data: Any, k: int, method: str) -> Any:
    pts = [p for p in data.segmentation_rows() if p["k"] == k and p["method"] == method]
    kq_by = {(m, layer): v for m, (layers, values, _) in
             _kq_curves(data, sorted({a["model"] for a in data.attention_rows()})).items()
             for layer, v in zip(layers, values)}
    stats = _correlation_rows(data, k, method)
    fig = figures.pyplot().figure(figsize=(8.6, 3.3), layout="constrained")
    a, b = fig.subplots(1, 2)
    first = stats.get("nmi_vs_log_miou", {})
    figures.plot_scatter([p["nmi"] for p in pts], np.log([max(p["miou"], 1e-9) for p in pts]), xlabel="NMI",
                         ylabel="log mIoU", rho=first.get("rho"), n=first.get("n_pairs"), p=first.get("p_value"),
                         groups=[p["embedding"] for p in pts], ax=a)
    kq = [p for p in pts if p["embedding"] in ("keys", "queries") and (p["model"], p["layer"]) in kq_by]
    second = stats.get("kq_nmi_vs_attention_mi", {})
    figures.plot_scatter([kq_by[(p["model"], p["layer"])] for p in kq], [p["nmi"] for p in kq],
                         xlabel="I(K,Q) (nats)", ylabel="NMI of keys/queries", rho=second.get("rho"),
                         n=second.get("n_pairs"), p=second.get("p_value"), groups=[p["embedding"] for p in kq], ax=b)
    return fig


# -- the online k-means' sensitivity (PROTOCOL.md section 12.2) ----------------------------------
def sensitivity_label(r: dict[str, Any], pca_batches: set[int] | None = None) -> str:
    """'bs 24, PCA every 1' (with the PCA batches where the settings differ in them)."""
    label = f"bs {r['batch_images']}, PCA every {r['pca_interval']}"
    return label + (f" of {r['pca_batches']}" if pca_batches is not None and len(pca_batches) > 1 else "")


def sensitivity_groups(rows: list[dict[str, Any]]) -> list[tuple[tuple[Any, ...], list[dict[str, Any]]]]:
    """The sensitivity rows by (model, embedding, layer, K, train split)."""
    keys = list(dict.fromkeys((r["model"], r["embedding"], r["layer"], r["k"], r["train_split"]) for r in rows))
    return [(key, [r for r in rows if (r["model"], r["embedding"], r["layer"], r["k"], r["train_split"]) == key])
            for key in keys]


@panel("sensitivity", "kmeans_sensitivity", "(12.2) mIoU per k-means setting",
       "One column per setting of the online k-means (bs: images per Adam batch; PCA every n: the PCA "
       "initialisation takes every n-th of the first batches), one dot per seed (error bar: its 95 % bootstrap "
       "interval over test images, where the results hold it), the grey bar the mean over seeds; one panel per "
       "model, embedding, layer and K, on one y scale. The expected reading ([U] App. 0.A.2, Fig. 10): a spread "
       "small against the differences between models.", sensitivity=True)
def sensitivity(data: Any) -> Any:
    groups = sensitivity_groups(data.sensitivity_rows())
    fig, axes = _grid(len(groups), 4.6, 3.0, columns=2)
    for ax, (key, mine) in zip(axes, groups):
        batches = {r["pca_batches"] for r in mine}
        settings = list(dict.fromkeys(sensitivity_label(r, batches) for r in mine))
        points = [{"label": s, "points": [(r["seed"], r["miou"], figures.interval(r, "miou")) for r in mine
                                          if sensitivity_label(r, batches) == s]} for s in settings]
        model, embedding, layer, k, train = key
        figures.plot_sensitivity(points, title=f"{model}: {embedding}, block {layer}, K = {k}", ax=ax)
    values = [v for _, mine in groups for r in mine for v in (r["miou"], *(figures.interval(r, "miou") or ()))
              if v is not None]
    if values and axes:
        span = max(values) - min(values)
        pad = 0.15 * span if span > 0 else 0.01
        for ax in axes:
            ax.set_ylim(min(values) - pad, max(values) + pad)
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
       "y scale ([U] Fig. 15); bands: 95 % bootstrap intervals over pairs, where the results hold them. Look for "
       "where in depth each embedding peaks, and whether the last layer drops. " + _LAYERS, correspondence=True)
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
    top = max([100 * v for r in rows for v in (r["pck_point"], (figures.interval(r, "pck_point") or (0, 0))[1])
               if v is not None] + [1.0])
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


# -- ULTra explanations (PROTOCOL.md section 10.9) -------------------------------------------------
_ULTRA = ("Blocks are numbered from 0; M(.) min-max scales a map to [0, 1], S~ is a G x G patch map upsampled "
          "bilinearly to the image.")
MAX_ULTRA_LAYERS = 6      # u1, u2: at most this many explained blocks, evenly spaced, the deepest included
MAX_CUT_LAYERS = 3        # u3: at most this many blocks
MAX_MAP_COLUMNS = 8       # u1, u2: example images side by side while their columns stay within this


def _has_maps(data: Any, run_id: str) -> bool:
    stored = data.ultra_maps(run_id)
    return bool(stored) and min(len(s["images"]) for s in stored) > 0


def _picked(stored: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    return [stored[i] for i in figures.shown_layers(len(stored), len(stored) - 1, limit)]


def _token_map_grid(data: Any, run_id: str, *, masks: bool) -> Any:
    stored = _picked(data.ultra_maps(run_id), MAX_ULTRA_LAYERS)
    n = min(min(len(s["images"]), len(s["token_maps"]), len(s["class_maps"])) for s in stored)
    tokens = [None, *[int(t) for t in stored[0]["tokens"]]]
    layers = [s["layer"] for s in stored]
    cols = max(1, min(n, MAX_MAP_COLUMNS // len(layers)))
    rows = -(-n // cols)
    fig = figures.pyplot().figure(figsize=(cols * (1.15 * len(layers) + 1.2), rows * (1.15 * len(tokens) + 0.45)))
    subs = fig.subfigures(rows, cols, squeeze=False)
    for e in range(n):
        maps = [np.vstack([s["class_maps"][e][None], s["token_maps"][e]]) for s in stored]  # (layer, row, P)
        figures.plot_token_maps(stored[0]["images"][e], maps, tokens, layers, int(stored[0]["grid"]),
                                tau=float(stored[0].get("tau", figures.ULTRA_TAU)) if masks else None,
                                title=f"example image {e}", fig=subs[e // cols, e % cols])
    return fig


@panel("u1", "u1_token_maps", "(u1) explanation maps of chosen tokens across blocks",
       "Per example test image (one block of panels each): the first row is the class token's map, then one row "
       "per chosen patch token, whose patch is the cyan dot; columns are the explained blocks. Each map is M(S~_i), "
       "min-max scaled on its own and laid over the image (colour map 'inferno', dark = irrelevant, yellow = the "
       "most relevant pixels for that token's value). A semantic token lights up its object, not just its "
       "neighbourhood; a map that stays a blob around the dot is local ([X] Figs. 3b, 4). At most six blocks, "
       "evenly spaced with the deepest. " + _ULTRA, ultra=True, when=_has_maps)
def ultra_token_maps(data: Any, run_id: str) -> Any:
    return _token_map_grid(data, run_id, masks=False)


@panel("u2", "u2_masks", "(u2) binary masks of the chosen tokens",
       "The same tokens, blocks and images as (u1), each map turned into its binary mask M_i = [M(S~_i) >= tau] "
       "(tau = 0.2, as ITIoU's headline): the image is shown where the mask holds (outlined white) and darkened "
       "elsewhere ([X] Fig. 3c). The mask is the object the token 'selects'; ITIoU (u6) scores it against the "
       "ground truth of the token's class. " + _ULTRA, ultra=True, when=_has_maps)
def ultra_masks(data: Any, run_id: str) -> Any:
    return _token_map_grid(data, run_id, masks=True)


@panel("u3", "u3_dendrograms", "(u3) per-image dendrograms and segmentations at several cuts",
       "One row per example image and block: the dendrogram of the image's patch tokens (average linkage of the "
       "cosine distances between their min-max scaled maps M(S_i); leaves are tokens, merge heights distances; "
       "the clusters below the run's cut distance zeta are coloured), with dashed lines at the stored cuts; then "
       "the image and its segmentation at each cut (each pixel takes the cluster whose summed upsampled maps are "
       "largest there, Eqs. 7-8; colours are per-image segment ids, arbitrary). Lower cuts give more, smaller "
       "segments ([X] Fig. 13). At most three blocks, evenly spaced with the deepest. " + _ULTRA,
       ultra=True, when=_has_maps)
def ultra_dendrograms(data: Any, run_id: str) -> Any:
    run = data.ultra_run(run_id)
    stored = _picked(data.ultra_maps(run_id), MAX_CUT_LAYERS)
    n = min(min(len(s["linkage"]), len(s["cuts"]), len(s["images"])) for s in stored)
    zetas = [float(z) for z in stored[0].get("zetas", [])]
    n_cuts = min(s["cuts"].shape[1] for s in stored)
    fig = figures.pyplot().figure(figsize=(3.2 + 1.25 * (1 + n_cuts), 1.35 * n * len(stored) + 0.3))
    axes = fig.subplots(n * len(stored), 2 + n_cuts, squeeze=False, width_ratios=[2.6] + [1] * (1 + n_cuts))
    for e in range(n):
        for j, s in enumerate(stored):
            row = axes[e * len(stored) + j]
            figures.plot_dendrogram(s["linkage"][e], cuts=zetas[:n_cuts], colour_below=run["zeta"], ax=row[0])
            row[0].set_title(f"image {e}, block {s['layer']}", fontsize=7)
            figures.plot_segment_map(None, image=s["images"][e], title="image" if e == j == 0 else "", ax=row[1])
            for z in range(n_cuts):
                cut = s["cuts"][e, z]
                name = f"zeta {zetas[z]:g}" if z < len(zetas) else f"cut {z}"
                count = len(np.unique(cut))
                figures.plot_segment_map(cut, image=s["images"][e], ax=row[2 + z],
                                         title=f"{name}\n{count} segment{'s' if count != 1 else ''}")
    fig.subplots_adjust(wspace=0.12, hspace=0.55)
    return fig


def _scored_maps(data: Any, run_id: str) -> list[tuple[str, np.ndarray]]:
    """The run's 'dataset'-scored maps (section 5's ``examples``, mapped class ids) by block."""
    out = []
    for r in data.ultra_rows("segmentation", run_id):
        try:
            out.append((f"{r['method']}, block {r['layer']}\n(K = {r['k']}, mIoU {r['miou']:.2f})",
                        data.setting_map(r, "examples")))
        except Exception:  # noqa: BLE001 - a setting whose maps are missing is left out
            continue
    return out


def _has_scored_maps(data: Any, run_id: str) -> bool:
    return bool(_scored_maps(data, run_id)) and len(data.ultra_ground_truth(run_id)["images"]) > 0


@panel("u4", "u4_segmentations", "(u4) exemplary ULTra segmentations, 'dataset' scoring",
       "As (a1), for the ULTra segmentations: columns are the same test images, the first rows the image and its "
       "ground truth, then one row per explained block with the 'dataset' scoring's class map (each image's "
       "segments clustered by their token descriptors into K = C clusters fitted on the train split, then "
       "Hungarian-matched to the classes over the whole split, section 10.4), in the dataset palette ([X] Fig. 2). "
       "Segments that follow objects but take a wrong colour are good segments with a poor descriptor match. "
       + _ULTRA, ultra=True, when=_has_scored_maps)
def ultra_segmentations(data: Any, run_id: str) -> Any:
    gt = data.ultra_ground_truth(run_id)
    preds = _scored_maps(data, run_id)
    n = min([len(gt["images"]), len(gt["labels"])] + [len(p) for _, p in preds])
    return figures.plot_example_grid(gt["images"][:n], gt["labels"][:n], [(label, p[:n]) for label, p in preds],
                                     gt["palette"], gt["classes"])


def _has_scores(data: Any, run_id: str) -> bool:
    return bool(data.ultra_rows("ultra_oracle", run_id) or data.ultra_rows("segmentation", run_id))


def _score_series(data: Any, run_id: str, metric: str) -> list[dict[str, Any]]:
    """The oracle's (solid) and the 'dataset' scoring's (dashed) ``metric`` against the block."""
    series = []
    for i, (table, name, style) in enumerate((("ultra_oracle", "per-image oracle", "-"),
                                              ("segmentation", "dataset scoring (K = C)", "--"))):
        rows = sorted(data.ultra_rows(table, run_id), key=lambda r: r["layer"])
        if rows:
            series.append({"x": [r["layer"] for r in rows], "y": [r[metric] for r in rows], "linestyle": style,
                           "colour": figures.COLOURS[i], "label": name})
    return series


@panel("u5", "u5_scores", "(u5) ULTra segmentation scores against the block (and zeta)",
       "mIoU (left) and pixel accuracy (right) of the run's per-image segmentations against the block: solid, the "
       "per-image oracle (each image's segments Hungarian-matched to its own classes, an optimistic bound that "
       "uses the labels per image, [X]'s unstated matching read generously); dashed, the 'dataset' scoring (one "
       "K = C matching for the whole split, comparable with the k-means rows of the other sections), where a "
       "train split was given ([X] Figs. 6, 7). Where other runs of the model differ from this one only in the cut "
       "distance zeta, a second row shows the same against zeta, one colour per block, this run's zeta dotted "
       "([X] Fig. 12). " + _ULTRA, ultra=True, when=_has_scores)
def ultra_scores(data: Any, run_id: str) -> Any:
    family = data.ultra_zeta_runs(run_id)
    fig = figures.pyplot().figure(figsize=(7.6, 2.8 * (2 if family else 1)), layout="constrained")
    axes = fig.subplots(2 if family else 1, 2, squeeze=False)
    for j, (metric, name) in enumerate((("miou", "mIoU"), ("pixel_accuracy", "pixel accuracy"))):
        figures.plot_line_series(_score_series(data, run_id, metric), xlabel="block (0-based)",
                                 ylabel=name, title=f"{name} against the block", integer_x=True, ax=axes[0, j])
        if family:
            figures.plot_line_series(_zeta_series(data, family, metric), xlabel="zeta (cut distance)", ylabel=name,
                                     title=f"{name} against zeta",
                                     mark_x=data.ultra_run(run_id)["zeta"], ax=axes[1, j])
    return fig


def _zeta_series(data: Any, family: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per block, ``metric`` against the runs' zeta: the oracle solid, the 'dataset' scoring dashed."""
    layers = sorted({r["layer"] for f in family for r in data.ultra_rows("ultra_oracle", f["run_id"])}
                    | {r["layer"] for f in family for r in data.ultra_rows("segmentation", f["run_id"])})
    series = []
    for i, layer in enumerate(layers):
        for table, name, style in (("ultra_oracle", "oracle", "-"), ("segmentation", "dataset", "--")):
            points = sorted((f["zeta"], r[metric]) for f in family for r in data.ultra_rows(table, f["run_id"])
                            if r["layer"] == layer)
            if points:
                series.append({"x": [p[0] for p in points], "y": [p[1] for p in points], "linestyle": style,
                               "colour": figures.COLOURS[i % len(figures.COLOURS)], "label": f"{name}, block {layer}"})
    return series


def _has_itiou(data: Any, run_id: str) -> bool:
    return bool(data.ultra_rows("ultra_itiou", run_id))


@panel("u6", "u6_itiou", "(u6) ITIoU against the threshold tau and the block",
       "ITIoU: per image, the mean over the classes of its labelled tokens of the mean IoU between each token's "
       "mask [M(S~_i) >= tau] and the ground truth of the token's class (ignore pixels left out), then the mean "
       "over images (section 10.5). Left: against tau, one line per block ([X] Fig. 10: an interior optimum; "
       "tau = 0 selects the whole image, tau = 1 a single pixel); right: at tau = 0.2 (dotted on the left) against "
       "the block ([X] Fig. 11: deeper blocks higher). " + _ULTRA, ultra=True, when=_has_itiou)
def ultra_itiou(data: Any, run_id: str) -> Any:
    rows = data.ultra_rows("ultra_itiou", run_id)
    layers = sorted({r["layer"] for r in rows})
    fig = figures.pyplot().figure(figsize=(7.6, 2.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    figures.plot_line_series([{"x": [r["tau"] for r in rows if r["layer"] == layer],
                               "y": [r["itiou"] for r in rows if r["layer"] == layer], "label": f"block {layer}"}
                              for layer in layers], xlabel="tau (threshold of M(S~))", ylabel="ITIoU",
                             title="ITIoU against tau", mark_x=figures.ULTRA_TAU, ax=left)
    headline = {}
    for r in rows:
        if abs(r["tau"] - figures.ULTRA_TAU) < abs(headline.get(r["layer"], {}).get("tau", np.inf) - figures.ULTRA_TAU):
            headline[r["layer"]] = r
    tau = next(iter(headline.values()))["tau"]
    figures.plot_line_series([{"x": layers, "y": [headline[layer]["itiou"] for layer in layers],
                               "label": f"tau = {tau:g}"}], xlabel="block (0-based)", ylabel="ITIoU",
                             title=f"ITIoU at tau = {tau:g} against the block", integer_x=True, ax=right)
    return fig


def _has_perturbation(data: Any, run_id: str) -> bool:
    return _has_maps(data, run_id) or bool(data.ultra_rows("ultra_perturbation", run_id))


@panel("u7", "u7_perturbation", "(u7) the perturbation test",
       "Top: one example image and one chosen token (cyan dot) at the deepest explained block: its map M(S~_i), "
       "then its positive set (the fraction rho of the other patches with the highest S_i, shaded vermilion) and "
       "its negative set (the rho with the lowest, shaded blue); the token's own patch is never perturbed. The "
       "test perturbs one set at a time in the model input ('mask': the pixels set to the mean colour; 'noise': "
       "0.3 N(0, 1) added in normalised space) and measures how far the token's embedding moves, "
       "||z_i - z~_i||. Bottom: per perturbation and block, the mean distance over images (error bars = std over "
       "images) with the negative (blue) and the positive (vermilion) set perturbed; above each pair, positive "
       "minus negative with its 95 % bootstrap interval over images. A faithful map gives positive > negative, "
       "an interval above 0 ([X] Fig. 9, Tables 3, 6). " + _ULTRA, ultra=True, when=_has_perturbation)
def ultra_perturbation(data: Any, run_id: str) -> Any:
    stored = data.ultra_maps(run_id) if _has_maps(data, run_id) else []
    rows = data.ultra_rows("ultra_perturbation", run_id)
    modes = list(dict.fromkeys(r["perturbation"] for r in rows))
    parts = [part for part, on in (("sets", bool(stored)), ("bars", bool(modes))) if on]
    height = 2.2 * len(parts) + 0.6 * ("bars" in parts)
    fig = figures.pyplot().figure(figsize=(max(7.0, 3.4 * len(modes) + 1.6), height), layout="constrained")
    subs = dict(zip(parts, fig.subfigures(len(parts), 1, squeeze=False)[:, 0]))
    if stored:
        s = stored[-1]
        tokens = [int(t) for t in s["tokens"]]
        which = len(tokens) // 2
        token, grid, image = tokens[which], int(s["grid"]), s["images"][0]
        s_i = s["token_maps"][0][which]
        rho = float(s.get("rho", rows[0]["fraction"] if rows else 0.5))
        positive, negative = relevance_sets(s_i, token, rho)
        axes = subs["sets"].subplots(1, 4)
        figures.plot_token_on_image(image, token, grid, title=f"image 0, token {token}", ax=axes[0])
        figures.plot_explanation_map(image, s_i, grid, token=token, title=f"M(S~_i), block {s['layer']}", ax=axes[1])
        figures.plot_relevance_set(image, positive, grid, token=token, colour=figures.POSITIVE_COLOUR,
                                   title=f"positive set ({len(positive)} patches)", ax=axes[2])
        figures.plot_relevance_set(image, negative, grid, token=token, colour=figures.NEGATIVE_COLOUR,
                                   title=f"negative set ({len(negative)} patches)", ax=axes[3])
    if modes:
        axes = subs["bars"].subplots(1, len(modes), squeeze=False)[0]
        for j, (ax, mode) in enumerate(zip(axes, modes)):
            mine = [r for r in rows if r["perturbation"] == mode]
            figures.plot_perturbation_bars(mine, title=f"{mode}, rho = {mine[0]['fraction']:g}\n"
                                                       f"{mine[0]['tokens_per_image']} tokens per image, "
                                                       f"{mine[0]['n_images']} images", legend=j == len(modes) - 1,
                                           ax=ax)
    return fig
