"""The results folder: atomic Parquet parts read back with DuckDB, and its version contract."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rep_pipeline.pipeline.errors import QueryError, StoreError
from rep_pipeline.pipeline.results import Results
from rep_pipeline.storage_schemas import results as layout
from rep_pipeline.storage_schemas.tables import SCHEMAS, TABLES_VERSION

ROW = {"dataset": "d", "split": "val", "mi": 0.5, "nmi": 0.25, "mi_null": 0.1, "nmi_bias_aware": 0.2,
       "n_images": 3, "dataset_fingerprint": "f"}


def test_parts_are_written_where_the_layout_says_and_read_back(tmp_path):
    results = Results(tmp_path / "r", mode="a")
    path = results.write_table("ground_truth", [ROW], dataset="d", model=None, part="val")
    assert path == tmp_path / "r" / layout.part_file("ground_truth", "d", None, "val")
    assert pq.read_schema(path).metadata[b"version"] == str(TABLES_VERSION).encode()
    marker = json.loads((tmp_path / "r" / layout.MARKER).read_text())
    assert marker["kind"] == layout.RESULTS_KIND and marker["tables_version"] == TABLES_VERSION
    reader = Results(tmp_path / "r")
    assert reader.tables() == ["ground_truth"]
    assert reader.rows("SELECT dataset, split, nmi FROM ground_truth") == [{"dataset": "d", "split": "val",
                                                                            "nmi": 0.25}]
    results.write_table("ground_truth", [dict(ROW, split="test", nmi=0.5)], dataset="d", model=None, part="test")
    assert reader.rows("SELECT nmi FROM ground_truth ORDER BY nmi") == [{"nmi": 0.25}, {"nmi": 0.5}]
    assert reader.rows("SELECT nmi FROM ground_truth", dataset="d", split="test") == [{"nmi": 0.5}]
    assert not list((tmp_path / "r").glob("**/*.tmp"))


def test_rows_are_cast_to_the_schema_and_a_missing_column_fails(tmp_path):
    results = Results(tmp_path, mode="a")
    with pytest.raises((KeyError, pa.ArrowInvalid, pa.ArrowTypeError)):
        results.write_table("ground_truth", {k: [v] for k, v in ROW.items() if k != "nmi"},
                            dataset="d", model=None, part="val")
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        results.write_table("ground_truth", [dict(ROW, n_images="three")], dataset="d", model=None, part="val")
    assert not (tmp_path / "ground_truth").exists() or not list((tmp_path / "ground_truth").glob("**/*.parquet"))


@pytest.mark.parametrize("mode", ["r", "a"])
def test_results_of_another_version_are_refused_for_reading_and_appending(tmp_path, mode):
    Results(tmp_path, mode="a").write_table("ground_truth", [ROW], dataset="d", model=None, part="val")
    (tmp_path / layout.MARKER).write_text(json.dumps({"kind": layout.RESULTS_KIND, "tables_version": TABLES_VERSION + 1}))
    with pytest.raises(StoreError, match=f"results version.*{TABLES_VERSION + 1}.*version {TABLES_VERSION}"):
        Results(tmp_path, mode=mode)


def test_a_folder_without_marker_is_read_by_its_parquet_version(tmp_path):
    """Folders written before the marker existed carry the version in each part's schema."""
    old = SCHEMAS["ground_truth"].with_metadata({b"table": b"ground_truth", b"version": b"0"})
    (tmp_path / "ground_truth" / "dataset=d").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([ROW], schema=old), tmp_path / "ground_truth/dataset=d/val.parquet")
    with pytest.raises(StoreError, match=f"results version 0; .*reads and writes version {TABLES_VERSION}"):
        Results(tmp_path)
    assert Results(tmp_path / "new", mode="a").version() is None


def test_query_reads_the_tables_and_errors_name_them(tmp_path):
    Results(tmp_path, mode="a").write_table("ground_truth", [ROW], dataset="d", model=None, part="val")
    results = Results(tmp_path)
    assert results.fetch_rows("SELECT count(*) AS n FROM ground_truth", 5) == (["n"], [(1,)])
    with pytest.raises(QueryError, match="(?s)nope.*tables: training_curves"):
        results.query("SELECT nope FROM ground_truth")
    with pytest.raises(QueryError, match="tables: training_curves"):
        results.query("SELECT * FROM no_such_table")
    with pytest.raises(StoreError, match="does not exist"):
        Results(tmp_path / "missing")


def test_a_part_of_another_version_is_refused_even_under_a_current_marker(tmp_path):
    results = Results(tmp_path, mode="a")
    results.write_table("ground_truth", [ROW], dataset="d", model=None, part="val")
    newer = SCHEMAS["ground_truth"].with_metadata({b"table": b"ground_truth", b"version": str(TABLES_VERSION + 1).encode()})
    pq.write_table(pa.Table.from_pylist([ROW], schema=newer), tmp_path / "ground_truth/dataset=d/test.parquet")
    with pytest.raises(StoreError, match=f"mixes results versions: {TABLES_VERSION} .*, {TABLES_VERSION + 1} "):
        Results(tmp_path)


