"""`rep-pipeline query` takes SQL as pasted from the docs: beginning with a `-- comment` line,
and prints values with enough digits to tell them apart."""
import subprocess
import sys

from rep_pipeline.pipeline.results import Results


def _results(tmp_path):
    results = Results(tmp_path / "results", mode="a")
    for model, ratio in (("m1", 0.000212345), ("m2", 0.000219876)):
        row = {"model": model, "dataset": "d", "split": "val", "alias": model, "timm_name": "t",
               "weights_sha256": None, "last_norm": "after", "rope": "before", "depth": 2, "image_size": 32,
               "store_fingerprint": str(ratio)}
        results.write_table("feature_groups", [row], dataset="d", model=model, part="val")
    return tmp_path / "results"


def _query(*args):
    return subprocess.run([sys.executable, "-m", "rep_pipeline.cli.app", "query", *args], capture_output=True,
                          text=True, timeout=120)


def test_sql_that_begins_with_a_comment_runs_as_pasted(tmp_path):
    sql = "-- every model once\nSELECT model, CAST(store_fingerprint AS DOUBLE) AS ratio FROM feature_groups ORDER BY model"
    run = _query(str(_results(tmp_path)), sql, "--limit", "5")
    assert run.returncode == 0, run.stderr
    assert "m1" in run.stdout and "m2" in run.stdout
    assert "0.000212345" in run.stdout and "0.000219876" in run.stdout  # not 0.0002 twice


def test_an_option_before_the_sql_still_reads_as_an_option(tmp_path):
    run = _query("--limit", "1", str(_results(tmp_path)), "-- one row\nSELECT model FROM feature_groups ORDER BY model")
    assert run.returncode == 0, run.stderr
    assert "m1" in run.stdout and "m2" not in run.stdout
