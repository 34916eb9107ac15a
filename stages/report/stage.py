"""The report stage: the visual protocol's figures and a self-contained ``index.html``.

Reads only the results folder (tables and maps through ``pipeline.results``); draws every
panel of ``panels.COMPARISON_PANELS`` for each comparison and the ``SUMMARY_PANELS`` once,
and, when the results hold direction probes (``rep-pipeline probe``), the ``DIRECTION_PANELS``
once in a "direction probes" section; writes each as PNG and SVG under ``<out>/<section>/``,
and an ``index.html`` that embeds the PNGs, so it opens anywhere without network or companion
files. Results of probes alone make a page of that section alone.
"""
from __future__ import annotations

import base64
import html
import io
import re
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from rep_pipeline.pipeline.config import Comparison, ReportConfig
from rep_pipeline.pipeline.errors import ConfigError, StoreError
from rep_pipeline.pipeline.location import ObjectPath, is_local
from rep_pipeline.pipeline.results import Results
from rep_pipeline.storage_schemas import results as layout

from . import figures
from .panels import COMPARISON_PANELS, DIRECTION_PANELS, SUMMARY_PANELS, Panel, Row


@dataclass
class ReportResult:
    index: Path
    figures: list[Path] = field(default_factory=list)

    def summary(self) -> list[str]:
        return [f"report: {self.index} ({len(self.figures)} figure files)"]


class ReportData:
    """The results of one (dataset, split), as the panels read them: its segmentation results
    (``segmented``) and its direction probes (``directions``), one of them at least."""

    def __init__(self, cfg: ReportConfig):
        self.cfg = cfg
        self.results = Results(cfg.results)
        self.maps = self.results.maps()
        tables = self.results.tables()
        found = {table: [tuple(r.values()) for r in self.results.rows(
            f"SELECT DISTINCT dataset, split FROM {table} ORDER BY ALL")] if table in tables else []
            for table in ("segmentation", "direction_summary")}
        if not any(found.values()):
            raise StoreError(f"{cfg.results} holds neither segmentation results nor direction probes; run "
                             f"`rep-pipeline evaluate` or `rep-pipeline probe`")
        pairs = sorted({*found["segmentation"], *found["direction_summary"]})
        pairs = [p for p in pairs if (cfg.dataset in (None, p[0])) and (cfg.split in (None, p[1]))]
        if len(pairs) != 1:
            raise ConfigError(f"the results hold {len(pairs)} (dataset, split) pairs matching the request "
                              f"({pairs[:6]}); choose one with --dataset and --split")
        self.dataset, self.split = pairs[0]
        self.segmented = pairs[0] in found["segmentation"]
        self.directions = pairs[0] in found["direction_summary"]
        if self.segmented:
            self._read_ground_truth()

    def _read_ground_truth(self) -> None:
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
            raise StoreError(f"{self.cfg.results} has no ground-truth row for {self.dataset}/{self.split}; run "
                             f"`rep-pipeline evaluate` again")
        self.gt = truth[0]
        self.gt_classwise = self.classwise("source = 'ground_truth'")

    # -- direction probes ----------------------------------------------------------------------
    @cached_property
    def direction_summary(self) -> list[dict[str, Any]]:
        """Every ``direction_summary`` row of this dataset and split (patch before class token,
        hyperplane before cosine)."""
        if not self.directions:
            return []
        return self.rows("SELECT * FROM direction_summary ORDER BY model, object DESC, rule DESC, layer, "
                         "k_shot NULLS FIRST, embedding, category")

    def direction_rows(self, *, per_category: bool = False, every_layer: bool = False,
                       every_shot: bool = False) -> list[dict[str, Any]]:
        """Summary rows of the category 'all' (or, ``per_category``, of each category), at each
        model's last probed block (or every block) and, for the cosine rule, at the largest k
        probed for the object (or every k)."""
        rows = [r for r in self.direction_summary if (r["category"] != "all") == per_category]
        last = {}
        for r in rows:
            last[r["model"]] = max(last.get(r["model"], r["layer"]), r["layer"])
        shots = {}
        for r in (r for r in rows if r["rule"] == "cosine"):
            shots[r["object"]] = max(shots.get(r["object"], r["k_shot"]), r["k_shot"])
        return [r for r in rows if (every_layer or r["layer"] == last[r["model"]])
                and (every_shot or r["rule"] != "cosine" or r["k_shot"] == shots[r["object"]])]

    @cached_property
    def _direction_masks(self) -> list[dict[str, Any]]:
        out = []
        hyper = [r for r in self.direction_rows(per_category=True)
                 if r["rule"] == "hyperplane" and r["object"] == "patch"]
        for model, category, layer in dict.fromkeys((r["model"], r["category"], r["layer"]) for r in hyper):
            probed = [r["embedding"] for r in hyper if (r["model"], r["category"]) == (model, category)]
            # the probe stage keeps the masks of keys where keys were probed, else of its first embedding
            for embedding in sorted(dict.fromkeys(probed), key=lambda e: (e != "keys", probed.index(e))):
                path = layout.direction_masks(self.dataset, self.split, model, category, embedding, layer)
                try:
                    attrs = self.maps.attrs(path)
                except StoreError:
                    continue
                f1 = {r["concept_id"]: r["f1"] for r in self.rows(
                    f"SELECT concept_id, f1 FROM direction_probes WHERE rule = 'hyperplane' AND object = 'patch' "
                    f"AND model = {_sql(model)} AND embedding = {_sql(embedding)} AND layer = {int(layer)} "
                    f"AND category = {_sql(category)}")}
                cosine = self.maps.read(path, "cosine_decisions") if attrs.get("cosine_embedding") else None
                out.append({"model": model, "category": category, "embedding": embedding, "layer": layer,
                            "names": list(attrs["names"]), "f1": [f1.get(c, float("nan")) for c in attrs["concepts"]],
                            "cosine": cosine, "cosine_embedding": attrs.get("cosine_embedding"),
                            **{name: self.maps.read(path, name) for name in ("images", "truth", "decisions")}})
                break
        return out

    def direction_masks(self) -> list[dict[str, Any]]:
        """Figure d4's inputs per (model, category) at the model's last probed block: names and
        hyperplane F1 of up to five concepts, their images, ground-truth masks and patch decisions."""
        return self._direction_masks

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


