"""Pascal VOC 2012 segmentation: 21 classes, 255 = void.

Reads the standard layout (``JPEGImages``, ``SegmentationClass``,
``ImageSets/Segmentation/<split>.txt``) or, where that is absent, a flat ``images/`` +
``labels/`` folder as one ``val`` split.
"""
from __future__ import annotations

from .registry import register_dataset
from .base import Item, SegmentationDataset

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


@register_dataset
class PascalVOC(SegmentationDataset):
    name = "voc"
    default_splits = ("train", "val")
    root_layout = "JPEGImages, SegmentationClass and ImageSets/Segmentation (or images/ and labels/)"

    @property
    def classes(self) -> tuple[str, ...]:
        return VOC_CLASSES

    @property
    def _flat(self) -> bool:
        root = self.data_root
        return (root / "images").is_dir() and not (root / "JPEGImages").is_dir()

    def splits(self) -> tuple[str, ...]:
        return ("val",) if self._flat else self.default_splits

    def _list_items(self, split: str) -> list[Item]:
        root = self.data_root
        if self._flat:
            images = self._require_dir(root / "images", "images/")
            labels = self._require_dir(root / "labels", "labels/")
            paths = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            return [Item(p.stem, p, labels / f"{p.stem}.png") for p in paths]
        listing = self._require_dir(root / "ImageSets" / "Segmentation", "ImageSets/Segmentation") / f"{split}.txt"
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()] if listing.is_file() else []
        return [
            Item(i, root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png")
            for i in ids
        ]