def test_headline_metrics_carry_their_interval_columns_right_after_them():
    """docs/uncertainty.md: <metric>_lo and <metric>_hi, nullable float64, follow each headline."""
    headline = {"segmentation": ("miou", "pixel_accuracy", "nmi", "nmi_bias_aware"),
                "ground_truth": ("nmi", "nmi_bias_aware"), "attention_mi": ("mean",),
                "correspondence": ("pck_point", "pck_image"), "correspondence_best": ("pck_point",),
                "best_layers": ("miou", "nmi"), "kmeans_sensitivity": ("miou",)}
    for table, metrics in headline.items():
        names = SCHEMAS[table].names
        for m in metrics:
            i = names.index(m)
            assert names[i + 1:i + 3] == [f"{m}_lo", f"{m}_hi"], (table, m)
            for f in (SCHEMAS[table].field(f"{m}_lo"), SCHEMAS[table].field(f"{m}_hi")):
                assert f.type == pa.float64() and f.nullable and f.metadata[b"doc"], (table, f)
    corr = SCHEMAS["correlations"]
    assert corr.names.index("p_value") == corr.names.index("rho") + 1 and corr.field("p_value").nullable


def test_kmeans_sensitivity_schema():
    schema = SCHEMAS["kmeans_sensitivity"]
    assert schema.names == ["model", "dataset", "split", "train_split", "embedding", "layer", "k", "seed",
                            "batch_images", "pca_batches", "pca_interval", "codebook", "miou", "miou_lo", "miou_hi",
                            "pixel_accuracy", "nmi", "n_images", "store_fingerprint", "codebook_fingerprint"]
    types = {f.name: f.type for f in schema}
    assert types["layer"] == pa.int16() and types["nmi"] == pa.float64() and types["codebook"] == pa.string()
    assert all(types[c] == pa.int32() for c in ("k", "seed", "batch_images", "pca_batches", "pca_interval",
                                                 "n_images"))
    assert all(f.metadata[b"doc"] for f in schema)


def test_parts_written_before_the_interval_columns_read_as_null(tmp_path):
    """A part without the new nullable columns (written before them) still reads: nulls."""
    old = pa.schema([f for f in SCHEMAS["ground_truth"] if not f.name.endswith(("_lo", "_hi"))],
                    metadata=SCHEMAS["ground_truth"].metadata)
    Results(tmp_path, mode="a").write_table("ground_truth", [ROW], dataset="d", model=None, part="val")
    pq.write_table(pa.Table.from_pylist([dict(ROW, split="old")], schema=old),
                   tmp_path / "ground_truth/dataset=d/old.parquet")
    rows = Results(tmp_path).rows("SELECT split, nmi, nmi_lo FROM ground_truth ORDER BY split")
    assert rows == [{"split": "old", "nmi": 0.25, "nmi_lo": None}, {"split": "val", "nmi": 0.25, "nmi_lo": None}]


def test_selections_and_query_values_reach_duckdb_as_values_not_sql(tmp_path):
    odd = "o'brien; DROP VIEW feature_groups; --"  # a quote and SQL in a name: only ever a value
    results = Results(tmp_path, mode="a")
    for model in ("m1", odd, layout.GROUND_TRUTH_MODEL):
        for split in ("val", odd):
            row = {"model": model, "dataset": odd, "split": split, "alias": model, "timm_name": "t",
                   "weights_sha256": None, "last_norm": "after", "rope": "before", "depth": 2, "image_size": 32,
                   "store_fingerprint": "f"}
            results.write_table("feature_groups", [row], dataset="d", model=model.replace("'", "").replace(" ", ""),
                                part=split.replace("'", "").replace(" ", "").replace(";", ""))
    sql = "SELECT model, split FROM feature_groups ORDER BY model, split"
    every = Results(tmp_path).rows(sql)
    assert len(every) == 6
    chosen = Results(tmp_path, models=[odd]).rows(sql, dataset=odd, split=odd)
    assert chosen == [{"model": m, "split": odd} for m in sorted((odd, layout.GROUND_TRUTH_MODEL))]
    assert Results(tmp_path).rows("SELECT count(*) AS n FROM feature_groups WHERE model = ?", [odd]) == [{"n": 2}]
    assert Results(tmp_path).rows("SELECT count(*) AS n FROM feature_groups WHERE model = $m AND depth = $d",
                                  {"m": odd, "d": 2}) == [{"n": 2}]
    assert Results(tmp_path).fetch_rows("SELECT split FROM feature_groups WHERE model = ? AND split = ?", 5,
                                        ["m1", "val"]) == (["split"], [("val",)])
    with pytest.raises(QueryError, match="refused"):  # the sandbox holds with parameters too
        Results(tmp_path).query("SELECT * FROM read_parquet(?)", [str(tmp_path / "x.parquet")])
