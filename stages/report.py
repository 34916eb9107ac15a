"""The report stage: the visual protocol's figures and a self-contained ``index.html``.

Reads only the results folder (Parquet tables through DuckDB, maps from ``maps.zarr``);
writes every figure as PNG and SVG under ``<out>/<comparison>/`` and an ``index.html`` that
embeds the PNGs, so it opens anywhere without network or companion files.
"""
from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Comparison, ReportConfig
from pipeline.errors import ConfigError, StoreError
from pipeline.query import connect
from pipeline.store import MapStore

from . import figures

READING = {
    "a1": "Columns are the same test images; the first rows show the image and its ground truth, then one "
          "row per compared setting with its cluster map after Hungarian matching, in the dataset palette. "
          "Look for object shapes (semantic clusters) versus stripes and blocks that follow the image grid "
          "(positional clusters).",
    "a2": "Each pixel mixes the palette colours of the classes predicted there, weighted by how often over the "
          "whole test split. A sharp layout (bands, a frame) that the ground truth's map lacks means the "
          "clusters encode position.",
    "b1": "NMI between pixel position and predicted class; the grey bar is the same figure for the ground "
          "truth. Bars far above it mean position explains more of the segmentation than of the labels.",
    "b2": "mIoU of each setting after matching clusters to classes.",
    "curves": "mIoU per layer, one line per embedding type: where in depth the semantic structure peaks.",
    "classwise": "Class-wise MI I_c for the classes whose ground-truth position dependence is highest.",
    "attention": "Image- and head-averaged patch attention of the compared layer, binarised at its 95th "
                 "percentile: a diagonal band is local attention. Beside it, I(K,Q) per layer.",
    "correlations": "Across every evaluated (model, layer, embedding): NMI against log mIoU, and the NMI of "
                    "keys and queries against the attention's I(K,Q).",
}


@dataclass
class Row:
    label: str
    setting: dict[str, Any]


@dataclass
class ReportResult:
    index: Path
    figures: list[Path] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class _Results:
    """The results folder, as the report reads it."""

    def __init__(self, cfg: ReportConfig):
        self.cfg = cfg
        self.con = connect(cfg.results)
        self.maps = MapStore(Path(cfg.results) / "maps.zarr")
        pairs = self.con.sql("SELECT DISTINCT dataset, split FROM segmentation ORDER BY ALL").fetchall()
        pairs = [p for p in pairs if (cfg.dataset in (None, p[0])) and (cfg.split in (None, p[1]))]
        if len(pairs) != 1:
            raise ConfigError(f"the results hold {len(pairs)} (dataset, split) pairs matching the request "
                              f"({pairs[:6]}); choose one with --dataset and --split")
        self.dataset, self.split = pairs[0]
        # from here on every table name means that table's rows for this dataset and split
        self.con.execute("CREATE SCHEMA selected")
        literal = lambda v: "'" + str(v).replace("'", "''") + "'"  # noqa: E731
        for (table,) in self.con.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall():
            self.con.execute(f"CREATE VIEW selected.{table} AS SELECT * FROM main.{table} "
                             f"WHERE dataset = {literal(self.dataset)} AND split = {literal(self.split)}")
        self.con.execute("SET search_path = 'selected'")
        gt_path = f"{self.dataset}/{self.split}/ground_truth"
        gt_attrs = self.maps.attrs(gt_path)
        self.classes = list(gt_attrs["classes"])
        self.palette = np.asarray(gt_attrs["palette"], dtype=np.uint8)
        self.gt_images = self.maps.read(gt_path, "images")
        self.gt_labels = self.maps.read(gt_path, "labels")
        self.gt_aggregate = self.maps.read(gt_path, "aggregate")
        self.gt = self.rows("SELECT mi, nmi, nmi_bias_aware FROM ground_truth")[0]
        self.gt_classwise = self.classwise("source = 'ground_truth'")

    def rows(self, sql: str) -> list[dict[str, Any]]:
        rel = self.con.sql(sql)
        return [dict(zip(rel.columns, r)) for r in rel.fetchall()]

    def classwise(self, condition: str) -> np.ndarray:
        rel = self.con.sql(f"SELECT class_id, mi FROM classwise_mi WHERE {condition} ORDER BY class_id")
        values = np.full(len(self.classes), np.nan)
        for class_id, mi in rel.fetchall():
            values[class_id] = mi
        return values

    def map_path(self, s: dict[str, Any]) -> str:
        return "/".join([self.dataset, self.split, s["model"], s["train_split"],
                         f"{s['method']}-k{s['k']}-s{s['seed']}", s["embedding"], f"layer_{s['layer']}"])


