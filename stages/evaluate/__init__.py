"""The evaluate stage: segmentation, Hungarian matching, positional and attention MI
(PROTOCOL.md section 5) into the results folder.

``stage`` streams the test features through every finished codebook; the formulas, as
functions of accumulated counts, are ``pipeline/metrics.py``, the scoring of cluster maps
``pipeline/segscore.py`` and the upsampling ``pipeline/upsample.py`` (the explain stage shares
them).
"""
from .stage import EvaluateResult, is_done, run_evaluate, segment

__all__ = ["EvaluateResult", "is_done", "run_evaluate", "segment"]
