"""The report stage: the visual protocol's figures and a self-contained ``index.html``.

Reads only the results folder (tables and maps through ``pipeline.results``); draws every
panel of ``panels.COMPARISON_PANELS`` for each comparison and the ``SUMMARY_PANELS`` once,
and, when the results hold direction probes (``rep-pipeline probe``), the ``DIRECTION_PANELS``
once in a "direction probes" section, when they hold ULTra explanations (``rep-pipeline
explain``), the ``ULTRA_PANELS`` once per run in an "ULTra explanations" section, and, when they
hold zero-shot correspondence (``rep-pipeline correspond``), the ``CORRESPONDENCE_PANELS`` once
per keypoint (dataset, split) in a "zero-shot correspondence" section, and, when they hold the
online k-means' sensitivity study (``kmeans_sensitivity``, PROTOCOL.md 12.2), the
``SENSITIVITY_PANELS`` once; writes each as PNG and SVG under ``<out>/<section>/``, and an
``index.html`` that embeds the PNGs, so it opens anywhere without network or companion files.
Results of probes, of ULTra explanations or of correspondence alone make a page of those
sections alone (ULTra's own section 5 rows, methods ``ultra_*``, are drawn in its section and
are not a segmentation to compare: the comparisons need the rows of ``rep-pipeline evaluate``).
Every comparison and the correlations state their K and method (defaults: the smallest K
evaluated, online where evaluated), the number of test images and that best layers are selected
on the evaluated split; tables show the 95 % intervals and figures their error bars where the
results hold them (``<column>_lo`` / ``_hi``; older results folders have none and are drawn
without); a provenance footer gives each model's weights and feature-group fingerprint, the
package versions, and the run config where the run left a copy (``run_config.yaml``).
Correspondence is of a keypoint dataset (SPair-71k, partpairs, synthetic pairs), not of the
segmentation's dataset: ``--dataset``/``--split`` choose the segmentation's, and pick among the
keypoint datasets only where they match no segmentation or direction probes.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from rep_pipeline.pipeline.config import IGNORE_INDEX, Comparison, ReportConfig
from rep_pipeline.pipeline.errors import ConfigError, StoreError
from rep_pipeline.pipeline.finite import finite_or
from rep_pipeline.pipeline.location import ObjectPath, is_local
from rep_pipeline.pipeline.results import Params, Results
from rep_pipeline.pipeline.store import LIBRARY as STORE_LIBRARY
from rep_pipeline.storage_schemas import results as layout

from . import figures
from .explorer import explorer_section
from .panels import (COMPARISON_PANELS, CORRESPONDENCE_PANELS, DIRECTION_PANELS, SENSITIVITY_PANELS, SUMMARY_PANELS,
                     ULTRA_PANELS, Panel, Row, Selection)


@dataclass
class ReportResult:
    index: Path
    figures: list[Path] = field(default_factory=list)

    def summary(self) -> list[str]:
        return [f"report: {self.index} ({len(self.figures)} figure files)"]


class ReportData:
    """The results of one (dataset, split), as the panels read them: its segmentation results
    (``segmented``: evaluate's rows, not ULTra's own section 5 rows), its direction probes
    (``directions``) and its ULTra runs (``ultra``); and, whatever dataset those are of, the
    zero-shot correspondence of every keypoint (dataset, split) the results hold
    (``correspondence_sets``). One of them at least; without segmentation, direction probes and
    ULTra runs, ``dataset`` and ``split`` are None."""

    def __init__(self, cfg: ReportConfig):
        self.cfg = cfg
        self.results = Results(cfg.results, models=cfg.models, snapshot=True)
        self.maps = self.results.maps()
        tables = self.results.tables()
        # ULTra's section 5 rows (methods ultra_*) belong to its own section, not to the comparisons
        where = {"segmentation": (" WHERE NOT starts_with(method, ?)", [ULTRA_METHOD_PREFIX])}
        found = {table: [tuple(r.values()) for r in self.results.rows(
            f"SELECT DISTINCT dataset, split FROM {table}{where.get(table, ('',))[0]} ORDER BY ALL",
            where.get(table, ('', None))[1])] if table in tables
            else [] for table in ("segmentation", "direction_summary", "correspondence", "ultra_runs")}
        if not any(found.values()):
            raise StoreError(f"{cfg.results} holds neither segmentation results, direction probes, ULTra "
                             f"explanations nor correspondence; run `rep-pipeline evaluate`, `rep-pipeline probe`, "
                             f"`rep-pipeline explain` or `rep-pipeline correspond`")
        requested = lambda p: (cfg.dataset in (None, p[0])) and (cfg.split in (None, p[1]))  # noqa: E731
        every = sorted({*found["segmentation"], *found["direction_summary"], *found["ultra_runs"]})
        pairs = [p for p in every if requested(p)]
        keypoints = [p for p in found["correspondence"] if requested(p)]
        # correspondence is of its own keypoint dataset: all of it is drawn, unless the request
        # names none of the segmentation results and some of the correspondence
        self.correspondence_sets: list[tuple[str, str]] = (
            keypoints if not pairs and keypoints and (cfg.dataset or cfg.split) else list(found["correspondence"]))
        if len(pairs) > 1 or (not pairs and (every and not keypoints or not self.correspondence_sets)):
            raise ConfigError(f"the results hold {len(pairs)} (dataset, split) pairs matching the request "
                              f"({(pairs or every)[:6]}); choose one with --dataset and --split")
        self.dataset, self.split = pairs[0] if pairs else (None, None)
        self.segmented = bool(pairs) and pairs[0] in found["segmentation"]
        self.directions = bool(pairs) and pairs[0] in found["direction_summary"]
        self.ultra = bool(pairs) and pairs[0] in found["ultra_runs"]
        self._correspondence: dict[tuple[str, str], dict[str, Any]] = {}
        self._ultra_maps: dict[str, list[dict[str, Any]]] = {}
        if self.segmented:
            self._read_ground_truth()

    def _read_ground_truth(self) -> None:
        gt_path = layout.ground_truth_maps(self.dataset, self.split)
        truth_meta = self.maps.ground_truth(gt_path)
        self.classes = list(truth_meta.classes)
        self.palette = truth_meta.palette_array
        self.gt_images = self.maps.read(gt_path, "images")
        self.gt_labels = self.maps.read(gt_path, "labels")
        self.gt_aggregate = self.maps.read(gt_path, "aggregate")
        self.gt_example_ids = list(truth_meta.example_ids or [])
        try:  # the classes of the whole test split's ground truth (the aggregate maps' legend)
            present = self.maps.read(gt_path, "counts").sum(axis=(0, 1)) > 0
            self.gt_present = [int(c) for c in np.flatnonzero(present)]
        except StoreError:
            self.gt_present = sorted(set(np.unique(self.gt_labels).tolist()) - {IGNORE_INDEX})
        truth = self.rows("SELECT * FROM ground_truth") if "ground_truth" in self.results.tables() else []
        if not truth:
            raise StoreError(f"{self.cfg.results} has no ground-truth row for {self.dataset}/{self.split}; run "
                             f"`rep-pipeline evaluate` again")
        self.gt = truth[0]
        self.gt_classwise = self.classwise(source="ground_truth")

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
                    attrs = self.maps.recorded(path)
                except StoreError:
                    continue
                where, params = _where(rule="hyperplane", object="patch", model=model, embedding=embedding,
                                       layer=int(layer), category=category)
                f1 = {r["concept_id"]: r["f1"] for r in self.rows(
                    f"SELECT concept_id, f1 FROM direction_probes WHERE {where}", params)}
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

    # -- ULTra explanations (PROTOCOL.md section 10.9) ---------------------------------------------
    @cached_property
    def _ultra(self) -> dict[str, list[dict[str, Any]]]:
        """The rows of every ULTra table of this dataset and split and ULTra's section 5 rows
        (``segmentation``, methods ``ultra_*``), read once; runs once each."""
        if not self.ultra:
            return {}
        tables = self.results.tables()
        order = {"ultra_runs": "model, f, embedding, zeta NULLS LAST, k_img NULLS LAST, run_id",
                 "ultra_oracle": "run_id, layer", "ultra_itiou": "run_id, layer, tau",
                 "ultra_perturbation": "run_id, perturbation, layer"}
        out = {table: self.rows(f"SELECT * FROM {table} ORDER BY {o}") if table in tables else []
               for table, o in order.items()}
        out["ultra_runs"] = list({r["run_id"]: r for r in out["ultra_runs"]}.values())
        out["segmentation"] = self.rows(
            "SELECT * FROM segmentation WHERE starts_with(method, ?) ORDER BY codebook_fingerprint, layer, method",
            [ULTRA_METHOD_PREFIX]) if "segmentation" in tables else []
        return out

    def ultra_runs(self) -> list[dict[str, Any]]:
        """The ``ultra_runs`` rows of this dataset and split, one per run, by model, scalar f,
        embedding and zeta."""
        return self._ultra.get("ultra_runs", [])

    def ultra_run(self, run_id: str) -> dict[str, Any]:
        found = next((r for r in self.ultra_runs() if r["run_id"] == run_id), None)
        if found is None:
            raise KeyError(f"no ULTra run {run_id!r} in {self.cfg.results} for {self.dataset}/{self.split}")
        return found

    def ultra_rows(self, table: str, run_id: str) -> list[dict[str, Any]]:
        """One run's rows of ``table``: ``ultra_oracle``, ``ultra_itiou``, ``ultra_perturbation``
        (by layer) or ``segmentation`` (its 'dataset' scoring, section 10.4: the rows whose
        codebook_fingerprint is the run's id)."""
        key = "codebook_fingerprint" if table == "segmentation" else "run_id"
        return [r for r in self._ultra.get(table, []) if r[key] == run_id]

    def ultra_zeta_runs(self, run_id: str) -> list[dict[str, Any]]:
        """The runs that differ from ``run_id``'s only in zeta (same model, features, scalar,
        clustering, aggregation and images; their explained layers may differ), itself included,
        by zeta; empty unless there are two zetas at least (figure u5's curves against zeta)."""
        keys = ("model", "embedding", "f", "k_img", "linkage", "metric", "aggregate", "self_fill", "order",
                "n_images", "store_fingerprint")
        run = self.ultra_run(run_id)
        family = sorted((r for r in self.ultra_runs() if r["zeta"] is not None and r["k_img"] is None
                         and all(r[k] == run[k] for k in keys)), key=lambda r: r["zeta"])
        return family if run in family and len({r["zeta"] for r in family}) > 1 else []

    def ultra_maps(self, run_id: str) -> list[dict[str, Any]]:
        """Figures u1 to u3 and u7's inputs: per explained layer whose maps are stored (by layer),
        the attrs (layer, tokens, zetas, grid, rho, tau, ...) and the example images' arrays
        ``images``, ``labels``, ``token_maps``, ``class_maps``, ``linkage`` and ``cuts`` (not
        ``segments``, every test image's)."""
        if run_id not in self._ultra_maps:
            run, out = self.ultra_run(run_id), []
            for layer in sorted(run["layers"]):
                path = layout.ultra_maps(self.dataset, self.split, run["model"], run_id, layer)
                try:
                    attrs = self.maps.recorded(path)
                except StoreError:
                    continue
                out.append({**attrs, "layer": int(layer), **{name: self.maps.read(path, name) for name in (
                    "images", "labels", "token_maps", "class_maps", "linkage", "cuts")}})
            self._ultra_maps[run_id] = out
        return self._ultra_maps[run_id]

    def ultra_ground_truth(self, run_id: str) -> dict[str, Any]:
        """Figure u4's images, ground truth, class names and palette: the evaluate stage's ground
        truth where the results hold it; else the run's own example images and labels, the class
        names of its ``per_class_iou`` rows and the VOC palette."""
        if self.segmented:
            return {"images": self.gt_images, "labels": self.gt_labels, "classes": self.classes,
                    "palette": self.palette}
        from rep_pipeline.pipeline.datasets import voc_palette

        stored = self.ultra_maps(run_id)
        names = {r["class_id"]: r["class_name"] for r in self.rows(
            "SELECT DISTINCT class_id, class_name FROM per_class_iou WHERE codebook_fingerprint = ?", [run_id])} \
            if "per_class_iou" in self.results.tables() else {}
        labels = stored[0]["labels"] if stored else np.zeros((0, 1, 1), np.uint8)
        present = [int(v) for v in np.unique(labels) if v != IGNORE_INDEX]
        n = max([*names, *present, -1]) + 1
        return {"images": stored[0]["images"] if stored else np.zeros((0, 1, 1, 3), np.uint8), "labels": labels,
                "classes": [names.get(c, f"class {c}") for c in range(n)], "palette": voc_palette(max(n, 1))}

    # -- zero-shot correspondence (PROTOCOL.md section 11) ----------------------------------------
    def _keypoint_set(self, dataset: str, split: str) -> dict[str, Any]:
        """Everything the c-panels read of one keypoint (dataset, split), read once."""
        key = (dataset, split)
        if key not in self._correspondence:
            rows = self.results.rows("SELECT * FROM correspondence ORDER BY model, embedding, layer, alpha",
                                     dataset=dataset, split=split)
            groups = {g["model"]: g for g in self.results.rows(
                "SELECT * FROM feature_groups ORDER BY model", dataset=dataset, split=split)} \
                if "feature_groups" in self.results.tables() else {}
            alphas = sorted({r["alpha"] for r in rows})
            alpha = min(alphas, key=lambda a: (abs(a - HEADLINE_ALPHA), a))
            self._correspondence[key] = {"rows": rows, "groups": groups, "alpha": alpha, "alphas": alphas,
                                         "models": _shown_models(rows, groups)}
        return self._correspondence[key]

    def correspondence_alpha(self, dataset: str, split: str) -> float:
        """The headline alpha of the c-panels: 0.10 where it was scored, else the nearest one."""
        return self._keypoint_set(dataset, split)["alpha"]

    def correspondence_models(self, dataset: str, split: str) -> list[dict[str, Any]]:
        """The model keys drawn, Base before Large of each family: per key its ``alias``
        (``feature_groups``; else the key), ``family`` and ``size`` (the alias split as
        '<family>-<size letter><patch>', None where it is not of that form), ``depth`` (blocks:
        ``feature_groups``, else the deepest scored block + 1) and ``last_norm``. A key whose
        group has its last tokens before the final norm is left to c4 where its alias has a key
        after the norm here."""
        return self._keypoint_set(dataset, split)["models"]

    def correspondence_pairs(self, dataset: str, split: str) -> list[tuple[str, str]]:
        """(Base, Large) model keys of one family: the aliases '<family>-b<patch>' and
        '<family>-l<patch>', where the family has exactly one of each among the keys drawn."""
        models = self.correspondence_models(dataset, split)
        out = []
        for family in dict.fromkeys(m["family"] for m in models if m["family"]):
            base = [m["model"] for m in models if m["family"] == family and m["size"] == "b"]
            large = [m["model"] for m in models if m["family"] == family and m["size"] == "l"]
            if len(base) == 1 and len(large) == 1:
                out.append((base[0], large[0]))
        return out

    def correspondence_rows(self, dataset: str, split: str, *, alpha: float | None = None) -> list[dict[str, Any]]:
        """``correspondence`` rows of the models drawn at ``alpha`` (default the headline alpha)."""
        data = self._keypoint_set(dataset, split)
        alpha = data["alpha"] if alpha is None else alpha
        shown = {m["model"] for m in data["models"]}
        return [r for r in data["rows"] if r["model"] in shown and abs(r["alpha"] - alpha) < 1e-9]

    def correspondence_best(self, dataset: str, split: str) -> list[dict[str, Any]]:
        """Table 3 per model drawn, at the headline alpha: ``pck`` {embedding: the best layer's
        pck_point} and ``layer`` {embedding: that block}, ties to the earliest block; the model's
        best (``best_embedding``, ``best_layer``: highest pck_point, then the earliest block, then
        the embedding's name, as ``correspondence_best``) and ``depth``."""
        rows = self.correspondence_rows(dataset, split)
        out = []
        for m in self.correspondence_models(dataset, split):
            mine = [r for r in rows if r["model"] == m["model"]]
            best: dict[str, dict[str, Any]] = {}
            for r in sorted(mine, key=lambda r: (-finite_or(r["pck_point"], -math.inf), r["layer"])):
                best.setdefault(r["embedding"], r)
            if not best:
                continue
            top = min(best, key=lambda e: (-finite_or(best[e]["pck_point"], -math.inf), best[e]["layer"], e))
            out.append({**m, "pck": {e: r["pck_point"] for e, r in best.items()},
                        "interval": {e: figures.interval(r, "pck_point") for e, r in best.items()},
                        "layer": {e: int(r["layer"]) for e, r in best.items()},
                        "best_embedding": top, "best_layer": int(best[top]["layer"])})
        return out

    def correspondence_differences(self, dataset: str, split: str) -> list[dict[str, Any]]:
        """'Large minus Base' of each pair (``correspondence_pairs``): per embedding, the
        difference of the best-layer pck_point (fractions)."""
        best = {b["model"]: b for b in self.correspondence_best(dataset, split)}
        out = []
        for base, large in self.correspondence_pairs(dataset, split):
            if base in best and large in best:
                b, lg = best[base], best[large]
                out.append({"family": b["family"], "base": base, "large": large,
                            "pck": {e: lg["pck"][e] - b["pck"][e] for e in b["pck"] if e in lg["pck"]}})
        return out

    def correspondence_summary(self, dataset: str, split: str) -> dict[str, Any]:
        """Pairs, keypoints, grid sizes and geometries of the rows (for the section's text)."""
        rows = self._keypoint_set(dataset, split)["rows"]
        return {**{column: sorted({r[column] for r in rows}) for column in ("n_pairs", "n_keypoints", "image_size",
                                                                           "geometry")},
                "alphas": self._keypoint_set(dataset, split)["alphas"]}

    def correspondence_examples(self, dataset: str, split: str) -> list[dict[str, Any]]:
        """Figure c3's inputs: per model drawn, embedding (K, Q, V, T order) and stored example
        keypoint j = 0, 1, ...: its attrs (layers, source_point, target_point, predictions,
        radius, best_layer, ...) and arrays ``source``, ``target``, ``cosine`` (float32, NaN on
        padding), with ``model`` and a row ``label``."""
        data = self._keypoint_set(dataset, split)
        if "examples" in data:
            return data["examples"]
        out = []
        for m in data["models"]:
            try:
                recorded = self.maps.run_record(layout.correspondence_maps(dataset, split, m["model"]))
            except StoreError:
                continue
            scored = {r["embedding"] for r in data["rows"] if r["model"] == m["model"]}
            for embedding in figures.embedding_order([s[0] for s in recorded.settings or ()] + sorted(scored)):
                for j in itertools.count():
                    path = layout.correspondence_example(dataset, split, m["model"], embedding, j)
                    try:
                        attrs = self.maps.recorded(path)
                    except StoreError:
                        break
                    example = {**attrs, "model": m["model"], "embedding": embedding, "example": j,
                               **{name: self.maps.read(path, name) for name in ("source", "target")},
                               "cosine": self.maps.read(path, "cosine").astype(np.float32)}
                    example["label"] = (f"{m['model']}\n{embedding}\n{attrs.get('category', '')} "
                                        f"kp {attrs.get('kp_id', j)}")
                    out.append(example)
        data["examples"] = out
        return out

    def ln_ablation(self, dataset: str, split: str) -> list[dict[str, Any]]:
        """Rows of the ``ln_ablation`` view (section 12.1; none where the view is not there) that
        belong with this keypoint dataset: its correspondence rows, and the segmentation rows of
        the report's dataset (of every dataset where the report has none)."""
        try:
            rows = self.results.rows("SELECT * FROM ln_ablation ORDER BY task DESC, measure, dataset, model")
        except StoreError:  # no feature_groups, so no view
            return []
        return [r for r in rows if (r["task"] == "correspondence" and r["dataset"] == dataset)
                or (r["task"] == "segmentation" and (not self.segmented or r["dataset"] == self.dataset))]

    def rows(self, sql: str, params: Params = None) -> list[dict[str, Any]]:
        """Rows of ``sql`` (its placeholders' values ``params``); every table holds only this
        dataset's and split's rows (all rows where the report has no segmentation or direction
        probes)."""
        return self.results.rows(sql, params, dataset=self.dataset, split=self.split)

    @cached_property
    def _tables(self) -> set[str]:
        return set(self.results.tables())

    def has_table(self, table: str) -> bool:
        return table in self._tables

    @cached_property
    def _segmentation(self) -> list[dict[str, Any]]:
        if not self.has_table("segmentation"):
            return []
        rows = self.rows("SELECT * FROM segmentation WHERE NOT starts_with(method, ?) "
                         "ORDER BY model, embedding, layer, k, method, seed", [ULTRA_METHOD_PREFIX])
        return [r for r in rows if not r.get("variant")]  # codebook variants (12.2) have their own section

    def segmentation_rows(self) -> list[dict[str, Any]]:
        """The k-means segmentation rows of this dataset and split (not ULTra's, not variants'),
        by model, embedding, layer, K, method and seed."""
        return self._segmentation

    @cached_property
    def _attention_rows(self) -> list[dict[str, Any]]:
        return self.rows("SELECT * FROM attention_mi ORDER BY model, layer, head") \
            if self.has_table("attention_mi") else []

    def attention_rows(self) -> list[dict[str, Any]]:
        """``attention_mi`` rows (model, layer, head, mean, its interval where kept, ...)."""
        return self._attention_rows

    def example_ids(self, indices: list[int]) -> list[Any]:
        """The dataset's ids of the stored example images ``indices`` (empty where not recorded)."""
        ids = self.gt_example_ids
        return [ids[i] for i in indices] if ids and all(i < len(ids) for i in indices) else []

    def _setting_path(self, s: dict[str, Any]) -> str:
        return layout.setting_maps(self.dataset, self.split, s["model"], s["train_split"], s["method"], s["k"],
                                   s["seed"], s["embedding"], s["layer"])

    def _has_array(self, path: str, name: str) -> bool:
        try:
            return self.maps.has(path, name)
        except Exception:  # noqa: BLE001 - a store that cannot answer holds nothing to draw
            return False

    def has_setting_map(self, s: dict[str, Any], name: str) -> bool:
        return self._has_array(self._setting_path(s), name)

    def _setting_where(self, s: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return _where(model=s["model"], train_split=s["train_split"], embedding=s["embedding"], layer=int(s["layer"]),
                      k=int(s["k"]), method=s["method"], seed=int(s["seed"]))

    def training_curve(self, s: dict[str, Any]) -> list[dict[str, Any]]:
        """The training curve (step, loss) of a setting's codebook, on its train split (that
        codebook's: its fingerprint tells it from variants trained for 12.2 beside it)."""
        if not self.has_table("training_curves"):
            return []
        fingerprint = {"codebook_fingerprint": s["codebook_fingerprint"]} if s.get("codebook_fingerprint") else {}
        where, params = _where(model=s["model"], split=s["train_split"], embedding=s["embedding"],
                               layer=int(s["layer"]), k=int(s["k"]), method=s["method"], seed=int(s["seed"]),
                               **fingerprint)
        return self.results.rows(f"SELECT step, loss FROM training_curves WHERE {where} ORDER BY step", params,
                                 dataset=self.dataset)

    def per_class_iou(self, s: dict[str, Any]) -> np.ndarray:
        """A setting's IoU per class (NaN where the class is neither predicted nor present)."""
        values = np.full(len(self.classes), np.nan)
        where, params = self._setting_where(s)
        for r in self.rows(f"SELECT class_id, iou FROM per_class_iou WHERE {where}", params):
            if r["iou"] is not None and 0 <= r["class_id"] < len(values):
                values[r["class_id"]] = r["iou"]
        return values

    def confusion(self, s: dict[str, Any]) -> tuple[np.ndarray, list[int], list[bool]]:
        """A setting's confusion matrix (K clusters x C classes, pixels), each cluster's mapped
        class (-1 where not recorded) and whether the Hungarian matching mapped it."""
        k = int(s["k"])
        matrix = np.zeros((k, len(self.classes)), np.int64)
        where, params = self._setting_where(s)
        for r in self.rows(f"SELECT cluster, class_id, pixels FROM confusion WHERE {where}", params):
            if 0 <= r["cluster"] < k and 0 <= r["class_id"] < len(self.classes):
                matrix[r["cluster"], r["class_id"]] += r["pixels"]
        mapped, hungarian = [-1] * k, [True] * k
        if self.has_table("matching"):
            for r in self.rows(f"SELECT cluster, class_id, hungarian FROM matching WHERE {where}", params):
                if 0 <= r["cluster"] < k:
                    mapped[r["cluster"]], hungarian[r["cluster"]] = int(r["class_id"]), bool(r["hungarian"])
        return matrix, mapped, hungarian

    def sensitivity_rows(self) -> list[dict[str, Any]]:
        """``kmeans_sensitivity`` rows of this dataset and split (PROTOCOL.md 12.2), empty where
        the table is not there."""
        if not self.has_table("kmeans_sensitivity"):
            return []
        return self.rows("SELECT * FROM kmeans_sensitivity ORDER BY model, embedding, layer, k, train_split, "
                         "batch_images, pca_interval, pca_batches, seed")

    def feature_groups(self, dataset: str | None = None, split: str | None = None) -> list[dict[str, Any]]:
        """``feature_groups`` rows (what each model key's features come from) of this dataset and
        split, or of the given ones."""
        if not self.has_table("feature_groups"):
            return []
        if dataset is None:
            return self.rows("SELECT * FROM feature_groups ORDER BY model")
        return self.results.rows("SELECT * FROM feature_groups ORDER BY model", dataset=dataset, split=split)

    def run_config(self) -> str | None:
        """The text of the run config the run driver copied into the results folder, if any."""
        path = self.results.path / getattr(layout, "RUN_CONFIG", "run_config.yaml")
        try:
            return path.read_bytes().decode("utf-8", "replace") if path.is_file() else None
        except (OSError, StoreError):
            return None

    def results_version(self) -> str | None:
        """The package version that started the results folder (its marker)."""
        import json

        try:
            return json.loads((self.results.path / layout.MARKER).read_bytes()).get("package_version")
        except (OSError, StoreError, ValueError, AttributeError):
            return None

    def classwise(self, **values: Any) -> np.ndarray:
        """Class-wise MI per class of the ``classwise_mi`` rows whose columns hold ``values``
        (NaN for a class without a row)."""
        where, params = _where(**values)
        out = np.full(len(self.classes), np.nan)
        for r in self.rows(f"SELECT class_id, mi FROM classwise_mi WHERE {where} ORDER BY class_id", params):
            out[r["class_id"]] = r["mi"]
        return out

    def setting_map(self, s: dict[str, Any], name: str) -> np.ndarray:
        return self.maps.read(layout.setting_maps(self.dataset, self.split, s["model"], s["train_split"], s["method"],
                                                  s["k"], s["seed"], s["embedding"], s["layer"]), name)

    def attention(self, model: str, layer: int) -> np.ndarray:
        path = layout.attention_maps(self.dataset, self.split, model)
        if (model, layer) not in self._attention:
            self._attention[(model, layer)] = self.maps.read(path, "attention")[
                list(self.maps.attention(path).layers).index(layer)]
        return self._attention[(model, layer)]

    @cached_property
    def _attention(self) -> dict[tuple[str, int], np.ndarray]:
        return {}

    def attention_layers(self, model: str) -> list[int]:
        """The blocks whose image-averaged attention is stored for ``model``."""
        return list(self.maps.attention(layout.attention_maps(self.dataset, self.split, model)).layers)

    def attention_grid(self, model: str) -> int:
        """G, the side of ``model``'s patch grid (the attention maps' attrs; else from the matrix)."""
        path = layout.attention_maps(self.dataset, self.split, model)
        grid = self.maps.attention(path).grid_side
        if grid:
            return grid
        return int(round(np.sqrt(self.attention(model, self.attention_layers(model)[0]).shape[-1])))

    def has_example_attention(self, model: str) -> bool:
        """Whether the attention maps of ``model`` keep ``example_attention`` (PROTOCOL.md 12.5)."""
        return self._has_array(layout.attention_maps(self.dataset, self.split, model), "example_attention")

    def example_attention(self, model: str) -> tuple[list[int], np.ndarray, list[int | None]]:
        """The example images' own head-averaged attention (layer, example, query, key), its
        blocks (the attrs' ``example_layers`` where given, else the attention's layers) and, per
        example, the index of the same image among the stored ground-truth examples (matched by
        the attrs' ``example_ids``; by position where none are recorded; None: not stored)."""
        path = layout.attention_maps(self.dataset, self.split, model)
        meta = self.maps.attention(path)
        maps = self.maps.read(path, "example_attention")
        layers = list(meta.example_layers or meta.layers)
        if len(layers) != maps.shape[0]:
            layers = list(meta.layers)[-maps.shape[0]:]
        ids = [str(i) for i in meta.example_ids or []]
        known = [str(i) for i in self.gt_example_ids]
        if ids and known:
            where = [known.index(i) if i in known else None for i in ids]
        else:
            where = [e if e < len(self.gt_images) else None for e in range(maps.shape[1])]
        return layers, maps, where

HEADLINE_ALPHA = 0.10  # PROTOCOL.md section 11.4
ULTRA_METHOD_PREFIX = "ultra_"  # the section 5 methods of ULTra's 'dataset' scoring (PROTOCOL.md section 10.4)
_ALIAS = re.compile(r"^(?P<family>.+)-(?P<size>[sblgh])(?P<patch>\d+)$")  # dino-b16, dinov2-reg-l14, clip-l14
_SIZES = "sblgh"


def _shown_models(rows: list[dict[str, Any]], groups: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The model keys of ``rows`` the c-panels draw, ordered by family and then size (see
    ``ReportData.correspondence_models``)."""
    models = []
    for model in dict.fromkeys(r["model"] for r in rows):
        g = groups.get(model, {})
        alias = g.get("alias") or model
        match = _ALIAS.match(alias)
        depth = g.get("depth") or max(int(r["layer"]) for r in rows if r["model"] == model) + 1
        models.append({"model": model, "alias": alias, "family": match["family"] if match else None,
                       "size": match["size"] if match else None, "depth": int(depth),
                       "last_norm": g.get("last_norm") or "after"})
    after = {m["alias"] for m in models if m["last_norm"] != "before"}
    models = [m for m in models if m["last_norm"] != "before" or m["alias"] not in after]
    return sorted(models, key=lambda m: (m["family"] or m["alias"], _SIZES.index(m["size"]) if m["size"] else
                                         len(_SIZES), m["alias"], m["model"]))


def _where(**values: Any) -> tuple[str, dict[str, Any]]:
    """``column = $column AND ...`` over the keyword names (columns, written by this module),
    and the parameters that carry the values to DuckDB."""
    return " AND ".join(f"{column} = ${column}" for column in values), values


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_k_method(seg: list[dict[str, Any]], k: int | None = None, method: str | None = None
                     ) -> tuple[int, str, str, str]:
    """The K and method of a comparison whose config leaves them open (``Comparison``): the method
    is online where it was evaluated (at the requested K), else the first evaluated; K the
    smallest evaluated with that method. Returns (K, method, why K, why the method)."""
    methods = sorted({r["method"] for r in seg if k is None or r["k"] == k})
    if method is not None:
        method_reason = "as requested"
    elif not methods:
        raise ConfigError(f"no evaluated codebooks with k={k}")
    elif "online" in methods:
        method, method_reason = "online", "the default: online where evaluated"
    else:
        method, method_reason = methods[0], f"the default: online was not evaluated ({', '.join(methods)} were)"
    ks = sorted({r["k"] for r in seg if r["method"] == method})
    if k is not None:
        k_reason = "as requested"
    elif not ks:
        raise ConfigError(f"no evaluated codebooks with method={method}")
    else:
        k = ks[0]
        k_reason = ("the default: the only K evaluated" if len(ks) == 1 else
                    f"the default: the smallest K evaluated ({', '.join(map(str, ks))})")
    return int(k), method, k_reason, method_reason


def _examples_with_class(data: ReportData, name: str) -> list[int]:
    """The stored example images whose ground truth shows class ``name``."""
    if name not in data.classes:
        raise ConfigError(f"images_with_class: {name!r} is not a class of {data.dataset} "
                          f"({', '.join(data.classes)})")
    cid = data.classes.index(name)
    return [i for i in range(len(data.gt_labels)) if (data.gt_labels[i] == cid).any()]


def select_rows(data: ReportData, comp: Comparison) -> Selection:
    """The settings one comparison shows: models at their best (or a fixed) layer, or the
    layers of one model, at the comparison's K and method (defaults: ``default_k_method``); a
    model's best layer is selected on the evaluated split, at ``layer_k`` where it is given
    (12.3: the codebooks of K = 97 at each model's best K = 27 layer)."""
    every = data.segmentation_rows()
    if not every:
        raise StoreError(f"{data.cfg.results} has no segmentation rows for {data.dataset}/{data.split}")
    mine = [r for r in every if r["embedding"] == comp.embedding and (not comp.models or r["model"] in comp.models)]
    if not mine:
        raise ConfigError(f"no evaluated {comp.embedding} codebooks" + (f" of {', '.join(comp.models)}"
                                                                         if comp.models else ""))
    k, method, k_reason, method_reason = default_k_method(mine, comp.k, comp.method)
    seg = [r for r in every if r["embedding"] == comp.embedding and r["k"] == k and r["method"] == method]
    if not seg:
        raise ConfigError(f"no evaluated {comp.embedding} codebooks with k={k}, method={method}")
    examples = _examples_with_class(data, comp.images_with_class) if comp.images_with_class else None
    shown = dict(comparison=comp, k=k, method=method, k_reason=k_reason, method_reason=method_reason,
                 colour=comp.colour, examples=examples or None, images_with_class=comp.images_with_class)
    models = list(comp.models) if comp.models else sorted({r["model"] for r in seg})
    if comp.compare == "layers":
        model = models[0]
        return Selection([Row(f"{model} L{r['layer']}", r) for r in sorted(seg, key=lambda r: r["layer"])
                          if r["model"] == model], **shown)
    layer_k = comp.layer_k if comp.layer == "best" and comp.layer_k not in (None, k) else None
    rows = []
    for model in models:
        mine = [r for r in seg if r["model"] == model]
        if not mine:
            raise ConfigError(f"model {model!r} has no evaluated {comp.embedding} codebook with k={k}, {method}")
        if layer_k is not None:
            at = [r for r in every if (r["model"], r["embedding"], r["k"], r["method"]) ==
                  (model, comp.embedding, layer_k, method)]
            if not at:
                raise ConfigError(f"layer_k={layer_k}: model {model!r} has no evaluated {comp.embedding} codebook "
                                  f"with k={layer_k}, {method} to select its best layer at")
            best = max(at, key=lambda r: r["miou"])["layer"]
            pick = next((r for r in mine if r["layer"] == best), None)
            if pick is None:
                raise ConfigError(f"model {model!r}: its best layer at k={layer_k} is {best}, which has no "
                                  f"evaluated k={k} codebook")
        else:
            pick = (max(mine, key=lambda r: r["miou"]) if comp.layer == "best"
                    else max(mine, key=lambda r: r["layer"]) if comp.layer == "last"
                    else next((r for r in mine if r["layer"] == int(comp.layer)), None))
        if pick is None:
            raise ConfigError(f"model {model!r} has no evaluated layer {comp.layer}")
        rows.append(Row(f"{model} L{pick['layer']}", pick))
    return Selection(rows, layer_k=layer_k, **shown)


def _save(fig: Any, out: Path, name: str, written: list[Path]) -> str:
    """Write PNG and SVG; return the PNG as base64 for the page."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    # the tight box once for both formats: savefig's "tight" draws the figure twice per format
    fig.draw_without_rendering()
    box = fig.get_tightbbox().padded(figures.pyplot().rcParams["savefig.pad_inches"])
    fig.savefig(buf, format="png", bbox_inches=box)
    (out / f"{name}.png").write_bytes(buf.getvalue())
    fig.savefig(out / f"{name}.svg", bbox_inches=box)
    figures.pyplot().close(fig)
    written += [out / f"{name}.png", out / f"{name}.svg"]
    return base64.b64encode(buf.getvalue()).decode()


def _section(title: str, panels: tuple[Panel, ...], draw_args: tuple, folder: Path, written: list[Path],
             head: str = "", level: int = 2) -> str:
    body = []
    with figures.style():
        for panel in (p for p in panels if p.applies(*draw_args)):
            data = _save(panel.draw(*draw_args), folder, panel.file, written)
            note = panel.notes(*draw_args)
            body.append(f'<figure><img alt="{html.escape(panel.caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption><b>{html.escape(panel.caption)}.</b> {html.escape(panel.reading)}"
                        + (f" {html.escape(note)}" if note else "") + "</figcaption></figure>")
    return f"<section><h{level}>{html.escape(title)}</h{level}>{head}{''.join(body)}</section>"


def value_text(row: dict[str, Any], column: str, digits: int = 3) -> str:
    """A table cell: the value, with its 95 % interval where the row holds one: '0.123 [0.110, 0.138]'."""
    value = row.get(column)
    if value is None or not np.isfinite(value):
        return ""
    span = figures.interval(row, column)
    return f"{value:.{digits}f}" + ("" if span is None else f" [{span[0]:.{digits}f}, {span[1]:.{digits}f}]")


def _listed(values: list[Any]) -> str:
    return ", ".join(map(str, values))


def _comparison_title(comp: Comparison, rows: Selection) -> str:
    return comp.title or (f"{comp.compare}: {comp.embedding}, layer {comp.layer}" if comp.compare != "layers"
                          else f"layers of {rows[0].setting['model']}: {comp.embedding}")


def _comparison_section(data: ReportData, comp: Comparison, rows: Selection, out: Path, written: list[Path]) -> str:
    title = _comparison_title(comp, rows)
    first = rows[0].setting
    k, method = first["k"], first["method"]
    columns = ["setting", "mIoU", "pixel acc.", "NMI", "NMI (bias-aware)", "test images"]
    table = _table(columns, [[r.label, *[value_text(r.setting, c) for c in ("miou", "pixel_accuracy", "nmi",
                                                                           "nmi_bias_aware")], r.setting["n_images"]]
                             for r in rows]
                   + [["ground truth", "", "", value_text(data.gt, "nmi"), value_text(data.gt, "nmi_bias_aware"),
                       data.gt.get("n_images")]])
    n_images = sorted({r.setting["n_images"] for r in rows})
    other_k = sorted({r["k"] for r in data.segmentation_rows() if r["embedding"] == comp.embedding} - {k})
    other_m = sorted({r["method"] for r in data.segmentation_rows() if r["embedding"] == comp.embedding} - {method})
    text = (f"K = {k} ({getattr(rows, 'k_reason', '') or 'as evaluated'}), method {html.escape(str(method))} "
            f"({html.escape(getattr(rows, 'method_reason', '') or 'as evaluated')})"
            + (f"; also evaluated: K = {_listed(other_k)}" if other_k else "")
            + (f"; methods {html.escape(_listed(other_m))}" if other_m else "")
            + f". Scores over {_listed(n_images)} test images of {html.escape(data.split)}, codebooks trained on "
              f"{html.escape(_listed(sorted({r.setting['train_split'] for r in rows})))}.")
    if comp.compare != "layers" and comp.layer == "best":
        layer_k = getattr(rows, "layer_k", None)
        text += (f" Each model's layer is its best-mIoU layer at K = {layer_k} (method {html.escape(method)}), "
                 f"shown with its K = {k} codebook; the best layer is selected on this evaluated split, not on a "
                 f"held-out one." if layer_k is not None else
                 " Each model's layer is its best-mIoU layer, selected on this evaluated split (not on a held-out "
                 "one), so the best rows are optimistic.")
    elif comp.compare != "layers" and comp.layer == "last":
        text += " Every model at its last evaluated block."
    elif comp.compare != "layers":
        text += f" Every model at block {comp.layer} (0-based)."
    if getattr(rows, "images_with_class", None):
        cls = html.escape(rows.images_with_class)
        text += (f" Example images: those showing the class '{cls}' among the stored examples (listed under (a1)); "
                 f"the scores are over every test image." if rows.examples is not None else
                 f" None of the stored example images shows the class '{cls}': (a1) shows all of them; the scores are "
                 f"over every test image.")
    intervals = any(figures.interval(r.setting, "miou") for r in rows)
    text += (" Values in brackets: 95 % bootstrap intervals over test images." if intervals else
             " These results hold no intervals (written before they were kept).")
    heading = f"{title} (K = {k}, {method})"
    return _section(heading, COMPARISON_PANELS, (data, rows), out / _slug(title), written,
                    head=f"<p>{text}</p>" + table)


def _correlations_section(data: ReportData, seg: dict[str, Any], out: Path, written: list[Path]) -> str:
    """The two correlations over every (model, layer, embedding) at one K and method: a table of
    Spearman rho, n and p, then the scatter plots."""
    k, method = seg["k"], seg["method"]
    stats = [r for r in data.rows("SELECT * FROM correlations WHERE k = ? AND method = ? ORDER BY name",
                                  [int(k), method])] if data.has_table("correlations") else []
    names = {"nmi_vs_log_miou": "NMI vs log mIoU", "kq_nmi_vs_attention_mi": "NMI of keys/queries vs I(K,Q)"}
    table = _table(["correlation", "Spearman rho", "n (points)", "p (two-sided)"],
                   [[names.get(r["name"], r["name"]), r["rho"], r.get("n_pairs"),
                     "" if r.get("p_value") is None else f"{r['p_value']:.2g}"] for r in stats])
    others = sorted({(r["k"], r["method"]) for r in data.segmentation_rows()} - {(k, method)})
    head = (f"<p>Spearman rank correlations over every evaluated (model, layer, embedding) at K = {k} "
            f"({html.escape(seg.get('k_reason', ''))}), method {html.escape(method)} "
            f"({html.escape(seg.get('method_reason', ''))})"
            + (f"; also evaluated: {html.escape(_listed([f'K = {a} ({b})' for a, b in others]))}" if others else "")
            + ". n is the number of points; p the two-sided p-value of rho = 0 (blank where the results do not "
              "hold it). With few points, rho is uncertain whatever its p.</p>" + table)
    return _section(f"correlations (K = {k}, {method})", SUMMARY_PANELS, (data, k, method), out / "correlations",
                    written, head=head)


def _sensitivity_section(data: ReportData, out: Path, written: list[Path]) -> str:
    """The online k-means' sensitivity (PROTOCOL.md 12.2): the spread in words, a table per
    setting, then the figure."""
    from .panels import sensitivity_groups, sensitivity_label

    rows = data.sensitivity_rows()
    values = [r["miou"] for r in rows if r["miou"] is not None]
    spread = max(values) - min(values) if values else float("nan")
    table_rows, parts = [], []
    for (model, embedding, layer, k, train), mine in sensitivity_groups(rows):
        batches = {r["pca_batches"] for r in mine}
        mi = [r["miou"] for r in mine]
        parts.append(f"{html.escape(model)} ({html.escape(embedding)}, block {layer}, K = {k}): "
                     f"{max(mi) - min(mi):.4f} over {len(mine)} codebooks")
        for label in dict.fromkeys(sensitivity_label(r, batches) for r in mine):
            these = [r for r in mine if sensitivity_label(r, batches) == label]
            v = [r["miou"] for r in these]
            table_rows.append([model, f"{embedding}, block {layer}, K = {k}", label,
                               _listed([r["seed"] for r in these]),
                               "; ".join(value_text(r, "miou") for r in these), float(np.mean(v)),
                               float(max(v) - min(v)),
                               float(np.mean([r["pixel_accuracy"] for r in these])),
                               float(np.mean([r["nmi"] for r in these])),
                               _listed(sorted({r["n_images"] for r in these}))])
    between = _between_models(data, rows)
    head = (f"<p>The online k-means (PROTOCOL.md 12.2) trained with other batch sizes and PCA initialisations, "
            f"several seeds each, scored on {html.escape(str(data.split))} like the comparisons. Spread of mIoU (max "
            f"- min over all {len(values)} codebooks): <b>{spread:.4f}</b>"
            + (f"; per model and layer: {'; '.join(parts)}" if len(parts) > 1 else "")
            + (f". For scale, the best-layer mIoU of the models at this embedding and K ranges over {between:.4f}"
               if between is not None else "")
            + ". Per setting: the mIoU of each seed (95 % interval where kept), their mean and range, the mean pixel "
              "accuracy and NMI.</p>"
            + _table(["model", "features", "setting", "seeds", "mIoU per seed", "mean mIoU", "range",
                      "pixel acc.", "NMI", "test images"], table_rows))
    return _section("k-means sensitivity (online k-means: batch size and PCA initialisation)", SENSITIVITY_PANELS,
                    (data,), out / "kmeans-sensitivity", written, head=head)


def _between_models(data: ReportData, rows: list[dict[str, Any]]) -> float | None:
    """The range of the models' best-layer mIoU (online) at the sensitivity rows' embedding and K."""
    keys = {(r["embedding"], r["k"]) for r in rows}
    best: dict[str, float] = {}
    for r in data.segmentation_rows():
        if (r["embedding"], r["k"]) in keys and r["method"] == "online":
            best[r["model"]] = max(best.get(r["model"], -np.inf), r["miou"])
    return max(best.values()) - min(best.values()) if len(best) > 1 else None


VERSIONED = ("torch", "timm", STORE_LIBRARY, "numpy", "duckdb", "pyarrow", "matplotlib")


def package_versions() -> list[tuple[str, str]]:
    """rep-pipeline's version and those of the packages its numbers depend on, as installed."""
    from importlib import metadata

    from rep_pipeline import __version__

    out = [("rep-pipeline", __version__)]
    for name in VERSIONED:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "not installed"))
    return out


def _run_weights(config: str) -> dict[str, str]:
    """Model key -> the weights a run config's ``models`` entries ask for (where they say)."""
    import yaml

    try:
        raw = yaml.safe_load(config)
    except yaml.YAMLError:
        return {}
    out = {}
    for entry in (raw.get("models") or []) if isinstance(raw, dict) else []:
        if isinstance(entry, dict) and entry.get("model") and entry.get("weights"):
            out[str(entry.get("model_key") or entry["model"])] = str(entry["weights"])
    return out


def _provenance(data: ReportData) -> str:
    """Where the numbers come from: each model's weights and feature group, the package
    versions, and the run config (where the run left a copy in the results folder)."""
    groups = data.feature_groups() if data.dataset is not None else []
    short = lambda v: "" if not v else str(v)[:12]  # noqa: E731
    config = data.run_config()
    asked = _run_weights(config) if config is not None else {}
    source = lambda g: g.get("weights_source") or (  # noqa: E731
        f"{asked[g['model']]} (the run config's)" if g["model"] in asked else "not recorded")
    rows = [[g["model"], g.get("alias") or g["model"], g.get("timm_name") or "",
             source(g), short(g.get("weights_sha256")) or "none (no file)",
             short(g.get("store_fingerprint")), g.get("last_norm") or "", g.get("depth"), g.get("image_size")]
            for g in groups]
    models = (_table(["model key", "alias", "timm name", "weights source", "weights sha256 (short)",
                      "store fingerprint (short)", "last-layer norm", "blocks", "S"], rows)
              if rows else "<p>The results hold no feature_groups rows for this dataset and split (results of an "
                           "older `rep-pipeline evaluate`): the models' weights are not recorded here.</p>")
    written = data.results_version()
    versions = ", ".join(f"{name} {version}" for name, version in package_versions())
    run = (f"<details><summary>the run config ({html.escape(getattr(layout, 'RUN_CONFIG', 'run_config.yaml'))} in "
           f"the results folder)</summary><pre>{html.escape(config)}</pre></details>" if config is not None else
           "<p>This report was drawn without a run config: the results folder holds no copy of one (`rep-pipeline "
           "run` leaves it there; the stages run one by one do not).</p>")
    return ("<footer><h2>provenance</h2>"
            + (f"<p>Models of {html.escape(data.dataset)} / {html.escape(data.split)} (the feature_groups table: the "
               f"weights each model key was extracted with and the fingerprint of its feature group).</p>" + models
               if data.dataset is not None else "")
            + f"<p>Drawn with {html.escape(versions)}"
            + (f"; the results folder was started by rep-pipeline {html.escape(written)}" if written else "")
            + ".</p>" + run + "</footer>")


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


def _ultra_title(run: dict[str, Any]) -> str:
    cut = f"k_img {run['k_img']}" if run["k_img"] is not None else f"zeta {run['zeta']:g}"
    return (f"{run['model']}: {figures.ULTRA_SCALARS.get(run['f'], run['f'])} of {run['embedding']}, {cut} "
            f"(run {run['run_id'][:12]})")


def _ultra_run_table(data: ReportData, run: dict[str, Any]) -> str:
    """Per explained block: the oracle's and the 'dataset' scoring's mIoU and accuracy, ITIoU
    at tau = 0.2 and each perturbation's positive - negative with its interval."""
    rid = run["run_id"]
    oracle = {r["layer"]: r for r in data.ultra_rows("ultra_oracle", rid)}
    scored = {r["layer"]: r for r in data.ultra_rows("segmentation", rid)}
    itiou = {}
    for r in data.ultra_rows("ultra_itiou", rid):
        if abs(r["tau"] - figures.ULTRA_TAU) < abs(itiou.get(r["layer"], {}).get("tau", np.inf) - figures.ULTRA_TAU):
            itiou[r["layer"]] = r
    perturbed = data.ultra_rows("ultra_perturbation", rid)
    modes = list(dict.fromkeys(r["perturbation"] for r in perturbed))
    interval = lambda r: "" if r is None or r["diff_mean"] is None else (  # noqa: E731
        f"{r['diff_mean']:+.3f}" + ("" if r["diff_ci_low"] is None else
                                    f" [{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}]"))
    rows = []
    for layer in sorted({*run["layers"], *oracle, *itiou}):
        o, s, i = oracle.get(layer, {}), scored.get(layer, {}), itiou.get(layer, {})
        rows.append([layer, o.get("mean_segments_per_image"), o.get("miou"), o.get("pixel_accuracy"), s.get("miou"),
                     s.get("pixel_accuracy"), i.get("itiou"),
                     *[interval(next((r for r in perturbed if (r["layer"], r["perturbation"]) == (layer, m)), None))
                       for m in modes]])
    rho = perturbed[0]["fraction"] if perturbed else None
    scalar = figures.ULTRA_SCALARS.get(run["f"], run["f"])
    return (f"<p>{html.escape(scalar)} maps of the {html.escape(run['embedding'])} of {html.escape(run['model'])} "
            f"on {run['n_images']} images of {html.escape(run['split'])}; per image, {html.escape(run['linkage'])}-"
            f"linkage clustering of the patch tokens' maps ({html.escape(run['metric'])} distance), "
            + (f"cut into {run['k_img']} clusters" if run["k_img"] is not None else f"cut at zeta = {run['zeta']:g}")
            + f", concept maps by {html.escape(run['aggregate'])}. Per block (0-based): segments per image, the "
              f"per-image oracle's mIoU and pixel accuracy (Hungarian matching per image, an optimistic bound), "
              f"the 'dataset' scoring's (K = C clusters of segment descriptors, section 5, comparable with the "
              f"k-means rows; blank where no train split was given), ITIoU at tau = {figures.ULTRA_TAU:g}, and, "
              f"per perturbation (rho = {'?' if rho is None else f'{rho:g}'}), the mean distance with the most "
              f"relevant patches perturbed minus that with the least relevant [95 % bootstrap interval].</p>"
            + _table(["block", "segments / image", "oracle mIoU", "oracle acc.", "dataset mIoU", "dataset acc.",
                      f"ITIoU (tau {figures.ULTRA_TAU:g})", *[f"{m}: pos - neg" for m in modes]], rows))


def _ultra_section(data: ReportData, out: Path, written: list[Path]) -> str:
    """The ULTra explanations: a table of the runs, then one subsection per run (every run of
    this dataset and split, by model, scalar f, embedding and zeta) with the u-panels."""
    runs = data.ultra_runs()
    listing = [[r["run_id"][:12], r["model"], figures.ULTRA_SCALARS.get(r["f"], r["f"]), r["embedding"],
                ", ".join(map(str, sorted(r["layers"]))), f"k_img {r['k_img']}" if r["k_img"] is not None else
                f"zeta {r['zeta']:g}", r["aggregate"], r["n_images"],
                "yes" if data.ultra_rows("segmentation", r["run_id"]) else "no"] for r in runs]
    head = ("<p>Explanation maps of latent tokens (ULTra, PROTOCOL.md section 10): the map S_i of token i is "
            "row i of the rollout of the gradient-weighted attention, over the patches; per image, the patch "
            "tokens' maps are clustered into concepts that segment the image. One subsection per run (a run is one "
            "model, explained embedding, scalar f and clustering; its id hashes them), each with its scores per "
            "block and the figures u1 to u7.</p>"
            + _table(["run", "model", "scalar f", "embedding", "blocks", "cut", "aggregate", "images",
                      "dataset scoring"], listing))
    subsections = [_section(_ultra_title(run), ULTRA_PANELS, (data, run["run_id"]),
                            out / f"ultra-{_slug(run['model'])}-{run['run_id'][:12]}", written,
                            head=_ultra_run_table(data, run), level=3) for run in runs]
    return f"<section><h2>ULTra explanations</h2>{head}{''.join(subsections)}</section>"


def _correspondence_section(data: ReportData, dataset: str, split: str, out: Path, written: list[Path]) -> str:
    """The zero-shot correspondence of one keypoint (dataset, split): Table 3 as a table, then
    the c-panels."""
    alpha = data.correspondence_alpha(dataset, split)
    info = data.correspondence_summary(dataset, split)
    best = data.correspondence_best(dataset, split)
    embeddings = figures.embedding_order([e for b in best for e in b["pck"]])
    pct = lambda v, signed=False: "" if v is None or not np.isfinite(v) else (f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}")  # noqa: E731
    span = lambda b, e: "" if not b.get("interval", {}).get(e) else (  # noqa: E731
        " [{:.2f}, {:.2f}]".format(*(100 * v for v in b["interval"][e])))
    rows = [[b["model"], b["alias"], *[pct(b["pck"].get(e)) + span(b, e) for e in embeddings],
             f"{b['best_layer'] + 1}/{b['depth']}", b["best_embedding"]] for b in best]
    rows += [[f"{d['family']}: Large minus Base", f"{d['large']} - {d['base']}",
              *[pct(d["pck"].get(e), True) for e in embeddings], "", ""]
             for d in data.correspondence_differences(dataset, split)]
    listed = lambda values: ", ".join(map(str, values)) or "?"  # noqa: E731
    head = (f"<p>Keypoint transfer by the cosine argmax of upsampled patch features (PROTOCOL.md section 11) on "
            f"{html.escape(dataset)} / {html.escape(split)}: {listed(info['n_pairs'])} pairs, "
            f"{listed(info['n_keypoints'])} keypoints, grid S = {listed(info['image_size'])}, geometry "
            f"{html.escape(listed(info['geometry']))}; alphas scored {listed(info['alphas'])}. The table gives, per "
            f"model, PCK@{alpha:.2f} per point (%, pooled over every keypoint) of each embedding at its best layer, "
            f"and the model's best layer, 1-based as in [U] Table 3 (layer = block + 1, of the model's depth), with "
            f"its embedding; then, for each family with a Base and a Large model, Large minus Base "
            f"(percentage points). The best layer is selected on this split, as in [U]"
            + ("; in brackets, 95 % bootstrap intervals over pairs (of that layer; the choice of the layer not "
               "included)" if any(b.get("interval", {}).get(e) for b in best for e in embeddings) else "")
            + ".</p>"
            + _table(["model", "alias", *[f"{figures.CORRESPONDENCE_LETTERS.get(e, e)} ({e})" for e in embeddings],
                      "best layer", "best embedding"], rows)
            + _keypoint_provenance(data, dataset, split))
    title = f"zero-shot correspondence: {dataset} / {split}"
    return _section(title, CORRESPONDENCE_PANELS, (data, dataset, split),
                    out / f"correspondence-{_slug(dataset)}-{_slug(split)}", written, head=head)


def _keypoint_provenance(data: ReportData, dataset: str, split: str) -> str:
    """The weights and feature groups of the models scored on one keypoint dataset."""
    shown = {m["model"] for m in data.correspondence_models(dataset, split)}
    groups = [g for g in data.feature_groups(dataset, split) if g["model"] in shown]
    if not groups:
        return ""
    short = lambda v: "" if not v else str(v)[:12]  # noqa: E731
    return ("<p>Where the features come from (feature_groups):</p>"
            + _table(["model key", "weights source", "weights sha256 (short)", "store fingerprint (short)",
                      "last-layer norm"],
                     [[g["model"], g.get("weights_source") or "not recorded",
                       short(g.get("weights_sha256")) or "none (no file)", short(g.get("store_fingerprint")),
                       g.get("last_norm") or ""] for g in groups]))


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
footer {{ margin-top: 3rem; }} details {{ margin: .8rem 0; }} summary {{ cursor: pointer; }}
pre {{ background: #f6f6f6; padding: .6rem; overflow-x: auto; font-size: 12px; }}
</style></head><body>
<h1>rep-pipeline report: {title}</h1>
<p>{intro}</p>
{sections}
</body></html>
"""


def correlation_setting(data: ReportData) -> dict[str, Any]:
    """The K and method of the correlations section: online where evaluated, its smallest K
    (as a comparison's defaults), with the reasons."""
    k, method, k_reason, method_reason = default_k_method(data.segmentation_rows())
    return {"k": k, "method": method, "k_reason": k_reason, "method_reason": method_reason}


FINGERPRINT_FILE = "report_fingerprint.json"  # beside index.html: what the page was drawn from


def results_fingerprint(cfg: ReportConfig) -> str | None:
    """A hash of what a page of ``cfg`` is drawn from: the options, the package version, and
    every file of the results folder (path, size, modification time). None where the results
    or the page are in object storage (those pages are always redrawn)."""
    if not (is_local(cfg.results) and is_local(cfg.out)) or not Path(cfg.results).is_dir():
        return None
    from rep_pipeline import __version__

    root = Path(cfg.results)
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        files.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    text = json.dumps({"options": cfg.model_dump(mode="json"), "version": __version__, "files": files},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def is_done(cfg: ReportConfig) -> bool:
    """The page is there and was drawn from exactly these results and options (its
    fingerprint, ``report_fingerprint.json``); otherwise it is redrawn."""
    found = results_fingerprint(cfg)
    mark = Path(cfg.out) / FINGERPRINT_FILE if is_local(cfg.out) else None
    if found is None or mark is None or not (Path(cfg.out) / "index.html").is_file() or not mark.is_file():
        return False
    try:
        return json.loads(mark.read_text()).get("results_sha256") == found
    except (OSError, ValueError):
        return False


def run_report(cfg: ReportConfig, *, address: str | None = None, progress: bool = True) -> ReportResult:
    """Draw every comparison of ``cfg`` and the summary panels; write ``<out>/index.html``.
    (``address`` and ``progress`` are accepted for the common stage signature.)"""
    data = ReportData(cfg)
    chosen, seg = [], None
    if data.segmented:  # results of direction probes alone have no comparisons to draw
        chosen = [(comp, select_rows(data, comp)) for comp in cfg.comparisons]  # all checked before a figure is drawn
        seg = correlation_setting(data)
    found = results_fingerprint(cfg)
    with tempfile.TemporaryDirectory(prefix="rep-pipeline-report-") as scratch:
        # on object storage the page is drawn into a local folder and put there once whole
        out = cfg.out if is_local(cfg.out) else Path(scratch)
        index, written = _draw(cfg, data, chosen, seg, out)
        if not is_local(cfg.out):
            index, written = _upload(out, cfg.out, written)
        else:
            _remove_stale(Path(out), {Path(p) for p in written} | {Path(index)})
            if found is not None:
                (Path(out) / FINGERPRINT_FILE).write_text(json.dumps({"results_sha256": found}))
    return ReportResult(index, written)


def _remove_stale(out: Path, kept: set[Path]) -> None:
    """Figure files of an earlier page that this one did not write (a section gone, a model
    left out): removed, so the folder holds this page alone."""
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".png", ".svg") and path not in kept:
            path.unlink()
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def _draw(cfg: ReportConfig, data: ReportData, chosen: list, seg: dict[str, Any] | None,
          out: Path) -> tuple[Path, list[Path]]:
    written: list[Path] = []
    sections = [_comparison_section(data, comp, rows, out, written) for comp, rows in chosen]
    if seg is not None:
        sections.append(_correlations_section(data, seg, out, written))
    sections.append(explorer_section(data, out, written))  # "" without segmentation
    if data.segmented and data.sensitivity_rows():
        sections.append(_sensitivity_section(data, out, written))
    if data.directions:
        sections.append(_directions_section(data, out, written))
    if data.ultra:
        sections.append(_ultra_section(data, out, written))
    for dataset, split in data.correspondence_sets:
        sections.append(_correspondence_section(data, dataset, split, out, written))
    keypoints = ", ".join(f"{html.escape(d)} / {html.escape(s)}" for d, s in data.correspondence_sets)
    if data.dataset is None:
        intro = (f"Zero-shot correspondence on {keypoints}. The results hold no segmentation and no direction probes "
                 f"(`rep-pipeline evaluate` and `rep-pipeline probe` write them): only the correspondence is shown.")
    else:
        shown = " and ".join(name for name, on in (("the direction probes", data.directions),
                                                   ("the ULTra explanations", data.ultra)) if on)
        intro = (f"Dataset {html.escape(data.dataset)}, test split {html.escape(data.split)}. " +
                 (f"{data.gt['n_images']} test images. Ground truth: NMI {value_text(data.gt, 'nmi')} (bias-aware "
                  f"{value_text(data.gt, 'nmi_bias_aware')}). Every section states its K and method; best layers are "
                  f"selected on this evaluated split. Where the weights and features come from, the package "
                  f"versions and the run config: provenance, at the end."
                  if data.segmented else "The results hold no segmentation of this split (`rep-pipeline evaluate` "
                                         f"writes it): only {shown} are shown" +
                  (" (and the zero-shot correspondence)." if keypoints else ".")))
        if keypoints:
            intro += f" Zero-shot correspondence on {keypoints}."
    title = cfg.title or (f"{data.dataset} / {data.split}" if data.dataset is not None
                          else "zero-shot correspondence: " + ", ".join(f"{d} / {s}" for d, s in
                                                                         data.correspondence_sets))
    index = out / "index.html"
    out.mkdir(parents=True, exist_ok=True)
    index.write_text(PAGE.format(title=html.escape(title), intro=intro,
                                 sections="\n".join([*sections, _provenance(data)])))
    return index, written


def _upload(folder: Path, target: ObjectPath, written: list[Path]) -> tuple[ObjectPath, list[ObjectPath]]:
    """Put the drawn files under ``target``, the page last (it links the rest)."""
    files = [*written, folder / "index.html"]
    for path in files:
        (target / path.relative_to(folder).as_posix()).write_bytes(path.read_bytes())
    return target / "index.html", [target / p.relative_to(folder).as_posix() for p in written]
