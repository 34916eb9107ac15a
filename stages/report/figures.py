"""The figures of the visual protocol (PROTOCOL.md section 6), of the direction probes
(section 9.7, d1-d5), of the ULTra explanations (section 10.9, u1-u7) and of the zero-shot
correspondence (section 11.6, c1-c4), one function per panel.

Each ``plot_*`` draws on the axes (or figure) it is given and creates them only when none
is given, as xarray's plot helpers do; none writes files (the report stage does). matplotlib
is imported lazily, with a non-interactive backend.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np

from rep_pipeline.pipeline.arrays import minmax
from rep_pipeline.pipeline.config import IGNORE_INDEX
from rep_pipeline.pipeline.upsample import scaled_upsampled

STYLE = {
    "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "axes.spines.top": False,
    "axes.spines.right": False, "figure.dpi": 110, "savefig.bbox": "tight", "legend.frameon": False,
    "axes.prop_cycle": None,  # filled below with a colour-blind-safe cycle
}
COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
GT_COLOUR = "#7f7f7f"
AGGREGATE_GAMMA = 0.5  # (a2) the aggregate maps' display brightening (figures.brighten)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def style() -> Iterator[None]:
    plt = pyplot()
    from cycler import cycler

    with plt.rc_context({**STYLE, "axes.prop_cycle": cycler(color=COLOURS)}):
        yield


def _axes(ax: Any, figsize: tuple[float, float] = (4.0, 3.0)) -> Any:
    if ax is not None:
        return ax
    return pyplot().subplots(figsize=figsize)[1]


def colourise(classes: np.ndarray, palette: np.ndarray, ignore: int = IGNORE_INDEX) -> np.ndarray:
    """Class-id maps -> RGB with the dataset palette; ignore pixels white."""
    pal = np.vstack([palette.astype(np.uint8), np.zeros((256 - len(palette), 3), np.uint8)])
    rgb = pal[np.asarray(classes, dtype=np.int64).clip(0, 255)]
    rgb[np.asarray(classes) == ignore] = 255
    return rgb


def class_legend(ax: Any, names: Sequence[str], palette: np.ndarray, present: Sequence[int] | None = None,
                 ncol: int = 1) -> None:
    from matplotlib.patches import Patch

    idx = range(len(names)) if present is None else present
    handles = [Patch(facecolor=np.asarray(palette[i]) / 255, edgecolor="0.6", label=names[i]) for i in idx]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, ncol=ncol)


def cluster_palette(n: int) -> np.ndarray:
    """``n`` distinguishable RGB colours (uint8) for raw cluster ids (overclustering, PROTOCOL.md
    12.3: 97 clusters): hues stepped by the golden ratio, in three saturation and brightness
    levels, so neighbouring ids differ strongly. Cluster colours are arbitrary labels."""
    import colorsys

    out = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        sat = (0.85, 0.55, 1.0)[(i // 3) % 3]
        val = (0.95, 0.75, 0.55)[i % 3]
        out.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)])
    return np.asarray(out, dtype=np.uint8).reshape(-1, 3)


def plot_example_grid(images: np.ndarray, ground_truth: np.ndarray, rows: Sequence[tuple[str, np.ndarray]],
                      palette: np.ndarray, class_names: Sequence[str], *, fig: Any = None,
                      palettes: Sequence[np.ndarray | None] | None = None, column_titles: Sequence[str] = ()) -> Any:
    """(a1) columns: the same exemplary test images; rows: image, ground truth, then one row of
    matched predictions per compared setting, all coloured with the dataset palette (or, where
    ``palettes[i]`` is given, row i's maps are raw cluster ids coloured with that palette)."""
    n = len(images)
    n_rows = 2 + len(rows)
    fig = fig or pyplot().figure(figsize=(1.3 * n + 1.8, 1.3 * n_rows))
    axes = fig.subplots(n_rows, max(n, 1), squeeze=False)
    labels = ["image", "ground truth"] + [name for name, _ in rows]
    own = [None, None, *(palettes or [None] * len(rows))]
    for r, (row_label, maps) in enumerate([("image", images), ("ground truth", ground_truth), *rows]):
        for c in range(n):
            ax = axes[r, c]
            colours = palette if own[r] is None else own[r]
            ax.imshow(maps[c] if r == 0 else colourise(maps[c], colours), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
        axes[r, 0].set_ylabel(labels[r], rotation=0, ha="right", va="center", fontsize=8)
    for c, title in enumerate(list(column_titles)[:n]):
        axes[0, c].set_title(title, fontsize=6.5)
    present = sorted(set(np.unique(ground_truth).tolist()) - {IGNORE_INDEX})
    class_legend(axes[1, -1], class_names, palette, present)
    fig.subplots_adjust(wspace=0.03, hspace=0.03)
    return fig


def plot_aggregate_maps(rows: Sequence[tuple[str, np.ndarray]], ground_truth: np.ndarray, *, fig: Any = None,
                        class_names: Sequence[str] | None = None, palette: np.ndarray | None = None,
                        present: Sequence[int] | None = None, size: float = 2.4, columns: int = 5,
                        gamma: float = AGGREGATE_GAMMA) -> Any:
    """(a2) aggregate maps: per pixel, the palette colours of the predicted classes mixed by
    their frequency over the test split; the ground truth's first. Each map ``size`` inches wide,
    at most ``columns`` per row, with the legend of the classes ``present`` (given
    ``class_names`` and ``palette``). Maps and legend are shown brightened by ``gamma`` (each
    channel c -> 255 (c / 255) ** gamma; 1: as stored): mixtures of the dark VOC colours read
    as black otherwise."""
    panels = [("ground truth", ground_truth), *rows]
    cols = min(columns, len(panels))
    n_rows = -(-len(panels) // cols)
    legend = class_names is not None and palette is not None
    fig = fig or pyplot().figure(figsize=(size * cols + (1.9 if legend else 0.2), (size + 0.35) * n_rows))
    axes = fig.subplots(n_rows, cols, squeeze=False).ravel()
    for ax, (label, rgb) in zip(axes, panels):
        ax.imshow(brighten(rgb, gamma), interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if legend:
        class_legend(axes[cols - 1], class_names, brighten(palette, gamma), present)
    fig.subplots_adjust(wspace=0.06, hspace=0.18)
    return fig


def brighten(rgb: np.ndarray, gamma: float = AGGREGATE_GAMMA) -> np.ndarray:
    """uint8 colours with each channel c -> 255 (c / 255) ** gamma (black and white unchanged)."""
    rgb = np.asarray(rgb)
    if gamma == 1:
        return rgb
    return (255 * (rgb.astype(np.float32) / 255) ** gamma).round().clip(0, 255).astype(np.uint8)


def interval(row: Any, column: str) -> tuple[float, float] | None:
    """The 95 % interval ``(<column>_lo, <column>_hi)`` of a table row, None where the row has no
    such columns (results written before they existed) or they are null."""
    get = row.get if hasattr(row, "get") else (lambda _: None)
    lo, hi = get(f"{column}_lo"), get(f"{column}_hi")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    return float(lo), float(hi)


def _yerr(values: Sequence[float], intervals: Sequence[tuple[float, float] | None] | None) -> np.ndarray | None:
    """Asymmetric error bars (2, n) from intervals; None where none is given."""
    if not intervals or all(i is None for i in intervals):
        return None
    vals = np.asarray(values, float)
    lo = np.array([v if i is None else i[0] for v, i in zip(vals, intervals)])
    hi = np.array([v if i is None else i[1] for v, i in zip(vals, intervals)])
    return np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])


def plot_bars(labels: Sequence[str], values: Sequence[float], *, ylabel: str, reference: float | None = None,
              reference_label: str = "ground truth", intervals: Sequence[tuple[float, float] | None] | None = None,
              reference_interval: tuple[float, float] | None = None, ax: Any = None) -> Any:
    """(b1)/(b2) one bar per compared setting, optionally with the ground truth's value; error
    bars from ``intervals`` (95 % intervals, None for a bar without one)."""
    ax = _axes(ax, (max(3.0, 0.55 * len(labels) + 1.5), 2.8))
    names, vals = list(labels), list(values)
    spans = list(intervals) if intervals is not None else [None] * len(vals)
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(names))]
    if reference is not None:
        names, vals, colours = [reference_label] + names, [reference] + vals, [GT_COLOUR] + colours
        spans = [reference_interval] + spans
    yerr = _yerr(vals, spans)
    ax.bar(range(len(names)), vals, color=colours, yerr=yerr, capsize=3 if yerr is not None else 0,
           error_kw={"elinewidth": 0.9})
    tops = [v for v in vals if np.isfinite(v)] + [s[1] for s in spans if s is not None] + [0.0]
    top = max(tops) or 1.0
    for i, (v, s) in enumerate(zip(vals, spans)):  # each value above its bar and error bar
        if np.isfinite(v):
            ax.text(i, max(v, s[1] if s is not None else v) + 0.02 * top, f"{v:.3f}", ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, top * 1.18)
    return ax


