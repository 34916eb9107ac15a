"""ULTra_W's learned projections (PROTOCOL.md 10.7) on a tiny random model: unit rows, a loss that
falls over the epoch, determinism by seed, the closed-form eigenvector reference, and maps from the
learned vectors."""
import json

import numpy as np
import pytest
import torch

from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.pipeline.registry import build_model
from rep_pipeline.stages.explain import concepts
from rep_pipeline.stages.explain.learned import (
    fit_projections,
    minimise,
    segment_deltas,
    self_consistency_loss,
    smallest_eigenvectors,
)
from rep_pipeline.stages.explain.rollout import Explainer

SIZE = 32
IMAGES = 8
K_IMG = 3  # a random model's maps rarely split at zeta = 0.4; three segments per image give pairs


@pytest.fixture(scope="module")
def setup():
    lm = build_model("tiny-vit", "random", SIZE)
    layer = lm.depth - 1
    explainer = Explainer(lm, (layer,))
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn((3, SIZE, SIZE), generator=gen) for _ in range(IMAGES)]
    maps = [explainer.explain(x[None])[layer].maps.numpy() for x in images]
    grid = SIZE // lm.patch_size
    return lm, explainer, layer, grid, images, maps


def _fit(setup, seed=0, **kw):
    lm, explainer, layer, grid, images, maps = setup
    return fit_projections(explainer, images, maps, layer, grid, SIZE, k=K_IMG, batch=2, seed=seed, **kw)


@pytest.fixture(scope="module")
def fitted(setup):
    return _fit(setup)


def test_unit_rows_and_recorded_choices(setup, fitted):
    lm, *_ = setup
    w, choices = fitted
    n_tokens = lm.num_prefix_tokens + (SIZE // lm.patch_size) ** 2
    assert w.shape == (n_tokens, lm.embed_dim) and w.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-6)
    # the class token never enters the loss: it keeps the f_s direction theta = 1
    np.testing.assert_allclose(w[0], lm.embed_dim ** -0.5, atol=1e-7)
    assert not np.allclose(w[1:], lm.embed_dim ** -0.5)
    assert choices["lr"] == 1e-3 and choices["delta"] == 0.3 and choices["epochs"] == 1
    assert choices["perturbation"] == "noise" and choices["batch"] == 2 and choices["seed"] == 0
    assert choices["n_images"] == IMAGES and choices["steps"] == IMAGES // 2 and choices["n_pairs"] > IMAGES
    json.dumps(choices)  # fit for the run's attributes


def test_loss_decreases_over_the_epoch(setup, fitted):
    lm, explainer, layer, grid, images, maps = setup
    w, choices = fitted
    rng = np.random.default_rng(choices["seed"])  # the same noise draws, in the same order, as the fit
    pairs = [segment_deltas(explainer, x, m, layer, grid, SIZE, k=K_IMG, rng=rng) for x, m in zip(images, maps)]
    deltas, keep = torch.cat([d for d, _ in pairs]), torch.cat([k for _, k in pairs])
    assert deltas.shape[0] == choices["n_pairs"]
    start = torch.full(w.shape, lm.embed_dim ** -0.5)
    before = float(self_consistency_loss(start, deltas, keep))
    after = float(self_consistency_loss(torch.from_numpy(w), deltas, keep))
    assert 0 < after < 0.95 * before


def test_deltas_keep_the_unperturbed_patches_of_each_segment(setup):
    lm, explainer, layer, grid, images, maps = setup
    deltas, keep = segment_deltas(explainer, images[0], maps[0], layer, grid, SIZE, k=K_IMG, rng=0)
    segments, _, _ = concepts.segment_image(maps[0], grid, SIZE, 0.4, K_IMG)
    owner = concepts.patch_segments(segments, grid)
    expected = [owner == c for c in np.unique(owner)] if np.unique(owner).size > 1 else []
    npt = lm.num_prefix_tokens
    assert keep.shape == (len(expected), npt + grid * grid) and not keep[:, :npt].any()
    np.testing.assert_array_equal(keep[:, npt:].numpy(), np.array(expected).reshape(keep.shape[0], -1))
    assert torch.isfinite(deltas).all() and deltas[keep].abs().sum() > 0
    # one segment: nothing to perturb, no pair
    deltas, keep = segment_deltas(explainer, images[0], maps[0], layer, grid, SIZE, k=1, rng=0)
    assert deltas.shape[0] == 0 and keep.shape[0] == 0


def test_determinism_by_seed(setup, fitted):
    w, choices = fitted
    again, same = _fit(setup, seed=0)
    np.testing.assert_array_equal(w, again)
    assert same == choices
    other, _ = _fit(setup, seed=1)
    assert not np.array_equal(w, other)


def test_long_optimisation_approaches_the_smallest_eigenvector():
    gen = torch.Generator().manual_seed(0)
    n_tokens, dim, pairs = 3, 6, 64
    rotations = torch.linalg.qr(torch.randn(n_tokens, dim, dim, generator=gen))[0]
    spread = torch.linspace(0.2, 2.0, dim)  # well separated eigenvalues of sum Delta Delta^T
    deltas = torch.einsum("knd,ned->kne", torch.randn(pairs, n_tokens, dim, generator=gen) * spread, rotations)
    keep = torch.ones(pairs, n_tokens, dtype=torch.bool)
    keep[: pairs // 2, 2] = False
    ref = smallest_eigenvectors(deltas, keep)
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-6)
    m = torch.einsum("kn,kni,knj->nij", keep.double(), deltas.double(), deltas.double())
    lowest = torch.linalg.eigvalsh(m)[:, 0]
    r = torch.from_numpy(ref).double()
    torch.testing.assert_close(torch.einsum("nij,nj->ni", m, r), lowest[:, None] * r, atol=1e-4, rtol=1e-4)
    w, losses = minimise([(deltas, keep)] * 500, lr=0.05)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(np.abs((w * ref).sum(1)), 1.0, atol=1e-4)
    # a token without data keeps the f_s direction
    keep[:, 1] = False
    np.testing.assert_allclose(smallest_eigenvectors(deltas, keep)[1], dim ** -0.5, atol=1e-7)


def test_learned_maps_from_the_fit(setup, fitted):
    lm, explainer, layer, grid, images, maps = setup
    w, _ = fitted
    out = Explainer(lm, (layer,), f="learned").explain(images[0][None], w=w)[layer]
    assert out.maps.shape == (grid * grid, grid * grid) and torch.isfinite(out.maps).all()
    assert torch.isfinite(out.class_map).all()


def test_bad_inputs(setup):
    lm, explainer, layer, grid, images, maps = setup
    with pytest.raises(ConfigError, match="ULTra_S maps"):
        fit_projections(explainer, images[:3], maps[:2], layer, grid, SIZE, k=K_IMG)
    with pytest.raises(ConfigError, match="layer"):
        fit_projections(explainer, images, maps, layer + 1, grid, SIZE)
    with pytest.raises(ConfigError, match="no training"):
        fit_projections(explainer, [], [], layer, grid, SIZE)
