"""The results folder's contract, written once and run on every storage backend.

``ResultsContract`` holds the tests (atomic Parquet parts read back with DuckDB, queries and
their errors, the version contract, several models side by side, the maps beside the tables);
each backend subclasses it and overrides one fixture, ``location``: ``TestResultsLocal`` a
local folder, ``TestResultsS3`` a prefix on the real S3 server on 127.0.0.1 (integration tier),
as zarr-python's ``src/zarr/testing/store.py`` and xarray's round-trip base class do. Files a
test writes by hand (an old or foreign part, a marker) go through the location, as any other
writer's would. The schemas themselves are in tests/test_results.py.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rep_pipeline.pipeline.errors import QueryError, StoreError
from rep_pipeline.pipeline.location import as_location
from rep_pipeline.pipeline.results import Results
from rep_pipeline.storage_schemas import results as layout
from rep_pipeline.storage_schemas.tables import SCHEMAS, TABLES_VERSION

ROW = {"dataset": "d", "split": "val", "mi": 0.5, "nmi": 0.25, "mi_null": 0.1, "nmi_bias_aware": 0.2,
       "n_images": 3, "dataset_fingerprint": "f"}


def _attention_row(model, layer, mean):
    return {"model": model, "dataset": "d", "split": "val", "layer": layer, "head": 0, "mean": mean, "std": 0.0,
            "n_images": 3, "store_fingerprint": "s"}


def _write_parquet(location, rows, schema) -> None:
    """A Parquet part written as another program would: whole bytes at ``location``."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    location.parent.mkdir(parents=True, exist_ok=True)
    location.write_bytes(sink.getvalue().to_pybytes())


