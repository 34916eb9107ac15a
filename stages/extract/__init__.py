"""The extract stage: timm models over a dataset into the Zarr feature store (section 2).

``stage`` holds the driver (``run_extract``, ``is_done``); ``extractor`` the ``Extractor``
that a Ray actor owns; ``capture`` the tapped forward pass that yields q, k, v, tokens and
the attention statistics. ``Extractor`` (torch and timm) loads on first use.
"""
from typing import Any

from .stage import ExtractResult, is_done, request, run_extract

__all__ = ["ExtractResult", "Extractor", "is_done", "request", "run_extract"]


def __getattr__(name: str) -> Any:
    if name == "Extractor":
        from .extractor import Extractor

        return Extractor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
