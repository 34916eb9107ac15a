"""What rep-pipeline writes, as pure data: the feature store's Zarr layout, the results
folder's layout and its Parquet schemas, and their versions. No I/O happens here."""
from . import feature_store, results, tables

__all__ = ["feature_store", "results", "tables"]
