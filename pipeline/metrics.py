"""The evaluation formulas of PROTOCOL.md section 5, as array functions on counts.

Everything here works on accumulated counts (a confusion matrix, position-by-class counts),
so the evaluate stage can stream over the test split once and compute every figure after.
Natural logarithms throughout; 0 log 0 = 0.

The count builders (``confusion_matrix``, ``roll_maps``, ``position_class_counts``) are Array
API standard code on the maps' own namespace and device (their ``xp`` argument is ignored);
the formulas on finished counts run on the host, and ``hungarian_match`` takes its small
K x C matrix there explicitly (``to_host``): the one crossing evaluate needs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import is_numpy_array
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr

from .backend import bincount, device, namespace, to_host


def confusion_matrix(clusters: Any, labels: Any, k: int, n_classes: int, ignore: int, xp: Any = None) -> Any:
    """(k, n_classes) pixel counts of cluster x class, on the maps' device; ignore pixels
    dropped (counted into one bin past the end: no data-dependent shape)."""
    xp = namespace(clusters, labels)
    flat = xp.astype(clusters, xp.int64) * n_classes + xp.astype(labels, xp.int64)
    flat = xp.where(labels != ignore, flat, xp.asarray(k * n_classes, dtype=xp.int64, device=device(flat)))
    return xp.reshape(bincount(xp.reshape(flat, (-1,)), k * n_classes + 1)[:-1], (k, n_classes))


def hungarian_match(confusion: Any) -> tuple[np.ndarray, np.ndarray]:
    """(cluster -> class, whether each cluster was matched one-to-one by the Hungarian step).
    SciPy's solver runs on the host: a device ``confusion`` crosses here, explicitly."""
    confusion = to_host(confusion)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    mapping = confusion.argmax(axis=1)          # majority class for the clusters left over
    mapping[rows] = cols
    matched = np.zeros(confusion.shape[0], dtype=bool)
    matched[rows] = True
    return mapping, matched


@dataclass
class SegmentationScores:
    miou: float
    pixel_accuracy: float
    iou: np.ndarray            # (classes,), NaN where the union is empty


def segmentation_scores(confusion: np.ndarray, mapping: np.ndarray) -> SegmentationScores:
    """mIoU over classes with a non-empty union, per-class IoU and pixel accuracy."""
    c = confusion.shape[1]
    mapped = np.zeros((c, c), dtype=np.int64)  # predicted class x true class
    np.add.at(mapped, mapping, confusion)
    tp = np.diag(mapped).astype(np.float64)
    union = mapped.sum(0) + mapped.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = mapped.sum()
    return SegmentationScores(miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
                              pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
                              iou=iou)


@dataclass
class PositionalEffect:
    classwise_mi: np.ndarray   # (classes,) I_c
    mi: float
    entropy: float             # H(C)
    nmi: float


def positional_effect(counts: np.ndarray) -> PositionalEffect:
    """MI between pixel position and class from ``counts`` (positions..., classes):
    n(p, c) images whose pixel p has class c."""
    n = counts.reshape(-1, counts.shape[-1]).astype(np.float64)
    total = n.sum()
    if total == 0:
        nan = float("nan")
        return PositionalEffect(np.full(n.shape[1], np.nan), nan, nan, nan)
    joint = n / total
    p_pos = joint.sum(1, keepdims=True)
    p_cls = joint.sum(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log(joint / (p_pos * p_cls)), 0.0)
        h = float(-np.sum(np.where(p_cls > 0, p_cls * np.log(p_cls), 0.0)))
    classwise = terms.sum(0)
    mi = float(classwise.sum())
    return PositionalEffect(classwise, mi, h, mi / h if h > 0 else float("nan"))


@dataclass
class PositionalScores:
    mi: float
    nmi: float
    mi_null: float
    nmi_bias_aware: float      # (mi - mi_null) / H(C); NaN where H(C) = 0 (a single class)
    classwise_mi: np.ndarray


def positional_scores(counts: np.ndarray, null_counts: np.ndarray) -> PositionalScores:
    """MI, NMI and the bias-aware NMI of position and class, from the counts of the maps and of
    the same maps randomly shifted (``shifted_counts``)."""
    pe, null = positional_effect(counts), positional_effect(null_counts)
    bias_aware = (pe.mi - null.mi) / pe.entropy if pe.entropy > 0 else float("nan")
    return PositionalScores(pe.mi, pe.nmi, null.mi, bias_aware, pe.classwise_mi)


