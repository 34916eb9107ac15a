"""The extract stage: timm models over a dataset into the Zarr feature store (section 2).

``stage`` holds the driver (``run_extract``, ``is_done``) and the ``Extractor`` that a Ray
actor owns; ``capture`` is the tapped forward pass that yields q, k, v, tokens and the
attention statistics.
"""
from .stage import ExtractResult, Extractor, is_done, request, run_extract

__all__ = ["ExtractResult", "Extractor", "is_done", "request", "run_extract"]
