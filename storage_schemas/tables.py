"""Parquet tables rep-pipeline writes, as pyarrow schemas with column docs.

Writers cast to these schemas (a missing or mistyped column fails loudly); readers, DuckDB
included, see the docs in each field's metadata. Files are Hive-partitioned by dataset and
model, so several runs and models share one results folder:
``<results>/<table>/dataset=<d>/model=<m>/<part>.parquet``.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

TABLES_VERSION = 1


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


_SETTING = (
    _field("model", pa.string(), "model key in the feature store (alias or timm name)"),
    _field("dataset", pa.string(), "dataset name"),
    _field("split", pa.string(), "split the codebook was trained on"),
    _field("embedding", pa.string(), "queries | keys | values | tokens"),
    _field("layer", pa.int16(), "block number (0-based)"),
    _field("k", pa.int32(), "number of clusters"),
    _field("method", pa.string(), "online | lloyd"),
    _field("seed", pa.int32(), "k-means seed"),
)

TRAINING_CURVES = pa.schema([
    *_SETTING,
    _field("step", pa.int32(), "online: Adam step (1-based); lloyd: pass over the data (1-based)"),
    _field("loss", pa.float64(), "batch k-means loss -mean max_k cos(f, c_k) (online: of this "
                                 "step's batch; lloyd: over the whole pass)"),
    _field("changed_fraction", pa.float64(), "lloyd: fraction of assignments that changed in the "
                                             "pass; null for online", nullable=True),
    _field("store_fingerprint", pa.string(), "hash of the feature group's fingerprint"),
    _field("codebook_fingerprint", pa.string(), "hash of the codebook's training fingerprint"),
], metadata={"table": "training_curves", "version": str(TABLES_VERSION)})

SCHEMAS: dict[str, pa.Schema] = {"training_curves": TRAINING_CURVES}


def partition_dir(results: str | Path, table: str, dataset: str, model: str) -> Path:
    return Path(results) / table / f"dataset={dataset}" / f"model={model}"


def write_table(results: str | Path, table: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
                *, dataset: str, model: str, part: str) -> Path:
    """Write rows (a list of dicts or a dict of columns) as one Parquet part, atomically:
    a reader sees either the old part or the whole new one, never a half-written file."""
    schema = SCHEMAS[table]
    if isinstance(rows, Mapping):
        data = pa.table({name: rows[name] for name in schema.names}, schema=schema)
    else:
        data = pa.Table.from_pylist(list(rows), schema=schema)
    directory = partition_dir(results, table, dataset, model)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{part}.parquet"
    tmp = directory / f".{part}.{uuid.uuid4().hex}.tmp"
    pq.write_table(data, tmp)
    os.replace(tmp, path)
    return path
