"""Pascal-Part: VOC photos with two label maps, objects (the 21 VOC classes, 255 = void) and
parts (``part_ids.txt``: part id -> ``<VOC class id>:<part name>``, 0 = no part), the two
categories ``pascalpart-objects`` and ``pascalpart-parts`` of PROTOCOL.md section 9.2.

Layout: ``images/``, ``objects/``, ``parts/`` (PNG per image) and ``part_ids.txt``; one split,
halved into ``train`` and ``val`` by a seeded permutation of the image ids (section 9.6;
option ``split_seed``, default 0). The objects map is the primary one (evaluate, report).
"""
from __future__ import annotations

from functools import cached_property

import numpy as np

from ..errors import DataRootError
from . import register_dataset
from .base import Item, LabelMap, SegmentationDataset
from .voc import VOC_CLASSES

PARTS = "pascalpart-parts"


@register_dataset
class PascalPart(SegmentationDataset):
    name = "pascalpart"
    default_splits = ("train", "val")
    root_layout = "images/, objects/, parts/ and part_ids.txt"
    options_allowed = ("split_seed",)

    @property
    def classes(self) -> tuple[str, ...]:
        return VOC_CLASSES

    @property
    def category(self) -> str:
        return "pascalpart-objects"

    @cached_property
    def part_classes(self) -> tuple[str, ...]:
        """``<object>:<part>`` names, in part-id order 1..K."""
        path = self.data_root / "part_ids.txt"
        if not path.is_file():
            raise DataRootError(f"{self.name}: part list {path} does not exist")
        names: dict[int, str] = {}
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            pid, _, rest = line.partition(" ")
            obj, _, part = rest.strip().partition(":")
            names[int(pid)] = f"{VOC_CLASSES[int(obj)]}:{part}"
        if sorted(names) != list(range(1, len(names) + 1)):
            raise DataRootError(f"{self.name}: {path} must number parts 1..K without gaps")
        return tuple(names[i] for i in range(1, len(names) + 1))

    def label_maps(self) -> tuple[LabelMap, ...]:
        n = len(self.part_classes)
        table = np.full(256, self.ignore_index, dtype=np.uint8)
        table[1:n + 1] = np.arange(n, dtype=np.uint8)
        valid = np.zeros(256, dtype=bool)
        valid[:n + 1] = True
        valid[self.ignore_index] = True
        return (LabelMap(PARTS, self.part_classes, table, valid),)

    def _list_items(self, split: str) -> list[Item]:
        root = self.data_root
        images = self._require_dir(root / "images", "images/")
        objects, parts = self._require_dir(root / "objects", "objects/"), self._require_dir(root / "parts", "parts/")
        paths = {p.stem: p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
        return [Item(i, paths[i], objects / f"{i}.png", ((PARTS, parts / f"{i}.png"),))
                for i in self._halves(list(paths), split)]
