"""Section 5 scoring of cluster maps (PROTOCOL.md section 5), shared by the stages that
segment: ``evaluate`` (codebooks applied to features) and ``explain`` (ULTra's segments,
clustered by their descriptors). Counts accumulate on the backend, image chunk by image chunk;
``finish_scores`` turns them into the rows of the section 5 tables and the maps.

Besides the sums, every image's own confusion (K x C) and its position counts pooled into at
most 16 x 16 cells are kept, so ``finish_scores`` can give each headline number its 95 %
bootstrap interval over test images (``bootstrap``, docs/uncertainty.md) without a second pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rep_pipeline.storage_schemas import results as layout

from . import bootstrap, metrics
from .backend import Backend, bincount, device, namespace, to_device
from .store import MapStore


@dataclass
class ClusterMapScores:
    """What the section 5 scores need of one K-cluster segmentation, summed over the test split,
    and per image what their bootstrap intervals need. ``seed`` seeds the bootstrap draws."""

    k: int
    n_classes: int
    size: int
    be: Backend
    seed: int = 0
    draws: int = bootstrap.DRAWS  # bootstrap draws of the intervals; 0: none
    confusion: Any = None
    counts: Any = None          # (S, S, k) images whose pixel p fell in cluster k
    null_counts: Any = None     # the same after per-image random cyclic shifts
    examples: list[np.ndarray] = field(default_factory=list)
    image_confusions: list[Any] = field(default_factory=list)  # (images, k, classes) per chunk added
    image_pooled: list[Any] = field(default_factory=list)      # (images, cells, k): positions pooled
    image_pooled_null: list[Any] = field(default_factory=list)  # the same of the shifted maps

    def __post_init__(self) -> None:
        # the sums live on the first maps' namespace and device (``add``)
        self.n_cells = bootstrap.pooled_cells(self.size)[1]
        self._cell = None
        self._small = bootstrap.small_count_dtype(self.size)
        xp, dev = self.be.xp, self.be.device
        zeros = (lambda shape: xp.zeros(shape, dtype=xp.int64)) if dev is None else \
            (lambda shape: xp.zeros(shape, dtype=xp.int64, device=dev))
        self.confusion = zeros((self.k, self.n_classes))
        self.counts = zeros((self.size, self.size, self.k))
        self.null_counts = zeros((self.size, self.size, self.k))

    def add(self, clusters: Any, labels: Any, shifts: tuple[Any, Any], ignore: int) -> None:
        xp, dev = namespace(clusters, labels), device(clusters)
        k, c = self.k, self.n_classes
        n = clusters.shape[0]
        if self._cell is None:
            self._cell = to_device(bootstrap.pooled_cells(self.size)[0], clusters)  # host table, explicitly
        small = getattr(xp, np.dtype(self._small).name)
        base = xp.reshape(xp.arange(n, dtype=xp.int64, device=dev) * (k * c), (n, 1, 1))
        flat = xp.astype(clusters, xp.int64) * c + xp.astype(labels, xp.int64) + base
        # ignore pixels into one bin past the end, dropped
        flat = xp.where(labels != ignore, flat, xp.asarray(n * k * c, dtype=xp.int64, device=dev))
        per_image = xp.reshape(bincount(xp.reshape(flat, (-1,)), n * k * c + 1)[:-1], (n, k, c))
        self.confusion += xp.sum(per_image, axis=0)
        self.image_confusions.append(xp.astype(per_image, xp.int32))
        shifted = metrics.roll_maps(clusters, *shifts)
        self.counts += metrics.position_class_counts(clusters, k)
        self.null_counts += metrics.position_class_counts(shifted, k)
        for maps, out in ((clusters, self.image_pooled), (shifted, self.image_pooled_null)):
            out.append(xp.astype(bootstrap.pooled_counts(maps, k, self._cell, self.n_cells), small))

    def per_image(self) -> tuple[Any, Any, Any]:
        """(confusions (images, k, classes), pooled counts, pooled shifted counts) of every image added."""
        if not self.image_confusions:
            xp = self.be.xp
            return (xp.zeros((0, self.k, self.n_classes), dtype=xp.int32),
                    *(xp.zeros((0, self.n_cells, self.k), dtype=getattr(xp, np.dtype(self._small).name))
                      for _ in range(2)))
        xp = namespace(self.image_confusions[0])
        return tuple(xp.concat(parts) if len(parts) > 1 else parts[0]
                     for parts in (self.image_confusions, self.image_pooled, self.image_pooled_null))


def _map_counts(counts: np.ndarray, mapping: np.ndarray, n_classes: int, size: int) -> np.ndarray:
    """(S, S, k) cluster counts -> (S, S, classes) counts of the mapped classes."""
    onehot = np.zeros((len(mapping), n_classes), dtype=np.int64)
    onehot[np.arange(len(mapping)), mapping] = 1
    return (counts.reshape(size * size, -1) @ onehot).reshape(size, size, n_classes)


def score_intervals(acc: ClusterMapScores, mapping: np.ndarray, scores: metrics.SegmentationScores,
                    pos: metrics.PositionalScores) -> dict[str, float | None]:
    """The ``<metric>_lo`` / ``<metric>_hi`` cells of a segmentation row: 95 % bootstrap
    intervals over the test images (docs/uncertainty.md). Each draw resamples the per-image
    confusions and rematches them (Hungarian, majority for K > C); NMI and bias-aware NMI come
    from the pooled per-image position counts under each draw's matching, centred on the
    full-resolution estimates. Basic intervals (``bootstrap.basic_interval``): the draws'
    optimism (rematching) and MI bias (repeated images) move them against, not with, the bias."""
    be = acc.be
    confusions, pooled, pooled_null = acc.per_image()
    n = confusions.shape[0]
    if n == 0 or acc.draws == 0:
        return {f"{m}_{end}": None for m in ("miou", "pixel_accuracy", "nmi", "nmi_bias_aware") for end in ("lo", "hi")}
    weights = bootstrap.draw_weights(n, acc.seed, acc.draws)
    seg = bootstrap.segmentation_draws(be, confusions, weights)
    positional = bootstrap.positional_intervals(be, weights, pooled, pooled_null, pos.nmi, pos.nmi_bias_aware,
                                                mapping=mapping, mappings=seg.mappings, n_classes=acc.n_classes)
    found = {"miou": bootstrap.basic_interval(scores.miou, seg.miou, bounds=(0.0, 1.0)),
             "pixel_accuracy": bootstrap.basic_interval(scores.pixel_accuracy, seg.pixel_accuracy, bounds=(0.0, 1.0)),
             **positional}
    if not np.isfinite(scores.miou):
        found["miou"] = (float("nan"), float("nan"))
    return {f"{m}_{end}": bootstrap.finite_or_none(v) for m, (lo, hi) in found.items()
            for end, v in (("lo", lo), ("hi", hi))}


@dataclass
class Headline:
    """The section 5 numbers of one finished accumulation: matching, scores and intervals."""

    mapping: np.ndarray
    hungarian: np.ndarray
    confusion: np.ndarray
    scores: metrics.SegmentationScores
    counts: np.ndarray               # (S, S, classes) position counts of the mapped maps
    positional: metrics.PositionalScores
    intervals: dict[str, float | None]


def headline(acc: ClusterMapScores) -> Headline:
    be, C, S = acc.be, acc.n_classes, acc.size
    confusion = be.to_numpy(acc.confusion)
    mapping, hungarian = metrics.hungarian_match(confusion)
    scores = metrics.segmentation_scores(confusion, mapping)
    counts = _map_counts(be.to_numpy(acc.counts), mapping, C, S)
    pos = metrics.positional_scores(counts, _map_counts(be.to_numpy(acc.null_counts), mapping, C, S))
    return Headline(mapping, hungarian, confusion, scores, counts, pos, score_intervals(acc, mapping, scores, pos))


def finish_scores(rows: dict[str, list[dict]], maps: MapStore, acc: ClusterMapScores, setting: dict, classes: list[str],
            palette: np.ndarray, n_images: int, fps: dict[str, str], example_ids: list[str]) -> None:
    """The rows of every section 5 table (``rows``, by table) and the setting's maps (counts,
    aggregate, examples: the class-mapped maps of the example images, clusters: their raw
    cluster ids) of one finished accumulation; ``setting`` names it. The segmentation row
    carries the bootstrap intervals of its headline numbers (``score_intervals``)."""
    C, S = len(classes), acc.size
    h = headline(acc)
    confusion, mapping, hungarian, scores, counts, pos, ci = (h.confusion, h.mapping, h.hungarian, h.scores, h.counts,
                                                             h.positional, h.intervals)
    rows["segmentation"].append({**setting, "miou": scores.miou, "miou_lo": ci["miou_lo"], "miou_hi": ci["miou_hi"],
                                 "pixel_accuracy": scores.pixel_accuracy, "pixel_accuracy_lo": ci["pixel_accuracy_lo"],
                                 "pixel_accuracy_hi": ci["pixel_accuracy_hi"], "mi": pos.mi, "nmi": pos.nmi,
                                 "nmi_lo": ci["nmi_lo"], "nmi_hi": ci["nmi_hi"], "mi_null": pos.mi_null,
                                 "nmi_bias_aware": pos.nmi_bias_aware, "nmi_bias_aware_lo": ci["nmi_bias_aware_lo"],
                                 "nmi_bias_aware_hi": ci["nmi_bias_aware_hi"], "n_images": n_images, **fps})
    for c in range(C):
        iou = scores.iou[c]
        rows["per_class_iou"].append({**setting, "class_id": c, "class_name": classes[c],
                                      "iou": None if np.isnan(iou) else float(iou), **fps})
        rows["classwise_mi"].append({**setting, "source": "prediction", "class_id": c, "class_name": classes[c],
                                     "mi": float(pos.classwise_mi[c]), **fps})
    rows["confusion"] += [{**setting, "cluster": int(k), "class_id": int(c), "pixels": int(confusion[k, c]), **fps}
                          for k, c in np.argwhere(confusion > 0)]
    rows["matching"] += [{**setting, "cluster": k, "class_id": int(mapping[k]), "hungarian": bool(hungarian[k]),
                          **fps} for k in range(acc.k)]
    raw = np.concatenate(acc.examples) if acc.examples else np.zeros((0, S, S), np.int64)
    path = layout.setting_maps(setting["dataset"], setting["split"], setting["model"], setting["train_split"],
                               setting["method"], setting["k"], setting["seed"], setting["embedding"], setting["layer"])
    maps.write(path, counts=counts, aggregate=metrics.aggregate_map(counts, palette),
               examples=mapping[raw].astype(np.uint8),
               clusters=raw.astype(np.uint8 if acc.k < 256 else np.uint16),  # 12.3: maps coloured by cluster
               attrs={"example_ids": example_ids, **fps})
