"""Infrastructure below the stages: configuration, errors, the model registry, datasets, the
store and results I/O (the only zarr code: the package ``store``; the only Parquet and DuckDB code:
``parquet`` and ``results``), the Ray runner, the
array backend and the feature streams the stages share. Nothing here knows a stage."""
