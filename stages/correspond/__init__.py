"""The correspond stage: zero-shot keypoint transfer and PCK (PROTOCOL.md section 11).

``stage`` reads the store and writes the tables; ``transfer`` is the exact, cheap cosine argmax
over upsampled features, on the backend; ``pck`` scores predictions.
"""
from .stage import CorrespondResult, is_done, run_correspond

__all__ = ["CorrespondResult", "is_done", "run_correspond"]
