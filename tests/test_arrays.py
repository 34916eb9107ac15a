"""The small array helpers several rooms share (pipeline/arrays.py)."""
import numpy as np

from rep_pipeline.pipeline.arrays import minmax


def test_minmax_per_map_and_constant_maps_are_zero():
    a = np.array([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    out = minmax(a, axis=-1)
    np.testing.assert_allclose(out, [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    assert out.dtype == np.float32
    stack = np.stack([np.arange(4.0).reshape(2, 2), np.full((2, 2), 7.0)])
    np.testing.assert_allclose(minmax(stack, axis=(-2, -1)), [[[0, 1 / 3], [2 / 3, 1]], np.zeros((2, 2))])
    assert minmax(np.array([[0, 2]])).dtype == np.float32
    np.testing.assert_allclose(minmax(a), [[0.0, 0.5, 0.25], [1.0, 1.0, 1.0]])  # no axis: the whole array
    assert minmax(np.full((3, 3), 2.0)).max() == 0                              # a constant map scales to 0
    assert minmax(np.zeros(2, np.float16)).dtype == np.float16                    # floating input keeps its dtype


def test_minmax_reads_lists_as_numpy_does():
    np.testing.assert_array_equal(minmax([1.0, 2.0, 3.0]), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(minmax([[4, 4], [1, 3]], axis=-1), [[0.0, 0.0], [0.0, 1.0]])
