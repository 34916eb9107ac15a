"""Our cosine k-means engine (PROTOCOL.md section 4), one code path for NumPy and CuPy.

Every class here trains *several* codebooks of one (layer, embedding) feature set at once:
their centroids sit in one matrix, so each batch is scored against all of them with a single
matrix product. ``OnlineKMeans`` is the paper's method (Adam on the batch k-means loss);
``LloydKMeans`` is exact spherical k-means, one iteration per pass over the data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from rep_pipeline.pipeline.backend import Backend


def l2_normalize(xp: Any, x: Any, eps: float = 1e-12) -> Any:
    """Rows of ``x`` scaled to unit length (rows of zeros stay zero)."""
    sq = xp.einsum("...i,...i->...", x, x)  # one pass, no squared temporary
    return x * (1.0 / xp.maximum(xp.sqrt(sq), eps))[..., None]


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
        xp = be.xp
        self.be, self.n, self.shift = be, 0, None
        self.total = xp.zeros(dim, dtype=xp.float64)
        self.outer = xp.zeros((dim, dim), dtype=xp.float64)
        self.samples: list[Any] = []  # an even subsample, for the signs and for K beyond the rank
        self._directions: Any = None

    def add(self, x: Any) -> None:
        xp = self.be.xp
        if self.shift is None:  # centring on a pilot mean keeps E[xx^T] - mm^T well conditioned
            self.shift = x.mean(0, dtype=xp.float64).astype(xp.float32)
        xs = x - self.shift
        self.total += xs.sum(0, dtype=xp.float64)
        self.outer += (xs.T @ xs).astype(xp.float64)  # float32 product of one batch, float64 sum
        self.n += x.shape[0]
        self.samples.append(xs[:: max(1, x.shape[0] // self.SAMPLE_ROWS_PER_BATCH)])
        self._directions = None

    def components(self) -> tuple[Any, Any]:
        """(all principal directions, largest variance first, oriented; the shifted sample)."""
        xp = self.be.xp
        if self._directions is None:
            mean = self.total / self.n
            cov = self.outer / self.n - xp.outer(mean, mean)
            _, vecs = xp.linalg.eigh(cov)                  # ascending eigenvalues
            comps = vecs[:, ::-1].T
            sample = xp.concatenate(self.samples).astype(xp.float64) - mean
            proj = sample @ comps.T
            skew = (proj * proj * proj).mean(0)
            self._directions = (comps * xp.where(skew < 0, -1.0, 1.0)[:, None], sample + mean + self.shift)
        return self._directions

    def centroids(self, k: int, seed: int) -> Any:
        """Unit centroids: the top-``k`` principal components of the centred data, oriented
        toward their heavier tails; beyond the rank, random samples of the data."""
        xp = self.be.xp
        comps, sample = self.components()
        comps = comps[:k]
        if k > comps.shape[0]:
            rng = np.random.default_rng(seed)
            extra = k - comps.shape[0]
            picks = rng.choice(sample.shape[0], size=extra, replace=sample.shape[0] < extra)
            comps = xp.concatenate([comps, sample[xp.asarray(picks)]])
        return l2_normalize(xp, comps.astype(xp.float32))


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
    idx, best = [], []
    for sl in layout.slices():
        block = scores[:, sl]
        a = xp.argmax(block, axis=1)
        best.append(xp.take_along_axis(block, a[:, None], axis=1)[:, 0])
        idx.append(a + sl.start)
    return idx, best


def _cluster_sums(be: Backend, labels: Sequence[Any], x: Any, n_rows: int) -> tuple[Any, Any]:
    """(sum of the rows of ``x`` assigned to each stacked centroid (n_rows, d), counts).

    ``labels`` holds one stacked-row index per vector for each codebook. They form one sparse
    one-hot in CSC layout, a column per vector with one entry per codebook, so the product
    reads every vector once and adds it into each of its centroids' sums (which stay in
    cache), instead of reading the batch once per codebook.
    """
    xp, n, m = be.xp, x.shape[0], len(labels)
    rows = xp.stack(labels, axis=1).reshape(-1)
    onehot = be.sparse.csc_matrix((xp.ones(n * m, dtype=x.dtype), rows, xp.arange(0, n * m + 1, m)),
                                  shape=(n_rows, n))
    return xp.asarray(onehot @ x), xp.bincount(rows, minlength=n_rows)


class OnlineKMeans:
    """Adam on L = -mean_f max_k f . c_k, centroids re-normalised in every forward pass.

    The parameters are unconstrained rows w_k with c_k = w_k / |w_k|; the gradient of L with
    respect to c_k (minus the mean of the rows assigned to k) is carried through the
    normalisation by (I - c c^T) / |w|. Adam as ``torch.optim.Adam`` with default betas.
    """

    def __init__(self, be: Backend, inits: Sequence[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        xp = be.xp
        self.be, self.lr, self.betas, self.eps = be, lr, betas, eps
        self.layout = _Layout(tuple(int(c.shape[0]) for c in inits))
        self.w = xp.concatenate([xp.asarray(c, dtype=xp.float32) for c in inits])
        self.m, self.v, self.t = xp.zeros_like(self.w), xp.zeros_like(self.w), 0

    def centroids(self) -> list[Any]:
        c = l2_normalize(self.be.xp, self.w)
        return [c[sl] for sl in self.layout.slices()]

    def step(self, x: Any) -> Any:
        """One Adam step on unit rows ``x`` (n, d); returns each codebook's loss (device array)."""
        xp, n = self.be.xp, x.shape[0]
        norms = xp.maximum(xp.linalg.norm(self.w, axis=1, keepdims=True), 1e-12)
        c = self.w / norms
        idx, best = _assign(xp, x @ c.T, self.layout)
        grad_c = -_cluster_sums(self.be, idx, x, c.shape[0])[0] / n
        grad = (grad_c - (grad_c * c).sum(1, keepdims=True) * c) / norms
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad * grad
        m_hat, v_hat = self.m / (1 - b1**self.t), self.v / (1 - b2**self.t)
        self.w = self.w - self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)
        return -xp.stack([b.mean() for b in best])


