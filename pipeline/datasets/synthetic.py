"""Scenes the tool draws itself: textured regions and shapes of known classes.

Deterministic from ``seed`` (each image from its own ``SeedSequence``), rendered with array
operations at a non-square native size so the resize-and-crop geometry is exercised too.
With ``layout_bias`` (the default) sky sits on top, ground below, water at the bottom and
objects stand on the ground, so the ground truth itself depends on position, as in real
photos; without it regions and objects fall anywhere.
"""
from __future__ import annotations

from functools import cached_property
from typing import Callable

import numpy as np
from PIL import Image

from .. import config
from .registry import register_dataset
from .base import Item, SegmentationDataset

CLASSES = ("sky", "ground", "water", "disc", "box", "triangle")
SKY, GROUND, WATER, DISC, BOX, TRIANGLE = range(len(CLASSES))
_BASE_RGB = np.array(
    [[120, 170, 235], [120, 95, 60], [40, 80, 150], [210, 60, 50], [230, 190, 60], [70, 170, 80]],
    dtype=np.float32,
)
Pattern = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]
# one texture per class, values in about [-1, 1]; periods in units of the image height
_TEXTURES: dict[int, Pattern] = {
    SKY: lambda y, x, r: 1.0 - 2.0 * y,
    GROUND: lambda y, x, r: r.standard_normal(y.shape).clip(-2, 2) / 2,
    WATER: lambda y, x, r: np.sin(2 * np.pi * 14 * y + r.uniform(0, 6.3)),
    DISC: lambda y, x, r: np.sign(np.sin(2 * np.pi * 10 * x) * np.sin(2 * np.pi * 10 * y)),
    BOX: lambda y, x, r: np.sin(2 * np.pi * 9 * (x + y)),
    TRIANGLE: lambda y, x, r: np.cos(2 * np.pi * 12 * x) * np.cos(2 * np.pi * 12 * y),
}
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}


@register_dataset
class SyntheticScenes(SegmentationDataset):
    """Options: ``sizes`` ({split: n}), ``seed``, ``layout_bias``, ``native_size`` ((h, w))."""

    name = "synthetic"
    options_allowed = ("sizes", "native_size", "seed", "layout_bias")
    default_splits = tuple(config.SYNTHETIC_SPLIT_SIZES)
    needs_root = False

    @cached_property
    def sizes(self) -> dict[str, int]:
        return dict(self.options.get("sizes", config.SYNTHETIC_SPLIT_SIZES))

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES

    def splits(self) -> tuple[str, ...]:
        return tuple(self.sizes)

    def _list_items(self, split: str) -> list[Item]:
        return [Item(f"{split}-{i:05d}") for i in range(int(self.sizes[split]))]

    def read_pair(self, item: Item, max_pixels: int | None = None) -> tuple[Image.Image, Image.Image]:
        split, index = item.image_id.rsplit("-", 1)
        rgb, label = self.render(split, int(index))
        return Image.fromarray(rgb), Image.fromarray(label)

    def render(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 (h, w, 3), class ids uint8 (h, w)) of image ``index`` of ``split``."""
        h, w = self.options.get("native_size", (240, 320))
        seed = int(self.options.get("seed", config.SYNTHETIC_SEED))
        code = _SPLIT_CODES.get(split, sum(split.encode()) + 10)
        rng = np.random.default_rng(np.random.SeedSequence([seed, code, index]))
        y, x = np.meshgrid(np.arange(h, dtype=np.float32) / h, np.arange(w, dtype=np.float32) / h, indexing="ij")
        label = self._layout(y, x / (w / h), rng)
        rgb = np.zeros((h, w, 3), dtype=np.float32)
        for cls, texture in _TEXTURES.items():
            mask = label == cls
            if mask.any():
                rgb[mask] = _BASE_RGB[cls] + 45.0 * texture(y, x, rng)[mask, None]
        rgb += rng.normal(0, 6, rgb.shape)
        return rgb.clip(0, 255).astype(np.uint8), label

    def _layout(self, y: np.ndarray, xn: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Class ids on normalised coordinates (y, x in [0, 1))."""
        biased = bool(self.options.get("layout_bias", True))
        if biased:
            horizon = rng.uniform(0.3, 0.6)
            label = np.where(y < horizon, SKY, GROUND)
            if rng.random() < 0.5:
                label = np.where(y > rng.uniform(0.78, 0.92), WATER, label)
        else:
            angle, offset = rng.uniform(0, 2 * np.pi), rng.uniform(-0.2, 0.2)
            first, second = rng.choice([SKY, GROUND, WATER], size=2, replace=False)
            side = (y - 0.5) * np.cos(angle) + (xn - 0.5) * np.sin(angle) < offset
            label = np.where(side, first, second)
            horizon = 0.0
        for _ in range(rng.integers(1, 4)):
            cls = rng.choice([DISC, BOX, TRIANGLE])
            r = rng.uniform(0.08, 0.2)
            cy = rng.uniform(max(horizon, r), 1 - r) if biased else rng.uniform(r, 1 - r)
            cx = rng.uniform(r, 1 - r)
            dy, dx = y - cy, xn - cx
            if cls == DISC:
                mask = dy**2 + dx**2 < r**2
            elif cls == BOX:
                mask = (np.abs(dy) < r * 0.8) & (np.abs(dx) < r)
            else:  # upright triangle
                mask = (dy < r) & (dy > -r) & (np.abs(dx) < (dy + r) / 2)
            label = np.where(mask, cls, label)
        return label.astype(np.uint8)
