"""Keypoint transfer by cosine on bilinearly upsampled patch features (PROTOCOL.md 11.3).

F is one image's G x G x D patch grid; F^ its bilinear upsampling (align_corners=False, as
``torch.nn.functional.interpolate``) to S x S. A source keypoint's feature f = F^_r[p_r] comes
from its <= 2 x 2 neighbouring patches; the prediction is the valid target pixel of highest
cos(f, F^_t[p]). F^_t (S x S x D) is never built:

- the numerator f . F^_t[p] is the bilinear upsampling of the G x G map f . F_t[a]
  (linearity): Ay @ M @ Ax^T with the (S, G) interpolation matrix;
- ||F^_t[p]||^2 is the quadratic form of p's 2 x 2 neighbouring patches' Gram matrix with
  the bilinear weights; the Gram entries of every 2 x 2 block are five (G, G) maps of
  neighbour dot products (``neighbour_grams``), computed once per (image, layer, embedding),
  and the quadratic form over all pixels is again a few (S, G) matrix products.

Everything is float64 on the backend module ``xp`` (NumPy or CuPy); inputs (float16 from
the store) are widened. Ties: pixels whose cosine is within ``TIE_TOL`` of the maximum count
as tied and the first in row-major order wins. Pixels with exactly one feature (the clamped
border bands of the upsampling, where whole rows or columns of pixels repeat the first or last
patch, or a region of identical patches) have exactly equal cosines, but a float64 route
reproduces that only up to rounding (here the bands come out bitwise equal, regions of
identical patches differ by ~1e-16; torch's interpolate is bitwise equal on both for
channels-first input, not for channels-last), so a strict argmax would pick among them by
rounding noise. 1e-12 is far above that noise (the
two routes agree to ~1e-15) and far below what float16 features resolve; a source pixel
matched against its own image keeps cosine 1 to ~1e-16 while every other pixel is lower by
orders of magnitude more. ``brute_force_match``, the reference, applies the same rule.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rep_pipeline.pipeline.upsample import bilinear_matrix, bilinear_taps

TIE_TOL = 1e-12  # cosines within this of the maximum are ties (first pixel in row-major order wins)
MAP_BUDGET = 1 << 24  # score values (float64) held at once by ``TargetFeatures.match``: 128 MiB


def _float64(a: Any, xp: Any) -> Any:
    return xp.asarray(a).astype(xp.float64, copy=False)


def sample(F: Any, rows: Any, cols: Any, size: int, xp: Any) -> Any:
    """(K, D): F^[rows, cols] for integer pixels of the S x S grid, exactly from each
    pixel's <= 2 x 2 neighbouring patches (F is (G, G, D))."""
    F = _float64(F, xp)
    i0, i1, wy = (t[xp.asarray(rows)] for t in bilinear_taps(F.shape[0], size, xp))
    j0, j1, wx = (t[xp.asarray(cols)] for t in bilinear_taps(F.shape[1], size, xp))
    wy, wx = wy[:, None], wx[:, None]
    top = (1.0 - wx) * F[i0, j0] + wx * F[i0, j1]
    bottom = (1.0 - wx) * F[i1, j0] + wx * F[i1, j1]
    return (1.0 - wy) * top + wy * bottom


def neighbour_grams(F: Any, xp: Any) -> Any:
    """(5, G, G) float64: the distinct Gram entries of every 2 x 2 block of patches, the
    compact form of the per-block 4 x 4 Gram matrix. With F padded by repeating its last row
    and column (entries that use the padding meet zero weights):
    [0] <F[a,b], F[a,b]>, [1] <F[a,b], F[a,b+1]>, [2] <F[a,b], F[a+1,b]>,
    [3] <F[a,b], F[a+1,b+1]>, [4] <F[a,b+1], F[a+1,b]>."""
    F = _float64(F, xp)
    P = xp.concatenate([F, F[-1:]], axis=0)
    P = xp.concatenate([P, P[:, -1:]], axis=1)  # (G + 1, G + 1, D)
    here, right, down, diag = P[:-1, :-1], P[:-1, 1:], P[1:, :-1], P[1:, 1:]
    return xp.stack([(here * here).sum(-1), (here * right).sum(-1), (here * down).sum(-1),
                     (here * diag).sum(-1), (right * down).sum(-1)])


def _pair_weights(A: Any, xp: Any) -> tuple[Any, Any]:
    """From an (S, G) interpolation matrix: the squared weights A[u, a]^2 and the products of
    neighbours A[u, a] A[u, a + 1] (0 in the last column), both (S, G)."""
    pair = xp.zeros_like(A)
    pair[:, :-1] = A[:, :-1] * A[:, 1:]
    return A * A, pair


def upsampled_norms(F: Any, size: int, xp: Any, grams: Any = None) -> Any:
    """(S, S) float64: ||F^[p]|| for every pixel, from the neighbour Gram maps (no upsampled
    features): ||sum_ab Ay[u,a] Ax[v,b] F_ab||^2 expanded over the (a, b) pairs that are at
    most one patch apart, each offset class one product (S, G) @ (G, G) @ (G, S)."""
    grams = neighbour_grams(F, xp) if grams is None else grams
    grid = grams.shape[1]
    square, pair = _pair_weights(bilinear_matrix(grid, size, xp, np.float64), xp)
    sq = (square @ grams[0] @ square.T
          + 2.0 * (square @ grams[1] @ pair.T)
          + 2.0 * (pair @ grams[2] @ square.T)
          + 2.0 * (pair @ (grams[3] + grams[4]) @ pair.T))
    return xp.sqrt(xp.maximum(sq, 0.0))


