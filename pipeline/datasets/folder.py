"""A folder of images, optionally with label PNGs and a class list.

``<root>/images[/<split>]/<name>.<ext>`` (or the images directly in ``<root>``), labels at
``<root>/labels[/<split>]/<name>.png`` holding class ids, names in ``<root>/classes.txt``
(one name per line, or ``<id> <name>``; ``#`` comments). Without labels every pixel is
ignore, which is enough for extraction and clustering.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ..errors import DataRootError
from .registry import register_dataset
from .base import Item, SegmentationDataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
ALL_SPLIT = "all"


def read_class_list(path: Path, ignore_index: int) -> tuple[str, ...]:
    names: dict[int, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        first, _, rest = line.partition(" ")
        if first.isdigit() and rest.strip():
            if int(first) != ignore_index:
                names[int(first)] = rest.strip()
        else:
            names[len(names)] = line
    if sorted(names) != list(range(len(names))):
        raise DataRootError(f"class list {path} must number classes 0..N-1 without gaps")
    return tuple(names[i] for i in range(len(names)))


@register_dataset
class ImageFolder(SegmentationDataset):
    name = "folder"
    default_splits = (ALL_SPLIT,)
    root_layout = "images[/<split>]/* (optional labels[/<split>]/*.png and classes.txt)"

    @cached_property
    def _image_dir(self) -> Path:
        root = self.data_root
        if not root.is_dir():
            raise DataRootError(f"folder: data root {root} does not exist")
        return root / "images" if (root / "images").is_dir() else root

    @cached_property
    def classes(self) -> tuple[str, ...]:
        root = self.data_root
        path = root / "classes.txt"
        if path.is_file():
            return read_class_list(path, self.ignore_index)
        if (root / "labels").is_dir():
            raise DataRootError(f"folder: labels found under {root / 'labels'} but no classes.txt")
        return ()

    def splits(self) -> tuple[str, ...]:
        subdirs = sorted(p.name for p in self._image_dir.iterdir() if p.is_dir() and p.name != "labels")
        return tuple(subdirs) if subdirs else (ALL_SPLIT,)

    def _list_items(self, split: str) -> list[Item]:
        images = self._image_dir if split == ALL_SPLIT else self._image_dir / split
        labels = self.data_root / "labels" if split == ALL_SPLIT else self.data_root / "labels" / split
        has_labels = labels.is_dir()
        return [
            Item(p.stem, p, labels / f"{p.stem}.png" if has_labels else None)
            for p in sorted(images.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