class ResultsContract:
    """Every backend answers these alike. A subclass overrides ``location``."""

    @pytest.fixture
    def location(self):
        raise NotImplementedError("a backend's subclass says where its results live")

    def test_parts_are_written_where_the_layout_says_and_read_back(self, location):
        results = Results(location / "r", mode="a")
        path = results.write_table("ground_truth", [ROW], dataset="d", model=None, part="val")
        assert path == location / "r" / layout.part_file("ground_truth", "d", None, "val")
        assert pq.read_schema(pa.BufferReader(path.read_bytes())).metadata[b"version"] == str(TABLES_VERSION).encode()
        marker = json.loads((location / "r" / layout.MARKER).read_text())
        assert marker["kind"] == layout.RESULTS_KIND and marker["tables_version"] == TABLES_VERSION
        reader = Results(location / "r")
        assert reader.tables() == ["ground_truth"] and reader.version() == TABLES_VERSION
        assert reader.rows("SELECT dataset, split, nmi FROM ground_truth") == [{"dataset": "d", "split": "val",
                                                                                "nmi": 0.25}]
        results.write_table("ground_truth", [dict(ROW, split="test", nmi=0.5)], dataset="d", model=None, part="test")
        assert reader.rows("SELECT nmi FROM ground_truth ORDER BY nmi") == [{"nmi": 0.25}, {"nmi": 0.5}]
        assert reader.rows("SELECT nmi FROM ground_truth", dataset="d", split="test") == [{"nmi": 0.5}]
        assert not list((location / "r").glob("**/*.tmp"))

    def test_a_part_written_again_is_replaced_whole(self, location):
        results = Results(location / "r", mode="a")
        results.write_table("ground_truth", [ROW, dict(ROW, nmi=0.75)], dataset="d", model=None, part="val")
        results.write_table("ground_truth", [dict(ROW, nmi=0.5)], dataset="d", model=None, part="val")
        assert Results(location / "r").rows("SELECT nmi FROM ground_truth") == [{"nmi": 0.5}]

    def test_rows_are_cast_to_the_schema_and_a_missing_column_fails(self, location):
        results = Results(location, mode="a")
        with pytest.raises((KeyError, pa.ArrowInvalid, pa.ArrowTypeError)):
            results.write_table("ground_truth", {k: [v] for k, v in ROW.items() if k != "nmi"},
                                dataset="d", model=None, part="val")
        with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
            results.write_table("ground_truth", [dict(ROW, n_images="three")], dataset="d", model=None, part="val")
        assert not (location / "ground_truth").exists() or not list((location / "ground_truth").glob("**/*.parquet"))

    def test_a_reader_cannot_write(self, location):
        Results(location, mode="a").write_table("ground_truth", [ROW], dataset="d", model=None, part="val")
        reader = Results(location)
        with pytest.raises(StoreError, match="opened for reading"):
            reader.write_table("ground_truth", [ROW], dataset="d", model=None, part="test")
        with pytest.raises(StoreError, match="opened for reading"):
            with reader.staged_maps():
                pass

    def test_a_second_model_is_appended_beside_the_first(self, location):
        results = Results(location, mode="a")
        results.write_table("attention_mi", [_attention_row("m1", layer, 0.1 * layer) for layer in range(3)],
                            dataset="d", model="m1", part="val")
        first = Results(location).rows("SELECT model, count(*) AS n FROM attention_mi GROUP BY model")
        Results(location, mode="a").write_table("attention_mi", [_attention_row("m2", 0, 0.5)], dataset="d",
                                                model="m2", part="val")
        reader = Results(location)
        assert first == [{"model": "m1", "n": 3}]
        assert reader.rows("SELECT model, count(*) AS n FROM attention_mi GROUP BY model ORDER BY model") == [
            {"model": "m1", "n": 3}, {"model": "m2", "n": 1}]
        assert (location / layout.part_file("attention_mi", "d", "m1", "val")).is_file()
        assert (location / layout.part_file("attention_mi", "d", "m2", "val")).is_file()
        assert reader.fetch_rows("SELECT mean FROM attention_mi WHERE model = 'm2'", 5) == (["mean"], [(0.5,)])

    @pytest.mark.parametrize("mode", ["r", "a"])
    def test_results_of_another_version_are_refused_for_reading_and_appending(self, location, mode):
        Results(location, mode="a").write_table("ground_truth", [ROW], dataset="d", model=None, part="val")
        (location / layout.MARKER).write_text(json.dumps({"kind": layout.RESULTS_KIND,
                                                          "tables_version": TABLES_VERSION + 1}))
        with pytest.raises(StoreError, match=f"results version.*{TABLES_VERSION + 1}.*version {TABLES_VERSION}"):
            Results(location, mode=mode)

    def test_a_folder_without_marker_is_read_by_its_parquet_version(self, location):
        """Folders written before the marker existed carry the version in each part's schema."""
        old = SCHEMAS["ground_truth"].with_metadata({b"table": b"ground_truth", b"version": b"0"})
        _write_parquet(location / "ground_truth/dataset=d/val.parquet", [ROW], old)
        with pytest.raises(StoreError, match=f"results version 0; .*reads and writes version {TABLES_VERSION}"):
            Results(location)
        assert Results(location / "new", mode="a").version() is None

    def test_a_part_of_another_version_is_refused_even_under_a_current_marker(self, location):
        results = Results(location, mode="a")
        results.write_table("ground_truth", [ROW], dataset="d", model=None, part="val")
        newer = SCHEMAS["ground_truth"].with_metadata({b"table": b"ground_truth",
                                                       b"version": str(TABLES_VERSION + 1).encode()})
        _write_parquet(location / "ground_truth/dataset=d/test.parquet", [ROW], newer)
        with pytest.raises(StoreError, match=f"mixes results versions: {TABLES_VERSION} .*, {TABLES_VERSION + 1} "):
            Results(location)

    def test_query_reads_the_tables_and_errors_name_them(self, location):
        Results(location, mode="a").write_table("ground_truth", [ROW], dataset="d", model=None, part="val")
        results = Results(location)
        assert results.fetch_rows("SELECT count(*) AS n FROM ground_truth", 5) == (["n"], [(1,)])
        assert results.query("SELECT nmi FROM ground_truth").fetchall() == [(0.25,)]
        with pytest.raises(QueryError, match="(?s)nope.*tables: training_curves"):
            results.query("SELECT nope FROM ground_truth")
        with pytest.raises(QueryError, match="tables: training_curves"):
            results.query("SELECT * FROM no_such_table")
        with pytest.raises(StoreError, match="does not exist"):
            Results(location / "missing")

    def test_parts_written_before_the_interval_columns_read_as_null(self, location):
        """A part without the new nullable columns (written before them) still reads: nulls."""
        old = pa.schema([f for f in SCHEMAS["ground_truth"] if not f.name.endswith(("_lo", "_hi"))],
                        metadata=SCHEMAS["ground_truth"].metadata)
        Results(location, mode="a").write_table("ground_truth", [ROW], dataset="d", model=None, part="val")
        _write_parquet(location / "ground_truth/dataset=d/old.parquet", [dict(ROW, split="old")], old)
        rows = Results(location).rows("SELECT split, nmi, nmi_lo FROM ground_truth ORDER BY split")
        assert rows == [{"split": "old", "nmi": 0.25, "nmi_lo": None}, {"split": "val", "nmi": 0.25, "nmi_lo": None}]

    def test_staged_maps_join_the_results_only_when_complete(self, location):
        results = Results(location, mode="a")
        with results.staged_maps() as staging:
            staging.write("d/val/ground_truth", attrs={"classes": ["a"]}, counts=np.ones((2, 2, 1), np.int64))
        assert results.maps().read("d/val/ground_truth", "counts").sum() == 4
        with pytest.raises(RuntimeError, match="interrupted"):
            with results.staged_maps() as staging:
                staging.write("d/val/ground_truth", attrs={"classes": ["a"]}, counts=np.zeros((2, 2, 1), np.int64))
                staging.write("d/val/m/online-k2-s0/keys/layer_0", attrs={"k": 2},
                              examples=np.ones((1, 4, 4), np.uint8))
                raise RuntimeError("interrupted")
        maps = Results(location).maps()
        assert maps.read("d/val/ground_truth", "counts").sum() == 4  # the interrupted block left nothing
        with pytest.raises(StoreError, match="has no d/val/m/online-k2-s0/keys/layer_0/examples"):
            maps.read("d/val/m/online-k2-s0/keys/layer_0", "examples")
        # nothing of either staging store is left (SeaweedFS may still list a removed prefix, empty)
        assert [p for p in location.glob("**/*") if ".maps-staging" in str(p)] == []


class TestResultsLocal(ResultsContract):
    @pytest.fixture
    def location(self, tmp_path):
        return tmp_path / "results"


@pytest.mark.integration
class TestResultsS3(ResultsContract):
    @pytest.fixture
    def location(self, s3):
        return as_location(s3.url("results"))
