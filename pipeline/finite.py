"""The NaN/inf checks every stage shares, naming the images at fault: ``check_finite`` on
NumPy/CuPy arrays read from the store (cluster, evaluate), ``all_finite`` and
``non_finite_images`` on the torch tensors extract produces, before they leave the device;
and ``finite_or``, a number or a fallback where it is missing, NaN or infinite (table cells,
sort keys).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .backend import Backend
from .errors import NonFiniteFeaturesError

if TYPE_CHECKING:  # torch is loaded only where extract's tensors are checked
    import torch


def finite_or(value: Any, fallback: Any = None) -> Any:
    """``float(value)``, or ``fallback`` where ``value`` is None, NaN or infinite."""
    return float(value) if value is not None and math.isfinite(value) else fallback


def check_finite(x: Any, image_index: np.ndarray, what: str, be: Backend | None = None) -> None:
    """Raise, naming the array and images, if ``x`` (images, ...) holds NaN or inf."""
    xp = be.xp if be is not None else np
    per_image = x.reshape(x.shape[0], -1).sum(1, dtype=xp.float32)
    bad = ~xp.isfinite(per_image)
    if bool(bad.any()):
        where = image_index[be.to_numpy(bad) if be is not None else bad]
        raise NonFiniteFeaturesError(f"{what} holds NaN/inf for images {where[:5].tolist()} (positions in the split)")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf anywhere: min and max propagate NaN, so two reductions decide it, reading
    float16 at memory speed (``isfinite`` or a float32 sum would copy); the per-image search
    (``non_finite_images``) runs only when this fails.
    """
    import torch

    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def non_finite_images(tensor: torch.Tensor, image_ids: list[str]) -> list[str]:
    """The ids of the images with a NaN/inf anywhere in ``tensor`` (layer, image, ...)."""
    rows = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
    import torch

    finite = torch.isfinite(rows.amin(-1)) & torch.isfinite(rows.amax(-1))
    return sorted({image_ids[i] for i in torch.nonzero(~finite)[:, 1].tolist()})
