"""The cluster stage: cosine k-means codebooks over the feature store (PROTOCOL.md section 4).

``stage`` plans and runs the training on Ray workers; the engine (online Adam and exact Lloyd,
one code path on NumPy and CuPy) is ``pipeline/kmeans.py``, which the explain stage shares.
"""
from .stage import ClusterResult, ClusterWorker, GroupPlan, is_done, plan_codebooks, run_cluster

__all__ = ["ClusterResult", "ClusterWorker", "GroupPlan", "is_done", "plan_codebooks", "run_cluster"]
