"""The k-means engine lives in ``pipeline/kmeans.py`` (the explain stage fits its segment
codebooks with it too); this name stays importable."""
from rep_pipeline.pipeline.kmeans import LloydKMeans, OnlineKMeans, PCAInit, l2_normalize  # noqa: F401

__all__ = ["LloydKMeans", "OnlineKMeans", "PCAInit", "l2_normalize"]
