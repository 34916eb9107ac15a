"""Our cosine k-means engine (PROTOCOL.md section 4), one code path for every backend.

Every class here trains *several* codebooks of one (layer, embedding) feature set at once:
their centroids sit in one matrix, so each batch is scored against all of them with a single
matrix product. ``OnlineKMeans`` is the paper's method (Adam on the batch k-means loss);
``LloydKMeans`` is exact spherical k-means, one iteration per pass over the data.

Array API standard code: each call takes its namespace and device from its inputs; the
scatter-add of the cluster sums is ``backend.row_sums``, and the one host crossing (PCA
initialisation's random picks beyond the rank) is ``backend.to_device``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from rep_pipeline.pipeline.backend import Backend, device, namespace, row_sums, to_device


def l2_normalize(xp: Any, x: Any, eps: float = 1e-12) -> Any:
    """Rows of ``x`` scaled to unit length (rows of zeros stay zero). ``xp`` is ignored (the
    namespace is ``x``'s); it stays for the callers that pass one."""
    xp = namespace(x)
    sq = xp.linalg.vecdot(x, x)  # one pass, no squared temporary
    return x * (1.0 / xp.clip(xp.sqrt(sq), min=eps))[..., None]


class PCAInit:
    """Streaming covariance of raw (un-normalised) patch embeddings -> top-K directions.

    A principal component is a line; a cosine centroid is a direction. Each component is
    oriented toward its heavier tail (positive third moment of the centred projections), where
    a cluster that the component separates from the rest lies. PROTOCOL.md leaves the sign
    free; on planted data this choice recovers the clusters where an arbitrary sign often
    leaves two centroids on one cluster.
    """

    SAMPLE_ROWS_PER_BATCH = 512

    def __init__(self, be: Backend, dim: int):
        self.be, self.dim, self.n, self.shift = be, dim, 0, None
        self.total: Any = None   # float64 sums, on the first batch's namespace and device
        self.outer: Any = None
        self.samples: list[Any] = []  # an even subsample, for the signs and for K beyond the rank
        self._directions: Any = None

    def add(self, x: Any) -> None:
        xp = namespace(x)
        if self.shift is None:  # centring on a pilot mean keeps E[xx^T] - mm^T well conditioned
            self.shift = xp.astype(xp.sum(x, axis=0, dtype=xp.float64) / x.shape[0], xp.float32)
            self.total = xp.zeros(self.dim, dtype=xp.float64, device=device(x))
            self.outer = xp.zeros((self.dim, self.dim), dtype=xp.float64, device=device(x))
        xs = x - self.shift
        self.total += xp.sum(xs, axis=0, dtype=xp.float64)
        self.outer += xp.astype(xs.T @ xs, xp.float64)  # float32 product of one batch, float64 sum
        self.n += x.shape[0]
        self.samples.append(xs[:: max(1, x.shape[0] // self.SAMPLE_ROWS_PER_BATCH), ...])
        self._directions = None

    def components(self) -> tuple[Any, Any]:
        """(all principal directions, largest variance first, oriented; the shifted sample)."""
        xp = namespace(self.total)
        if self._directions is None:
            mean = self.total / self.n
            cov = self.outer / self.n - xp.linalg.outer(mean, mean)
            _, vecs = xp.linalg.eigh(cov)                  # ascending eigenvalues
            comps = xp.flip(vecs, axis=1).T
            sample = xp.astype(xp.concat(self.samples), xp.float64) - mean
            proj = sample @ comps.T
            skew = xp.mean(proj * proj * proj, axis=0)
            sign = 1.0 - 2.0 * xp.astype(skew < 0, xp.float64)
            self._directions = (comps * sign[:, None], sample + mean + self.shift)
        return self._directions

    def centroids(self, k: int, seed: int) -> Any:
        """Unit centroids: the top-``k`` principal components of the centred data, oriented
        toward their heavier tails; beyond the rank, random samples of the data."""
        comps, sample = self.components()
        xp = namespace(comps)
        comps = comps[:min(k, comps.shape[0]), ...]
        if k > comps.shape[0]:
            rng = np.random.default_rng(seed)
            extra = k - comps.shape[0]
            picks = rng.choice(sample.shape[0], size=extra, replace=sample.shape[0] < extra)
            comps = xp.concat([comps, xp.take(sample, to_device(picks, sample), axis=0)])  # host picks: explicit
        return l2_normalize(xp, xp.astype(comps, xp.float32))


@dataclass
class _Layout:
    """Where each codebook's rows sit in the stacked centroid matrix."""

    ks: tuple[int, ...]
    offsets: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = tuple(int(o) for o in np.cumsum((0,) + self.ks[:-1]))

    def slices(self) -> list[slice]:
        return [slice(o, o + k) for o, k in zip(self.offsets, self.ks)]


def _assign(xp: Any, scores: Any, layout: _Layout) -> tuple[list[Any], list[Any]]:
    """Per codebook: the best centroid of each row (as a row of the stacked matrix) and its
    cosine similarity."""
    xp = namespace(scores)
    idx, best = [], []
    for sl in layout.slices():
        block = scores[:, sl]
        a = xp.argmax(block, axis=1)
        best.append(xp.take_along_axis(block, a[:, None], axis=1)[:, 0])
        idx.append(a + sl.start)
    return idx, best


def _cluster_sums(labels: Sequence[Any], x: Any, n_rows: int) -> tuple[Any, Any]:
    """(sum of the rows of ``x`` assigned to each stacked centroid (n_rows, d), counts).
    ``labels`` holds one stacked-row index per vector for each codebook (``row_sums``)."""
    xp = namespace(x)
    return row_sums(xp.stack(labels, axis=1), x, n_rows)


class OnlineKMeans:
    """Adam on L = -mean_f max_k f . c_k, centroids re-normalised in every forward pass.

    The parameters are unconstrained rows w_k with c_k = w_k / |w_k|; the gradient of L with
    respect to c_k (minus the mean of the rows assigned to k) is carried through the
    normalisation by (I - c c^T) / |w|. Adam as ``torch.optim.Adam`` with default betas.
    """

    def __init__(self, be: Backend, inits: Sequence[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        xp = namespace(*inits)
        self.be, self.lr, self.betas, self.eps = be, lr, betas, eps
        self.layout = _Layout(tuple(int(c.shape[0]) for c in inits))
        self.w = xp.concat([xp.astype(c, xp.float32) for c in inits])
        self.m, self.v, self.t = xp.zeros_like(self.w), xp.zeros_like(self.w), 0

    def centroids(self) -> list[Any]:
        c = l2_normalize(None, self.w)
        return [c[sl, ...] for sl in self.layout.slices()]

    def step(self, x: Any) -> Any:
        """One Adam step on unit rows ``x`` (n, d); returns each codebook's loss (device array)."""
        xp, n = namespace(x, self.w), x.shape[0]
        norms = xp.clip(xp.linalg.vector_norm(self.w, axis=1, keepdims=True), min=1e-12)
        c = self.w / norms
        idx, best = _assign(xp, x @ c.T, self.layout)
        grad_c = -_cluster_sums(idx, x, c.shape[0])[0] / n
        grad = (grad_c - xp.sum(grad_c * c, axis=1, keepdims=True) * c) / norms
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat, v_hat = self.m / (1 - b1**self.t), self.v / (1 - b2**self.t)
        self.w = self.w - self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)
        return -xp.stack([xp.mean(b) for b in best])


class LloydKMeans:
    """Exact spherical k-means, streamed: ``accumulate`` every batch of a pass, then ``update``.

    A codebook stops when the fraction of vectors whose assignment changed in a pass falls
    below ``tol`` (or after ``max_iter`` passes); a cluster that loses every vector keeps its
    previous centroid.
    """

    def __init__(self, be: Backend, inits: Sequence[Any], n_vectors: int, tol: float, max_iter: int):
        xp = namespace(*inits)
        self.be, self.tol, self.max_iter, self.n_vectors = be, tol, max_iter, n_vectors
        self.layout = _Layout(tuple(int(c.shape[0]) for c in inits))
        self.c = xp.concat([l2_normalize(xp, xp.astype(c, xp.float32)) for c in inits])
        n_books = len(inits)
        self.assignments = xp.full((n_books, n_vectors), -1, dtype=xp.int32, device=device(self.c))
        self.active = [True] * n_books
        self.iterations = [0] * n_books
        self._begin()

    def _begin(self) -> None:
        xp, dev = namespace(self.c), device(self.c)
        self.sums = xp.zeros_like(self.c)
        self.counts = xp.zeros(self.c.shape[0], dtype=xp.int64, device=dev)
        self.changed = xp.zeros(len(self.layout.ks), dtype=xp.int64, device=dev)
        self.objective = xp.zeros(len(self.layout.ks), dtype=xp.float64, device=dev)
        self.seen = 0

    @property
    def done(self) -> bool:
        return not any(self.active)

    def centroids(self) -> list[Any]:
        return [self.c[sl, ...] for sl in self.layout.slices()]

    def accumulate(self, x: Any, offset: int) -> None:
        """Add unit rows ``x``, which are vectors ``offset ..`` of the pass, to the sums."""
        xp = namespace(x, self.c)
        idx, best = _assign(xp, x @ self.c.T, self.layout)
        rows = slice(offset, offset + x.shape[0])
        active = [b for b, on in enumerate(self.active) if on]
        sums, counts = _cluster_sums([idx[b] for b in active], x, self.c.shape[0])
        self.sums += sums
        self.counts += counts
        for b in active:
            # device-side sums: no host round trip per batch on a GPU
            new = xp.astype(idx[b], xp.int32)
            self.changed[b] += xp.sum(xp.astype(self.assignments[b, rows] != new, xp.int64))
            self.assignments[b, rows] = new
            self.objective[b] += xp.sum(xp.astype(best[b], xp.float64))
        self.seen += x.shape[0]

    def update(self) -> list[tuple[float, float] | None]:
        """End a pass: new centroids for active codebooks; per codebook (mean cosine, changed
        fraction) of the pass just finished, None for codebooks that had already stopped."""
        xp = namespace(self.c)
        stats: list[tuple[float, float] | None] = []
        for b, sl in enumerate(self.layout.slices()):
            if not self.active[b]:
                stats.append(None)
                continue
            frac = float(self.changed[b]) / max(self.seen, 1)
            stats.append((float(self.objective[b]) / max(self.seen, 1), frac))
            filled = (self.counts[sl] > 0)[:, None]
            self.c[sl, ...] = xp.where(filled, l2_normalize(xp, self.sums[sl, ...]), self.c[sl, ...])
            self.iterations[b] += 1
            if frac < self.tol or self.iterations[b] >= self.max_iter:
                self.active[b] = False
        self._begin()
        return stats
