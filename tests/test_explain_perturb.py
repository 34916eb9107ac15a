"""The perturbation test of PROTOCOL.md 10.6 (stages/explain/perturb.py)."""
import numpy as np
import pytest
import torch

from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.stages.explain import perturb as pt


# --- token choice (the relevance sets: test_relevance.py) -------------------------------------------------------------

def test_choose_tokens_draws_distinct_patches_reproducibly():
    a = pt.choose_tokens(400, 10, np.random.default_rng(0))
    assert a.shape == (10,) and len(set(a)) == 10 and a.min() >= 0 and a.max() < 400
    assert (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, pt.choose_tokens(400, 10, 0))
    assert not np.array_equal(a, pt.choose_tokens(400, 10, 1))
    np.testing.assert_array_equal(pt.choose_tokens(4, 10, 0), [0, 1, 2, 3])  # a grid smaller than k
    counts = np.bincount(np.concatenate([pt.choose_tokens(20, 5, np.random.default_rng(s)) for s in range(2000)]),
                         minlength=20)
    assert counts.min() > 400 and counts.max() < 600                          # uniform: 500 each


# --- perturbations -------------------------------------------------------------------------------

def _changed_patches(x, y, grid):
    patch = x.shape[-1] // grid
    diff = (x != y).any(0).reshape(grid, patch, grid, patch).any(3).any(1)
    return set(np.flatnonzero(diff.numpy().ravel()))


def test_mask_zeroes_exactly_the_chosen_patches():
    x = torch.randn(3, 32, 32) + 5.0
    patches = np.array([0, 5, 15])
    y = pt.perturb(x, patches, grid=4, mode="mask")
    assert _changed_patches(x, y, 4) == {0, 5, 15}
    assert (y[:, 8:16, 8:16] == 0).all() and (y[:, :8, :8] == 0).all() and (y[:, 24:, 24:] == 0).all()
    assert (x[:, :8, :8] != 0).all()                                # the input is not modified
    assert torch.equal(pt.perturb(x, np.array([], dtype=int), 4, "mask"), x)


def test_noise_adds_scaled_standard_normal_noise_to_the_chosen_patches_only():
    x = torch.randn(3, 64, 64)
    patches = np.arange(0, 16, 2)                                    # half the patches, 8 x (3 x 16 x 16)
    y = pt.perturb(x, patches, grid=4, mode="noise", rng=np.random.default_rng(0), strength=0.3)
    assert _changed_patches(x, y, 4) == set(patches.tolist())
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask.view(-1)[torch.as_tensor(patches)] = True
    mask = mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
    eps = ((y - x) / 0.3)[:, mask]
    assert eps.numel() == 3 * 8 * 256
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1.0) < 0.05
    again = pt.perturb(x, patches, 4, "noise", np.random.default_rng(0))
    assert torch.equal(again, y)
    with pytest.raises(ConfigError):
        pt.perturb(x, patches, 4, mode="blur")
    with pytest.raises(ConfigError):
        pt.perturb(x, patches, 5, mode="mask")


# --- distances -----------------------------------------------------------------------------------

def _patch_mean_embed(grid: int, n_prefix: int = 1):
    """A transparent 'model': token p is the mean of patch p's pixels and channels, scaled."""
    def embed(batch):
        b, _, h, w = batch.shape
        p = h // grid
        means = batch.reshape(b, 3, grid, p, grid, p).mean((1, 3, 5)).reshape(b, grid * grid, 1)
        tokens = means @ torch.ones(1, 2) + torch.arange(grid * grid).reshape(1, -1, 1)  # separable rows
        return torch.cat([torch.zeros(b, n_prefix, 2), tokens], 1)
    return embed


