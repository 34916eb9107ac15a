"""Section 5 scoring of cluster maps (PROTOCOL.md section 5), shared by the stages that
segment: ``evaluate`` (codebooks applied to features) and ``explain`` (ULTra's segments,
clustered by their descriptors). Counts accumulate on the backend, image chunk by image chunk;
``finish_scores`` turns them into the rows of the section 5 tables and the maps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rep_pipeline.storage_schemas import results as layout

from . import metrics
from .backend import Backend
from .store import MapStore


def bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) weights of 1-D bilinear resampling with align_corners=False, as
    ``torch.nn.functional.interpolate`` computes it (source positions below 0 clamp to 0)."""
    pos = np.maximum((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0.0)
    lo = np.minimum(np.floor(pos).astype(np.int64), src - 1)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    weights = np.zeros((dst, src))
    np.add.at(weights, (np.arange(dst), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(dst), hi), frac)
    return weights.astype(np.float32)


def upsample(be: Backend, grid_values: Any, size: int) -> Any:
    """(n, G, G, c) -> (n, S, S, c), bilinear, align_corners=False: two small matrix products."""
    xp = be.xp
    u = be.asarray(bilinear_matrix(grid_values.shape[1], size))
    rows = xp.einsum("yi,nijc->nyjc", u, grid_values)
    return xp.einsum("xj,nyjc->nyxc", u, rows)


@dataclass
class ClusterMapScores:
    """What the section 5 scores need of one K-cluster segmentation, summed over the test split."""

    k: int
    n_classes: int
    size: int
    be: Backend
    confusion: Any = None
    counts: Any = None          # (S, S, k) images whose pixel p fell in cluster k
    null_counts: Any = None     # the same after per-image random cyclic shifts
    examples: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        xp = self.be.xp
        self.confusion = xp.zeros((self.k, self.n_classes), dtype=xp.int64)
        self.counts = xp.zeros((self.size, self.size, self.k), dtype=xp.int64)
        self.null_counts = xp.zeros_like(self.counts)

    def add(self, clusters: Any, labels: Any, shifts: tuple[Any, Any], ignore: int) -> None:
        xp = self.be.xp
        self.confusion += metrics.confusion_matrix(clusters, labels, self.k, self.n_classes, ignore, xp=xp)
        self.counts += metrics.position_class_counts(clusters, self.k, xp=xp)
        self.null_counts += metrics.shifted_counts(clusters, self.k, None, *shifts, xp=xp)


def _map_counts(counts: np.ndarray, mapping: np.ndarray, n_classes: int, size: int) -> np.ndarray:
    """(S, S, k) cluster counts -> (S, S, classes) counts of the mapped classes."""
    onehot = np.zeros((len(mapping), n_classes), dtype=np.int64)
    onehot[np.arange(len(mapping)), mapping] = 1
    return (counts.reshape(size * size, -1) @ onehot).reshape(size, size, n_classes)


def finish_scores(rows: dict[str, list[dict]], maps: MapStore, acc: ClusterMapScores, setting: dict, classes: list[str],
            palette: np.ndarray, n_images: int, fps: dict[str, str], example_ids: list[str]) -> None:
    """The rows of every section 5 table (``rows``, by table) and the setting's maps (counts,
    aggregate, examples) of one finished accumulation; ``setting`` names it."""
    be, C, S = acc.be, len(classes), acc.size
    confusion = be.to_numpy(acc.confusion)
    mapping, hungarian = metrics.hungarian_match(confusion)
    scores = metrics.segmentation_scores(confusion, mapping)
    counts = _map_counts(be.to_numpy(acc.counts), mapping, C, S)
    pos = metrics.positional_scores(counts, _map_counts(be.to_numpy(acc.null_counts), mapping, C, S))
    rows["segmentation"].append({**setting, "miou": scores.miou, "pixel_accuracy": scores.pixel_accuracy,
                                 "mi": pos.mi, "nmi": pos.nmi, "mi_null": pos.mi_null,
                                 "nmi_bias_aware": pos.nmi_bias_aware, "n_images": n_images, **fps})
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
    examples = mapping[np.concatenate(acc.examples)] if acc.examples else np.zeros((0, S, S), np.int64)
    path = layout.setting_maps(setting["dataset"], setting["split"], setting["model"], setting["train_split"],
                               setting["method"], setting["k"], setting["seed"], setting["embedding"], setting["layer"])
    maps.write(path, counts=counts, aggregate=metrics.aggregate_map(counts, palette),
               examples=examples.astype(np.uint8), attrs={"example_ids": example_ids, **fps})


