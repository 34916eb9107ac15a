"""One source of truth for what rep-pipeline writes: the Zarr layout (and, later, Parquet)."""
from .zarr_layout import (
    DATASET_ARRAYS,
    DATASET_ATTRS,
    FEATURE_CODEC,
    MODEL_ARRAYS,
    MODEL_ATTRS,
    SCHEMA_VERSION,
    STORE_KIND,
    ArraySpec,
    dataset_path,
    model_path,
    validate_store,
)

__all__ = [
    "ArraySpec", "DATASET_ARRAYS", "DATASET_ATTRS", "FEATURE_CODEC", "MODEL_ARRAYS", "MODEL_ATTRS",
    "SCHEMA_VERSION", "STORE_KIND", "dataset_path", "model_path", "validate_store",
]
