"""What every dataset shares: items, the geometry of PROTOCOL.md section 3, label tables."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import config
from ..errors import DataRootError, EmptySplitError, ImageReadError, LabelValueError, SizeMismatchError


@dataclass(frozen=True)
class Item:
    """One image of a split: its id and where its pixels and labels come from."""

    image_id: str
    image_path: Path | None = None      # None: the dataset renders the image itself
    label_path: Path | None = None      # None: no labels (every pixel = ignore)


def voc_palette(n: int = 256) -> np.ndarray:
    """The Pascal VOC bit-shift colour map, (n, 3) uint8: 0 black, 1 (128, 0, 0), ..."""
    idx = np.arange(n)
    rgb = np.zeros((n, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            rgb[:, channel] |= ((idx >> (3 * (7 - shift) + channel)) & 1) << shift
    return rgb.astype(np.uint8)


def resize_shorter_and_crop(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize the shorter side to ``size``, then centre-crop ``size`` x ``size``."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _open(path: Path, what: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()  # decode now, so a truncated file fails here and names itself
    except FileNotFoundError as exc:
        raise ImageReadError(f"{what} file {path} does not exist") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{what} file {path} cannot be decoded: {exc}") from exc
    return img


class SegmentationDataset:
    """Base of every dataset: subclasses list items and describe their label table.

    ``label_table`` maps a raw label value (0..255) to a class id or ``ignore_index``;
    ``label_valid`` says which raw values may appear at all. A value outside it is an error
    that names the file, never a silent ignore.
    """

    name: ClassVar[str]
    default_splits: ClassVar[tuple[str, ...]]
    ignore_index: ClassVar[int] = config.IGNORE_INDEX

    def __init__(self, root: str | Path | None = None, **options: Any):
        self.root = Path(root) if root is not None else None
        self.options = options

    # -- what subclasses provide ---------------------------------------------------------
    @property
    def classes(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _list_items(self, split: str) -> list[Item]:
        raise NotImplementedError

    def _raw_label_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(table, valid): two length-256 arrays over raw label values."""
        n = len(self.classes)
        table = np.full(256, self.ignore_index, dtype=np.uint8)
        table[:n] = np.arange(n, dtype=np.uint8)
        valid = np.zeros(256, dtype=bool)
        valid[:n] = True
        valid[self.ignore_index] = True
        return table, valid

    # -- shared behaviour ----------------------------------------------------------------
    @property
    def palette(self) -> np.ndarray:
        return voc_palette(256)[: len(self.classes)]

    def items(self, split: str, limit: int | None = None) -> list[Item]:
        """The split's items in list order, the first ``limit`` of them if given."""
        if split not in self.splits():
            raise EmptySplitError(
                f"{self.name}: no split {split!r} under {self.root}; available: {', '.join(self.splits()) or 'none'}"
            )
        items = self._list_items(split)
        if not items:
            raise EmptySplitError(f"{self.name}: split {split!r} under {self.root} lists no images")
        return items[:limit] if limit is not None else items

    def splits(self) -> tuple[str, ...]:
        return self.default_splits

    def load(self, item: Item, image_size: int, max_pixels: int = config.MAX_IMAGE_PIXELS
             ) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 (S, S, 3), class ids uint8 (S, S)) after resize and centre crop."""
        image, raw = self._read_pair(item)
        if raw is None:
            label = np.full((image_size, image_size), self.ignore_index, dtype=np.uint8)
        else:
            cropped = resize_shorter_and_crop(raw, image_size, Image.NEAREST)
            label = self.map_labels(np.asarray(cropped), item.label_path or item.image_id)
        image = resize_shorter_and_crop(image, image_size, Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8), label

    def _read_pair(self, item: Item) -> tuple[Image.Image, Image.Image | None]:
        """The decoded image (RGB) and raw label image (one channel), sizes checked."""
        image = _open(item.image_path, "image").convert("RGB")
        if item.label_path is None:
            return image, None
        raw = _open(item.label_path, "label")
        if raw.size != image.size:
            raise SizeMismatchError(
                f"image {item.image_path} is {image.size[0]}x{image.size[1]} but its label "
                f"{item.label_path} is {raw.size[0]}x{raw.size[1]}"
            )
        return image, self._as_label_image(raw, item.label_path)

    def _as_label_image(self, raw: Image.Image, path: Path) -> Image.Image:
        if raw.mode in ("L", "P"):
            return raw
        if raw.mode in ("I", "I;16"):
            arr = np.asarray(raw)
            if arr.min() < 0 or arr.max() > 255:
                raise LabelValueError(f"label file {path} holds values {arr.min()}..{arr.max()}, outside 0..255")
            return Image.fromarray(arr.astype(np.uint8))
        raise LabelValueError(
            f"label file {path} is a {raw.mode} image; expected one channel of class ids (mode L or P)"
        )

    def map_labels(self, raw: np.ndarray, path: Path | str) -> np.ndarray:
        table, valid = self._raw_label_table()
        if not valid[raw].all():
            bad = np.unique(raw[~valid[raw]])
            raise LabelValueError(
                f"label file {path} holds values {bad[:10].tolist()} outside the class table of "
                f"{self.name} ({len(self.classes)} classes, {self.ignore_index} = ignore)"
            )
        return table[raw]

    def fingerprint(self, split: str, items: Sequence[Item], image_size: int) -> dict[str, Any]:
        """What identifies the labels this split produces; stored and checked on reuse."""
        ids = hashlib.sha256("\n".join(i.image_id for i in items).encode()).hexdigest()
        return {
            "dataset": self.name,
            "split": split,
            "n_images": len(items),
            "image_size": image_size,
            "classes": list(self.classes),
            "ignore_index": self.ignore_index,
            "image_ids_sha256": ids,
            "options": {k: v for k, v in sorted(self.options.items())},
        }

    def _require_dir(self, path: Path, what: str) -> Path:
        if self.root is None:
            raise DataRootError(f"{self.name} needs --data-root ({what})")
        if not path.is_dir():
            raise DataRootError(f"{self.name}: expected {what} at {path}; is --data-root {self.root} right?")
        return path
