"""Small NumPy helpers that several rooms share, with the conventions PROTOCOL.md fixes.

- ``minmax``: M(S) = (S - min S)/(max S - min S) of section 10.2, 0 where the map is
  constant; the explain stage scales its maps with it, the report its maps and attention rows.
"""
from __future__ import annotations

import numpy as np


def minmax(a: np.ndarray, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """(a - min)/(max - min) over ``axis`` (the whole array for None; one map per remaining
    index otherwise, e.g. ``axis=-1`` for maps as rows, ``axis=(-2, -1)`` for stacks of 2-D
    maps); 0 where constant. Floating input keeps its dtype, anything else becomes float32."""
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    lo = a.min(axis=axis, keepdims=True)
    span = a.max(axis=axis, keepdims=True) - lo
    out = a - lo                                   # 0 everywhere on a constant map
    np.divide(out, np.where(span > 0, span, 1).astype(a.dtype), out=out)
    return out
