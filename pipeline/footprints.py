"""Patch footprints and the patch label of PROTOCOL.md's Conventions (section 7, **A1**): one
rule for the direction probes (section 9) and ULTra's ITIoU (section 10.5).

A patch (y, x) of the G x G grid covers the label pixels
[floor(y S/G), floor((y+1) S/G)) x [floor(x S/G), floor((x+1) S/G)) of the S x S grid (its
footprint). It takes the majority class of its footprint if that class covers at least half
of the footprint's pixels, ignore pixels counting in the footprint but not in the vote;
otherwise it has no label (the ignore index). Of two classes with exactly half each, the lower
id wins.
"""
from __future__ import annotations

import numpy as np

from .config import IGNORE_INDEX
from .errors import ConfigError

_BUDGET = 1 << 23  # (image, patch, class) counts held at once by ``patch_labels``


def footprint_cells(height: int, width: int, grid: int) -> np.ndarray:
    """(height * width,) int64: the patch (row-major on the G x G grid) whose footprint holds
    each pixel of a height x width label map."""
    if min(height, width) < grid:
        raise ConfigError(f"a {height} x {width} map cannot hold a {grid} x {grid} patch grid")
    rows = np.searchsorted((np.arange(grid + 1) * height) // grid, np.arange(height), side="right") - 1
    cols = np.searchsorted((np.arange(grid + 1) * width) // grid, np.arange(width), side="right") - 1
    return (rows[:, None] * grid + cols[None, :]).ravel()


def patch_labels(labels: np.ndarray, grid: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(..., S, S) integer label maps -> (..., G, G) patch labels (the labels' dtype) by the
    footprint rule; ``ignore_index`` where a patch has no label. One ``bincount`` of
    (image, patch, class) keys per chunk of images, no loop over patches."""
    labels = np.asarray(labels)
    if labels.ndim < 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"patch labels need integer label maps (..., S, S), got {labels.dtype} {labels.shape}")
    lead, (h, w) = labels.shape[:-2], labels.shape[-2:]
    labels = labels.reshape(-1, h, w)
    n, p = labels.shape[0], grid * grid
    cell = footprint_cells(h, w, grid)
    area = np.bincount(cell, minlength=p)                                        # footprint sizes, ignore included
    valid = labels != ignore_index
    n_bins = int(labels[valid].max()) + 1 if valid.any() else 1
    out = np.full((n, p), ignore_index, dtype=labels.dtype)
    step = max(1, _BUDGET // max(h * w, 1))
    for lo in range(0, n, step):
        lab, ok = labels[lo:lo + step].reshape(-1, h * w), valid[lo:lo + step].reshape(-1, h * w)
        img = np.broadcast_to(np.arange(lab.shape[0])[:, None], lab.shape)
        key = (img[ok] * p + np.broadcast_to(cell, lab.shape)[ok]) * n_bins + lab[ok]
        counts = np.bincount(key, minlength=lab.shape[0] * p * n_bins).reshape(-1, p, n_bins)
        best = counts.argmax(-1)
        votes = np.take_along_axis(counts, best[..., None], -1)[..., 0]
        out[lo:lo + step] = np.where((votes > 0) & (2 * votes >= area), best, ignore_index)
    return out.reshape(*lead, grid, grid)