def plot_layer_curves(curves: dict[str, tuple], *, ylabel: str = "mIoU", title: str = "", ax: Any = None,
                      band_label: str | None = None) -> Any:
    """Layer-wise curves, one line per label (embedding type or model): ``(layers, values)``, or
    ``(layers, values, intervals)`` with a 95 % interval (or None) per point, shown as a band."""
    ax = _axes(ax, (4.2, 2.8))
    for i, (label, curve) in enumerate(curves.items()):
        layers, values = list(curve[0]), [np.nan if v is None else float(v) for v in curve[1]]
        colour = COLOURS[i % len(COLOURS)]
        ax.plot(layers, values, marker="o", markersize=3, label=label, color=colour)
        spans = curve[2] if len(curve) > 2 else None
        if spans and any(s is not None for s in spans):
            lo = [v if s is None else s[0] for v, s in zip(values, spans)]
            hi = [v if s is None else s[1] for v, s in zip(values, spans)]
            ax.fill_between(layers, lo, hi, color=colour, alpha=0.18, linewidth=0,
                            label=band_label if i == 0 and band_label else None)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=7)
    return ax


def plot_classwise_mi(class_names: Sequence[str], ground_truth: np.ndarray, rows: Sequence[tuple[str, np.ndarray]],
                      *, top: int = 8, ax: Any = None) -> Any:
    """Class-wise MI I_c of the classes with the highest ground-truth MI, per setting."""
    order = np.argsort(-np.nan_to_num(ground_truth))[:top]
    series = [("ground truth", ground_truth), *rows]
    ax = _axes(ax, (max(4.0, 0.6 * len(order) * max(1, len(series) / 2)), 2.8))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        colour = GT_COLOUR if i == 0 else COLOURS[(i - 1) % len(COLOURS)]
        ax.bar(np.arange(len(order)) + i * width, np.asarray(values)[order], width, label=label, color=colour)
    ax.set_xticks(np.arange(len(order)) + 0.4 - width / 2, [class_names[i] for i in order], rotation=30, ha="right")
    ax.set_ylabel("class-wise MI (nats)")
    ax.legend(fontsize=7)
    return ax


def binarise(attention: np.ndarray, percentile: float = 95.0) -> np.ndarray:
    return attention >= np.percentile(attention, percentile)


