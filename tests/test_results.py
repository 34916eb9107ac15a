"""The result tables' schemas: interval columns, the k-means sensitivity table. The results folder
itself (Parquet parts, DuckDB, versions) is the contract of tests/test_results_contract.py, run on
every backend."""
import pyarrow as pa
import pytest

from rep_pipeline.pipeline.errors import QueryError
from rep_pipeline.pipeline.results import Results
from rep_pipeline.storage_schemas import results as layout
from rep_pipeline.storage_schemas.tables import SCHEMAS


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
