"""The relevance sets of the perturbation test (PROTOCOL.md 10.6, A21): pipeline/relevance.py,
the one definition the explain stage perturbs and the report draws."""
import math

import numpy as np
import pytest

from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.pipeline.relevance import relevance_sets, set_size


def _by_definition(s, own, rho):
    """PROTOCOL.md 10.6 read literally: the other P - 1 patches by S_i descending (ties by
    index), positive = the first m, negative = the last m, m = floor(rho (P - 1))."""
    others = sorted((p for p in range(len(s)) if p != own), key=lambda p: (-s[p], p))
    m = math.floor(round(rho * (len(s) - 1), 9))
    return others[:m], others[len(others) - m:]


def test_relevance_sets_sizes_order_and_own_patch():
    s = np.array([0.1, 0.9, 0.5, 0.9, 0.0, 0.3, 0.7, 1.0, 0.2])   # own patch 7 has the largest value
    pos, neg = relevance_sets(s, own=7, rho=0.5)                   # m = floor(0.5 * 8) = 4
    np.testing.assert_array_equal(pos, [1, 3, 6, 2])                # ties by index
    np.testing.assert_array_equal(neg, [5, 8, 0, 4])
    assert 7 not in pos and 7 not in neg and not set(pos) & set(neg)
    pos, neg = relevance_sets(s, own=1, rho=0.25)                  # m = 2
    np.testing.assert_array_equal(pos, [7, 3])
    np.testing.assert_array_equal(neg, [0, 4])
    empty = relevance_sets(s, own=0, rho=0.0)
    assert empty[0].size == 0 and empty[1].size == 0
    assert set_size(101, 0.29) == 29 and set_size(400, 0.5) == 199
    with pytest.raises(ConfigError):
        relevance_sets(s, own=0, rho=0.6)
    with pytest.raises(ConfigError):
        relevance_sets(s, own=9)


@pytest.mark.parametrize("rho", [0.0, 0.1, 0.29, 0.5])
def test_relevance_sets_follow_the_protocol_definition(rho):
    rng = np.random.default_rng(0)
    for p in (4, 16, 101):
        s = rng.integers(0, 5, p).astype(np.float64)  # many ties
        for own in (0, p // 2, p - 1):
            pos, neg = relevance_sets(s, own, rho)
            want_pos, want_neg = _by_definition(s, own, rho)
            assert pos.tolist() == want_pos and neg.tolist() == want_neg
            assert pos.dtype == neg.dtype == np.int64
