"""Keypoint transfer (PROTOCOL.md 11.3): the fast cosine argmax against brute-force upsampling
with torch, the tie rule, the padding mask, and a source image matched against itself."""
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from rep_pipeline.stages.correspond import transfer
from rep_pipeline.pipeline.upsample import bilinear_matrix, bilinear_taps
from rep_pipeline.stages.correspond.transfer import TargetFeatures, brute_force_match, sample, upsampled_norms


def torch_upsample(F, size):
    """(G, G, D) -> (S, S, D) float64 with torch's bilinear interpolate."""
    x = torch.from_numpy(np.asarray(F, np.float64)).permute(2, 0, 1).contiguous()[None]
    return TF.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


def features(rng, grid, dim):
    """Random patch features as the store holds them (float16), with a common offset."""
    return (rng.standard_normal((grid, grid, dim)) + 0.3).astype(np.float16)


def padding_mask(rng, size):
    """A valid (S, S) mask shaped like the pad geometry's: one rectangle of the grid."""
    h, w = rng.integers(size // 3, size + 1, 2)
    top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    valid = np.zeros((size, size), bool)
    valid[top:top + h, left:left + w] = True
    return valid


def first_clamped(grid, size):
    """The first grid index whose source position is clamped to the last patch."""
    return int(np.argmax((np.arange(size) + 0.5) * grid / size - 0.5 >= grid - 1))



@pytest.fixture
def backend(array_backend):
    """NumPy, array-api-strict (device1), torch, CuPy where present."""
    return array_backend

@pytest.mark.parametrize("grid,size,dim", [(23, 322, 64), (4, 64, 8)])
def test_sample_and_norms_equal_upsampled_features(grid, size, dim):
    rng = np.random.default_rng(1)
    F = features(rng, grid, dim)
    up = torch_upsample(F, size)
    rows, cols = rng.integers(0, size, 50), rng.integers(0, size, 50)
    np.testing.assert_allclose(sample(F, rows, cols, size, np), up[rows, cols], rtol=0, atol=1e-12)
    np.testing.assert_allclose(upsampled_norms(F, size, np), np.linalg.norm(up, axis=-1), rtol=1e-13)


CASES = [(4, 64, 8), (4, 322, 64), (4, 320, 768), (20, 64, 768), (20, 320, 64), (20, 322, 8), (23, 64, 64),
         (23, 320, 8), (23, 322, 768)]


@pytest.mark.parametrize("grid,size,dim", CASES)
def test_fast_equals_brute_force(backend, grid, size, dim):
    """Random pairs, padding rectangles, and a block of identical patches in the target that
    the first queries point at (so the winners include exact ties): scores to 1e-5 (they agree
    to ~1e-15), indices exactly."""
    xp, rng = backend.xp, np.random.default_rng(grid * size + dim)
    for _ in range(3):
        F_t, F_r = features(rng, grid, dim), features(rng, grid, dim)
        a, b = rng.integers(0, grid - 1, 2)
        F_t[a:a + 2, b:b + 2] = F_r[0, 0]  # a 2 x 2 block equal to the source's first patch
        valid = padding_mask(rng, size)
        rows, cols = rng.integers(0, size, 16), rng.integers(0, size, 16)
        rows[:3], cols[:3] = 0, 0  # f = F_r[0, 0]: the best pixels are the block's (or the clamped borders')
        f = sample(backend.asarray(F_r), backend.asarray(rows), backend.asarray(cols), size, xp)
        index, score = TargetFeatures(backend.asarray(F_t), size, backend.asarray(valid), xp).match(f)
        want_index, want_score = brute_force_match(F_t, backend.to_numpy(f), size, valid)
        assert backend.to_numpy(index).dtype == np.int64
        np.testing.assert_array_equal(backend.to_numpy(index), want_index)
        np.testing.assert_allclose(backend.to_numpy(score), want_score, rtol=0, atol=1e-5)
        assert valid.reshape(-1)[want_index].all()


def test_ties_go_to_the_first_pixel_in_row_major_order(backend):
    """Pixels with one same feature: a region of identical patches, and the clamped corner
    bands of the upsampling (all of them exactly F[0, 0] or F[G-1, G-1]). Torch's values in the
    last band differ by rounding, so a plain argmax would pick among them by noise."""
    xp, rng, grid, size, dim = backend.xp, np.random.default_rng(2), 23, 322, 64
    F = features(rng, grid, dim)
    F[5:9, 10:13] = F[0, 5]  # a 4 x 3 region of one feature
    i0, i1, _ = (backend.to_numpy(t) for t in bilinear_taps(grid, size, xp))
    inner_rows = np.flatnonzero((i0 >= 5) & (i1 <= 8))
    inner_cols = np.flatnonzero((i0 >= 10) & (i1 <= 12))
    last = first_clamped(grid, size)
    queries = np.stack([F[0, 5], F[0, 0], F[-1, -1]]).astype(np.float64)
    want = [inner_rows[0] * size + inner_cols[0], 0, last * size + last]
    valid = np.ones((size, size), bool)
    index, score = TargetFeatures(backend.asarray(F), size, backend.asarray(valid), xp).match(backend.asarray(queries))
    np.testing.assert_array_equal(backend.to_numpy(index), want)
    np.testing.assert_allclose(backend.to_numpy(score), 1.0, atol=1e-14)
    np.testing.assert_array_equal(brute_force_match(F, queries, size, valid)[0], want)


def test_padding_is_never_chosen(backend):
    """The query's perfect match lies in the padding; the answer is the best valid pixel."""
    xp, rng, grid, size, dim = backend.xp, np.random.default_rng(3), 20, 320, 32
    F = features(rng, grid, dim)
    valid = np.zeros((size, size), bool)
    valid[:200, 40:] = True  # bottom rows and left columns are padding
    queries = np.stack([F[-1, 5], F[3, 0], F[-1, 0]]).astype(np.float64)
    target = TargetFeatures(backend.asarray(F), size, backend.asarray(valid), xp)
    index, _ = target.match(backend.asarray(queries))
    index = backend.to_numpy(index)
    assert valid.reshape(-1)[index].all()
    np.testing.assert_array_equal(index, brute_force_match(F, queries, size, valid)[0])
    maps = backend.to_numpy(target.cosine_maps(backend.asarray(queries)))
    assert np.isnan(maps[:, ~valid]).all() and np.isfinite(maps[:, valid]).all()
    np.testing.assert_array_equal(np.nanargmax(maps.reshape(3, -1), axis=1), index)
    with pytest.raises(ValueError):
        TargetFeatures(backend.asarray(F), size, backend.asarray(np.zeros((size, size), bool)), xp)


def test_cosine_maps_equal_brute_force(backend):
    xp, rng, grid, size, dim = backend.xp, np.random.default_rng(4), 23, 64, 16
    F_t, F_r = features(rng, grid, dim), features(rng, grid, dim)
    valid = padding_mask(rng, size)
    f = sample(F_r, rng.integers(0, size, 4), rng.integers(0, size, 4), size, np)
    maps = backend.to_numpy(TargetFeatures(backend.asarray(F_t), size, backend.asarray(valid), xp).cosine_maps(backend.asarray(f)))
    up = torch_upsample(F_t, size)
    want = np.einsum("ijd,kd->kij", up, f) / np.linalg.norm(up, axis=-1) / np.linalg.norm(f, axis=1)[:, None, None]
    np.testing.assert_allclose(maps[:, valid], want[:, valid], rtol=0, atol=1e-13)


def test_zero_vectors_have_cosine_zero(backend):
    xp, grid, size = backend.xp, 4, 16
    F = features(np.random.default_rng(5), grid, 8)
    F[1, 1] = 0
    target = TargetFeatures(backend.asarray(F), size, backend.asarray(np.ones((size, size), bool)), xp)
    index, score = target.match(backend.asarray(np.zeros((1, 8))))
    assert int(backend.to_numpy(index)[0]) == 0 and float(backend.to_numpy(score)[0]) == 0.0
    assert [a.shape[0] for a in target.match(backend.asarray(np.zeros((0, 8))))] == [0, 0]
    assert np.isfinite(backend.to_numpy(target.cosine_maps(backend.asarray(F[1:2, 2], dtype=xp.float64)))).all()


@pytest.mark.parametrize("grid,size", [(20, 320), (23, 322)])
def test_self_pair_maps_every_pixel_to_itself(backend, grid, size):
    """Source = target, all valid, D = 768: every pixel is matched to itself, or, in the
    clamped border bands where pixels share one feature, to the first pixel sharing it."""
    xp, rng = backend.xp, np.random.default_rng(grid)
    _, first, inverse = np.unique(bilinear_matrix(grid, size, np, np.float64), axis=0, return_index=True,
                                  return_inverse=True)
    same = first[inverse.ravel()]  # per grid index: the first index with the same weights
    valid = backend.asarray(np.ones((size, size), bool))
    failures = 0
    for _ in range(2):
        F = features(rng, grid, 768)
        rows, cols = rng.integers(0, size, 400), rng.integers(0, size, 400)
        target = TargetFeatures(backend.asarray(F), size, valid, xp)
        index, score = target.match(sample(backend.asarray(F), backend.asarray(rows), backend.asarray(cols), size, xp))
        failures += int((backend.to_numpy(index) != same[rows] * size + same[cols]).sum())
        np.testing.assert_allclose(backend.to_numpy(score), 1.0, atol=1e-14)
    assert failures == 0
