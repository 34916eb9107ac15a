"""Small NumPy helpers that several rooms share, with the conventions PROTOCOL.md fixes.

- ``minmax``: M(S) = (S - min S)/(max S - min S) of section 10.2, 0 where the map is
  constant; the explain stage scales its maps with it, the report its maps and attention rows.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .backend import is_foreign_array, namespace


def minmax(a: Any, axis: int | tuple[int, ...] | None = None) -> Any:
    """(a - min)/(max - min) over ``axis`` (the whole array for None; one map per remaining
    index otherwise, e.g. ``axis=-1`` for maps as rows, ``axis=(-2, -1)`` for stacks of 2-D
    maps); 0 where constant. Floating input keeps its dtype, anything else becomes float32.
    An array of another Array API namespace stays in it, on its device."""
    if is_foreign_array(a):
        xp = namespace(a)
        if not xp.isdtype(a.dtype, "real floating"):
            a = xp.astype(a, xp.float32)
        lo = xp.min(a, axis=axis, keepdims=True)
        span = xp.max(a, axis=axis, keepdims=True) - lo
        return (a - lo) / xp.where(span > 0, span, 1.0)
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    lo = a.min(axis=axis, keepdims=True)
    span = a.max(axis=axis, keepdims=True) - lo
    out = a - lo                                   # 0 everywhere on a constant map
    np.divide(out, np.where(span > 0, span, 1).astype(a.dtype), out=out)
    return out
