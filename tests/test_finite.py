"""The NaN/inf checks and the finite fallback the stages share (pipeline/finite.py)."""
import math

import numpy as np
import pytest

from rep_pipeline.pipeline.errors import NonFiniteFeaturesError
from rep_pipeline.pipeline.finite import check_finite, finite_or


def test_finite_or_falls_back_on_missing_nan_and_inf():
    assert finite_or(np.float32(0.5)) == 0.5 and isinstance(finite_or(np.float64(2)), float)
    assert finite_or(None) is None and finite_or(float("nan")) is None and finite_or(np.inf) is None
    assert finite_or(float("nan"), -math.inf) == -math.inf


def test_check_finite_names_the_images():
    x = np.zeros((4, 3, 2), np.float16)
    check_finite(x, np.arange(10, 14), "feats")
    x[2, 1, 0] = np.nan
    with pytest.raises(NonFiniteFeaturesError, match=r"feats holds NaN/inf for images \[12\]"):
        check_finite(x, np.arange(10, 14), "feats")