def _inverse(x: Any, xp: Any) -> Any:
    """1 / x, 0 where x is 0 (a zero vector has cosine 0 with everything)."""
    return xp.where(x > 0, 1.0 / xp.where(x > 0, x, 1.0), 0.0)


def _first_max(scores: Any, xp: Any) -> tuple[Any, Any]:
    """(K, S, S) scores (invalid pixels -inf) -> flat row-major index of the first pixel within
    TIE_TOL of each map's maximum, and that maximum."""
    flat = scores.reshape(scores.shape[0], -1)
    best = flat.max(axis=1)
    index = (flat >= (best - TIE_TOL)[:, None]).argmax(axis=1).astype(xp.int64)
    return index, best


class TargetFeatures:
    """One target image's (layer, embedding) features, ready to match many query vectors:
    the interpolation matrix and the per-pixel norms are computed once."""

    def __init__(self, F: Any, size: int, valid: Any, xp: Any) -> None:
        self.xp, self.size = xp, size
        self.F = _float64(F, xp)
        self.grid, _, self.dim = self.F.shape
        self.valid = xp.asarray(valid, dtype=bool)
        if self.valid.shape != (size, size) or not bool(self.valid.any()):
            raise ValueError(f"valid must be a ({size}, {size}) mask with at least one true pixel, "
                             f"got shape {self.valid.shape}")
        self.A = bilinear_matrix(self.grid, size, xp, np.float64)
        norms = upsampled_norms(self.F, size, xp)
        self.inv_norms = _inverse(norms, xp)  # 0 where F^_t[p] is zero: its cosine is 0

    def _numerators(self, f: Any) -> Any:
        """(K, S, S): f . F^_t[p] = Ay @ (f . F_t[a]) @ Ax^T, as two matrix products."""
        xp, G, S = self.xp, self.grid, self.size
        f = _float64(f, xp)
        m = self.F.reshape(G * G, self.dim) @ f.T                  # (G*G, K): [a, b, k]
        rows = (self.A @ m.reshape(G, G * len(f))).reshape(S, G, len(f))
        rows = xp.ascontiguousarray(rows.transpose(2, 0, 1)).reshape(len(f) * S, G)
        return (rows @ self.A.T).reshape(len(f), S, S)

    def _scores(self, f: Any) -> Any:
        """(K, S, S) cosines, -inf outside the image (0 where f or F^_t[p] is zero)."""
        xp = self.xp
        f = _float64(f, xp)
        scores = self._numerators(f) * self.inv_norms
        scores *= _inverse(xp.sqrt((f * f).sum(-1)), xp)[:, None, None]
        return xp.where(self.valid, scores, -xp.inf)

    def match(self, f: Any) -> tuple[Any, Any]:
        """(K, D) queries -> (K,) int64 flat row-major indices of the best valid pixel
        (row = index // S, col = index % S) and (K,) their cosines. Queries go in blocks of at
        most ``MAP_BUDGET`` score values."""
        if len(f) == 0:
            return self.xp.zeros(0, self.xp.int64), self.xp.zeros(0, self.xp.float64)
        step = max(1, MAP_BUDGET // self.size ** 2)
        parts = [_first_max(self._scores(f[k:k + step]), self.xp) for k in range(0, len(f), step)]
        return self.xp.concatenate([p[0] for p in parts]), self.xp.concatenate([p[1] for p in parts])

    def cosine_maps(self, f: Any) -> Any:
        """(K, S, S) float64 cosine maps for figures; NaN outside the image (padding)."""
        scores = self._scores(f)
        return self.xp.where(self.valid, scores, self.xp.nan)


def _host(a: Any) -> np.ndarray:
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def brute_force_match(F_t: Any, f: Any, size: int, valid: Any) -> tuple[np.ndarray, np.ndarray]:
    """The reference, on the host: upsample F_t to (S, S, D) with torch's interpolate in
    float64, full cosine of every pixel, argmax over ``valid`` with the same tie rule.
    Returns NumPy (K,) int64 flat indices and (K,) cosines."""
    import torch

    Ft = torch.from_numpy(_host(F_t).astype(np.float64))
    up = torch.nn.functional.interpolate(Ft.permute(2, 0, 1).contiguous()[None], size=(size, size), mode="bilinear",
                                         align_corners=False)[0].reshape(Ft.shape[2], -1)  # (D, S*S)
    q = torch.from_numpy(_host(f).astype(np.float64))
    den = torch.linalg.vector_norm(q, dim=1)[:, None] * torch.linalg.vector_norm(up, dim=0)[None]
    scores = torch.where(den > 0, (q @ up) / torch.where(den > 0, den, 1.0), 0.0).numpy()
    scores = np.where(_host(valid).reshape(1, -1), scores, -np.inf).reshape(len(q), size, size)
    return _first_max(scores, np)
