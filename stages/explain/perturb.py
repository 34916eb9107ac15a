"""The perturbation test of PROTOCOL.md section 10.6 ([X] Sec. 5.3, Eq. 16, App. D.2).

Per image: k patch tokens drawn without replacement; for each, the other P - 1 patches are
ordered by the token's map S_i, the first m = floor(rho (P - 1)) form the positive set (most
relevant) and the last m the negative set (A21); the set's pixels of the *normalised* model
input are zeroed (``mask``, A22: zero is the mean colour) or get 0.3 eps, eps ~ N(0, 1) per
pixel and channel (``noise``); d_i = ||z_i - z~_i||_2 at the explained embedding and layer.

The model enters only as ``embed``: a callable from a (B, 3, H, W) input batch to the
(B, N, D) embedding the maps explain (prefix tokens first, then patches row-major), so this
module needs neither the store nor a particular model family.

Conventions this module fixes:
- The sets themselves (ties, m, the range of rho) are ``pipeline/relevance.py``'s, which
  the report draws too.
- ``choose_tokens`` draws min(k, P) tokens (all of them on a grid smaller than k) and
  returns them sorted.
- The original input is embedded in the same call as its perturbations, so rho = 0 gives
  d = 0 up to the model's batch-position rounding.
- ``summarise``: each std is the sample std (ddof = 1) over images of the per-image means
  (NaN for one image); the interval is a percentile bootstrap over images of the paired
  per-image difference positive - negative.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.pipeline.relevance import relevance_sets

MODES = ("mask", "noise")
RNG = np.random.Generator | int | None


def _rng(rng: RNG) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def choose_tokens(n_patches: int, k: int = 10, rng: RNG = None) -> np.ndarray:
    """min(k, n_patches) distinct patch indices (0..P-1), uniform without replacement, sorted."""
    if k < 0:
        raise ConfigError(f"tokens per image must be >= 0, got {k}")
    return np.sort(_rng(rng).choice(n_patches, size=min(k, n_patches), replace=False)).astype(np.int64)


def _patch_mask(patches: np.ndarray, grid: int, height: int, width: int):
    """(H, W) bool torch mask of the pixels of ``patches`` (row-major on the G x G grid)."""
    import torch

    if height % grid or width % grid:
        raise ConfigError(f"input {height} x {width} is not a whole {grid} x {grid} grid of patches")
    cells = torch.zeros(grid * grid, dtype=torch.bool)
    cells[torch.as_tensor(np.asarray(patches, dtype=np.int64))] = True
    return cells.reshape(grid, grid).repeat_interleave(height // grid, 0).repeat_interleave(width // grid, 1)


def perturb(x, patches: np.ndarray, grid: int, mode: str = "mask", rng: RNG = None, strength: float = 0.3):
    """x~ from the normalised input ``x`` (3, H, W) torch tensor, H = W = grid * patch: the pixels
    of ``patches`` set to 0 (``mask``) or given + strength * eps, eps ~ N(0, 1) drawn from ``rng``
    per pixel and channel (``noise``). Other pixels are untouched; ``x`` is not modified."""
    import torch

    if mode not in MODES:
        raise ConfigError(f"perturbation must be one of {MODES}, got {mode!r}")
    mask = _patch_mask(patches, grid, x.shape[-2], x.shape[-1]).to(x.device)
    if mode == "mask":
        return torch.where(mask, torch.zeros((), dtype=x.dtype, device=x.device), x)
    eps = torch.from_numpy(_rng(rng).standard_normal(tuple(x.shape), dtype=np.float32)).to(x.device, x.dtype)
    return x + strength * eps * mask


def perturbation_distances(embed: Callable, x, maps: np.ndarray, n_prefix: int, grid: int, tokens: np.ndarray,
                           rho: float = 0.5, mode: str = "mask", rng: RNG = None, strength: float = 0.3,
                           batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(d_pos (k,), d_neg (k,)) float64 for the patch ``tokens`` of one image.

    ``maps`` (P, P) holds S_i as rows; token i's embedding is row n_prefix + i of ``embed``'s
    output. The original input and its 2k perturbations go through ``embed`` as one batch
    (or in batches of ``batch_size``) under ``torch.no_grad``; pairs are laid out token by
    token, positive before negative, so noise draws follow that order.
    """
    import torch

    maps = np.asarray(maps)
    tokens = np.asarray(tokens, dtype=np.int64).ravel()
    if maps.shape != (grid * grid, grid * grid):
        raise ConfigError(f"maps must be (P, P) with P = {grid * grid}, got shape {maps.shape}")
    generator = _rng(rng)
    inputs = [x]
    for t in tokens:
        positive, negative = relevance_sets(maps[t], int(t), rho)
        inputs += [perturb(x, positive, grid, mode, generator, strength),
                   perturb(x, negative, grid, mode, generator, strength)]
    batch = torch.stack(inputs)
    step = batch.shape[0] if batch_size is None else max(1, int(batch_size))
    rows = torch.as_tensor(n_prefix + tokens)
    with torch.no_grad():
        z = torch.cat([embed(batch[lo:lo + step])[:, rows] for lo in range(0, batch.shape[0], step)])
    d = torch.linalg.vector_norm((z[1:] - z[:1]).float(), dim=-1)          # (2k, k): every token's row
    d = d[torch.arange(2 * tokens.size), torch.arange(tokens.size).repeat_interleave(2)]
    d = d.double().cpu().numpy().reshape(tokens.size, 2)
    return d[:, 0].copy(), d[:, 1].copy()


def bootstrap_difference(pos: np.ndarray, neg: np.ndarray, draws: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the paired per-image difference pos - neg: the mean and its
    percentile bootstrap interval at ``level`` from ``draws`` resamples of the images (NaNs for
    no image)."""
    diff = np.asarray(pos, dtype=np.float64) - np.asarray(neg, dtype=np.float64)
    if diff.ndim != 1:
        raise ConfigError(f"bootstrap expects one value per image, got shape {diff.shape}")
    if diff.size == 0:
        return float("nan"), float("nan"), float("nan")
    if not 0 < level < 1:
        raise ConfigError(f"level must lie in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(draws, diff.size))].mean(1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(diff.mean()), float(low), float(high)


def _image_means(per_image: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([np.mean(np.asarray(d, dtype=np.float64)) for d in per_image], dtype=np.float64)


def summarise(per_image_pos: Sequence[np.ndarray], per_image_neg: Sequence[np.ndarray], draws: int = 1000,
              seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """The ``ultra_perturbation`` figures from per-image distance arrays (one (k,) array per
    image, or an (n_images, k) matrix): neg_mean, neg_std, pos_mean, pos_std, diff_mean,
    diff_ci_low, diff_ci_high. Means are d-bar (mean over images of each image's token mean)."""
    pos, neg = _image_means(per_image_pos), _image_means(per_image_neg)
    if pos.shape != neg.shape:
        raise ConfigError(f"{pos.size} images with positive and {neg.size} with negative distances")

    def std(a: np.ndarray) -> float:
        return float(a.std(ddof=1)) if a.size > 1 else float("nan")

    diff_mean, low, high = bootstrap_difference(pos, neg, draws, seed, level)
    return {"neg_mean": float(neg.mean()) if neg.size else float("nan"), "neg_std": std(neg),
            "pos_mean": float(pos.mean()) if pos.size else float("nan"), "pos_std": std(pos),
            "diff_mean": diff_mean, "diff_ci_low": low, "diff_ci_high": high}