def test_distances_use_the_tokens_row_and_its_sets():
    grid, n_prefix = 3, 2
    x = torch.ones(3, 12, 12)
    maps = np.tile(np.arange(9.0), (9, 1))          # every map prefers high patch ids
    # a token's own patch is never perturbed: with a patch-local embed, d = 0 both ways ...
    d_pos, d_neg = pt.perturbation_distances(_patch_mean_embed(grid, n_prefix), x, maps, n_prefix, grid,
                                             np.array([0, 8]), rho=0.5, mode="mask")
    np.testing.assert_allclose(d_pos, 0)
    np.testing.assert_allclose(d_neg, 0)

    # ... and a token that reads the sum of all patches sees exactly the masked ones (value 1 each)
    def global_embed(batch):
        b = batch.shape[0]
        means = batch.reshape(b, 3, grid, 4, grid, 4).mean((1, 3, 5)).reshape(b, grid * grid)
        weights = torch.zeros(grid * grid, grid * grid, 1)
        weights[:, :, 0] = torch.arange(1.0, 10.0)                      # patch j weighs j + 1
        return torch.cat([torch.zeros(b, n_prefix, 1), torch.einsum("bj,ijd->bid", means, weights)], 1)

    d_pos, d_neg = pt.perturbation_distances(global_embed, x, maps, n_prefix, grid, np.array([0, 8]), rho=0.5,
                                             mode="mask", batch_size=2)
    # token 0: positive {8,7,6,5} -> 9+8+7+6 = 30, negative {1,2,3,4} -> 2+3+4+5 = 14
    # token 8: positive {7,6,5,4} -> 8+7+6+5 = 26, negative {0,1,2,3} -> 1+2+3+4 = 10
    np.testing.assert_allclose(d_pos, [30, 26], rtol=1e-6)
    np.testing.assert_allclose(d_neg, [14, 10], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    from rep_pipeline.pipeline.registry import build_model

    loaded = build_model("tiny-vit", "random", 64)
    return loaded, (lambda batch: loaded.model.forward_features(batch))


@pytest.mark.parametrize("mode", ["mask", "noise"])
def test_rho_zero_gives_zero_distance_with_a_real_model(tiny, mode):
    loaded, embed = tiny
    grid, p = loaded.grid, loaded.grid ** 2
    x = torch.randn(3, loaded.input_size, loaded.input_size, generator=torch.Generator().manual_seed(0))
    maps = np.random.default_rng(0).random((p, p))
    tokens = pt.choose_tokens(p, 5, np.random.default_rng(0))
    d_pos, d_neg = pt.perturbation_distances(embed, x, maps, loaded.num_prefix_tokens, grid, tokens, rho=0.0,
                                             mode=mode, rng=np.random.default_rng(1))
    assert d_pos.shape == d_neg.shape == (5,)
    np.testing.assert_allclose(d_pos, 0, atol=1e-5)
    np.testing.assert_allclose(d_neg, 0, atol=1e-5)
    d_pos, d_neg = pt.perturbation_distances(embed, x, maps, loaded.num_prefix_tokens, grid, tokens, rho=0.5,
                                             mode=mode, rng=np.random.default_rng(1))
    assert (d_pos > 1e-3).all() and (d_neg > 1e-3).all()


# --- bootstrap and summary -----------------------------------------------------------------------

def test_bootstrap_of_a_constant_difference_is_a_point():
    pos = np.array([3.0, 4.0, 7.0, 1.0])
    assert pt.bootstrap_difference(pos, pos - 2.0) == pytest.approx((2.0, 2.0, 2.0))
    assert all(np.isnan(pt.bootstrap_difference(np.array([]), np.array([]))))


def test_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    diff = rng.normal(1.0, 2.0, 400)
    neg = rng.random(400)
    mean, low, high = pt.bootstrap_difference(neg + diff, neg, draws=4000, seed=3)
    half = 1.96 * diff.std(ddof=1) / np.sqrt(400)
    assert mean == pytest.approx(diff.mean())
    assert low < mean < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)
    assert (low + high) / 2 == pytest.approx(mean, abs=0.03)
    assert pt.bootstrap_difference(neg + diff, neg, draws=4000, seed=3) == (mean, low, high)
    _, low90, high90 = pt.bootstrap_difference(neg + diff, neg, draws=4000, seed=3, level=0.9)
    assert low < low90 < high90 < high


def test_summarise_averages_tokens_then_images():
    pos = [np.array([2.0, 4.0]), np.array([6.0, 6.0, 6.0])]    # image means 3, 6 (ragged k is fine)
    neg = np.array([[1.0, 1.0], [2.0, 4.0]])                   # image means 1, 3
    out = pt.summarise(pos, neg, draws=200)
    assert out["pos_mean"] == pytest.approx(4.5) and out["neg_mean"] == pytest.approx(2.0)
    assert out["pos_std"] == pytest.approx(np.std([3, 6], ddof=1)) and out["neg_std"] == pytest.approx(np.sqrt(2))
    assert out["diff_mean"] == pytest.approx(2.5)
    assert 2.0 <= out["diff_ci_low"] <= out["diff_ci_high"] <= 3.0   # resampled differences are 2 and 3
    assert set(out) == {"neg_mean", "neg_std", "pos_mean", "pos_std", "diff_mean", "diff_ci_low", "diff_ci_high"}
    one = pt.summarise([np.array([1.0])], [np.array([0.5])])
    assert np.isnan(one["pos_std"]) and one["diff_mean"] == one["diff_ci_low"] == one["diff_ci_high"] == 0.5
