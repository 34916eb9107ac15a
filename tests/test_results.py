"""The result tables' schemas: interval columns, the k-means sensitivity table. The results folder
itself (Parquet parts, DuckDB, versions) is the contract of tests/test_results_contract.py, run on
every backend."""
import pyarrow as pa

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
