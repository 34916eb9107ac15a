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

Everything is float64, Array API standard code on the inputs' own namespace and device
(NumPy, CuPy, torch; the ``xp`` arguments name the namespace where no input array does);
inputs (float16 from the store) are widened. The small (S, G) interpolation tables are
built on the host and cross to the features' device explicitly (``to_device``). Ties: pixels whose cosine is within ``TIE_TOL`` of the maximum count
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

from rep_pipeline.pipeline.backend import device, is_numpy, namespace, to_device, to_host
from rep_pipeline.pipeline.upsample import bilinear_matrix, bilinear_taps

TIE_TOL = 1e-12  # cosines within this of the maximum are ties (first pixel in row-major order wins)
MAP_BUDGET = 1 << 24  # score values (float64) held at once by ``TargetFeatures.match``: 128 MiB


def _float64(a: Any, xp: Any = None) -> Any:
    xp = namespace(a)
    return xp.astype(a, xp.float64, copy=False)


def sample(F: Any, rows: Any, cols: Any, size: int, xp: Any = None) -> Any:
    """(K, D): F^[rows, cols] for integer pixels of the S x S grid, exactly from each
    pixel's <= 2 x 2 neighbouring patches (F is (G, G, D); ``rows``, ``cols`` on its device)."""
    F = _float64(F)
    xp = namespace(F, rows, cols)
    G, W, D = F.shape
    i0, i1, wy = (xp.take(t, xp.astype(rows, xp.int64), axis=0) for t in bilinear_taps(G, size, like=F))
    j0, j1, wx = (xp.take(t, xp.astype(cols, xp.int64), axis=0) for t in bilinear_taps(W, size, like=F))
    wy, wx = wy[:, None], wx[:, None]
    flat = xp.reshape(F, (G * W, D))
    at = lambda i, j: xp.take(flat, i * W + j, axis=0)  # noqa: E731
    top = (1.0 - wx) * at(i0, j0) + wx * at(i0, j1)
    bottom = (1.0 - wx) * at(i1, j0) + wx * at(i1, j1)
    return (1.0 - wy) * top + wy * bottom


def neighbour_grams(F: Any, xp: Any = None) -> Any:
    """(5, G, G) float64: the distinct Gram entries of every 2 x 2 block of patches, the
    compact form of the per-block 4 x 4 Gram matrix. With F padded by repeating its last row
    and column (entries that use the padding meet zero weights):
    [0] <F[a,b], F[a,b]>, [1] <F[a,b], F[a,b+1]>, [2] <F[a,b], F[a+1,b]>,
    [3] <F[a,b], F[a+1,b+1]>, [4] <F[a,b+1], F[a+1,b]>."""
    F = _float64(F)
    xp = namespace(F)
    P = xp.concat([F, F[-1:, ...]], axis=0)
    P = xp.concat([P, P[:, -1:, :]], axis=1)  # (G + 1, G + 1, D)
    here, right, down, diag = P[:-1, :-1, :], P[:-1, 1:, :], P[1:, :-1, :], P[1:, 1:, :]
    dot = lambda a, b: xp.sum(a * b, axis=-1)  # noqa: E731
    return xp.stack([dot(here, here), dot(here, right), dot(here, down), dot(here, diag), dot(right, down)])


def _pair_weights(A: Any, xp: Any) -> tuple[Any, Any]:
    """From an (S, G) interpolation matrix: the squared weights A[u, a]^2 and the products of
    neighbours A[u, a] A[u, a + 1] (0 in the last column), both (S, G)."""
    pair = xp.zeros_like(A)
    pair[:, :-1] = A[:, :-1] * A[:, 1:]
    return A * A, pair


def upsampled_norms(F: Any, size: int, xp: Any = None, grams: Any = None) -> Any:
    """(S, S) float64: ||F^[p]|| for every pixel, from the neighbour Gram maps (no upsampled
    features): ||sum_ab Ay[u,a] Ax[v,b] F_ab||^2 expanded over the (a, b) pairs that are at
    most one patch apart, each offset class one product (S, G) @ (G, G) @ (G, S)."""
    grams = neighbour_grams(F) if grams is None else grams
    xp = namespace(grams)
    grid = grams.shape[1]
    square, pair = _pair_weights(bilinear_matrix(grid, size, dtype=np.float64, like=grams), xp)
    sq = (square @ grams[0, ...] @ square.T
          + 2.0 * (square @ grams[1, ...] @ pair.T)
          + 2.0 * (pair @ grams[2, ...] @ square.T)
          + 2.0 * (pair @ (grams[3, ...] + grams[4, ...]) @ pair.T))
    return xp.sqrt(xp.clip(sq, min=0.0))


