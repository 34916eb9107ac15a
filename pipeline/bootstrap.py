"""Bootstrap intervals over test images (docs/uncertainty.md), from per-image counts.

Every headline number is a function of counts summed over the test images (a confusion matrix,
position-by-class counts, per-image I(K,Q), per-pair PCK counts). A bootstrap draw resamples
the n images with replacement; image i then enters w_i times, so the draw's counts are
``w @ per_image``. All ``DRAWS`` draws are one (draws x images) weight matrix ``W`` times the
per-image counts (images x ...): one matrix product on the backend, no loop over images.
The interval comes from the 2.5 % and 97.5 % quantiles of the draws: as they are (percentile
interval) for means and ratios, reversed about the estimate (basic interval) for the
segmentation scores, whose draws are biased.

Draw d of a run seeded s resamples the images ``resample_indices(n, s)[d]``; every statistic
of that run uses the same draws (common random numbers across settings). What is per-draw
beyond the product (the Hungarian matching of a resampled confusion) runs exactly as the
point estimate does (``metrics.hungarian_match``).

The products and the MI are Array API standard code on the counts' namespace and device; the
host-made draw weights and one-hot matchings cross to it with ``to_device``, and what the
host needs back (resampled confusions for the Hungarian step, the NMI draws) with ``to_host``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from . import metrics
from .backend import Backend, bincount, device, namespace, to_device, to_host
from .finite import finite_or

DRAWS = 1000        # bootstrap draws
LEVEL = 0.95        # percentile interval (2.5 %, 97.5 %)
POOLED_CELLS = 16   # positions pooled into at most 16 x 16 cells for the NMI draws
_STREAM = 1000      # the draws of seed s come from default_rng([s, _STREAM])
_BLOCK = 1 << 24    # elements of one block of resampled counts (draws x features)


def resample_indices(n: int, seed: int, draws: int = DRAWS) -> np.ndarray:
    """(draws, n) image indices: draw d takes images ``[d]`` (with replacement)."""
    rng = np.random.default_rng([int(seed), _STREAM])
    return rng.integers(0, max(n, 1), size=(draws, n))


@lru_cache(maxsize=16)
def draw_weights(n: int, seed: int, draws: int = DRAWS) -> np.ndarray:
    """(draws, n) multinomial counts: how often each image enters each draw (rows sum to n),
    the bincount of ``resample_indices``. Read-only; cached (settings of a run share it)."""
    idx = resample_indices(n, seed, draws)
    flat = (np.arange(draws)[:, None] * n + idx).ravel()
    w = np.bincount(flat, minlength=draws * n).reshape(draws, n).astype(np.int32)
    w.flags.writeable = False
    return w


def interval(draws: Any, level: float = LEVEL) -> tuple[float, float]:
    """(low, high) percentile interval of the finite ``draws``; NaNs when none is finite."""
    values = np.asarray(draws, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def basic_interval(estimate: float, draws: Any, draws_centre: float | None = None, level: float = LEVEL,
                   bounds: tuple[float, float] = (-np.inf, np.inf)) -> tuple[float, float]:
    """The basic (reverse percentile) interval: estimate - (q97.5 - c) to estimate - (q2.5 - c),
    c the statistic the draws resample on the full sample (``draws_centre``, default the
    estimate itself), clipped to the statistic's ``bounds``. Where the draws are biased (a
    resample repeats images, which inflates a plug-in MI; rematching every draw is optimistic)
    it moves the interval against the bias instead of with it, as the percentile interval
    would (docs/uncertainty.md). ``draws_centre`` serves draws computed coarser than the
    estimate (pooled positions)."""
    lo, hi = interval(draws, level)
    centre = estimate if draws_centre is None else draws_centre
    if not (np.isfinite(estimate) and np.isfinite(centre)):
        return float("nan"), float("nan")
    return (float(np.clip(estimate - (hi - centre), *bounds)), float(np.clip(estimate - (lo - centre), *bounds)))


def finite_or_none(value: float) -> float | None:
    """A table cell: the float, or null where it is NaN or infinite."""
    return finite_or(value, None)


def resample(be: Backend, weights: np.ndarray, per_image: Any, bound: float | None = None) -> Any:
    """``weights`` (draws, n) @ ``per_image`` (n, ...) -> (draws, ...) on the backend. Counts are
    summed exactly: float32 while every sum (and ``bound``, a larger sum made of them later)
    stays below 2^24, float64 otherwise."""
    xp = namespace(per_image)
    n = per_image.shape[0]
    flat = xp.reshape(per_image, (n, -1))
    if bound is None:
        bound = float(to_host(xp.max(flat))) * n if n * flat.shape[1] else 0.0
    counts = xp.isdtype(flat.dtype, ("integral", "bool"))
    dtype = xp.float32 if bound < 2 ** 24 and counts else xp.float64
    out = to_device(weights, flat, dtype=dtype) @ xp.astype(flat, dtype, copy=False)
    return xp.reshape(out, (weights.shape[0],) + tuple(per_image.shape[1:]))


# -- pooled per-image position counts -----------------------------------------------------------------
def pooled_cells(size: int, cells: int = POOLED_CELLS) -> tuple[np.ndarray, int]:
    """(S, S) cell of each pixel when S x S positions pool into ``cells`` x ``cells`` blocks
    (as even as S allows; every pixel a cell when S <= cells), and the number of cells."""
    c = min(cells, size)
    band = (np.arange(size) * c) // size
    return (band[:, None] * c + band[None, :]).astype(np.int64), c * c


def pooled_counts(maps: Any, n_classes: int, cell: Any, n_cells: int, ignore: int | None = None,
                  xp: Any = None) -> Any:
    """(images, cells, classes) counts of each image's pixels per pooled cell and class, of
    ``maps`` (images, S, S), on their device; ignore pixels dropped (into one bin past the
    end). ``cell`` is ``pooled_cells``'s map on the maps' device."""
    xp = namespace(maps, cell)
    n = maps.shape[0]
    flat = xp.astype(xp.reshape(maps, (n, -1)), xp.int64)
    at = xp.arange(n, dtype=xp.int64, device=device(maps))[:, None]
    idx = (at * n_cells + xp.reshape(cell, (1, -1))) * n_classes + flat
    end = n * n_cells * n_classes
    if ignore is not None:
        idx = xp.where(flat != ignore, idx, xp.asarray(end, dtype=xp.int64, device=device(maps)))
    return xp.reshape(bincount(xp.reshape(idx, (-1,)), end + 1)[:end], (n, n_cells, n_classes))


def small_count_dtype(size: int, cells: int = POOLED_CELLS) -> Any:
    """The smallest integer type that holds one image's count in one pooled cell."""
    side = -(-size // min(cells, size))
    return np.int16 if side * side < 2 ** 15 else np.int32


# -- the statistics, batched over draws ------------------------------------------------------------------
def _xlogx(a: Any, xp: Any) -> Any:
    return a * xp.log(xp.clip(a, min=1.0))  # 0 log 0 = 0: counts are whole numbers


def mutual_information(counts: Any, xp: Any = None) -> tuple[Any, Any]:
    """(MI, H(class)) of position and class, natural log, for ``counts`` (draws, positions,
    classes), per draw: the plug-in formulas of ``metrics.positional_effect`` written on
    counts, MI = (sum n log n - sum_p n_p log n_p - sum_c n_c log n_c) / N + log N. NaN where
    N = 0. float32 counts (exact below 2^24, as ``resample`` gives them) keep the largest term
    in float32 (4x faster; MI good to about 1e-6 nats); every sum is float64."""
    xp, dev = namespace(counts), device(counts)
    n = counts if counts.dtype in (xp.float32, xp.float64) else xp.astype(counts, xp.float64)
    d = n.shape[0]
    s_pc = xp.sum(xp.reshape(_xlogx(n, xp), (d, -1)), axis=1, dtype=xp.float64)
    # a cell's sum over classes stays below 2^24 for float32 counts (``resample``'s bound): exact
    per_position = xp.astype(n @ xp.ones(n.shape[-1], dtype=n.dtype, device=dev), xp.float64)
    total = xp.sum(per_position, axis=-1)
    if n.dtype == xp.float32 and float(to_host(xp.max(total))) < 2 ** 24:  # float32 class sums exact too
        per_class = xp.astype((xp.ones((1, n.shape[1]), dtype=n.dtype, device=dev) @ n)[:, 0, :], xp.float64)
    else:
        per_class = xp.sum(n, axis=1, dtype=xp.float64)
    s_p = xp.sum(_xlogx(per_position, xp), axis=-1)
    s_c = xp.sum(_xlogx(per_class, xp), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        safe = xp.where(total > 0, total, 1.0)
        log_n = xp.log(safe)
        mi = xp.where(total > 0, (s_pc - s_p - s_c) / safe + log_n, xp.nan)
        h = xp.where(total > 0, log_n - s_c / safe, xp.nan)
    return mi, h


@dataclass
class SegmentationDraws:
    miou: np.ndarray            # (draws,)
    pixel_accuracy: np.ndarray  # (draws,)
    mappings: np.ndarray        # (draws, K) each draw's cluster -> class


def segmentation_scores_batched(confusions: np.ndarray, mappings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mIoU, pixel accuracy) per draw of confusions (draws, K, C) under mappings (draws, K):
    ``metrics.segmentation_scores`` on every draw at once."""
    d, k, c = confusions.shape
    onehot = np.zeros((d, k, c), dtype=np.float64)
    onehot[np.arange(d)[:, None], np.arange(k)[None, :], mappings] = 1.0
    mapped = np.einsum("dkp,dkt->dpt", onehot, confusions.astype(np.float64))  # predicted x true
    tp = np.einsum("dcc->dc", mapped)
    union = mapped.sum(1) + mapped.sum(2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)
        valid = np.isfinite(iou)
        miou = np.where(valid.any(1), np.where(valid, iou, 0.0).sum(1) / np.maximum(valid.sum(1), 1), np.nan)
        total = mapped.sum((1, 2))
        accuracy = np.where(total > 0, tp.sum(1) / np.where(total > 0, total, 1.0), np.nan)
    return miou, accuracy


def segmentation_draws(be: Backend, confusions: Any, weights: np.ndarray) -> SegmentationDraws:
    """Per draw: the resampled confusion (clusters x classes), its own matching
    (``metrics.hungarian_match``, majority for K > C, as the point estimate) and its scores.
    ``confusions`` (images, K, C) are the per-image confusions, on the backend."""
    conf = np.rint(to_host(resample(be, weights, confusions))).astype(np.int64)  # K x C per draw: to the host
    mappings = np.stack([metrics.hungarian_match(c)[0] for c in conf]) if len(conf) else \
        np.zeros((0, confusions.shape[1]), np.int64)
    miou, accuracy = segmentation_scores_batched(conf, mappings)
    return SegmentationDraws(miou, accuracy, mappings)


@dataclass
class PositionalDraws:
    nmi: np.ndarray             # (draws,) MI / H(C) of the pooled counts
    nmi_bias_aware: np.ndarray  # (draws,) (MI - MI of the shifted maps) / H(C)


def positional_draws(be: Backend, weights: np.ndarray, pooled: Any, pooled_null: Any,
                     mappings: np.ndarray | None = None, n_classes: int | None = None) -> PositionalDraws:
    """NMI and bias-aware NMI of the pooled position counts of every draw. ``pooled`` and
    ``pooled_null`` (images, cells, K) are the per-image counts of the maps and of the shifted
    maps (``pooled_counts``); with ``mappings`` (draws, K) each draw's clusters map to its own
    classes (``n_classes`` of them) before the MI; without, the K columns are the classes."""
    xp = namespace(pooled, pooled_null)
    n, cells, k = pooled.shape
    draws = weights.shape[0]
    step = max(1, _BLOCK // max(cells * k, 1))
    # a mapped count sums the clusters of a cell: bounded by n times the largest cell of an image
    bound = max(float(to_host(xp.max(xp.sum(c, axis=-1)))) * n if n * cells * k else 0.0
                for c in (pooled, pooled_null))
    nmi, aware = np.empty(draws), np.empty(draws)
    for lo in range(0, draws, step):
        w = weights[lo:lo + step]
        onehot = None
        if mappings is not None:
            m = mappings[lo:lo + step]
            host = np.zeros((len(m), k, n_classes), dtype=np.float32)
            host[np.arange(len(m))[:, None], np.arange(k)[None, :], m] = 1.0
            onehot = to_device(host, pooled)
        mi = []
        for counts in (pooled, pooled_null):
            drawn = resample(be, w, counts, bound)             # (b, cells, K)
            if onehot is not None:
                drawn = xp.matmul(drawn, xp.astype(onehot, drawn.dtype))  # (b, cells, C): sums of counts, exact
            mi.append(mutual_information(drawn))
        (m_pos, h), (m_null, _) = mi
        with np.errstate(invalid="ignore", divide="ignore"):
            good = h > 0
            safe = xp.where(good, h, 1.0)
            nmi[lo:lo + step] = to_host(xp.where(good, m_pos / safe, xp.nan))
            aware[lo:lo + step] = to_host(xp.where(good, (m_pos - m_null) / safe, xp.nan))
    return PositionalDraws(nmi, aware)


def positional_intervals(be: Backend, weights: np.ndarray, pooled: Any, pooled_null: Any, nmi: float,
                         nmi_bias_aware: float, mapping: np.ndarray | None = None,
                         mappings: np.ndarray | None = None, n_classes: int | None = None,
                         level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """{"nmi": (lo, hi), "nmi_bias_aware": (lo, hi)}: the pooled draws' percentile intervals
    centred on the full-resolution estimates (``basic_interval``); the draws' centre is the
    pooled statistic of the full sample under the point estimate's ``mapping``."""
    draws = positional_draws(be, weights, pooled, pooled_null, mappings, n_classes)
    full = positional_draws(be, np.ones((1, pooled.shape[0]), np.int32), pooled, pooled_null,
                            None if mapping is None else np.asarray(mapping)[None], n_classes)
    return {"nmi": basic_interval(nmi, draws.nmi, float(full.nmi[0]), level, bounds=(0.0, 1.0)),
            "nmi_bias_aware": basic_interval(nmi_bias_aware, draws.nmi_bias_aware, float(full.nmi_bias_aware[0]),
                                             level, bounds=(-np.inf, 1.0))}


def mean_interval(values: np.ndarray, seed: int, axis: int = 0, draws: int = DRAWS,
                  level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) percentile intervals of the mean over ``axis`` (the images) of ``values``,
    for every other index: one product of the draw weights with the values."""
    v = np.moveaxis(np.asarray(values, dtype=np.float64), axis, 0)
    n = v.shape[0]
    if n == 0:
        nan = np.full(v.shape[1:], np.nan)
        return nan, nan.copy()
    means = (draw_weights(n, seed, draws).astype(np.float64) @ v.reshape(n, -1)) / n  # (draws, rest)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return lo.reshape(v.shape[1:]), hi.reshape(v.shape[1:])


def ratio_interval(numerator: np.ndarray, denominator: np.ndarray, seed: int, draws: int = DRAWS,
                   level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of sum(numerator) / sum(denominator) over units (pairs, images)
    resampled with replacement: per draw (w @ numerator) / (w @ denominator)."""
    num, den = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    if num.size == 0:
        return float("nan"), float("nan")
    w = draw_weights(num.size, seed, draws).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return interval((w @ num) / (w @ den), level)


__all__ = ["DRAWS", "LEVEL", "POOLED_CELLS", "resample_indices", "draw_weights", "interval", "basic_interval",
           "finite_or_none", "resample", "pooled_cells", "pooled_counts", "small_count_dtype", "mutual_information",
           "SegmentationDraws", "segmentation_scores_batched", "segmentation_draws", "PositionalDraws",
           "positional_draws", "positional_intervals", "mean_interval", "ratio_interval"]
