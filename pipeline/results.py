"""Parquet and DuckDB I/O over a results folder: the only module that touches DuckDB (Parquet
files are read and written through ``pipeline/parquet.py``).

``Results`` writes table parts (cast to ``storage_schemas.tables``, atomically), reads every
table through DuckDB, and opens the ``maps.zarr`` beside them. Every path comes from
``storage_schemas.results``. A folder written with another results version is refused, on
reading and on appending, naming the found and expected versions.

DuckDB reads the tables as Arrow datasets of their parts (pyarrow opens the files, through
its filesystem over the same obstore client as the stores when the folder is an object-storage
URL; DuckDB's own S3 support needs its httpfs extension, which is not there offline), inside
DuckDB's own sandbox: external access is switched off and the configuration locked before
any SQL of a caller runs, so no statement, however nested or wrapped, reads a file, writes
one, attaches a database or loads an extension; it sees the tables and nothing else.
"""
from __future__ import annotations

import contextlib
import functools
import json
import uuid
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from rep_pipeline import __version__
from rep_pipeline.storage_schemas import results as layout
from rep_pipeline.storage_schemas.tables import SCHEMAS, TABLES_VERSION, VIEWS

from .errors import QueryError, StoreError
from .location import ObjectPath, as_location, is_local, remove_tree
from .parquet import parquet_bytes, schema_metadata, write_whole
from .store.maps import MapStore
from .store.zarr_io import check_store_location

_TABLES = f"tables: {', '.join(SCHEMAS)}; views: {', '.join(VIEWS)}"
# set before the sandbox is locked: nothing may be installed or loaded behind a query's back, and
# no spill folder (DuckDB leaves its temp_directory, ./.tmp by default, open even in the sandbox)
_DUCKDB_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False, "temp_directory": ""}


Params = Sequence[Any] | Mapping[str, Any] | None  # DuckDB's query parameters: ``?`` in order, or ``$name``


def _plain(params: Params) -> Params:
    """``params`` with NumPy scalars as the Python values DuckDB binds (it refuses ``np.int64``)."""
    plain = lambda v: v.item() if isinstance(v, np.generic) else v  # noqa: E731
    if params is None:
        return None
    if isinstance(params, Mapping):
        return {k: plain(v) for k, v in params.items()}
    return [plain(v) for v in params]


