"""COCO-Stuff-27 in the STEGO/PriMaPs layout (PROTOCOL.md section 3)."""
from __future__ import annotations

from functools import cached_property

import numpy as np

from ..errors import DataRootError
from .registry import register_dataset
from .base import Item, SegmentationDataset

# PROTOCOL.md's table: coarse id -> name and the fine ids (0-based, COCO id - 1) it gathers.
_FINE_TO_COARSE = """
0 electronic 71-76 | 1 appliance 77-82 | 2 food 51-60 | 3 furniture 61-70 |
4 indoor 83-90 | 5 kitchen 43-50 | 6 accessory 25-32 | 7 animal 15-24 | 8 outdoor 9-14 |
9 person 0 | 10 sports 33-42 | 11 vehicle 1-8 | 12 ceiling 101-102 |
13 floor 100,113-117 | 14 food 120-121,152,169 |
15 furniture 97,106-107,109,111,122,129,132,155,160,164 | 16 rawmaterial 99,131,138,142 |
17 textile 91-92,103-104,108,130,136,140,151,166-167 | 18 wall 170-176 | 19 window 179-180 |
20 building 94-95,127,150,157,165 | 21 ground 110,124-125,135,139,143-144,146,148,153,158 |
22 plant 93,96,118,123,128,133,141,162,168 | 23 sky 105,156 |
24 solid 126,134,149,159,161,181 | 25 structural 98,112,137,145,163 |
26 water 119,147,154,177-178
"""
N_FINE = 182


def _parse_table(text: str) -> tuple[list[str], np.ndarray]:
    names: list[str] = []
    fine_to_coarse = np.full(N_FINE, -1, dtype=np.int64)
    for entry in text.replace("\n", " ").split("|"):
        coarse, name, ranges = entry.split()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            fine_to_coarse[int(lo): int(hi or lo) + 1] = int(coarse)
        names.append(name)
    # things and stuff both have "food" and "furniture": say which, so legends are readable
    names = [f"{n} ({'thing' if i < 12 else 'stuff'})" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return names, fine_to_coarse


COARSE_NAMES, FINE_TO_COARSE = _parse_table(_FINE_TO_COARSE)


@register_dataset
class CocoStuff27(SegmentationDataset):
    """``images/<split>/<id>.jpg``, ``annotations/<split>/<id>.png`` (fine ids 0..181, 255 =
    unlabelled) and the curated list ``curated/<split>/Coco164kFull_Stuff_Coarse_7.txt``."""

    name = "cocostuff27"
    options_allowed = ("list_name",)
    default_splits = ("train2017", "val2017")
    root_layout = "images/<split>, annotations/<split> and curated/<split>"

    @property
    def list_name(self) -> str:
        return self.options.get("list_name", "Coco164kFull_Stuff_Coarse_7.txt")

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(COARSE_NAMES)

    @cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        table = np.full(256, self.ignore_index, dtype=np.uint8)
        table[:N_FINE] = FINE_TO_COARSE
        valid = np.zeros(256, dtype=bool)
        valid[:N_FINE] = True
        valid[self.ignore_index] = True
        return table, valid

    def _raw_label_table(self) -> tuple[np.ndarray, np.ndarray]:
        return self._tables

    def _list_items(self, split: str) -> list[Item]:
        root = self.data_root
        images = self._require_dir(root / "images" / split, f"images/{split}")
        labels = self._require_dir(root / "annotations" / split, f"annotations/{split}")
        listing = self._require_dir(root / "curated" / split, f"curated/{split}") / self.list_name
        if not listing.is_file():
            raise DataRootError(f"{self.name}: image list {listing} does not exist")
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        return [Item(i, images / f"{i}.jpg", labels / f"{i}.png") for i in ids]
