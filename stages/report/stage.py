"""The report stage: the visual protocol's figures and a self-contained ``index.html``.

Reads only the results folder (tables and maps through ``pipeline.results``); draws every
panel of ``panels.COMPARISON_PANELS`` for each comparison and the ``SUMMARY_PANELS`` once,
writes each as PNG and SVG under ``<out>/<section>/``, and an ``index.html`` that embeds the
PNGs, so it opens anywhere without network or companion files.
"""
from __future__ import annotations

import base64
import html
import io
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rep_pipeline.pipeline.config import Comparison, ReportConfig
from rep_pipeline.pipeline.errors import ConfigError, StoreError
from rep_pipeline.pipeline.location import ObjectPath, is_local
from rep_pipeline.pipeline.results import Results
from rep_pipeline.storage_schemas import results as layout

from . import figures
from .panels import COMPARISON_PANELS, SUMMARY_PANELS, Panel, Row


@dataclass
class ReportResult:
    index: Path
    figures: list[Path] = field(default_factory=list)

    def summary(self) -> list[str]:
        return [f"report: {self.index} ({len(self.figures)} figure files)"]


class ReportData:
    """The results of one (dataset, split), as the panels read them."""

    def __init__(self, cfg: ReportConfig):
        self.cfg = cfg
        self.results = Results(cfg.results)
        self.maps = self.results.maps()
        pairs = [tuple(r.values()) for r in self.results.rows(
            "SELECT DISTINCT dataset, split FROM segmentation ORDER BY ALL")]
        pairs = [p for p in pairs if (cfg.dataset in (None, p[0])) and (cfg.split in (None, p[1]))]
        if len(pairs) != 1:
            raise ConfigError(f"the results hold {len(pairs)} (dataset, split) pairs matching the request "
                              f"({pairs[:6]}); choose one with --dataset and --split")
        self.dataset, self.split = pairs[0]
        gt_path = layout.ground_truth_maps(self.dataset, self.split)
        gt_attrs = self.maps.attrs(gt_path)
        self.classes = list(gt_attrs["classes"])
        self.palette = np.asarray(gt_attrs["palette"], dtype=np.uint8)
        self.gt_images = self.maps.read(gt_path, "images")
        self.gt_labels = self.maps.read(gt_path, "labels")
        self.gt_aggregate = self.maps.read(gt_path, "aggregate")
        truth = self.rows("SELECT mi, nmi, nmi_bias_aware FROM ground_truth") if "ground_truth" in \
            self.results.tables() else []
        if not truth:
            raise StoreError(f"{cfg.results} has no ground-truth row for {self.dataset}/{self.split}; run "
                             f"`rep-pipeline evaluate` again")
        self.gt = truth[0]
        self.gt_classwise = self.classwise("source = 'ground_truth'")

    def rows(self, sql: str) -> list[dict[str, Any]]:
        """Rows of ``sql``; every table holds only this dataset's and split's rows."""
        return self.results.rows(sql, dataset=self.dataset, split=self.split)

    def classwise(self, condition: str) -> np.ndarray:
        values = np.full(len(self.classes), np.nan)
        for r in self.rows(f"SELECT class_id, mi FROM classwise_mi WHERE {condition} ORDER BY class_id"):
            values[r["class_id"]] = r["mi"]
        return values

    def setting_map(self, s: dict[str, Any], name: str) -> np.ndarray:
        return self.maps.read(layout.setting_maps(self.dataset, self.split, s["model"], s["train_split"], s["method"],
                                                  s["k"], s["seed"], s["embedding"], s["layer"]), name)

    def attention(self, model: str, layer: int) -> np.ndarray:
        path = layout.attention_maps(self.dataset, self.split, model)
        return self.maps.read(path, "attention")[self.maps.attrs(path)["layers"].index(layer)]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def select_rows(data: ReportData, comp: Comparison) -> list[Row]:
    """The settings one comparison shows: models at their best (or a fixed) layer, or the
    layers of one model."""
    seg = data.rows("SELECT * FROM segmentation ORDER BY model, embedding, layer, k, method")
    if not seg:
        raise StoreError(f"{data.cfg.results} has no segmentation rows for {data.dataset}/{data.split}")
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
    figures.pyplot().close(fig)
    written += [out / f"{name}.png", out / f"{name}.svg"]
    return base64.b64encode(buf.getvalue()).decode()


