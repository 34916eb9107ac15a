"""The report's panels, registered in page order: a new figure is one ``@panel`` function here.

A comparison panel draws ``(data, rows)`` (the report's ``ReportData`` and the compared
settings) into a new figure; a summary panel draws ``(data, k, method)`` once per report.
Each carries its caption and how to read it, which the page prints beneath the figure.
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


COMPARISON_PANELS: tuple[Panel, ...] = ()
SUMMARY_PANELS: tuple[Panel, ...] = ()


def panel(key: str, file: str, caption: str, reading: str, *, summary: bool = False) -> Callable:
    """Register the decorated ``draw(...) -> Figure`` as a panel of every comparison (or, with
    ``summary``, of the report's summary section)."""
    def register(draw: Callable[..., Any]) -> Callable[..., Any]:
        global COMPARISON_PANELS, SUMMARY_PANELS
        p = Panel(key, file, caption, reading, draw)
        if summary:
            SUMMARY_PANELS += (p,)
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