def _select_rows(res: _Results, comp: Comparison) -> list[Row]:
    seg = res.rows("SELECT * FROM segmentation")
    if not seg:
        raise StoreError(f"{res.cfg.results} has no segmentation rows for {res.dataset}/{res.split}")
    k = comp.k or seg[0]["k"]
    method = comp.method or seg[0]["method"]
    seg = [r for r in seg if r["embedding"] == comp.embedding and r["k"] == k and r["method"] == method]
    if not seg:
        raise ConfigError(f"no evaluated {comp.embedding} codebooks with k={k}, method={method}")
    models = list(comp.models) if comp.models else sorted({r["model"] for r in seg})
    if comp.compare == "layers":
        model = models[0]
        return [Row(f"{model} L{r['layer']}", r) for r in sorted(seg, key=lambda r: r["layer"]) if r["model"] == model]
    rows = []
    for model in models:
        mine = [r for r in seg if r["model"] == model]
        if not mine:
            raise ConfigError(f"model {model!r} has no evaluated {comp.embedding} codebook with k={k}, {method}")
        pick = (max(mine, key=lambda r: r["miou"]) if comp.layer == "best"
                else next((r for r in mine if r["layer"] == int(comp.layer)), None))
        if pick is None:
            raise ConfigError(f"model {model!r} has no evaluated layer {comp.layer}")
        rows.append(Row(f"{model} L{pick['layer']}", pick))
    return rows


