"""Read-only SQL over a results folder with DuckDB: every table is a view of its Parquet files."""
from __future__ import annotations

from pathlib import Path

import duckdb

from storage_schemas.tables import SCHEMAS

from .errors import QueryError, StoreError

ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
_TABLES = f"tables: {', '.join(SCHEMAS)}"


def connect(results: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per results table found in ``results``."""
    results = Path(results)
    if not results.is_dir():
        raise StoreError(f"results folder {results} does not exist")
    con = duckdb.connect(":memory:")
    found = 0
    for table in SCHEMAS:
        if any((results / table).glob("**/*.parquet")):
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{results / table}/**/*.parquet', "
                        f"hive_partitioning = true, union_by_name = true)")
            found += 1
    if not found:
        raise StoreError(f"results folder {results} holds no rep-pipeline tables")
    return con


def run_query(results: str | Path, sql: str) -> duckdb.DuckDBPyRelation:
    """Run one read-only statement (SELECT, WITH ... SELECT, EXPLAIN) against the views."""
    con = connect(results)
    try:
        statements = con.extract_statements(sql)
        if len(statements) != 1 or statements[0].type not in ALLOWED:
            raise QueryError(f"rep-pipeline query runs one read-only statement (SELECT or EXPLAIN); {_TABLES}")
        return con.sql(sql)
    except duckdb.Error as exc:
        raise _query_error(exc) from exc


def fetch_rows(results: str | Path, sql: str, limit: int) -> tuple[list[str], list[tuple]]:
    """The column names and at most ``limit`` rows of ``run_query``; errors while running too."""
    relation = run_query(results, sql)
    try:
        return relation.columns, relation.limit(limit).fetchall()
    except duckdb.Error as exc:  # some only show when the rows are computed (casts, overflow)
        raise _query_error(exc) from exc


def _query_error(exc: duckdb.Error) -> QueryError:
    return QueryError(f"query failed: {exc} ({_TABLES})")
