"""ADE20K SceneParsing (150 classes): ``0`` = other (ignore), ``1..150`` = the classes of
``objectInfo150.txt``.

Reads the challenge layout (``images/{training,validation}``, ``annotations/...``; splits
``training`` and ``validation``) or a flat sample (``images/``, ``labels/``, one split), which
is split 50/50 into ``train`` and ``val`` by a seeded permutation of its image ids
(PROTOCOL.md section 9.6; option ``split_seed``, default 0).
"""
from __future__ import annotations

from functools import cached_property

import numpy as np

from ..errors import DataRootError
from .registry import register_dataset
from .base import Item, SegmentationDataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@register_dataset
class ADE150(SegmentationDataset):
    name = "ade150"
    default_splits = ("training", "validation")
    root_layout = "objectInfo150.txt and images/ + labels/ (or images/<split>/ + annotations/<split>/)"
    options_allowed = ("split_seed",)

    @cached_property
    def classes(self) -> tuple[str, ...]:
        path = self.data_root / "objectInfo150.txt"
        if not path.is_file():
            raise DataRootError(f"{self.name}: class list {path} does not exist")
        names = [line.split("\t")[-1].split(",")[0].strip() for line in path.read_text().splitlines()[1:] if line.strip()]
        if len(names) != 150:
            raise DataRootError(f"{self.name}: {path} lists {len(names)} classes, expected 150")
        return tuple(names)

    def _raw_label_table(self) -> tuple[np.ndarray, np.ndarray]:
        table = np.full(256, self.ignore_index, dtype=np.uint8)
        table[1:151] = np.arange(150, dtype=np.uint8)
        valid = np.zeros(256, dtype=bool)
        valid[:151] = True
        return table, valid

    @property
    def _flat(self) -> bool:
        return (self.data_root / "labels").is_dir()

    def splits(self) -> tuple[str, ...]:
        return ("train", "val") if self._flat else self.default_splits

    def _list_items(self, split: str) -> list[Item]:
        root = self.data_root
        if self._flat:
            images, labels = self._require_dir(root / "images", "images/"), root / "labels"
            ids = [p.stem for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            suffix = {p.stem: p.suffix for p in images.iterdir()}
            return [Item(i, images / f"{i}{suffix[i]}", labels / f"{i}.png") for i in self._halves(ids, split)]
        images = self._require_dir(root / "images" / split, f"images/{split}")
        labels = self._require_dir(root / "annotations" / split, f"annotations/{split}")
        return [Item(p.stem, p, labels / f"{p.stem}.png")
                for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