def _save(fig: Any, out: Path, name: str, written: list[Path]) -> str:
    """Write PNG and SVG; return the PNG as base64 for the page."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    (out / f"{name}.png").write_bytes(buf.getvalue())
    fig.savefig(out / f"{name}.svg")
    figures._plt().close(fig)
    written += [out / f"{name}.png", out / f"{name}.svg"]
    return base64.b64encode(buf.getvalue()).decode()


def _comparison_section(res: _Results, comp: Comparison, out: Path, written: list[Path]) -> str:
    rows = _select_rows(res, comp)
    title = comp.title or (f"{comp.compare}: {comp.embedding}, layer {comp.layer}" if comp.compare != "layers"
                           else f"layers of {rows[0].setting['model']}: {comp.embedding}")
    folder = out / _slug(title)
    n = min(len(res.gt_images), len(res.gt_labels))
    panels: list[tuple[str, str, str]] = []
    with figures.style():
        preds = [(r.label, res.maps.read(res.map_path(r.setting), "examples")[:n]) for r in rows]
        fig = figures.plot_example_grid(res.gt_images[:n], res.gt_labels[:n], preds, res.palette, res.classes)
        panels.append(("a1", "(a1) exemplary segmentations", _save(fig, folder, "a1_examples", written)))
        aggs = [(r.label, res.maps.read(res.map_path(r.setting), "aggregate")) for r in rows]
        fig = figures.plot_aggregate_maps(aggs, res.gt_aggregate)
        panels.append(("a2", "(a2) aggregate maps", _save(fig, folder, "a2_aggregate", written)))
        labels = [r.label for r in rows]
        ax = figures.plot_bars(labels, [r.setting["nmi"] for r in rows], ylabel="NMI (position; class)",
                               reference=res.gt["nmi"])
        panels.append(("b1", "(b1) positional effect, NMI", _save(ax.figure, folder, "b1_nmi", written)))
        ax = figures.plot_bars(labels, [r.setting["miou"] for r in rows], ylabel="mIoU")
        panels.append(("b2", "(b2) mIoU", _save(ax.figure, folder, "b2_miou", written)))
        models = sorted({r.setting["model"] for r in rows})
        seg = res.rows("SELECT model, embedding, layer, k, method, miou FROM segmentation")
        k, method = rows[0].setting["k"], rows[0].setting["method"]
        fig = figures._plt().figure(figsize=(4.2 * len(models), 2.8), layout="constrained")
        for ax, model in zip(fig.subplots(1, len(models), squeeze=False)[0], models):
            curves = {}
            for emb in sorted({r["embedding"] for r in seg if r["model"] == model}):
                pts = sorted((r["layer"], r["miou"]) for r in seg
                             if (r["model"], r["embedding"], r["k"], r["method"]) == (model, emb, k, method))
                curves[emb] = ([p[0] for p in pts], [p[1] for p in pts])
            figures.plot_layer_curves(curves, title=model, ax=ax)
        panels.append(("curves", "layer-wise mIoU", _save(fig, folder, "layer_curves", written)))
        cw = [(r.label, res.classwise(_setting_condition(r.setting))) for r in rows]
        ax = figures.plot_classwise_mi(res.classes, res.gt_classwise, cw)
        panels.append(("classwise", "class-wise MI, top classes", _save(ax.figure, folder, "classwise_mi",
                                                                           written)))
        att = res.rows("SELECT model, layer, avg(mean) AS kq FROM attention_mi GROUP BY ALL ORDER BY ALL")
        fig = figures._plt().figure(figsize=(2.7 * len(rows) + 4.2, 2.8))
        axes = fig.subplots(1, len(rows) + 1, squeeze=False, width_ratios=[1] * len(rows) + [1.5],
                            gridspec_kw={"wspace": 0.45})[0]
        for ax, r in zip(axes, rows):
            maps_path = f"{res.dataset}/{res.split}/{r.setting['model']}/attention"
            layers = res.maps.attrs(maps_path)["layers"]
            figures.plot_attention(res.maps.read(maps_path, "attention")[layers.index(r.setting["layer"])],
                                   title=r.label, ax=ax)
        figures.plot_layer_curves({m: ([a["layer"] for a in att if a["model"] == m],
                                       [a["kq"] for a in att if a["model"] == m]) for m in models},
                                  ylabel="I(K,Q) (nats)", title="attention locality", ax=axes[-1])
        panels.append(("attention", "attention matrices and I(K,Q)", _save(fig, folder, "attention", written)))
    table = _table(["setting", "mIoU", "pixel acc.", "NMI", "NMI (bias-aware)"],
                   [[r.label, r.setting["miou"], r.setting["pixel_accuracy"], r.setting["nmi"],
                     r.setting["nmi_bias_aware"]] for r in rows]
                   + [["ground truth", None, None, res.gt["nmi"], res.gt["nmi_bias_aware"]]])
    body = "".join(_figure_html(key, caption, data) for key, caption, data in panels)
    return f"<section><h2>{html.escape(title)}</h2>{table}{body}</section>"


def _setting_condition(s: dict[str, Any]) -> str:
    return (f"source = 'prediction' AND model = '{s['model']}' AND embedding = '{s['embedding']}' "
            f"AND layer = {s['layer']} AND k = {s['k']} AND method = '{s['method']}' AND seed = {s['seed']}")


def _correlation_section(res: _Results, out: Path, written: list[Path]) -> str:
    seg = res.rows("SELECT model, embedding, layer, k, method, miou, nmi FROM segmentation")
    att = {(a["model"], a["layer"]): a["kq"] for a in
           res.rows("SELECT model, layer, avg(mean) AS kq FROM attention_mi GROUP BY ALL")}
    corr = {(c["k"], c["method"], c["name"]): c["rho"] for c in res.rows("SELECT * FROM correlations")}
    k, method = seg[0]["k"], seg[0]["method"]
    pts = [r for r in seg if (r["k"], r["method"]) == (k, method)]
    with figures.style():
        fig = figures._plt().figure(figsize=(7.4, 2.9), layout="constrained")
        a, b = fig.subplots(1, 2)
        figures.plot_scatter([p["nmi"] for p in pts], np.log([max(p["miou"], 1e-9) for p in pts]), xlabel="NMI",
                             ylabel="log mIoU", rho=corr.get((k, method, "nmi_vs_log_miou")),
                             groups=[p["embedding"] for p in pts], ax=a)
        kq = [p for p in pts if p["embedding"] in ("keys", "queries") and (p["model"], p["layer"]) in att]
        figures.plot_scatter([att[(p["model"], p["layer"])] for p in kq], [p["nmi"] for p in kq],
                             xlabel="I(K,Q) (nats)", ylabel="NMI of keys/queries",
                             rho=corr.get((k, method, "kq_nmi_vs_attention_mi")),
                             groups=[p["embedding"] for p in kq], ax=b)
        data = _save(fig, out / "correlations", "correlations", written)
    return (f"<section><h2>correlations (K = {k}, {html.escape(method)})</h2>"
            f"{_figure_html('correlations', 'correlation scatter plots', data)}</section>")


def _figure_html(key: str, caption: str, png_b64: str) -> str:
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png_b64}">'
            f"<figcaption><b>{html.escape(caption)}.</b> {html.escape(READING[key])}</figcaption></figure>")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else html.escape(str(v)))  # noqa: E731
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rep-pipeline report: {title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; padding: 0 1rem; }}
h1 {{ font-size: 1.5rem; }} h2 {{ font-size: 1.15rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.5rem; }}
figure {{ margin: 1.2rem 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; max-width: 60rem; }}
table {{ border-collapse: collapse; margin: .8rem 0; }} td, th {{ padding: .2rem .7rem; border-bottom: 1px solid #eee; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
</style></head><body>
<h1>rep-pipeline report: {title}</h1>
<p>{intro}</p>
{sections}
</body></html>
"""


def run_report(cfg: ReportConfig) -> ReportResult:
    """Draw every comparison of ``cfg`` and write ``<out>/index.html``."""
    res = _Results(cfg)
    out = Path(cfg.out)
    written: list[Path] = []
    sections = [_comparison_section(res, comp, out, written) for comp in cfg.comparisons]
    sections.append(_correlation_section(res, out, written))
    intro = (f"Dataset {html.escape(res.dataset)}, test split {html.escape(res.split)}. Ground truth: NMI "
             f"{res.gt['nmi']:.3f} (bias-aware {res.gt['nmi_bias_aware']:.3f}).")
    index = out / "index.html"
    out.mkdir(parents=True, exist_ok=True)
    index.write_text(PAGE.format(title=html.escape(cfg.title or f"{res.dataset} / {res.split}"), intro=intro,
                                 sections="\n".join(sections)))
    return ReportResult(index, written)
