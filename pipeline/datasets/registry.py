"""The dataset registry: ``DATASETS`` by name, filled by the ``@register_dataset`` decorator of
each dataset module, and ``build_dataset(name, root)``.

It sits in a module of its own so that the dataset modules import it, not the package
``__init__`` that imports them back; the package imports this registry and then the modules,
which fill it as they load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .base import SegmentationDataset

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