def roll_maps(maps: Any, dy: Any, dx: Any, xp: Any = None) -> Any:
    """Every map (images, S, S) cyclically shifted by its own offset (dy[i], dx[i]); the
    offsets on the maps' device."""
    xp = namespace(maps, dy, dx)
    n_img, S, _ = maps.shape
    if is_numpy_array(maps):  # one fancy-index gather: NumPy's fastest
        rows = (np.arange(S)[None, :] + dy[:, None]) % S
        cols = (np.arange(S)[None, :] + dx[:, None]) % S
        return maps[np.arange(n_img)[:, None, None], rows[:, :, None], cols[:, None, :]]
    at = xp.arange(S, dtype=xp.int64, device=device(maps))[None, :]
    rows = (at + xp.astype(dy, xp.int64)[:, None]) % S
    cols = (at + xp.astype(dx, xp.int64)[:, None]) % S
    out = xp.take_along_axis(maps, xp.broadcast_to(rows[:, :, None], maps.shape), axis=1)
    return xp.take_along_axis(out, xp.broadcast_to(cols[:, None, :], maps.shape), axis=2)


def random_shifts(n_images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One random cyclic offset (dy, dx) per image, the same for every map of that image."""
    rng = np.random.default_rng([seed, 7])
    return rng.integers(0, size, n_images), rng.integers(0, size, n_images)


def shifted_counts(maps: Any, n_classes: int, ignore: int | None, dy: Any, dx: Any, xp: Any = None) -> Any:
    """Position-by-class counts of ``maps`` (images, S, S) after shifting every map by its own
    cyclic offset (``random_shifts``): what the counts look like when position carries no
    information, for the bias-aware NMI."""
    return position_class_counts(roll_maps(maps, dy, dx, xp=xp), n_classes, ignore, xp=xp)


def position_class_counts(maps: Any, n_classes: int, ignore: int | None = None, xp: Any = None) -> Any:
    """(S, S, classes) counts n(p, c) of ``maps`` (images, S, S), on their device; ignore
    pixels dropped (into one bin past the end)."""
    xp = namespace(maps)
    n_img, S, _ = maps.shape
    flat = xp.astype(xp.reshape(maps, (n_img, -1)), xp.int64)
    idx = xp.arange(S * S, dtype=xp.int64, device=device(maps))[None, :] * n_classes + flat
    end = S * S * n_classes
    if ignore is not None:
        idx = xp.where(flat != ignore, idx, xp.asarray(end, dtype=xp.int64, device=device(maps)))
    return xp.reshape(bincount(xp.reshape(idx, (-1,)), end + 1)[:end], (S, S, n_classes))


def aggregate_map(counts: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """A[y, x] = sum_k W~[k, y, x] palette[k]: the per-pixel class frequencies (normalised
    over classes) mixed into one RGB image, uint8 (S, S, 3). Pixels never labelled: black."""
    weights = counts.astype(np.float64)
    norm = weights.sum(-1, keepdims=True)
    mixed = np.divide(weights, norm, out=np.zeros_like(weights), where=norm > 0) @ palette[: counts.shape[-1]].astype(np.float64)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


class Spearman(NamedTuple):
    rho: float        # NaN with fewer than three finite pairs, or where a side is constant
    n: int            # finite pairs used
    p_value: float    # two-sided, of rho = 0 (scipy.stats.spearmanr); NaN where rho is


def spearman(x: np.ndarray, y: np.ndarray) -> Spearman:
    """(Spearman rho, number of finite pairs, its two-sided p-value); NaNs when fewer than
    three pairs."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    n = int(keep.sum())
    if n < 3:
        return Spearman(float("nan"), n, float("nan"))
    with warnings.catch_warnings():  # a constant side: scipy warns and answers NaN, as we do
        warnings.simplefilter("ignore")
        result = spearmanr(x[keep], y[keep])
    return Spearman(float(result.statistic), n, float(result.pvalue))


__all__ = ["confusion_matrix", "hungarian_match", "SegmentationScores", "segmentation_scores", "PositionalEffect", "positional_effect", "PositionalScores", "positional_scores", "roll_maps", "random_shifts", "shifted_counts", "position_class_counts", "aggregate_map", "Spearman", "spearman"]
