"""Parquet files, whole: the only module that imports ``pyarrow.parquet``.

Below both the feature store (a split's keypoint pairs) and the results (table parts), so
neither imports the other for it. A file is written aside and renamed into place (an object:
put in one request), so a reader sees no file or the whole one.
"""
from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StoreError
from .location import ObjectPath, is_local


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of one Parquet file."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def schema_metadata(part: str, filesystem: Any = None) -> dict[bytes, bytes]:
    """The schema metadata of the Parquet file ``part`` (a path in ``filesystem``)."""
    return pq.read_schema(part, filesystem=filesystem).metadata or {}


def write_parquet(path: Path | ObjectPath, rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> None:
    """``rows`` cast to ``schema`` as one Parquet file, written whole (see ``write_whole``)."""
    write_whole(path, parquet_bytes(pa.Table.from_pylist(list(rows), schema=schema)))


def read_parquet(path: Path | ObjectPath, schema: pa.Schema) -> pa.Table:
    """One Parquet file read and cast to ``schema``; a file that does not parse or lacks a
    column is a ``StoreError`` naming it."""
    try:
        data = path.read_bytes() if not is_local(path) else Path(path).read_bytes()
        return pq.read_table(io.BytesIO(data)).select(schema.names).cast(schema)
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        raise StoreError(f"{path} cannot be read as {schema.metadata.get(b'table', b'a table').decode()}: {exc}") from exc


def write_whole(path: Path | ObjectPath, data: bytes) -> None:
    """Readers see no file or the whole one: a file is written aside and renamed into place;
    an object is put in one request."""
    if not is_local(path):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
