"""Bilinear upsampling, align_corners=False (PROTOCOL.md sections 5 and 7): pipeline/upsample.py,
the one definition the evaluate, explain and correspond stages and the report use, against
torch's ``interpolate``."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rep_pipeline.pipeline.arrays import minmax
from rep_pipeline.pipeline.backend import get_backend
from rep_pipeline.pipeline.upsample import bilinear_matrix, scaled_upsampled, upsample, upsample_maps

SIZES = [(4, 64), (20, 320), (23, 320), (20, 322), (23, 322), (3, 7), (7, 3), (5, 5)]


def torch_upsample(x, size):
    """(..., G, G) float64 -> (..., S, S) with torch's bilinear interpolate."""
    x = torch.from_numpy(np.asarray(x, np.float64))
    shape = x.shape[:-2]
    out = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=(size, size), mode="bilinear", align_corners=False)
    return out.reshape(*shape, size, size).numpy()


@pytest.mark.parametrize("grid,size", SIZES)
def test_bilinear_matrix_equals_torch(grid, size):
    x = np.random.default_rng(grid * size).standard_normal((grid, grid))
    A = bilinear_matrix(grid, size, np, np.float64)
    assert A.shape == (size, grid) and A.dtype == np.float64
    np.testing.assert_array_equal(A.sum(1), 1.0)
    assert ((A != 0).sum(1) <= 2).all()
    np.testing.assert_allclose(A @ x @ A.T, torch_upsample(x, size), rtol=0, atol=1e-13)
    u = bilinear_matrix(grid, size)  # the float32 default: the same weights, rounded
    assert u.dtype == np.float32
    np.testing.assert_array_equal(u, A.astype(np.float32))


def test_upsample_maps_and_channels():
    maps = np.random.default_rng(1).random((3, 5, 5)).astype(np.float32)
    out = upsample_maps(maps, 12)
    assert out.shape == (3, 12, 12) and out.dtype == np.float32
    np.testing.assert_allclose(out, torch_upsample(maps, 12), atol=1e-6)
    np.testing.assert_allclose(upsample_maps(maps[0], 12), out[0], atol=1e-6)  # one 2-D map
    channels = np.moveaxis(maps, 0, -1)[None]   # (1, G, G, c) on the backend
    np.testing.assert_allclose(upsample(get_backend("numpy"), channels, 12)[0], np.moveaxis(out, 0, -1), atol=1e-6)


def test_scaled_upsampled_is_the_scaled_upsampled_map():
    # 2 -> 4 pixels weigh (1, 0), (3/4, 1/4), (1/4, 3/4), (0, 1)
    assert np.allclose(scaled_upsampled(np.array([0.0, 2.0, 0.0, 2.0]), 2, 4)[0], [[0, 0.25, 0.75, 1]] * 4)
    assert scaled_upsampled(np.ones(16), 4, 32).max() == 0  # a constant map scales to 0
    maps = np.random.default_rng(2).random((4, 16)) * 7 + 3
    a = scaled_upsampled(maps, 4, 10)
    b = minmax(upsample_maps(minmax(maps, axis=-1).reshape(4, 4, 4), 10), axis=(-2, -1))  # linear, weights sum to 1
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.min() == 0 and np.allclose(a.reshape(4, -1).max(1), 1)
