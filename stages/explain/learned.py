"""ULTra_W: learned projections w_i for f_w(z_i) = <z_i, w_i> (PROTOCOL.md 10.7; [X] Sec. 4.1, Eqs. 9-13).

One unit vector per token position, w_p = theta_p / ||theta_p||, theta (N, D) initialised to 1
(the f_s direction), trained on the self-consistency loss

    L_sc = sum over segments c of each image, sum over tokens i of c, of (w_i . (z_i - z~_i^c))^2,

where the segments c are the image's ULTra_S segments (``concepts.segment_image`` of its f_s maps at
the layer) and x~^c = x + P(x, c; delta) perturbs the input *outside* c with the noise of 10.6
(+ delta eps, eps ~ N(0, 1) per pixel and channel, delta = 0.3). z is the explained embedding at the
layer (``Explainer.embed``); the loss is quadratic in w with fixed Delta = z - z~, so the model runs
without gradients and only theta is optimised (Adam, lr 1e-3, one epoch, batches of 8 images).
Minimised to the end, w_i is the eigenvector of the smallest eigenvalue of sum Delta_i Delta_i^T
(``smallest_eigenvectors``, the reference); [X]'s "lightly optimizing" is the early-stopped run
the protocol fixes (A23).

Conventions this module fixes where PROTOCOL.md leaves a detail open:

- The perturbation works at patch resolution: for segment c, a patch belongs to c when most of
  its footprint lies in c (``concepts.patch_segments``); the pixels of every *other* patch are
  perturbed (``perturb.perturb``, mode ``noise``), so the tokens summed for c are exactly the
  tokens whose input patch is unperturbed.
- A segment that is the majority of no patch (a sliver) has no token to sum and is skipped; so
  is one that holds every patch (nothing to perturb). An image with a single segment adds
  nothing; a batch without any (image, segment) pair makes no step.
- Prefix tokens (class token, registers) have no input patch: they never enter the loss, their
  theta gets zero gradient and Adam leaves it at the f_s direction.
- Each image is embedded together with its perturbations in one ``embed`` call (as in the
  perturbation test). The noise comes from one ``numpy`` generator seeded by ``seed``, drawn
  image by image in the given order, segment by segment in id order; the images are not
  shuffled. For more than one epoch the images are kept in memory (fresh noise each epoch).
- The loss of a batch is the plain sum over its pairs and tokens (not a mean); Adam is
  invariant to that scale up to its eps.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from rep_pipeline.pipeline.errors import ConfigError

from . import concepts
from .perturb import RNG, perturb
from .rollout import Explainer

Batch = tuple[torch.Tensor, torch.Tensor]  # deltas (K, N, D), keep (K, N) bool
BETAS = (0.9, 0.999)
EPS = 1e-8


def unit_rows(theta: torch.Tensor) -> torch.Tensor:
    """w_p = theta_p / ||theta_p|| row by row."""
    return theta / theta.norm(dim=-1, keepdim=True)


def self_consistency_loss(w: torch.Tensor, deltas: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """L_sc = sum over pairs k and kept tokens i of (w_i . Delta_ki)^2: ``w`` (N, D), ``deltas``
    (K, N, D), ``keep`` (K, N) bool. A graph scalar in ``w``'s dtype."""
    projected = torch.einsum("knd,nd->kn", deltas.to(w.dtype), w)
    return (projected.square() * keep.to(w.dtype)).sum()