def plot_attention(attention: np.ndarray, *, title: str = "", percentile: float = 95.0, ax: Any = None) -> Any:
    """Mean patch-to-patch attention binarised at its ``percentile``: a diagonal band means
    local attention, vertical stripes mean a few patches attended by all."""
    ax = _axes(ax, (2.6, 2.6))
    ax.imshow(binarise(attention, percentile), cmap="Greys", interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("key patch")
    ax.set_ylabel("query patch")
    ax.set_xticks([]), ax.set_yticks([])
    return ax


def spearman_text(rho: float | None, n: int | None = None, p: float | None = None) -> str:
    """'Spearman rho = -0.59 (n = 120, p = 3e-12)': n and p where known."""
    text = "Spearman rho = " + ("n/a" if rho is None or not np.isfinite(rho) else f"{rho:.2f}")
    extra = [f"n = {n}"] if n is not None else []
    if p is not None and np.isfinite(p):
        extra.append(f"p = {p:.2g}")
    return text + (f" ({', '.join(extra)})" if extra else "")


def plot_scatter(x: Sequence[float], y: Sequence[float], *, xlabel: str, ylabel: str, rho: float | None,
                 groups: Sequence[str] | None = None, n: int | None = None, p: float | None = None,
                 ax: Any = None) -> Any:
    """A correlation scatter with its Spearman rho (and, where given, n and p) in the title; at
    most five ticks per axis, so long tick labels do not run into each other."""
    from matplotlib.ticker import MaxNLocator

    ax = _axes(ax, (3.4, 2.8))
    x, y = np.asarray(x, float), np.asarray(y, float)
    if groups is None:
        ax.scatter(x, y, s=12)
    else:
        for i, g in enumerate(sorted(set(groups))):
            sel = np.asarray(groups) == g
            ax.scatter(x[sel], y[sel], s=12, label=g, color=COLOURS[i % len(COLOURS)])
        if len(set(groups)):
            ax.legend(fontsize=7, loc="best")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.ticklabel_format(style="sci", scilimits=(-3, 4), useOffset=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(spearman_text(rho, n, p), fontsize=8)
    return ax


def plot_training_curves(series: Sequence[Any], *, xlabel: str = "step", log_x: bool = False, title: str = "",
                         ax: Any = None) -> Any:
    """k-means training curves: ``series`` mappings with ``label``, ``step`` and ``loss`` (the batch
    loss -mean max_k cos(f, c_k), lower is better), one line each; ``log_x`` a log step axis."""
    ax = _axes(ax, (4.2, 2.8))
    for i, s in enumerate(series):
        ax.plot(list(s["step"]), list(s["loss"]), linewidth=1.0, label=s["label"], color=COLOURS[i % len(COLOURS)])
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("k-means loss (-mean max cos)")
    ax.set_title(title)
    if series:
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_per_class_iou(class_names: Sequence[str], rows: Sequence[tuple[str, np.ndarray]], palette: np.ndarray, *,
                       fig: Any = None) -> Any:
    """Per-class IoU: one strip per compared setting (``rows``: label, IoU per class, NaN where
    the class is neither predicted nor present), one bar per class in its palette colour, on one
    y scale (0 to 1); class names under the last strip."""
    n = max(len(rows), 1)
    width = max(5.0, 0.24 * len(class_names) + 1.8)
    fig = fig or pyplot().figure(figsize=(width, 1.05 * n + 1.3), layout="constrained")
    axes = fig.subplots(n, 1, squeeze=False, sharex=True, sharey=True)[:, 0]
    x = np.arange(len(class_names))
    colours = [np.asarray(palette[i % len(palette)]) / 255 for i in range(len(class_names))]
    for ax, (label, values) in zip(axes, rows):
        values = np.asarray(values, float)
        ax.bar(x, np.nan_to_num(values), color=colours, edgecolor="0.5", linewidth=0.4)
        for xi in x[~np.isfinite(values)]:
            ax.text(xi, 0.02, "-", ha="center", va="bottom", fontsize=6, color="0.5")
        mean = np.nanmean(values) if np.isfinite(values).any() else np.nan
        ax.set_title(f"{label}: mIoU {mean:.3f}" if np.isfinite(mean) else label, fontsize=8, loc="left")
        ax.set_ylabel("IoU")
    axes[0].set_ylim(0, 1.0)
    axes[-1].set_xticks(x, list(class_names), rotation=60, ha="right", fontsize=7)
    axes[-1].set_xlim(-0.6, len(class_names) - 0.4)
    return fig


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], cluster_labels: Sequence[str], *,
                   title: str = "", ax: Any = None) -> Any:
    """The confusion matrix of one setting, rows = clusters (``cluster_labels``), columns = true
    classes, each row normalised to sum 1 (the share of the cluster's labelled pixels per class;
    an empty cluster's row stays blank)."""
    m = np.asarray(matrix, float)
    totals = m.sum(axis=1, keepdims=True)
    share = np.where(totals > 0, m / np.where(totals > 0, totals, 1), np.nan)
    n_rows, n_cols = share.shape
    ax = _axes(ax, (0.22 * n_cols + 2.6, 0.17 * n_rows + 1.6))
    image = ax.imshow(np.ma.masked_invalid(share), cmap="Blues", vmin=0, vmax=1, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(n_cols), list(class_names), rotation=60, ha="right", fontsize=6.5)
    ax.set_yticks(range(n_rows), list(cluster_labels), fontsize=6.5 if n_rows <= 40 else 5)
    ax.set_xlabel("true class")
    ax.set_ylabel("cluster (-> its mapped class)")
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="share of the cluster's pixels")
    return ax


