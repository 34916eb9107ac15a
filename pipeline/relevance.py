"""The relevance sets of the perturbation test (PROTOCOL.md section 10.6), shared by the
explain stage (which perturbs them) and the report (which draws them, figure u7).

For the token of patch ``own`` with map S_i (P values, row-major patches): the other P - 1
patches ordered by S_i descending, ties by patch index (a stable sort of -S_i, so the sets are
deterministic); positive set = the first m (most relevant), negative set = the last m,
m = floor(rho (P - 1)) (A21; ``+ 1e-9`` so that e.g. rho = 0.29, P - 1 = 100 gives 29, not 28).
The token's own patch is in neither (App. D.2). rho must lie in [0, 0.5]: beyond, the two sets
would overlap.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError


def set_size(n_patches: int, rho: float) -> int:
    """m = floor(rho (P - 1)), the size of each of the two sets."""
    if not 0.0 <= rho <= 0.5:
        raise ConfigError(f"rho must lie in [0, 0.5] (larger sets would overlap), got {rho}")
    return int(math.floor(rho * (n_patches - 1) + 1e-9))


def relevance_sets(s_i: np.ndarray, own: int, rho: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) patch indices (int64) for the token of patch ``own`` with map
    ``s_i`` (P,): the m most and the m least relevant of the other P - 1 patches, each in the
    order of descending S_i (ties by index); ``own`` is in neither."""
    s_i = np.asarray(s_i, dtype=np.float64).ravel()
    p = s_i.size
    if not 0 <= own < p:
        raise ConfigError(f"own patch {own} outside 0..{p - 1}")
    m = set_size(p, rho)
    order = np.argsort(-s_i, kind="stable")
    order = order[order != own]
    return order[:m].copy(), order[order.size - m:].copy()
