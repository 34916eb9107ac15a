"""Datasets by name: ``build_dataset("cocostuff27", root)``; see ``DATASETS`` for the list."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .base import Item, LabelMap, SegmentationDataset, voc_palette

DATASETS: dict[str, type[SegmentationDataset]] = {}


def register_dataset(cls: type[SegmentationDataset]) -> type[SegmentationDataset]:
    DATASETS[cls.name] = cls
    return cls


def build_dataset(name: str, root: str | Path | None = None, **options: Any) -> SegmentationDataset:
    try:
        cls = DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}") from None
    return cls(root, **options)


from . import (ade150, cityscapes, cocostuff, folder, pascalpart, spair,  # noqa: E402,F401  (they register)
               synthetic, synthetic_pairs, voc)

__all__ = ["DATASETS", "Item", "LabelMap", "SegmentationDataset", "build_dataset", "register_dataset", "voc_palette"]
