"""How an image is placed on the S x S grid, and the map back (PROTOCOL.md sections 3 and 8.2).

``crop`` (the default): the shorter side resized to S, then a centred S x S crop. ``pad``:
the whole image resized to fit S x S (longer side = S) and centred on a canvas; the canvas
outside the image is label ``ignore`` and, once the extractor has normalised the pixels, 0.

Every image's placement is one row of six integers, ``GEOMETRY_FIELDS``: [W, H, W', H', ox,
oy]: the original size, the resized image's size and the offset of its top-left corner on the
grid (for ``crop``: minus the crop's left and top). With pixel k spanning [k, k + 1), an
original x maps to grid u = ox + (x + 0.5) W'/W - 0.5, and back x = (u - ox + 0.5) W/W' - 0.5
(y alike with H, H', oy). The functions below take ``(n, 6)`` rows and arrays of points.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

from ...storage_schemas.feature_store import GEOMETRY_FIELDS

GeometryMode = Literal["crop", "pad"]
GEOMETRIES: tuple[str, ...] = ("crop", "pad")
# the pad canvas before normalisation: the ImageNet mean, so figures look neutral; the
# extractor sets the padding to exactly 0 after normalising with the model's own mean
PAD_FILL_RGB = (124, 116, 104)

__all__ = ["GEOMETRIES", "GEOMETRY_FIELDS", "GeometryMode", "PAD_FILL_RGB", "inside", "place", "placement",
           "tight_box", "to_grid", "to_original"]


def placement(width: int, height: int, size: int, mode: str) -> tuple[int, int, int, int, int, int]:
    """The geometry row [W, H, W', H', ox, oy] of a ``width`` x ``height`` image on the S grid."""
    if mode == "crop":
        scale = size / min(width, height)
        nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
        return width, height, nw, nh, -((nw - size) // 2), -((nh - size) // 2)
    if mode == "pad":
        scale = size / max(width, height)
        nw, nh = max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale)))
        return width, height, nw, nh, (size - nw) // 2, (size - nh) // 2
    raise ValueError(f"unknown geometry {mode!r}; one of {', '.join(GEOMETRIES)}")


def place(img: Image.Image, size: int, mode: str, resample: int, fill: int | tuple[int, ...]) -> Image.Image:
    """``img`` on the S x S grid by ``mode`` (``fill``: the pad canvas)."""
    w, h, nw, nh, ox, oy = placement(*img.size, size, mode)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    if mode == "crop":
        return img.crop((-ox, -oy, -ox + size, -oy + size))
    canvas = Image.new(img.mode, (size, size), fill)
    canvas.paste(img, (ox, oy))
    return canvas


def _columns(geometry: np.ndarray) -> tuple[np.ndarray, ...]:
    g = np.asarray(geometry, dtype=np.float64)
    return tuple(g[..., i] for i in range(6))


def to_grid(x: np.ndarray, y: np.ndarray, geometry: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Original pixel coordinates -> continuous grid coordinates (``geometry`` broadcasts)."""
    w, h, nw, nh, ox, oy = _columns(geometry)
    return ox + (np.asarray(x) + 0.5) * nw / w - 0.5, oy + (np.asarray(y) + 0.5) * nh / h - 0.5


def to_original(u: np.ndarray, v: np.ndarray, geometry: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid coordinates -> original pixel coordinates (the inverse of ``to_grid``)."""
    w, h, nw, nh, ox, oy = _columns(geometry)
    return (np.asarray(u) - ox + 0.5) * w / nw - 0.5, (np.asarray(v) - oy + 0.5) * h / nh - 0.5


def inside(geometry: np.ndarray, size: int) -> np.ndarray:
    """(S, S) bool: the grid pixels that show the image (not padding) of one geometry row."""
    _, _, nw, nh, ox, oy = (int(v) for v in np.asarray(geometry))
    rows = (np.arange(size) >= oy) & (np.arange(size) < oy + nh)
    cols = (np.arange(size) >= ox) & (np.arange(size) < ox + nw)
    return rows[:, None] & cols[None, :]


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """[x1, y1, x2, y2] of the true pixels of a non-empty (H, W) mask, in original pixels,
    half-open: x2 = the largest column + 1, y2 = the largest row + 1 (the keypoint datasets'
    boxes, PROTOCOL.md 8.3)."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
