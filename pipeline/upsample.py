"""Bilinear upsampling from the G x G patch grid to the S x S label grid (PROTOCOL.md sections
5 and 7: align_corners=False, torch's formula), the one definition the evaluate, explain and
correspond stages and the report use.

Along one axis, output index u of ``dst`` reads the source position
src = (u + 0.5) G / S - 0.5, clamped below at 0: i0 = floor(src), i1 = min(i0 + 1, G - 1),
weight w = src - i0 of i1 (0 where i1 == i0, the clamped last patch, so that border weights
are exactly 1 and not a (1 - w) + w rounding). Two small matrix products with the (S, G)
weights upsample a 2-D map, channel by channel.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .arrays import minmax
from .backend import Backend, is_foreign_array, namespace, to_device
from .errors import ConfigError


def bilinear_taps(src: int, dst: int, xp: Any = np, like: Any = None) -> tuple[Any, Any, Any]:
    """Per output index of ``dst``: the two source indices (i0, i1) int64 and the float64
    weight of i1. Built on the host; placed explicitly on the namespace and device of ``like``
    where given, else on ``xp``."""
    pos = np.maximum((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5, 0.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), src - 1)
    i1 = np.minimum(i0 + 1, src - 1)
    weight = np.where(i1 > i0, pos - i0, 0.0)
    return tuple(_place(t, xp, like) for t in (i0, i1, weight))  # type: ignore[return-value]


def bilinear_matrix(src: int, dst: int, xp: Any = np, dtype: Any = np.float32, like: Any = None) -> Any:
    """(dst, src) weights of 1-D bilinear resampling (row u: 1 - w at i0, w at i1; one 1.0
    on the clamped borders), computed in float64 on the host and returned as ``dtype`` (a
    NumPy dtype) on ``like``'s device where given, else on ``xp``."""
    i0, i1, w = bilinear_taps(src, dst)
    out = np.zeros((dst, src), dtype=np.float64)
    rows = np.arange(dst)
    out[rows, i0] = 1.0 - w
    out[rows, i1] += w  # i1 == i0 only where w == 0
    return _place(out.astype(dtype, copy=False), xp, like)


def _place(host: np.ndarray, xp: Any, like: Any) -> Any:
    """A small host table on ``like``'s namespace and device (an explicit crossing), or on ``xp``."""
    if like is not None:
        return to_device(host, like)
    return host if xp is np else xp.asarray(host)


def upsample(be: Backend, grid_values: Any, size: int) -> Any:
    """(n, G, G, c) -> (n, S, S, c) in the namespace and on the device of ``grid_values``,
    float32 weights: two small matrix products."""
    xp = namespace(grid_values)
    u = to_device(bilinear_matrix(grid_values.shape[1], size), grid_values)
    # tensordot, not einsum: BLAS products (NumPy's einsum of this shape runs 5 to 10x slower)
    rows = xp.moveaxis(xp.tensordot(u, grid_values, axes=([1], [1])), 0, 1)   # (n, S, G, c)
    return xp.moveaxis(xp.tensordot(u, rows, axes=([1], [2])), 0, 2)          # (n, S, S, c)


def upsample_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """(..., G, G) maps -> (..., S, S) float32 NumPy, each upsampled by u @ map @ u^T."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim < 2 or maps.shape[-1] != maps.shape[-2]:
        raise ConfigError(f"upsample expects square maps (..., G, G), got shape {maps.shape}")
    u = bilinear_matrix(maps.shape[-1], size)
    return u @ maps @ u.T


def scaled_upsampled(maps: Any, grid: int, size: int) -> Any:
    """M(S~) of section 10.2: (n, G * G) patch maps (row-major) -> (n, S, S) float32,
    upsampled and then min-max scaled per map (the map a ULTra mask thresholds, 10.5). An
    array of another Array API namespace stays in it, on its device."""
    if is_foreign_array(maps):
        xp = namespace(maps)
        maps = xp.reshape(xp.astype(maps, xp.float32), (-1, grid, grid))
        u = bilinear_matrix(grid, size, like=maps)
        return minmax(u @ maps @ u.T, axis=(-2, -1))
    maps = np.asarray(maps, dtype=np.float32)
    return minmax(upsample_maps(maps.reshape(-1, grid, grid), size), axis=(-2, -1))