def segment_deltas(explainer: Explainer, x: torch.Tensor, maps: np.ndarray, layer: int, grid: int, size: int, *,
                   zeta: float = 0.4, k: int | None = None, aggregate: str = "sum", delta: float = 0.3,
                   rng: RNG = None) -> Batch:
    """The Delta = z - z~^c of one image ``x`` (3, H, W) for each usable ULTra_S segment c.

    ``maps`` (P, P): the image's ULTra_S maps at ``layer`` (rows S_i after the self-fill), cut into
    segments by ``concepts.segment_image(maps, grid, size, zeta, k, aggregate)``. Returns deltas
    (K, N, D) float32 and keep (K, N) bool: row k is the k-th usable segment (id order), keep marks
    its patch tokens (n_pre + p for the patches p of the segment). K may be 0.
    """
    if layer not in explainer.layers:
        raise ConfigError(f"layer {layer} is not one of the explainer's layers {list(explainer.layers)}")
    if x.ndim != 3:
        raise ConfigError(f"segment_deltas takes one image (3, H, W), not {tuple(x.shape)}")
    maps = np.asarray(maps)
    n_patches = grid * grid
    if maps.shape != (n_patches, n_patches):
        raise ConfigError(f"maps must be (P, P) with P = {n_patches}, got shape {maps.shape}")
    segments, _, _ = concepts.segment_image(maps, grid, size, zeta, k, aggregate)
    owner = concepts.patch_segments(segments, grid)                       # (P,)
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    inputs, members = [x], []
    for c in np.unique(owner):
        inside = owner == c
        if inside.all():
            continue
        members.append(inside)
        inputs.append(perturb(x, np.flatnonzero(~inside), grid, "noise", generator, delta))
    npt = explainer.loaded.num_prefix_tokens
    if not members:
        z = explainer.embed(x[None])[layer].float()
        return z.new_zeros((0, *z.shape[1:])), torch.zeros((0, z.shape[1]), dtype=torch.bool)
    z = explainer.embed(torch.stack(inputs))[layer].float()                # (1 + K, N, D)
    if z.shape[1] != npt + n_patches:
        raise ConfigError(f"the embedding has {z.shape[1]} tokens, not {npt} + {n_patches} (grid {grid})")
    keep = torch.zeros((len(members), z.shape[1]), dtype=torch.bool)
    keep[:, npt:] = torch.from_numpy(np.stack(members))
    return (z[:1] - z[1:]).cpu(), keep


def minimise(batches: Iterable[Batch], lr: float = 1e-3, dtype: torch.dtype = torch.float32
             ) -> tuple[np.ndarray, list[float]]:
    """Adam on theta (N, D), initialised to 1 (N, D from the first batch), one step per batch of
    (deltas (K, N, D), keep (K, N)) on ``self_consistency_loss(unit_rows(theta), ...)``; batches
    with nothing kept make no step. Returns (w (N, D) float32 unit rows, the loss of each step
    before its update)."""
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    theta = opt = None
    losses = []
    with torch.enable_grad():
        for deltas, keep in batches:
            if theta is None:
                theta = torch.ones(tuple(deltas.shape[1:]), dtype=dtype, requires_grad=True)
                opt = torch.optim.Adam([theta], lr=lr, betas=BETAS, eps=EPS)
            if deltas.ndim != 3 or deltas.shape[1:] != theta.shape or keep.shape != deltas.shape[:2]:
                raise ConfigError(f"a batch of deltas {tuple(deltas.shape)} and keep {tuple(keep.shape)} "
                                  f"does not fit theta {tuple(theta.shape)}")
            if not keep.any():
                continue
            opt.zero_grad(set_to_none=False)
            loss = self_consistency_loss(unit_rows(theta), deltas, keep)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    if theta is None:
        raise ConfigError("no training batch: ULTra_W needs at least one image")
    with torch.no_grad():
        w = unit_rows(theta.detach().double()).float()
    return w.numpy(), losses


def smallest_eigenvectors(deltas: torch.Tensor | np.ndarray, keep: torch.Tensor | np.ndarray | None = None
                          ) -> np.ndarray:
    """The closed-form minimiser of L_sc per token (Eq. 13 minimised to the end): for each token i,
    the unit eigenvector of the smallest eigenvalue of M_i = sum_k keep_ki Delta_ki Delta_ki^T.

    ``deltas`` (K, N, D), ``keep`` (K, N) bool (default all). Returns (N, D) float32 unit rows, sign
    fixed so the entries sum to >= 0 (the side of the f_s direction); a token with M_i = 0 (no data:
    prefix tokens) gets the f_s direction 1/sqrt(D). Forms N D x D matrices in float64: a reference
    for small problems, not for ViT-B.
    """
    d = torch.as_tensor(deltas, dtype=torch.float64)
    if d.ndim != 3:
        raise ConfigError(f"deltas must be (K, N, D), got shape {tuple(d.shape)}")
    k = torch.ones(d.shape[:2], dtype=torch.float64) if keep is None else torch.as_tensor(keep).to(torch.float64)
    if k.shape != d.shape[:2]:
        raise ConfigError(f"keep {tuple(k.shape)} does not match deltas {tuple(d.shape)}")
    m = torch.einsum("kn,kni,knj->nij", k, d, d)                          # (N, D, D)
    _, vectors = torch.linalg.eigh(m)
    w = vectors[..., 0]                                                    # ascending eigenvalues
    w = torch.where((w.sum(-1, keepdim=True) < 0), -w, w)
    empty = (m.abs().amax((-2, -1)) == 0)
    w[empty] = 1.0 / d.shape[-1] ** 0.5
    return w.float().numpy()