def query_positions(grid: int) -> list[tuple[str, tuple[int, int]]]:
    """The two query patches of the single-query attention maps ([U] Fig. 8b): one at the centre
    of the G x G grid and one near its top-left corner (a tenth of the grid in from each side)."""
    near = min(int(0.1 * grid), grid - 1)
    return [("centre", (grid // 2, grid // 2)), ("corner", (near, near))]


def plot_query_attention(row: np.ndarray, grid: int, query: tuple[int, int], *, image: np.ndarray | None = None,
                         title: str = "", ax: Any = None) -> Any:
    """One query's attention over the key patches (``row``: G * G values, row-major), shown as a
    G x G map scaled to its own range, minimum to maximum (colour map 'viridis'), or laid over
    ``image`` (its pixels upsampled from the grid); the query patch is marked with a red dot."""
    ax = _axes(ax, (1.5, 1.5))
    att = minmax(np.asarray(row, np.float32).reshape(grid, grid))
    if image is None:
        ax.imshow(att, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        centre = (query[0], query[1])
    else:
        size = np.asarray(image).shape[0]
        ax.imshow(image, interpolation="nearest")
        ax.imshow(upsample_nearest(att, size), cmap="viridis", vmin=0, vmax=1, alpha=0.65, interpolation="nearest")
        centre = ((query[0] + 0.5) * size / grid - 0.5, (query[1] + 0.5) * size / grid - 0.5)
    ax.plot([centre[1]], [centre[0]], marker="o", markersize=4, color="red", markeredgecolor="white",
            markeredgewidth=0.6, linestyle="none")
    ax.set_title(title, fontsize=7)
    _image_axes(ax)
    return ax


def plot_sensitivity(groups: Sequence[Any], *, ylabel: str = "mIoU", title: str = "", ax: Any = None) -> Any:
    """(12.2) one column per k-means setting (``groups``: mappings with ``label`` and ``points``, a
    list of (seed, value, interval or None)): every seed's value as a dot (error bar: its 95 %
    interval where known), the settings' mean as a short bar; the spread is visible at a glance."""
    ax = _axes(ax, (max(3.2, 0.9 * len(groups) + 1.4), 2.8))
    seeds = sorted({p[0] for g in groups for p in g["points"]})
    offsets = {s: (i - (len(seeds) - 1) / 2) * min(0.12, 0.6 / max(len(seeds), 1)) for i, s in enumerate(seeds)}
    for j, g in enumerate(groups):
        vals = [p[1] for p in g["points"]]
        for seed, value, span in g["points"]:
            i = seeds.index(seed)
            yerr = None if span is None else [[max(value - span[0], 0)], [max(span[1] - value, 0)]]
            ax.errorbar([j + offsets[seed]], [value], yerr=yerr, marker="o", markersize=4, capsize=2,
                        elinewidth=0.8, linestyle="none", color=COLOURS[i % len(COLOURS)],
                        label=f"seed {seed}" if j == 0 else None)
        if vals:
            ax.hlines(np.mean(vals), j - 0.3, j + 0.3, color="0.3", linewidth=1.2,
                      label="mean over seeds" if j == 0 else None)
    ax.set_xticks(range(len(groups)), [g["label"].replace(", ", "\n") for g in groups], fontsize=7)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if groups:
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


# -- direction probes (PROTOCOL.md section 9.7) --------------------------------------------------
TOKEN_TYPES = {"queries": "q", "keys": "k", "values": "v", "mid_tokens": "x1", "tokens": "x2", "mid_normed": "x_n"}
METRIC_NAMES = {"accuracy": "accuracy", "f1": "F1", "precision": "precision", "recall": "recall"}


def token_label(embedding: str) -> str:
    """The paper's name of a token type (q, k, v, x1, x2, x_n); other embeddings by name."""
    return TOKEN_TYPES.get(embedding, embedding)


def _ordered(values: Sequence[Any], key: str) -> list[Any]:
    """Distinct values in the order token types are shown (for embeddings), else as they come."""
    seen = list(dict.fromkeys(values))
    if key == "embedding":
        rank = list(TOKEN_TYPES)
        return sorted(seen, key=lambda e: (rank.index(e) if e in rank else len(rank), str(e)))
    return seen


def _label(value: Any, key: str) -> str:
    return token_label(value) if key == "embedding" else str(value)


def _std(row: Any, metric: str) -> float:
    value = row.get(f"{metric}_std") if hasattr(row, "get") else None
    return float("nan") if value is None else float(value)


def plot_token_bars(rows: Sequence[Any], *, metric: str = "f1", x: str = "embedding", hue: str = "model",
                    title: str = "", legend: bool = True, ax: Any = None) -> Any:
    """(d1)/(d2) one group of bars per ``x`` value (token types, in the order q, k, v, x1, x2,
    x_n; or categories), one bar per ``hue`` value (models; or token types); error bars are the
    rows' ``<metric>_std`` where it is given (cosine: std over trials). ``rows`` are mappings
    with the keys ``x``, ``hue``, ``metric`` and optionally ``<metric>_std``."""
    xs = _ordered([r[x] for r in rows], x)
    hues = _ordered([r[hue] for r in rows], hue)
    ax = _axes(ax, (max(3.0, 0.28 * len(xs) * max(1, len(hues)) + 1.2), 2.6))
    width = 0.8 / max(1, len(hues))
    value = {(r[x], r[hue]): (float(r[metric]), _std(r, metric)) for r in rows}
    for i, h in enumerate(hues):
        vals = [value.get((v, h), (np.nan, np.nan)) for v in xs]
        means, stds = np.array([m for m, _ in vals]), np.array([s for _, s in vals])
        yerr = np.nan_to_num(stds) if np.isfinite(stds).any() else None
        colour = COLOURS[i % len(COLOURS)]
        ax.bar(np.arange(len(xs)) + (i - (len(hues) - 1) / 2) * width, means, width, yerr=yerr, capsize=2,
               label=_label(h, hue), color=colour, error_kw={"elinewidth": 0.8})
    ax.set_xticks(np.arange(len(xs)), [_label(v, x) for v in xs], rotation=0 if x == "embedding" else 30,
                  ha="center" if x == "embedding" else "right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(METRIC_NAMES.get(metric, metric))
    ax.set_title(title)
    if legend and hues:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_metric_curves(rows: Sequence[Any], *, x: str = "k_shot", metric: str = "accuracy", line: str = "embedding",
                       log_x: bool = False, xlabel: str | None = None, title: str = "", ax: Any = None) -> Any:
    """(d3)/(d5) ``metric`` against ``x`` (k support images; or the block), one line per
    ``line`` value (token types), error bars = ``<metric>_std`` where given."""
    ax = _axes(ax, (3.6, 2.6))
    ticks: set[Any] = set()
    for i, value in enumerate(_ordered([r[line] for r in rows], line)):
        mine = sorted((r for r in rows if r[line] == value), key=lambda r: r[x])
        xs = [r[x] for r in mine]
        ys = [float(r[metric]) for r in mine]
        stds = np.array([_std(r, metric) for r in mine])
        ticks |= set(xs)
        ax.errorbar(xs, ys, yerr=np.nan_to_num(stds) if np.isfinite(stds).any() else None, marker="o", markersize=3,
                    capsize=2, elinewidth=0.8, label=_label(value, line), color=COLOURS[i % len(COLOURS)])
    if log_x:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(METRIC_NAMES.get(metric, metric))
    ax.set_title(title)
    if ticks:
        ax.legend(fontsize=7)
    return ax


def upsample_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """A (G, G) patch map shown on the (size, size) pixel grid, each pixel taking its patch's value."""
    mask = np.asarray(mask)
    rows = np.arange(size) * mask.shape[0] // size
    cols = np.arange(size) * mask.shape[1] // size
    return mask[rows[:, None], cols[None, :]]


def plot_concept_masks(images: np.ndarray, truth: np.ndarray, decisions: np.ndarray, labels: Sequence[str], *,
                       title: str = "", fig: Any = None, cosine: np.ndarray | None = None,
                       decision_titles: tuple[str, str] = ("decisions", "cosine")) -> Any:
    """(d4) one row per concept: the test image, the concept's ground-truth mask and the
    template's patch decisions (and, given ``cosine``, a second template's), nearest-upsampled
    from G x G to the image's S x S; the row is labelled ``labels[i]`` (the concept's name and
    F1). ``fig`` may be a figure or a subfigure."""
    n = len(labels)
    columns = 3 if cosine is None else 4
    fig = fig or pyplot().figure(figsize=(columns * 1.25 + 1.4, 1.25 * max(n, 1) + 0.4))
    axes = fig.subplots(max(n, 1), columns, squeeze=False)
    size = int(np.asarray(truth).shape[-1]) if n else 1
    for i in range(n):
        shown = [images[i], truth[i], upsample_nearest(decisions[i], size)]
        if cosine is not None:
            shown.append(upsample_nearest(cosine[i], size))
        for j, picture in enumerate(shown):
            ax = axes[i, j]
            if j == 0:
                ax.imshow(picture, interpolation="nearest")
            else:
                ax.imshow(picture, cmap="Greys_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            for side in ax.spines.values():  # a thin frame: white masks stay apart from the page
                side.set_visible(True), side.set_edgecolor("0.6"), side.set_linewidth(0.5)
        axes[i, 0].set_ylabel(labels[i], rotation=0, ha="right", va="center", fontsize=7)
    for j, name in enumerate(("image", "ground truth", *decision_titles[:columns - 2])):
        axes[0, j].set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    return fig


# -- zero-shot correspondence (PROTOCOL.md section 11.6, c1-c4) --------------------------------------
CORRESPONDENCE_EMBEDDINGS = ("keys", "queries", "values", "tokens")  # Table 3's order: K / Q / V / T
CORRESPONDENCE_LETTERS = {"keys": "K", "queries": "Q", "values": "V", "tokens": "T"}
MAX_HEATMAP_LAYERS = 12


def embedding_order(embeddings: Sequence[str]) -> list[str]:
    """Distinct embeddings in Table 3's order (keys, queries, values, tokens), others after by name."""
    rank = list(CORRESPONDENCE_EMBEDDINGS)
    return sorted(dict.fromkeys(embeddings), key=lambda e: (rank.index(e) if e in rank else len(rank), str(e)))


def embedding_colour(embedding: str) -> str:
    """One colour per embedding on every correspondence figure (K, Q, V, T first)."""
    rank = list(CORRESPONDENCE_EMBEDDINGS)
    if embedding in rank:
        return COLOURS[rank.index(embedding)]
    return COLOURS[len(rank) + sum(map(ord, str(embedding))) % (len(COLOURS) - len(rank))]


def plot_pck_layers(rows: Sequence[Any], *, metric: str = "pck_point", title: str = "", ylabel: str = "PCK (%)",
                    legend: bool = True, ax: Any = None) -> Any:
    """(c1) PCK (in %) against the layer, one line per embedding (K, Q, V, T order), each line's
    best layer marked with a larger dot. ``rows`` are mappings with ``embedding``, ``layer``
    (the 0-based block) and ``metric``; the x axis shows the paper's 1-based layer (block + 1)."""
    ax = _axes(ax, (3.6, 2.6))
    ticks: set[int] = set()
    for emb in embedding_order([r["embedding"] for r in rows]):
        mine = sorted((r for r in rows if r["embedding"] == emb), key=lambda r: r["layer"])
        xs = [int(r["layer"]) + 1 for r in mine]
        ys = [100 * float(r[metric]) for r in mine]
        ticks |= set(xs)
        colour = embedding_colour(emb)
        ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.2, color=colour, label=emb)
        spans = [interval(r, metric) for r in mine]
        if any(sp is not None for sp in spans):  # the 95 % intervals over pairs, where the results hold them
            ax.fill_between(xs, [100 * (sp[0] if sp else float(r[metric])) for sp, r in zip(spans, mine)],
                            [100 * (sp[1] if sp else float(r[metric])) for sp, r in zip(spans, mine)],
                            color=colour, alpha=0.15, linewidth=0)
        if ys and np.isfinite(ys).any():
            best = int(np.nanargmax(ys))
            ax.plot([xs[best]], [ys[best]], marker="o", markersize=6, color=colour, markeredgecolor="white",
                    linestyle="none")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(12, max(len(ticks), 1))))
    ax.set_xlabel("layer (1-based: block + 1)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend and ticks:
        ax.legend(fontsize=7)
    return ax


def plot_pck_table(rows: Sequence[Any], embeddings: Sequence[str], *, differences: Sequence[Any] = (),
                   title: str = "", ax: Any = None) -> Any:
    """(c2) Table 3's layout as a table figure: per model (``rows``: mappings with ``label``,
    ``pck`` {embedding: fraction} and ``best`` text, e.g. '9/12'), the best-layer PCK in % of each
    embedding, the row's highest in bold; then the ``differences`` rows (``label``, ``pck``
    {embedding: fraction difference}), shaded green where positive and red where negative."""
    header = ["model", *[CORRESPONDENCE_LETTERS.get(e, e) for e in embeddings], "best layer"]
    body: list[list[str]] = []
    for r in rows:
        body.append([r["label"], *[_pct(r["pck"].get(e)) for e in embeddings], r.get("best", "")])
    for d in differences:
        body.append([d["label"], *[_pct(d["pck"].get(e), signed=True) for e in embeddings], ""])
    n_cols = len(header)
    ax = _axes(ax, (1.1 * n_cols + 1.6, 0.3 * (len(body) + 1) + 0.4))
    ax.axis("off")
    if not body:
        return ax
    table = ax.table(cellText=body, colLabels=header, loc="upper center", cellLoc="center",
                     colWidths=[0.34] + [0.12] * len(embeddings) + [0.16])
    table.auto_set_font_size(False)
    table.set_fontsize(7.5)
    table.scale(1.0, 1.3)
    for (i, j), cell in table.get_celld().items():
        cell.set_edgecolor("0.85")
        if i == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("0.93")
    for i, r in enumerate(rows, start=1):
        values = [r["pck"].get(e) for e in embeddings]
        finite = [v for v in values if v is not None and np.isfinite(v)]
        for j, v in enumerate(values, start=1):
            if finite and v == max(finite):
                table[i, j].set_text_props(weight="bold")
    for i, d in enumerate(differences, start=len(rows) + 1):
        table[i, 0].set_text_props(style="italic")
        for j, e in enumerate(embeddings, start=1):
            v = d["pck"].get(e)
            if v is not None and np.isfinite(v) and v != 0:
                table[i, j].set_facecolor("#d9f0d3" if v > 0 else "#f6d5d5")
    ax.set_title(title)
    return ax


def _pct(value: Any, signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def shown_layers(n: int, best: int | None = None, limit: int = MAX_HEATMAP_LAYERS) -> list[int]:
    """Indices of the layer columns of a heatmap row: all ``n`` when at most ``limit``, else
    ``limit`` evenly spaced (first and last included) plus ``best``, the best layer's index."""
    if n <= limit:
        return list(range(n))
    picked = set(np.linspace(0, n - 1, limit).round().astype(int).tolist())
    if best is not None and 0 <= best < n:
        picked.add(int(best))
    return sorted(picked)


def shrink(image: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """``image`` (H, W[, C]) averaged over f x f blocks, f the smallest integer that brings its
    longer side to at most ``max_pixels`` (None: as it is); NaN spreads to its block. A panel
    about an inch wide shows no more, and the page and SVG stay small."""
    image = np.asarray(image)
    f = 1 if not max_pixels else -(-max(image.shape[:2]) // max_pixels)
    if f <= 1:
        return image
    h, w = image.shape[0] // f * f, image.shape[1] // f * f
    blocks = image[:h, :w].astype(np.float32).reshape(h // f, f, w // f, f, *image.shape[2:]).mean(axis=(1, 3))
    return blocks.round().astype(image.dtype) if image.dtype == np.uint8 else blocks


def _show(ax: Any, image: np.ndarray, max_pixels: int | None, **kwargs: Any) -> Any:
    """``imshow`` of ``image`` shrunk to ``max_pixels``, on its original pixel coordinates."""
    h, w = np.asarray(image).shape[:2]
    return ax.imshow(shrink(image, max_pixels), extent=(-0.5, w - 0.5, h - 0.5, -0.5), **kwargs)


def _image_axes(ax: Any) -> None:
    ax.set_xticks([]), ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)


def plot_source_point(image: np.ndarray, point: Sequence[float], *, title: str = "", max_pixels: int | None = 160,
                      ax: Any = None) -> Any:
    """(c3) the source image with its keypoint ([row, col], grid pixels) as a red dot (the image
    shown at most ``max_pixels`` wide, see ``shrink``)."""
    ax = _axes(ax, (1.6, 1.6))
    _show(ax, image, max_pixels, interpolation="nearest")
    ax.plot([point[1]], [point[0]], marker="o", markersize=5, color="red", markeredgecolor="white",
            markeredgewidth=0.6, linestyle="none")
    ax.set_title(title, fontsize=7)
    _image_axes(ax)
    return ax


def plot_cosine_map(target: np.ndarray, cosine: np.ndarray, *, truth: Sequence[float] | None = None,
                    prediction: Sequence[float] | None = None, radius: float | None = None, best: bool = False,
                    title: str = "", cmap: str = "plasma", opacity: float = 0.6, max_pixels: int | None = 160,
                    ax: Any = None) -> Any:
    """(c3) the target image with a cosine map over it: the map in ``cmap``, scaled to its own
    minimum and maximum and alpha-blended (``opacity``); NaN (padding) left transparent. The
    ground truth ``truth`` ([row, col], grid pixels) a green circle with a white circle of
    ``radius`` grid pixels around it, the argmax ``prediction`` a green cross; ``best`` frames
    the panel red. Image and map are shown at most ``max_pixels`` wide (``shrink``); the marks
    stay on the grid's pixel coordinates."""
    ax = _axes(ax, (1.6, 1.6))
    _show(ax, target, max_pixels, interpolation="nearest")
    values = np.ma.masked_invalid(np.asarray(cosine, dtype=np.float32))
    colours = pyplot().get_cmap(cmap).with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    if values.count():
        _show(ax, values.filled(np.nan), max_pixels, cmap=colours, alpha=opacity, vmin=float(values.min()),
              vmax=float(values.max()), interpolation="bilinear")
    if truth is not None:
        from matplotlib.patches import Circle

        if radius is not None and np.isfinite(radius) and radius > 0:
            ax.add_patch(Circle((truth[1], truth[0]), radius, fill=False, edgecolor="white", linewidth=0.9))
        ax.plot([truth[1]], [truth[0]], marker="o", markersize=5, markerfacecolor="none", markeredgecolor="lime",
                markeredgewidth=1.2, linestyle="none")
    if prediction is not None:
        ax.plot([prediction[1]], [prediction[0]], marker="x", markersize=5, color="lime", markeredgewidth=1.4,
                linestyle="none")
    ax.set_xlim(-0.5, np.asarray(target).shape[1] - 0.5)
    ax.set_ylim(np.asarray(target).shape[0] - 0.5, -0.5)
    ax.set_title(title, fontsize=7, color="red" if best else "black")
    ax.set_xticks([]), ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(best)
        if best:
            side.set_edgecolor("red"), side.set_linewidth(2.2)
    return ax


def plot_correspondence_heatmaps(examples: Sequence[Any], *, max_layers: int = MAX_HEATMAP_LAYERS,
                                 fig: Any = None) -> Any:
    """(c3) one row per example (mappings with ``label``, ``source``, ``target``, ``cosine``
    (layer, S, S), ``layers`` (blocks, 0-based), ``source_point``, ``target_point``,
    ``predictions``, ``radius``, ``best_layer``): the source image with its keypoint, then the
    target's cosine map per layer (at most ``max_layers`` evenly spaced plus the best, which is
    framed red). Columns are titled with the 1-based layer. ``fig`` may be a subfigure."""
    picks = []
    for e in examples:
        layers = [int(v) for v in e["layers"]]
        best = layers.index(int(e["best_layer"])) if e.get("best_layer") is not None and \
            int(e["best_layer"]) in layers else None
        picks.append((shown_layers(len(layers), best, max_layers), best))
    columns = 1 + max([len(p) for p, _ in picks] + [1])
    rows = max(len(examples), 1)
    fig = fig or pyplot().figure(figsize=(1.05 * columns + 1.3, 1.12 * rows + 0.3))
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, (e, (idx, best)) in enumerate(zip(examples, picks)):
        layers = [int(v) for v in e["layers"]]
        plot_source_point(e["source"], e["source_point"], title="source" if i == 0 else "", ax=axes[i, 0])
        axes[i, 0].set_ylabel(e.get("label", ""), rotation=0, ha="right", va="center", fontsize=7)
        for j, k in enumerate(idx, start=1):
            plot_cosine_map(e["target"], e["cosine"][k], truth=e["target_point"], prediction=e["predictions"][k],
                            radius=e.get("radius"), best=k == best, title=f"layer {layers[k] + 1}", ax=axes[i, j])
        for ax in axes[i, len(idx) + 1:]:
            ax.set_visible(False)
    for ax in axes[len(examples):].ravel():
        ax.set_visible(False)
    fig.subplots_adjust(wspace=0.04, hspace=0.25)
    return fig


def plot_ln_ablation(rows: Sequence[Any], *, title: str = "", ylabel: str = "%", ax: Any = None) -> Any:
    """(c4) the final-norm ablation: per model (``rows``: mappings with ``model``, ``before``,
    ``after``, fractions), a bar before and a bar after the final norm, in %, the difference
    (after minus before, points) written above the pair."""
    ax = _axes(ax, (max(3.0, 0.7 * len(rows) + 1.4), 2.6))
    x = np.arange(len(rows))
    before = np.array([100 * float(r["before"]) for r in rows])
    after = np.array([100 * float(r["after"]) for r in rows])
    ax.bar(x - 0.2, before, 0.4, color=GT_COLOUR, label="before final norm")
    ax.bar(x + 0.2, after, 0.4, color=COLOURS[0], label="after final norm")
    top = np.nanmax(np.concatenate([before, after, [0.0]]))
    for xi, b, a in zip(x, before, after):
        ax.text(xi, max(a, b) + 0.02 * (top or 1), f"{a - b:+.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [str(r["model"]) for r in rows], rotation=30 if len(rows) > 3 else 0,
                  ha="right" if len(rows) > 3 else "center")
    ax.set_xlim(-0.75, len(rows) - 0.25)
    ax.set_ylim(0, (top or 1) * 1.22)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(rows):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


# -- ULTra explanations (PROTOCOL.md section 10.9, u1-u7) ------------------------------------------
ULTRA_SCALARS = {"sum": "ULTra_S", "energy": "ULTra_E", "learned": "ULTra_W"}  # ultra_runs.f
ULTRA_TAU = 0.2  # the headline threshold of the masks and of ITIoU (section 10.5)
ULTRA_CMAP = "inferno"  # explanation maps: dark (irrelevant) to bright yellow (relevant)
SEGMENT_CMAP = "tab20"  # per-image segment ids: arbitrary labels, a qualitative map


def patch_centre(patch: int, grid: int, size: int) -> tuple[float, float]:
    """(row, col) of the centre of patch ``patch`` (row-major on the G x G grid) in the pixel
    coordinates of an image of ``size`` x ``size`` as ``imshow`` draws it."""
    r, c = divmod(int(patch), grid)
    return (r + 0.5) * size / grid - 0.5, (c + 0.5) * size / grid - 0.5


def _mark(ax: Any, point: tuple[float, float], colour: str = "cyan") -> None:
    ax.plot([point[1]], [point[0]], marker="o", markersize=4, color=colour, markeredgecolor="black",
            markeredgewidth=0.6, linestyle="none")


def plot_explanation_map(image: np.ndarray, patch_map: np.ndarray, grid: int, *, token: int | None = None,
                         tau: float | None = None, title: str = "", opacity: float = 0.6, ax: Any = None) -> Any:
    """(u1) ``image`` under M(S~) of ``patch_map`` (G * G values) in ``ULTRA_CMAP`` (alpha
    ``opacity``); (u2) with ``tau``, the binary mask M(S~) >= tau instead: the image where the
    mask holds, darkened elsewhere. ``token`` (a patch index) is marked with a dot."""
    ax = _axes(ax, (1.4, 1.4))
    image = np.asarray(image)
    size = image.shape[0]
    scaled = scaled_upsampled(patch_map, grid, size)[0]
    if tau is None:
        ax.imshow(image, interpolation="nearest")
        ax.imshow(scaled, cmap=ULTRA_CMAP, vmin=0, vmax=1, alpha=opacity, interpolation="nearest")
    else:
        mask = scaled >= tau
        shown = image.astype(np.float32) * np.where(mask, 1.0, 0.15)[..., None]
        ax.imshow(shown.round().astype(np.uint8), interpolation="nearest")
        ax.contour(mask.astype(np.float32), levels=[0.5], colors="white", linewidths=0.6)
    if token is not None:
        _mark(ax, patch_centre(token, grid, size))
    ax.set_xlim(-0.5, size - 0.5), ax.set_ylim(size - 0.5, -0.5)
    ax.set_title(title, fontsize=7)
    _image_axes(ax)
    return ax


def plot_token_maps(image: np.ndarray, maps: np.ndarray, tokens: Sequence[int | None], layers: Sequence[int],
                    grid: int, *, tau: float | None = None, title: str = "", fig: Any = None) -> Any:
    """(u1)/(u2) one example image: rows = the class token (``tokens[i]`` None: no dot) then each
    chosen token, columns = ``layers``; ``maps`` (layer, row, G * G) the rows' S_i per layer, each
    shown by ``plot_explanation_map`` (with ``tau``: its binary mask). ``fig`` may be a subfigure."""
    fig = fig or pyplot().figure(figsize=(1.2 * len(layers) + 1.0, 1.2 * len(tokens) + 0.3))
    axes = fig.subplots(len(tokens), len(layers), squeeze=False)
    for i, token in enumerate(tokens):
        for j, layer in enumerate(layers):
            plot_explanation_map(image, maps[j][i], grid, token=token, tau=tau,
                                 title=f"block {layer}" if i == 0 else "", ax=axes[i, j])
        name = "class token" if token is None else "token {}\n(row {}, col {})".format(token, *divmod(int(token), grid))
        axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    return fig


def colour_segments(segments: np.ndarray, image: np.ndarray | None = None, opacity: float = 0.65) -> np.ndarray:
    """Per-image segment ids -> RGB in ``SEGMENT_CMAP`` (ids modulo its 20 colours), blended over
    ``image`` with ``opacity`` where given."""
    colours = np.asarray(pyplot().get_cmap(SEGMENT_CMAP).colors)[:, :3]
    rgb = colours[np.asarray(segments, dtype=np.int64) % len(colours)]
    if image is not None:
        rgb = opacity * rgb + (1 - opacity) * np.asarray(image, dtype=np.float64) / 255
    return (rgb.clip(0, 1) * 255).round().astype(np.uint8)


def plot_dendrogram(linkage: np.ndarray, *, cuts: Sequence[float] = (), colour_below: float | None = None,
                    title: str = "", ax: Any = None) -> Any:
    """(u3) the per-image dendrogram of the patch tokens' maps (a scipy linkage; no leaf labels),
    clusters below ``colour_below`` coloured, a dashed line at each cut distance in ``cuts``."""
    from scipy.cluster.hierarchy import dendrogram

    ax = _axes(ax, (3.0, 1.6))
    linkage = np.asarray(linkage, dtype=np.float64)
    dendrogram(linkage, no_labels=True, ax=ax, color_threshold=colour_below if colour_below is not None else 0,
               above_threshold_color="0.45")
    for zeta in cuts:
        ax.axhline(zeta, color="0.3", linestyle="--", linewidth=0.7)
        ax.text(0.99, zeta, f"{zeta:g}", transform=ax.get_yaxis_transform(), fontsize=6, ha="right", va="bottom",
                color="0.3")
    top = max([float(linkage[:, 2].max()) if len(linkage) else 0.0, *cuts, 0.1])
    ax.set_ylim(0, top * 1.08)
    ax.set_ylabel("cosine distance", fontsize=7)
    ax.set_title(title, fontsize=7)
    ax.spines["bottom"].set_visible(False)
    return ax


def plot_segment_map(segments: np.ndarray | None, *, image: np.ndarray | None = None, title: str = "",
                     ax: Any = None) -> Any:
    """(u3) one image's segments (ids per image, arbitrary) over the image; ``segments`` None:
    the image alone."""
    ax = _axes(ax, (1.4, 1.4))
    ax.imshow(image if segments is None else colour_segments(segments, image), interpolation="nearest")
    ax.set_title(title, fontsize=7)
    _image_axes(ax)
    return ax


def plot_line_series(series: Sequence[Any], *, xlabel: str, ylabel: str, title: str = "", mark_x: float | None = None,
                     integer_x: bool = False, ylim: tuple[float, float] | None = (0, 1.05), legend: bool = True,
                     ax: Any = None) -> Any:
    """(u5)/(u6) lines of ``series`` (mappings with ``x``, ``y``, ``label`` and optionally
    ``colour``, ``linestyle``); ``mark_x`` a dotted vertical line (the run's zeta, tau = 0.2)."""
    ax = _axes(ax, (3.4, 2.6))
    for i, s in enumerate(series):
        y = np.array([np.nan if v is None else float(v) for v in s["y"]])
        ax.plot(list(s["x"]), y, marker="o", markersize=3, linewidth=1.2, label=s["label"],
                color=s.get("colour", COLOURS[i % len(COLOURS)]), linestyle=s.get("linestyle", "-"))
    if mark_x is not None:
        ax.axvline(mark_x, color=GT_COLOUR, linestyle=":", linewidth=1.0)
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend and series:
        ax.legend(fontsize=6.5)
    return ax


def plot_relevance_set(image: np.ndarray, patches: np.ndarray, grid: int, *, token: int, colour: str,
                       title: str = "", ax: Any = None) -> Any:
    """(u7) ``image`` with the pixels of ``patches`` (a perturbation set, row-major patch indices)
    shaded in ``colour`` and the rest dimmed; the token's own patch marked with a dot."""
    from matplotlib.colors import to_rgb

    ax = _axes(ax, (1.4, 1.4))
    image = np.asarray(image, dtype=np.float64) / 255
    size = image.shape[0]
    cells = np.zeros(grid * grid, bool)
    cells[np.asarray(patches, dtype=np.int64)] = True
    mask = upsample_nearest(cells.reshape(grid, grid), size)[..., None]
    shaded = np.where(mask, 0.45 * image + 0.55 * np.asarray(to_rgb(colour)), 0.35 * image)
    ax.imshow((shaded.clip(0, 1) * 255).round().astype(np.uint8), interpolation="nearest")
    _mark(ax, patch_centre(token, grid, size))
    ax.set_title(title, fontsize=7)
    _image_axes(ax)
    return ax


POSITIVE_COLOUR, NEGATIVE_COLOUR = COLOURS[5], COLOURS[0]  # most relevant set vermilion, least relevant blue


def _value(row: Any, key: str) -> float:
    v = row.get(key)
    return float("nan") if v is None else float(v)


def plot_perturbation_bars(rows: Sequence[Any], *, title: str = "", legend: bool = True, ax: Any = None) -> Any:
    """(u7) per block (``rows``: ``ultra_perturbation`` rows of one perturbation), the mean
    distance ||z_i - z~_i|| with the negative (least relevant) and the positive (most relevant)
    set perturbed, error bars = std over images; above each pair, positive - negative with its
    95 % bootstrap interval."""
    ax = _axes(ax, (max(2.6, 0.9 * len(rows) + 1.2), 2.6))
    rows = sorted(rows, key=lambda r: r["layer"])
    x = np.arange(len(rows))
    for offset, key, colour, label in ((-0.2, "neg", NEGATIVE_COLOUR, "negative (least relevant)"),
                                       (0.2, "pos", POSITIVE_COLOUR, "positive (most relevant)")):
        means = np.array([_value(r, f"{key}_mean") for r in rows])
        stds = np.array([_value(r, f"{key}_std") for r in rows])
        ax.bar(x + offset, means, 0.4, yerr=np.nan_to_num(stds) if np.isfinite(stds).any() else None, capsize=2,
               color=colour, label=label, error_kw={"elinewidth": 0.8})
    top = np.nanmax([_value(r, k) + np.nan_to_num(_value(r, f"{k[:3]}_std")) for r in rows
                     for k in ("neg_mean", "pos_mean")] + [0.0])
    for xi, r in zip(x, rows):
        diff = _value(r, "diff_mean")
        if np.isfinite(diff):
            ci = "" if not np.isfinite(_value(r, "diff_ci_low")) else \
                f"\n[{_value(r, 'diff_ci_low'):+.3g}, {_value(r, 'diff_ci_high'):+.3g}]"
            ax.text(xi, top * 1.03 if top > 0 else 0.02, f"{diff:+.3g}{ci}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, [f"block {r['layer']}" for r in rows])
    ax.set_xlim(-0.7, len(rows) - 0.3)
    ax.set_ylim(0, (top if np.isfinite(top) and top > 0 else 1.0) * 1.35)
    ax.set_ylabel("mean ||z - z~||")
    ax.set_title(title)
    if rows and legend:
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_token_on_image(image: np.ndarray, token: int, grid: int, *, title: str = "", ax: Any = None) -> Any:
    """(u7) the image with the token's patch marked by a dot."""
    ax = _axes(ax, (1.4, 1.4))
    ax.imshow(image, interpolation="nearest")
    _mark(ax, patch_centre(token, grid, np.asarray(image).shape[0]))
    ax.set_title(title, fontsize=7)
    _image_axes(ax)
    return ax
