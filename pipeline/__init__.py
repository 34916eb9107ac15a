"""Infrastructure below the stages: configuration, errors, the model registry, datasets, the
store and results I/O (the only zarr and the only pyarrow/DuckDB code), the Ray runner, the
array backend and the feature streams the stages share. Nothing here knows a stage."""
