"""``rep-pipeline query`` is confined by DuckDB's own sandbox: whatever the statement, it reads
the result tables and nothing else, and writes nothing anywhere."""
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rep_pipeline.cli.app import app
from rep_pipeline.pipeline.errors import QueryError
from rep_pipeline.pipeline.results import Results

ROW = {"dataset": "d", "split": "val", "mi": 0.5, "nmi": 0.25, "mi_null": 0.1, "nmi_bias_aware": 0.2,
       "n_images": 3, "dataset_fingerprint": "f"}


@pytest.fixture
def results(tmp_path):
    Results(tmp_path / "results", mode="a").write_table("ground_truth", [ROW], dataset="d", model=None, part="val")
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    return tmp_path / "results"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


ATTACKS = [
    # reading outside the results
    "SELECT * FROM read_csv('{secret}')",
    "SELECT * FROM read_text('{secret}')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM glob('/root/*')",
    "SELECT * FROM glob('{results}/**')",
    "SELECT * FROM read_parquet('{results}/ground_truth/**/*.parquet')",
    "SELECT * FROM '{secret}'",
    "WITH x AS (SELECT * FROM read_csv('{secret}')) SELECT * FROM x",
    "SELECT (SELECT count(*) FROM read_csv('{secret}')) AS n",
    "SELECT * FROM ground_truth UNION ALL SELECT * FROM read_csv('{secret}')",
    "EXPLAIN SELECT * FROM read_csv('{secret}')",
    # writing anywhere, the results folder included
    "COPY (SELECT 1) TO '{outside}'",
    "COPY ground_truth TO '{results}/ground_truth/dataset=d/val.parquet' (FORMAT parquet)",
    "COPY (SELECT 1) TO '{results}/x.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{results}/y.csv'",
    "EXPORT DATABASE '{outside}'",
    "ATTACH '{outside}.duckdb' AS other",
    "SELECT 1; COPY (SELECT 1) TO '{outside}'",
    # changing the rules or fetching code
    "SET enable_external_access = true",
    "RESET enable_external_access",
    "SET allowed_directories = ['/']",
    "PRAGMA enable_profiling = 'json'",
    "SET profiling_output = '{outside}'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "FORCE INSTALL parquet",
    "SELECT * FROM read_csv('https://example.com/x.csv')",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_no_statement_reads_or_writes_outside_the_tables(results, tmp_path, attack):
    before = _snapshot(tmp_path)
    sql = attack.format(secret=tmp_path / "secret.txt", results=results, outside=tmp_path / "stolen.csv")
    with pytest.raises(QueryError) as err:
        Results(results).fetch_rows(sql, 10)
    assert "top secret" not in str(err.value)
    assert _snapshot(tmp_path) == before  # nothing written, nothing changed


@pytest.mark.parametrize("attack", ATTACKS[:3] + ATTACKS[11:13] + ATTACKS[18:19])
def test_the_cli_refuses_in_one_line_and_exits_2(results, tmp_path, attack):
    before = _snapshot(tmp_path)
    sql = attack.format(secret=tmp_path / "secret.txt", results=results, outside=tmp_path / "stolen.csv")
    out = CliRunner().invoke(app, ["query", str(results), sql])
    assert out.exit_code == 2 and out.output.startswith("error:") and "Traceback" not in out.output, out.output
    assert "top secret" not in out.output and _snapshot(tmp_path) == before


def test_in_memory_scratch_work_is_allowed_and_leaves_nothing(results, tmp_path):
    """Statements that only touch DuckDB's own memory are harmless: they end with the query."""
    before = _snapshot(tmp_path)
    r = Results(results)
    assert r.fetch_rows("WITH t AS (SELECT nmi * 2 AS x FROM ground_truth) SELECT x FROM t", 5) == (["x"], [(0.5,)])
    assert r.fetch_rows("CREATE TEMP TABLE s AS SELECT 1 AS one; SELECT one FROM s", 5) == (["one"], [(1,)])
    assert _snapshot(tmp_path) == before


def test_duckdbs_spill_folder_is_closed_too(results, tmp_path, monkeypatch):
    """DuckDB keeps its temp_directory (./.tmp) open inside the sandbox unless told otherwise."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "old.csv").write_text("top secret\n")
    before = _snapshot(tmp_path)
    for sql in ("COPY (SELECT 1) TO '.tmp/x.csv'", "SELECT * FROM glob('.tmp/*')", "SELECT * FROM read_csv('.tmp/old.csv')"):
        with pytest.raises(QueryError, match="refused"):
            Results(results).fetch_rows(sql, 5)
    assert _snapshot(tmp_path) == before