class LloydKMeans:
    """Exact spherical k-means, streamed: ``accumulate`` every batch of a pass, then ``update``.

    A codebook stops when the fraction of vectors whose assignment changed in a pass falls
    below ``tol`` (or after ``max_iter`` passes); a cluster that loses every vector keeps its
    previous centroid.
    """

    def __init__(self, be: Backend, inits: Sequence[Any], n_vectors: int, tol: float, max_iter: int):
        xp = be.xp
        self.be, self.tol, self.max_iter, self.n_vectors = be, tol, max_iter, n_vectors
        self.layout = _Layout(tuple(int(c.shape[0]) for c in inits))
        self.c = xp.concatenate([l2_normalize(xp, xp.asarray(c, dtype=xp.float32)) for c in inits])
        n_books = len(inits)
        self.assignments = xp.full((n_books, n_vectors), -1, dtype=xp.int32)
        self.active = [True] * n_books
        self.iterations = [0] * n_books
        self._begin()

    def _begin(self) -> None:
        xp = self.be.xp
        self.sums = xp.zeros_like(self.c)
        self.counts = xp.zeros(self.c.shape[0], dtype=xp.int64)
        self.changed = xp.zeros(len(self.layout.ks), dtype=xp.int64)
        self.objective = xp.zeros(len(self.layout.ks), dtype=xp.float64)
        self.seen = 0

    @property
    def done(self) -> bool:
        return not any(self.active)

    def centroids(self) -> list[Any]:
        return [self.c[sl] for sl in self.layout.slices()]

    def accumulate(self, x: Any, offset: int) -> None:
        """Add unit rows ``x``, which are vectors ``offset ..`` of the pass, to the sums."""
        xp = self.be.xp
        idx, best = _assign(xp, x @ self.c.T, self.layout)
        rows = slice(offset, offset + x.shape[0])
        active = [b for b, on in enumerate(self.active) if on]
        sums, counts = _cluster_sums(self.be, [idx[b] for b in active], x, self.c.shape[0])
        self.sums += sums
        self.counts += counts
        for b in active:
            # device-side sums: no host round trip per batch on a GPU
            self.changed[b] += (self.assignments[b, rows] != idx[b]).sum()
            self.assignments[b, rows] = idx[b]
            self.objective[b] += best[b].sum()
        self.seen += x.shape[0]

    def update(self) -> list[tuple[float, float] | None]:
        """End a pass: new centroids for active codebooks; per codebook (mean cosine, changed
        fraction) of the pass just finished, None for codebooks that had already stopped."""
        xp = self.be.xp
        stats: list[tuple[float, float] | None] = []
        for b, sl in enumerate(self.layout.slices()):
            if not self.active[b]:
                stats.append(None)
                continue
            frac = float(self.changed[b]) / max(self.seen, 1)
            stats.append((float(self.objective[b]) / max(self.seen, 1), frac))
            filled = (self.counts[sl] > 0)[:, None]
            self.c[sl] = xp.where(filled, l2_normalize(xp, self.sums[sl]), self.c[sl])
            self.iterations[b] += 1
            if frac < self.tol or self.iterations[b] >= self.max_iter:
                self.active[b] = False
        self._begin()
        return stats