def _sql(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


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
        for panel in (p for p in panels if p.applies(*draw_args)):
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


def _directions_section(data: ReportData, out: Path, written: list[Path]) -> str:
    """The direction probes: the best token type per (model, object, rule), then the d-panels."""
    rows = data.direction_rows()
    best = []
    for key in dict.fromkeys((r["model"], r["object"], r["rule"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["object"], r["rule"]) == key]
        top = max(mine, key=lambda r: r["f1"])
        best.append([*key, top["k_shot"], top["layer"], f"{figures.token_label(top['embedding'])} ({top['embedding']})",
                     top["f1"], top["f1_std"], top["accuracy"], top["precision"], top["recall"], top["n_concepts"]])
    head = ("<p>Concept templates per token type (PROTOCOL.md section 9): hyperplanes trained on the train split and "
            "cosine templates from k support images, scored on the test split with balanced metrics. The table gives, "
            "per model, object and rule, the token type with the highest F1 (the mean over concepts; cosine: at the "
            "largest k probed, std over trials) at the model's last probed block (numbered from 0).</p>"
            + _table(["model", "object", "rule", "k", "block", "best token type", "F1", "F1 std", "accuracy",
                      "precision", "recall", "concepts"], best))
    return _section("direction probes", DIRECTION_PANELS, (data,), out / "directions", written, head=head)


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
    chosen, seg = [], None
    if data.segmented:  # results of direction probes alone have no comparisons to draw
        chosen = [(comp, select_rows(data, comp)) for comp in cfg.comparisons]  # all checked before a figure is drawn
        seg = data.rows("SELECT k, method FROM segmentation ORDER BY k, method LIMIT 1")[0]
    with tempfile.TemporaryDirectory(prefix="rep-pipeline-report-") as scratch:
        # on object storage the page is drawn into a local folder and put there once whole
        out = cfg.out if is_local(cfg.out) else Path(scratch)
        index, written = _draw(cfg, data, chosen, seg, out)
        if not is_local(cfg.out):
            index, written = _upload(out, cfg.out, written)
    return ReportResult(index, written)


def _draw(cfg: ReportConfig, data: ReportData, chosen: list, seg: dict[str, Any] | None,
          out: Path) -> tuple[Path, list[Path]]:
    written: list[Path] = []
    sections = [_comparison_section(data, comp, rows, out, written) for comp, rows in chosen]
    if seg is not None:
        sections.append(_section(f"correlations (K = {seg['k']}, {seg['method']})", SUMMARY_PANELS,
                                 (data, seg["k"], seg["method"]), out / "correlations", written))
    if data.directions:
        sections.append(_directions_section(data, out, written))
    intro = (f"Dataset {html.escape(data.dataset)}, test split {html.escape(data.split)}. " +
             (f"Ground truth: NMI {data.gt['nmi']:.3f} (bias-aware {data.gt['nmi_bias_aware']:.3f})." if data.segmented
              else "The results hold no segmentation of this split (`rep-pipeline evaluate` writes it): only the "
                   "direction probes are shown."))
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
