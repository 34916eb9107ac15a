"""The evaluate stage: segmentation, Hungarian matching, positional and attention MI
(PROTOCOL.md section 5) into the results folder.

``stage`` streams the test features through every finished codebook; ``metrics`` holds the
formulas, as functions of accumulated counts.
"""
from .stage import EvaluateResult, is_done, run_evaluate, segment

__all__ = ["EvaluateResult", "is_done", "run_evaluate", "segment"]