def fit_projections(explainer: Explainer, images: Iterable[torch.Tensor], ulta_s_maps: Iterable[np.ndarray],
                    layer: int, grid: int, size: int, *, zeta: float = 0.4, k: int | None = None,
                    aggregate: str = "sum", delta: float = 0.3, lr: float = 1e-3, epochs: int = 1,
                    batch: int = 8, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """ULTra_W's vectors at ``layer``: theta trained on the train ``images`` (each (3, H, W),
    normalised model input) with their ULTra_S ``ulta_s_maps`` ((P, P) each, at the same layer).

    Returns (w (N, D) float32 unit rows, for ``Explainer(..., f="learned").explain(x, w=w)``;
    choices: every setting and the run's counts, for the run's attributes).
    """
    if epochs < 1 or batch < 1:
        raise ConfigError(f"epochs and batch must be >= 1, got {epochs}, {batch}")
    if not delta > 0:
        raise ConfigError(f"delta must be > 0, got {delta}")
    if layer not in explainer.layers:
        raise ConfigError(f"layer {layer} is not one of the explainer's layers {list(explainer.layers)}")
    pairs: Iterable[tuple[torch.Tensor, np.ndarray]] = _pairs(images, ulta_s_maps)
    if epochs > 1:
        pairs = list(pairs)
    generator = np.random.default_rng(seed)
    counts = {"n_images": 0, "n_pairs": 0}

    def batches() -> Iterator[Batch]:
        for epoch in range(epochs):
            chunk: list[Batch] = []
            for x, maps in pairs:
                chunk.append(segment_deltas(explainer, x, maps, layer, grid, size, zeta=zeta, k=k,
                                            aggregate=aggregate, delta=delta, rng=generator))
                if epoch == 0:
                    counts["n_images"] += 1
                    counts["n_pairs"] += chunk[-1][0].shape[0]
                if len(chunk) == batch:
                    yield _concat(chunk)
                    chunk = []
            if chunk:
                yield _concat(chunk)

    w, losses = minimise(batches(), lr=lr)
    choices = {
        "method": "ultra_w", "layer": int(layer), "embedding": explainer.embedding,
        "parametrisation": "w_p = theta_p / ||theta_p||, one per token position",
        "init": "theta = 1 (the f_s direction)",
        "loss": "sum over ULTra_S segments c and tokens i of c of (w_i . (z_i - z~_i^c))^2",
        "segments": "concepts.segment_image of the ULTra_S maps at the layer",
        "zeta": float(zeta), "k_img": None if k is None else int(k), "aggregate": aggregate,
        "region": "patches outside c (patch footprint majority, concepts.patch_segments)",
        "perturbation": "noise", "delta": float(delta),
        "prefix_tokens": "not trained (keep the f_s direction)",
        "optimizer": "adam", "lr": float(lr), "betas": list(BETAS), "adam_eps": EPS,
        "epochs": int(epochs), "batch": int(batch), "order": "as given", "seed": int(seed),
        "steps": len(losses), "loss_per_step": losses, **counts,
    }
    return w, choices


def _concat(chunk: Sequence[Batch]) -> Batch:
    return torch.cat([d for d, _ in chunk]), torch.cat([k for _, k in chunk])



def _pairs(images: Iterable[torch.Tensor], maps: Iterable[np.ndarray]) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """(image, maps) pairs; unequal lengths are an error, not a silent truncation."""
    images, maps = iter(images), iter(maps)
    done = object()
    for n in itertools.count():
        x, m = next(images, done), next(maps, done)
        if x is done and m is done:
            return
        if x is done or m is done:
            raise ConfigError(f"{'fewer' if x is done else 'more'} training images than ULTra_S maps "
                              f"(stopped after {n})")
        yield x, m
