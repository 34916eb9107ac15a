"""``synthetic-pairs``: keypoint pairs whose truth is known exactly (PROTOCOL.md section 11.5).

Pair i is one scene of ``synthetic`` (its classes, colours and textures: sky over ground,
sometimes water) rendered twice with the same 2 or 3 shapes of distinct classes (disc, box,
triangle), each moved and scaled in the target; the shapes never overlap nor touch the
border, so each shape's label mask is the whole shape. A shape's texture moves and scales
with it, so the two renderings correspond.

Keypoints are the shapes' centres (the centres of their boxes), exact: shapes are drawn in
continuous coordinates in which pixel k spans [k, k + 1) (its centre at k + 0.5), so a
shape centred at continuous c has the keypoint x = c - 0.5 in section 8.2's pixel
coordinates (pixel k's centre at k). Centres are drawn on pixel centres, so each shape's
pixel set is mirror-symmetric about its centre: the label mask's centroid is the keypoint
exactly for disc and box, and for the upright triangle in x, with its tight box centred on
it (its centroid lies a third of its half-height lower). ``kp_id`` is the shape class's
index in (disc, box, triangle), the same in every pair; ``kp_name`` the class; category
``synthetic``; the boxes are the tight box of all shape pixels, half-open (x2 = the largest
column + 1, as ``partpairs``); SPair's difficulty flags are null.

Options: ``pairs`` (default 6), ``seed``, ``native_size`` ((h, w), default (240, 320)); one split
``test`` with images ``pair-<i>-src`` and ``pair-<i>-trg``; geometry ``pad`` by default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .. import config
from ..errors import ConfigError
from .registry import register_dataset
from .base import Item, SegmentationDataset
from .geometry import tight_box
from .synthetic import _BASE_RGB, _TEXTURES, BOX, CLASSES, DISC, GROUND, SKY, TRIANGLE, WATER

SHAPES = (DISC, BOX, TRIANGLE)       # kp_id = index here
CATEGORY = "synthetic"
SIDES = ("src", "trg")
_MARGIN = 2.0                        # pixels kept free around every shape's box
_RADIUS = (0.10, 0.16)               # source radii, fractions of min(h, w)
_SCALE = (1.1, 1.33)                 # target radius / source radius, or its inverse
_TEXTURE_RADIUS = 0.15               # a shape's texture as on a synthetic shape of this radius
_SCENE_CODE = 11                     # keeps these seeds apart from synthetic's split codes


@dataclass(frozen=True)
class Shape:
    """One shape in continuous pixel coordinates (pixel k spans [k, k + 1))."""

    cls: int
    cx: float
    cy: float
    r: float

    def mask(self, yc: np.ndarray, xc: np.ndarray) -> np.ndarray:
        """Pixels whose centres (``yc`` (h, 1), ``xc`` (1, w)) lie inside the shape."""
        dy, dx = yc - self.cy, xc - self.cx
        if self.cls == DISC:
            return dy**2 + dx**2 < self.r**2
        if self.cls == BOX:
            return (np.abs(dy) < self.r * 0.8) & (np.abs(dx) < self.r)
        return (dy < self.r) & (dy > -self.r) & (np.abs(dx) < (dy + self.r) / 2)  # upright triangle

    @property
    def keypoint(self) -> tuple[float, float]:
        """The centre in section 8.2's pixel coordinates (pixel k's centre at k)."""
        return self.cx - 0.5, self.cy - 0.5


@dataclass(frozen=True)
class Scene:
    """One pair: the shared background layout and the shapes of each rendering."""

    horizon: float                 # fraction of the height where ground starts
    water: float | None            # fraction of the height where water starts, if any
    src: tuple[Shape, ...]
    trg: tuple[Shape, ...]


@register_dataset
class SyntheticPairs(SegmentationDataset):
    name = "synthetic-pairs"
    options_allowed = ("pairs", "seed", "native_size")
    default_splits = ("test",)
    default_geometry = "pad"
    needs_root = False

    def __init__(self, root: Any = None, **options: Any):
        super().__init__(root, **options)
        pairs, size = self.options.get("pairs", 6), tuple(self.options.get("native_size", (240, 320)))
        if not isinstance(pairs, int) or isinstance(pairs, bool) or pairs < 1:
            raise ConfigError(f"{self.name}: dataset option pairs={pairs!r}; must be a positive integer")
        if len(size) != 2 or not all(isinstance(v, int) and v >= 32 for v in size):
            raise ConfigError(f"{self.name}: dataset option native_size={size!r}; must be (h, w), both >= 32")
        self.n_pairs, self.native_size = pairs, (int(size[0]), int(size[1]))
        self.seed = int(self.options.get("seed", config.SYNTHETIC_SEED))
        self._scenes: dict[int, Scene] = {}

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES

    def _list_items(self, split: str) -> list[Item]:
        return [Item(f"pair-{i}-{side}") for i in range(self.n_pairs) for side in SIDES]

    def read_pair(self, item: Item, max_pixels: int | None = None) -> tuple[Image.Image, Image.Image]:
        _, index, side = item.image_id.split("-")
        rgb, label = self.render(int(index), side)
        return Image.fromarray(rgb), Image.fromarray(label)

    def keypoint_pairs(self, split: str, items: Sequence[Item]) -> list[dict[str, Any]]:
        """One row per (pair, shape) of the pairs whose two images are both in ``items``."""
        taken = {it.image_id for it in items}
        return [row for i in range(self.n_pairs) if {f"pair-{i}-src", f"pair-{i}-trg"} <= taken
                for row in self._pair_rows(i)]

    # -- the scenes --------------------------------------------------------------------------
    def scene(self, index: int) -> Scene:
        """Pair ``index``'s layout (made once)."""
        if index not in self._scenes:
            self._scenes[index] = self._make_scene(index)
        return self._scenes[index]

    def _make_scene(self, index: int) -> Scene:
        """Pair ``index``'s layout, from its own seed: shapes placed by rejection sampling."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SCENE_CODE, index]))
        horizon = float(rng.uniform(0.3, 0.6))
        water = float(rng.uniform(0.78, 0.92)) if rng.random() < 0.5 else None
        classes = rng.choice(SHAPES, size=int(rng.integers(2, 4)), replace=False)
        for _ in range(100):
            radii = rng.uniform(*_RADIUS, size=len(classes)) * min(self.native_size)
            src = _place(classes, radii, self.native_size, rng)
            scales = rng.uniform(*_SCALE, size=len(classes)) ** rng.choice([-1, 1], size=len(classes))
            trg = _place(classes, radii * scales, self.native_size, rng)
            if src is not None and trg is not None:
                return Scene(horizon, water, src, trg)
        raise ConfigError(f"{self.name}: no room for the shapes of pair {index} in native_size={self.native_size}")

    def labels(self, index: int, side: str) -> np.ndarray:
        """Class ids uint8 (h, w) of pair ``index``'s ``side`` rendering."""
        scene, (h, w) = self.scene(index), self.native_size
        yc, xc = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
        label = np.where(yc < scene.horizon * h, SKY, GROUND) + np.zeros((1, w), dtype=np.int64)
        if scene.water is not None:
            label = np.where(yc > scene.water * h, WATER, label)
        for shape in getattr(scene, side):
            label[shape.mask(yc, xc)] = shape.cls
        return label.astype(np.uint8)

    def render(self, index: int, side: str) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 (h, w, 3), class ids uint8 (h, w)): the background textured in image
        coordinates, each shape in its own (so the texture moves and scales with it)."""
        if side not in SIDES:
            raise ConfigError(f"{self.name}: no image side {side!r}; one of {', '.join(SIDES)}")
        h, w = self.native_size
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SCENE_CODE, index, SIDES.index(side) + 1]))
        label = self.labels(index, side)
        y, x = np.meshgrid(np.arange(h, dtype=np.float32) / h, np.arange(w, dtype=np.float32) / h, indexing="ij")
        rgb = np.zeros((h, w, 3), dtype=np.float32)
        for cls in (SKY, GROUND, WATER):
            mask = label == cls
            if mask.any():
                rgb[mask] = _BASE_RGB[cls] + 45.0 * _TEXTURES[cls](y, x, rng)[mask, None]
        for shape in getattr(self.scene(index), side):
            mask = label == shape.cls
            scale = _TEXTURE_RADIUS / shape.r
            ly, lx = (y * h + 0.5 - shape.cy) * scale, (x * h + 0.5 - shape.cx) * scale
            rgb[mask] = _BASE_RGB[shape.cls] + 45.0 * _TEXTURES[shape.cls](ly, lx, rng)[mask, None]
        rgb += rng.normal(0, 6, rgb.shape)
        return rgb.clip(0, 255).astype(np.uint8), label

    def _pair_rows(self, index: int) -> list[dict[str, Any]]:
        scene = self.scene(index)
        boxes = {side: tuple(map(float, tight_box(self.labels(index, side) >= DISC))) for side in SIDES}
        shared = {"pair_id": f"pair-{index}", "category": CATEGORY, "src_image_id": f"pair-{index}-src",
                  "trg_image_id": f"pair-{index}-trg",
                  **{f"{side}_bbox_{c}": v for side in SIDES for c, v in zip(("x1", "y1", "x2", "y2"), boxes[side])},
                  "viewpoint_variation": None, "scale_variation": None, "truncation": None, "occlusion": None}
        rows = []
        for src, trg in zip(scene.src, scene.trg):
            (sx, sy), (tx, ty) = src.keypoint, trg.keypoint
            rows.append({**shared, "kp_id": SHAPES.index(src.cls), "kp_name": CLASSES[src.cls],
                         "src_x": sx, "src_y": sy, "trg_x": tx, "trg_y": ty})
        return rows


def _place(classes: np.ndarray, radii: np.ndarray, size: tuple[int, int], rng: np.random.Generator
           ) -> tuple[Shape, ...] | None:
    """Shapes at random centres with boxes inside the image and apart (``_MARGIN``); None when
    one finds no room in 50 tries."""
    h, w = size
    placed: list[Shape] = []
    for cls, r in zip(classes.tolist(), radii.tolist()):
        reach = r + _MARGIN
        if 2 * reach > min(h, w):
            return None
        for _ in range(50):
            # on a pixel centre (k + 0.5), inside [reach, size - reach]
            cx, cy = np.floor(rng.uniform(reach, w - reach)) + 0.5, np.floor(rng.uniform(reach, h - reach)) + 0.5
            if cx + reach > w or cy + reach > h:
                continue
            if all(abs(cx - s.cx) > reach + s.r + _MARGIN or abs(cy - s.cy) > reach + s.r + _MARGIN for s in placed):
                placed.append(Shape(int(cls), float(cx), float(cy), float(r)))
                break
        else:
            return None
    return tuple(placed)