def _inverse(x: Any, xp: Any) -> Any:
    """1 / x, 0 where x is 0 (a zero vector has cosine 0 with everything)."""
    return xp.where(x > 0, 1.0 / xp.where(x > 0, x, 1.0), 0.0)


def _first_max(scores: Any, xp: Any) -> tuple[Any, Any]:
    """(K, S, S) scores (invalid pixels -inf) -> flat row-major index of the first pixel within
    TIE_TOL of each map's maximum, and that maximum."""
    xp = namespace(scores)
    flat = xp.reshape(scores, (scores.shape[0], -1))
    best = xp.max(flat, axis=1)
    tied = flat >= (best - TIE_TOL)[:, None]
    if not is_numpy(xp):  # the standard's argmax takes numbers (NumPy's, bools: one pass less)
        tied = xp.astype(tied, xp.int8)
    index = xp.astype(xp.argmax(tied, axis=1), xp.int64)
    return index, best


class TargetFeatures:
    """One target image's (layer, embedding) features, ready to match many query vectors:
    the interpolation matrix and the per-pixel norms are computed once."""

    def __init__(self, F: Any, size: int, valid: Any, xp: Any) -> None:
        self.F = _float64(F)
        self.xp, self.size = namespace(self.F, valid), size
        xp = self.xp
        self.grid, _, self.dim = self.F.shape
        self.valid = xp.astype(valid, xp.bool)
        if tuple(self.valid.shape) != (size, size) or not bool(xp.any(self.valid)):
            raise ValueError(f"valid must be a ({size}, {size}) mask with at least one true pixel, "
                             f"got shape {tuple(self.valid.shape)}")
        self.A = bilinear_matrix(self.grid, size, dtype=np.float64, like=self.F)
        norms = upsampled_norms(self.F, size)
        self.inv_norms = _inverse(norms, xp)  # 0 where F^_t[p] is zero: its cosine is 0

    def _numerators(self, f: Any) -> Any:
        """(K, S, S): f . F^_t[p] = Ay @ (f . F_t[a]) @ Ax^T, as two matrix products."""
        xp, G, S = self.xp, self.grid, self.size
        f = _float64(f)
        K = f.shape[0]
        m = xp.reshape(self.F, (G * G, self.dim)) @ f.T                  # (G*G, K): [a, b, k]
        rows = xp.reshape(self.A @ xp.reshape(m, (G, G * K)), (S, G, K))
        rows = xp.reshape(xp.permute_dims(rows, (2, 0, 1)), (K * S, G))
        return xp.reshape(rows @ self.A.T, (K, S, S))

    def _scores(self, f: Any) -> Any:
        """(K, S, S) cosines, -inf outside the image (0 where f or F^_t[p] is zero)."""
        xp = self.xp
        f = _float64(f)
        scores = self._numerators(f) * self.inv_norms
        scores *= _inverse(xp.sqrt(xp.sum(f * f, axis=-1)), xp)[:, None, None]
        return xp.where(self.valid, scores, -xp.inf)

    def match(self, f: Any) -> tuple[Any, Any]:
        """(K, D) queries -> (K,) int64 flat row-major indices of the best valid pixel
        (row = index // S, col = index % S) and (K,) their cosines. Queries go in blocks of at
        most ``MAP_BUDGET`` score values."""
        xp, n = self.xp, f.shape[0]
        if n == 0:
            dev = device(self.F)
            return xp.zeros(0, dtype=xp.int64, device=dev), xp.zeros(0, dtype=xp.float64, device=dev)
        step = max(1, MAP_BUDGET // self.size ** 2)
        parts = [_first_max(self._scores(f[k:min(k + step, n), ...]), xp) for k in range(0, n, step)]
        return xp.concat([p[0] for p in parts]), xp.concat([p[1] for p in parts])

    def cosine_maps(self, f: Any) -> Any:
        """(K, S, S) float64 cosine maps for figures; NaN outside the image (padding)."""
        scores = self._scores(f)
        return self.xp.where(self.valid, scores, self.xp.nan)


def _host(a: Any) -> np.ndarray:
    return to_host(a)


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
