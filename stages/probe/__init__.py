"""The probe stage: hyperplane and cosine templates per token type (PROTOCOL.md section 9).

``stage`` reads the store and writes the tables; ``templates`` holds the decision rules, on
arrays in memory.
"""
from .stage import ProbeResult, is_done, run_probe

__all__ = ["ProbeResult", "is_done", "run_probe"]
