"""Cityscapes-27: fine ``labelIds`` 7..33 become classes 0..26, everything else is ignored."""
from __future__ import annotations

import numpy as np

from .registry import register_dataset
from .base import Item, SegmentationDataset

_CLASSES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
)
_FIRST_ID = 7


@register_dataset
class Cityscapes27(SegmentationDataset):
    """``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/*_gtFine_labelIds.png``."""

    name = "cityscapes27"
    default_splits = ("train", "val")
    root_layout = "leftImg8bit/<split> and gtFine/<split>"

    @property
    def classes(self) -> tuple[str, ...]:
        return _CLASSES

    def _raw_label_table(self) -> tuple[np.ndarray, np.ndarray]:
        shifted = np.arange(256) - _FIRST_ID
        table = np.where((shifted >= 0) & (shifted < len(_CLASSES)), shifted, self.ignore_index)
        return table.astype(np.uint8), np.ones(256, dtype=bool)  # any labelId is legal

    def _list_items(self, split: str) -> list[Item]:
        root = self.data_root
        images = self._require_dir(root / "leftImg8bit" / split, f"leftImg8bit/{split}")
        labels = self._require_dir(root / "gtFine" / split, f"gtFine/{split}")
        items = []
        for path in sorted(images.glob("*/*_leftImg8bit.png")):
            stem = path.name[: -len("_leftImg8bit.png")]
            items.append(Item(stem, path, labels / path.parent.name / f"{stem}_gtFine_labelIds.png"))
        return items