def _section(title: str, panels: tuple[Panel, ...], draw_args: tuple, folder: Path, written: list[Path],
             head: str = "") -> str:
    body = []
    with figures.style():
        for panel in panels:
            data = _save(panel.draw(*draw_args), folder, panel.file, written)
            body.append(f'<figure><img alt="{html.escape(panel.caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption><b>{html.escape(panel.caption)}.</b> {html.escape(panel.reading)}"
                        f"</figcaption></figure>")
    return f"<section><h2>{html.escape(title)}</h2>{head}{''.join(body)}</section>"


def _comparison_section(data: ReportData, comp: Comparison, rows: list[Row], out: Path, written: list[Path]) -> str:
    title = comp.title or (f"{comp.compare}: {comp.embedding}, layer {comp.layer}" if comp.compare != "layers"
                           else f"layers of {rows[0].setting['model']}: {comp.embedding}")
    table = _table(["setting", "mIoU", "pixel acc.", "NMI", "NMI (bias-aware)"],
                   [[r.label, r.setting["miou"], r.setting["pixel_accuracy"], r.setting["nmi"],
                     r.setting["nmi_bias_aware"]] for r in rows]
                   + [["ground truth", None, None, data.gt["nmi"], data.gt["nmi_bias_aware"]]])
    return _section(title, COMPARISON_PANELS, (data, rows), out / _slug(title), written, head=table)


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


def is_done(cfg: ReportConfig) -> bool:
    """A report is always redrawn: it is cheap and reads whatever the results hold now."""
    return False


def run_report(cfg: ReportConfig, *, address: str | None = None, progress: bool = True) -> ReportResult:
    """Draw every comparison of ``cfg`` and the summary panels; write ``<out>/index.html``.
    (``address`` and ``progress`` are accepted for the common stage signature.)"""
    data = ReportData(cfg)
    chosen = [(comp, select_rows(data, comp)) for comp in cfg.comparisons]  # all checked before a figure is drawn
    seg = data.rows("SELECT k, method FROM segmentation ORDER BY k, method LIMIT 1")[0]
    with tempfile.TemporaryDirectory(prefix="rep-pipeline-report-") as scratch:
        # on object storage the page is drawn into a local folder and put there once whole
        out = cfg.out if is_local(cfg.out) else Path(scratch)
        index, written = _draw(cfg, data, chosen, seg, out)
        if not is_local(cfg.out):
            index, written = _upload(out, cfg.out, written)
    return ReportResult(index, written)


def _draw(cfg: ReportConfig, data: ReportData, chosen: list, seg: dict[str, Any], out: Path) -> tuple[Path, list[Path]]:
    written: list[Path] = []
    sections = [_comparison_section(data, comp, rows, out, written) for comp, rows in chosen]
    sections.append(_section(f"correlations (K = {seg['k']}, {seg['method']})", SUMMARY_PANELS,
                             (data, seg["k"], seg["method"]), out / "correlations", written))
    intro = (f"Dataset {html.escape(data.dataset)}, test split {html.escape(data.split)}. Ground truth: NMI "
             f"{data.gt['nmi']:.3f} (bias-aware {data.gt['nmi_bias_aware']:.3f}).")
    index = out / "index.html"
    out.mkdir(parents=True, exist_ok=True)
    index.write_text(PAGE.format(title=html.escape(cfg.title or f"{data.dataset} / {data.split}"), intro=intro,
                                 sections="\n".join(sections)))
    return index, written


def _upload(folder: Path, target: ObjectPath, written: list[Path]) -> tuple[ObjectPath, list[ObjectPath]]:
    """Put the drawn files under ``target``, the page last (it links the rest)."""
    files = [*written, folder / "index.html"]
    for path in files:
        (target / path.relative_to(folder).as_posix()).write_bytes(path.read_bytes())
    return target / "index.html", [target / p.relative_to(folder).as_posix() for p in written]