class Results:
    """A results folder. ``mode="r"`` reads an existing one; ``"a"`` creates it if needed.
    ``models`` restricts every view to those models' rows (and the ground truth's): a report
    of some of the models a shared folder holds. ``snapshot`` keeps one connection per
    selection, its views over the parts found first (a report's hundreds of queries); without
    it every ``rows`` sees the parts written since."""

    def __init__(self, path: str | Path | ObjectPath, mode: str = "r", models: Sequence[str] | None = None,
                 snapshot: bool = False):
        self.path = as_location(path)
        self.mode = mode
        self.models = tuple(models) if models is not None else None
        self.snapshot = snapshot and mode == "r"
        if mode == "r" and not self.path.is_dir():
            raise StoreError(f"results folder {self.path} does not exist")
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"results folder {self.path} is a file, not a folder")
        if mode != "r":
            check_store_location(self.path / layout.MAPS, writable=True)
        found = self.version()
        if found is not None and found != TABLES_VERSION:
            raise StoreError(f"results folder {self.path} has results version {found}; this rep-pipeline "
                             f"({__version__}) reads and writes version {TABLES_VERSION}")

    # -- version -----------------------------------------------------------------------------
    def version(self) -> int | None:
        """The folder's results version: its marker's and every Parquet part's (their schema
        metadata) must agree; None for a new, empty folder. Parts of several versions, or parts
        that disagree with the marker, are refused."""
        found: dict[int, str] = {}
        marker = self.path / layout.MARKER
        if marker.is_file():
            try:
                found[int(json.loads(marker.read_text())["tables_version"])] = str(marker)
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"{marker} is not a rep-pipeline results marker: {exc}") from exc
        for table in SCHEMAS:
            for part in self._parts(table):
                meta = schema_metadata(part, self._filesystem)
                found.setdefault(int(meta.get(b"version", b"0")), str(part))
        if len(found) > 1:
            raise StoreError(f"results folder {self.path} mixes results versions: "
                             + ", ".join(f"{v} ({where})" for v, where in sorted(found.items()))
                             + f"; this rep-pipeline ({__version__}) reads and writes version {TABLES_VERSION}")
        return next(iter(found), None)

    def _ensure_marker(self) -> None:
        marker = self.path / layout.MARKER
        if not marker.is_file():
            write_whole(marker, json.dumps({"kind": layout.RESULTS_KIND, "tables_version": TABLES_VERSION,
                                             "package_version": __version__}).encode())

    # -- writing -------------------------------------------------------------------------------
    def write_table(self, table: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], *,
                    dataset: str, model: str | None, part: str) -> Path:
        """Write rows (a list of dicts or a dict of columns) as one Parquet part, atomically: a
        reader sees either the old part or the whole new one, never a half-written file."""
        if self.mode == "r":
            raise StoreError(f"results folder {self.path} was opened for reading")
        schema = SCHEMAS[table]
        if isinstance(rows, Mapping):
            data = pa.table({name: rows[name] for name in schema.names}, schema=schema)
        else:
            data = pa.Table.from_pylist(list(rows), schema=schema)
        self._ensure_marker()
        path = self.path / layout.part_file(table, dataset, model, part)
        write_whole(path, parquet_bytes(data))
        return path

    def maps(self) -> MapStore:
        """The ``maps.zarr`` beside the tables (created in ``"a"`` mode)."""
        return MapStore(self.path / layout.MAPS, mode=self.mode)

    @contextlib.contextmanager
    def staged_maps(self) -> Iterator[MapStore]:
        """A maps store aside from ``maps.zarr``; what was written into it moves into
        ``maps.zarr`` when the block ends without an error, and is dropped otherwise."""
        if self.mode == "r":
            raise StoreError(f"results folder {self.path} was opened for reading")
        existed = self.path.exists()
        staging = MapStore(self.path / f".maps-staging-{uuid.uuid4().hex}.zarr", mode="a")
        try:
            yield staging
            self.maps().adopt(staging)
        finally:
            remove_tree(staging.path)
            if is_local(self.path) and not existed and not any(self.path.iterdir()):
                self.path.rmdir()  # a refused first run leaves no trace

    # -- reading -------------------------------------------------------------------------------
    def tables(self) -> list[str]:
        """The tables that have at least one part here."""
        return [t for t in SCHEMAS if self._parts(t)]

    def _parts(self, table: str) -> list[str]:
        """The table's Parquet parts, as paths in ``_filesystem``."""
        folder = self.path / table
        if not is_local(folder):
            return sorted(f"{p.bucket}/{p.key}" for p in folder.glob("**/*.parquet"))
        return sorted(str(p) for p in folder.glob("**/*.parquet")) if folder.is_dir() else []

    @cached_property
    def _filesystem(self) -> Any:
        """pyarrow's filesystem for the parts: local, or over the object store's client."""
        return None if is_local(self.path) else self.path.arrow_filesystem()[0]

    def connect(self, *, dataset: str | None = None, split: str | None = None) -> duckdb.DuckDBPyConnection:
        """A sandboxed in-memory DuckDB connection with one view per table found here; with
        ``dataset`` and ``split``, each view holds only that dataset's and split's rows."""
        found = self.tables()
        if not found:
            raise StoreError(f"results folder {self.path} holds no rep-pipeline tables")
        con = duckdb.connect(":memory:", config=_DUCKDB_CONFIG)
        for table in found:
            parts = pads.dataset(self._parts(table), format="parquet", schema=SCHEMAS[table],
                                 filesystem=self._filesystem)
            con.register(f"{table}_parts", parts)
            # the selection as expressions, its values as constants: no value is spliced into SQL
            column, constant = duckdb.ColumnExpression, duckdb.ConstantExpression
            where = [column(col) == constant(v) for col, v in (("dataset", dataset), ("split", split))
                     if v is not None and col in SCHEMAS[table].names]
            if self.models is not None and "model" in SCHEMAS[table].names:
                where.append(column("model").isin(*(constant(m) for m in (*self.models, layout.GROUND_TRUTH_MODEL))))
            view = con.table(f"{table}_parts")
            for condition in where:
                view = view.filter(condition)
            view.create_view(table, replace=False)
        for view, (needs, sql, parts) in VIEWS.items():
            present = [part for table, part in parts.items() if table in found]
            if needs in found and present:
                con.execute(f"CREATE VIEW {view} AS " + sql.format(scores=" UNION ALL ".join(present)))
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        return con

    def rows(self, sql: str, params: Params = None, **selection: str | None) -> list[dict[str, Any]]:
        """The rows of ``sql`` over the views (``connect(**selection)``) as dicts; the values
        of ``sql``'s ``?`` / ``$name`` placeholders are ``params``."""
        try:
            con = self._reader(**selection) if self.snapshot else self.connect(**selection)
            rel = con.sql(sql, params=_plain(params))
            return [dict(zip(rel.columns, r)) for r in rel.fetchall()]
        except duckdb.Error as exc:  # a table without the columns asked for, say
            raise StoreError(f"results folder {self.path}: {exc}") from exc

    @functools.lru_cache(maxsize=8)  # noqa: B019  (a snapshot reader lives as long as its report)
    def _reader(self, *, dataset: str | None = None, split: str | None = None) -> duckdb.DuckDBPyConnection:
        return self.connect(dataset=dataset, split=split)

    def query(self, sql: str, params: Params = None) -> duckdb.DuckDBPyRelation:
        """Run ``sql`` against the tables, in the sandbox (see the module's docstring), with
        ``params`` the values of its ``?`` / ``$name`` placeholders; the result of its last
        statement."""
        con = self.connect()
        try:
            relation = con.sql(sql, params=_plain(params))
        except duckdb.Error as exc:
            raise _query_error(exc) from exc
        if relation is None:  # a statement without a result, such as SET
            raise QueryError(f"the statement returns no rows; rep-pipeline query shows a query's rows ({_TABLES})")
        return relation

    def fetch_rows(self, sql: str, limit: int, params: Params = None) -> tuple[list[str], list[tuple]]:
        """The column names and at most ``limit`` rows of ``query``; errors while running too."""
        relation = self.query(sql, params)
        try:
            return relation.columns, relation.limit(limit).fetchall()
        except duckdb.Error as exc:  # some only show when the rows are computed (casts, overflow)
            raise _query_error(exc) from exc


def _query_error(exc: duckdb.Error) -> QueryError:
    if isinstance(exc, duckdb.PermissionException):
        return QueryError(f"refused: rep-pipeline query reads the result tables only, with no access to files, "
                          f"databases or extensions ({exc})")
    return QueryError(f"query failed: {exc} ({_TABLES})")


def feature_group_row(model: str, dataset: str, split: str, group: Any) -> dict[str, Any]:
    """The ``feature_groups`` row of a store's model group (a ``ModelSplit``): what its model
    key stands for, so views can pair groups of one model (``ln_ablation``)."""
    meta = group.meta
    return {"model": model, "dataset": dataset, "split": split, "alias": meta.model or model,
            "timm_name": meta.timm_name or "", "weights_sha256": meta.weights_sha256,
            "last_norm": meta.last_norm_mode, "rope": meta.rope_mode,
            "depth": int(meta.depth or max(group.layers) + 1), "image_size": int(meta.image_size or 0),
            "store_fingerprint": group.fingerprint_hash}
