"""``MapStore``: the results' ``maps.zarr`` (evaluation maps beside the Parquet tables)."""
from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import numpy as np

from rep_pipeline import __version__
from rep_pipeline.storage_schemas import feature_store as layout
from rep_pipeline.storage_schemas import results as results_layout

from ..errors import StoreError
from ..location import ObjectPath, as_location
from .metadata import AttentionMapsMeta, GroundTruthMapsMeta, RunRecord
from .zarr_io import Location, _open_root


class MapStore:
    """The Zarr store of evaluation maps beside the Parquet tables (``maps.zarr``): per setting,
    the position-by-class counts, the aggregate map and a few predicted example maps. Paths
    come from ``storage_schemas.results``; a store of another results version is refused."""

    def __init__(self, path: str | Location, mode: str = "r"):
        self.path = as_location(path)
        self.root, meta = _open_root(
            self.path, mode, f"results maps {self.path} do not exist; run `rep-pipeline evaluate` first",
            {"kind": results_layout.MAPS_KIND, "tables_version": results_layout.TABLES_VERSION})
        self.written: list[str] = []  # group paths written through this object, in order
        found = meta.get("tables_version", meta.get("schema_version"))  # the key's name before 0.2
        if found != results_layout.TABLES_VERSION:
            raise StoreError(f"results maps {self.path} have results version {found}; this rep-pipeline "
                             f"({__version__}) reads and writes version {results_layout.TABLES_VERSION}")

    def write(self, path: str, *, attrs: Mapping[str, Any], **arrays: np.ndarray) -> None:
        self.written.append(path)
        group = self.root.require_group(path)
        for name, data in arrays.items():
            arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape or (1,),
                                     dimension_names=results_layout.MAP_ARRAYS[name].dims, overwrite=True,
                                     compressors=[layout.LABEL_CODEC])
            arr[...] = data
        group.attrs.update(attrs)

    def adopt(self, staging: "MapStore") -> None:
        """Move every group written into ``staging`` here, replacing groups of the same path:
        maps computed aside join the results only once all of them are complete. A group
        written together with groups under it moves as a whole, with them."""
        written = list(dict.fromkeys(staging.written))
        for path in (p for p in written if not any(p.startswith(q + "/") for q in written)):
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            if parent:
                self.root.require_group(parent)
            target = self.path / path
            if isinstance(target, ObjectPath):
                (staging.path / path).mirror_to(target)
                continue
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging.path / path, target)

    def attrs(self, path: str) -> dict[str, Any]:
        """The raw attributes of the group at ``path`` (stages read the typed accessors below)."""
        if path not in self.root:
            raise StoreError(f"{self.path} has no {path}")
        return dict(self.root[path].attrs)

    def recorded(self, path: str) -> dict[str, Any]:
        """What the stage that wrote the maps at ``path`` recorded beside them (a copy); a path
        not written is a ``StoreError`` naming it."""
        return self.attrs(path)

    def ground_truth(self, path: str) -> GroundTruthMapsMeta:
        """The ground-truth maps' metadata (``storage_schemas.results.ground_truth_maps``)."""
        return GroundTruthMapsMeta.from_dict(self.attrs(path), f"{self.path}/{path}")

    def attention(self, path: str) -> AttentionMapsMeta:
        """The attention maps' metadata (``storage_schemas.results.attention_maps``)."""
        return AttentionMapsMeta.from_dict(self.attrs(path), f"{self.path}/{path}")

    def run_record(self, path: str) -> RunRecord:
        """The record of the probe or correspondence run whose maps lie at ``path``."""
        return RunRecord.from_dict(self.attrs(path), f"{self.path}/{path}")

    def has(self, path: str, name: str | None = None) -> bool:
        """Whether the group ``path`` (and its array ``name``) is stored."""
        return path in self.root and (name is None or name in self.root[path])

    def read(self, path: str, name: str) -> np.ndarray:
        if path not in self.root or name not in self.root[path]:
            raise StoreError(f"{self.path} has no {path}/{name}")
        return self.root[path][name][...]
