"""Datasets by name: ``build_dataset("cocostuff27", root)``; see ``DATASETS`` for the list.

The registry lives in ``registry.py``; the dataset modules imported below register themselves
there as they load (none of them imports this package back).
"""
from __future__ import annotations

from . import (ade150, cityscapes, cocostuff, folder, pascalpart, spair,  # noqa: F401  (they register)
               synthetic, synthetic_pairs, voc)
from .base import Item, LabelMap, SegmentationDataset, voc_palette
from .registry import DATASETS, build_dataset, register_dataset

__all__ = ["DATASETS", "Item", "LabelMap", "SegmentationDataset", "build_dataset", "register_dataset", "voc_palette"]
