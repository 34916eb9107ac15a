"""ULTra's per-image array code (stages/explain/concepts.py) on every backend: NumPy,
array-api-strict on its extra device ``device1`` (marker ``strict``: an implicit host crossing,
a mixed-device operation or a call outside the standard fails), torch, and CuPy where a GPU is
present. Each function's result on a backend stays on its inputs' device and equals the NumPy
result: exactly for labels, segments, counts and masks, to float32 (float64) tolerance for
float32 (float64) scores. The one host step of a segmentation, SciPy's linkage, is reached
only through the explicit crossing in ``cluster``."""
import numpy as np
import pytest

from rep_pipeline.pipeline import backend as B
from rep_pipeline.pipeline.arrays import minmax
from rep_pipeline.pipeline.errors import LabelValueError
from rep_pipeline.pipeline.footprints import patch_labels
from rep_pipeline.pipeline.upsample import scaled_upsampled
from rep_pipeline.stages.explain import concepts as cc

IGNORE = 255
GRID, SIZE = 6, 24


def _on(be, a):
    return be.asarray(np.asarray(a))


def _back(be, out, like):
    """``out`` on the host, after checking that it stayed on ``like``'s device."""
    assert str(B.device(out)) == str(B.device(like))
    return B.to_host(out)


def _image(seed=0):
    """(maps (P, P) with quadrant structure, a duplicated row and two constant rows; labels
    (S, S) uint8 with ignore pixels; M(S~_i) (P, S, S); token labels (P,))."""
    rng = np.random.default_rng(seed)
    p = GRID * GRID
    rr, col = np.divmod(np.arange(p), GRID)
    quadrant = (rr >= GRID // 2) * 2 + (col >= GRID // 2)
    maps = ((quadrant[:, None] == quadrant[None, :]) + 0.2 * rng.random((p, p))).astype(np.float32)
    maps[4] = maps[9]
    maps[13], maps[20] = 0.5, 0.25
    labels = np.kron(rng.integers(0, 4, (3, 3)), np.ones((SIZE // 3, SIZE // 3), dtype=int)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.08] = IGNORE
    return maps, labels, scaled_upsampled(maps, GRID, SIZE), patch_labels(labels, GRID).ravel()


# --- concept discovery ---------------------------------------------------------------------------

def test_cosine_distances_and_cluster_equal_numpy(array_backend):
    be = array_backend
    maps, _, _, _ = _image()
    scaled = minmax(maps, axis=-1)
    x = _on(be, scaled)
    ref = cc.cosine_distances(scaled)
    got = _back(be, cc.cosine_distances(x), x)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, atol=1e-12)
    np.testing.assert_array_equal(got == 0, ref == 0)     # equal rows and zero rows: exactly 0
    np.testing.assert_array_equal(got == 1, ref == 1)     # zero vs non-zero: exactly 1
    for kw in (dict(zeta=0.4), dict(zeta=0.0), dict(k=3)):
        ref_labels, ref_tree = cc.cluster(scaled, **kw)
        labels, tree = cc.cluster(x, **kw)
        assert isinstance(tree, np.ndarray)               # the dendrogram stays on the host
        np.testing.assert_array_equal(_back(be, labels, x), ref_labels)
        np.testing.assert_allclose(tree, ref_tree, atol=1e-9)
    one, tree = cc.cluster(x[:1, :])
    assert _back(be, one, x).tolist() == [0] and tree.shape == (0, 4)


def test_segment_image_equals_numpy(array_backend):
    be = array_backend
    maps, _, scaled, _ = _image(1)
    x = _on(be, maps)
    for kw in (dict(zeta=0.4), dict(k=2, aggregate="mean")):
        ref = cc.segment_image(maps, GRID, SIZE, **kw)
        for given in (None, _on(be, scaled)):
            segments, labels, tree = cc.segment_image(x, GRID, SIZE, scaled=given, **kw)
            got = _back(be, segments, x)
            assert got.dtype == np.uint8
            np.testing.assert_array_equal(got, ref[0])
            np.testing.assert_array_equal(_back(be, labels, x), ref[1])
            np.testing.assert_allclose(tree, ref[2], atol=1e-9)


def test_minmax_and_scaled_upsampling_on_every_backend_equal_numpy(array_backend):
    be = array_backend
    maps, _, scaled, _ = _image(2)
    x = _on(be, maps)
    np.testing.assert_allclose(_back(be, minmax(x, axis=-1), x), minmax(maps, axis=-1), atol=1e-6)
    np.testing.assert_allclose(_back(be, scaled_upsampled(x, GRID, SIZE), x), scaled, atol=1e-6)


# --- concept maps and segments -------------------------------------------------------------------

def test_concept_maps_and_segment_map_equal_numpy(array_backend):
    be = array_backend
    maps, _, scaled, _ = _image(3)
    labels, _ = cc.cluster(minmax(maps, axis=-1), zeta=0.4)
    lab, up = _on(be, labels), _on(be, scaled)
    for aggregate in ("sum", "mean"):
        ref = cc.concept_maps(labels, scaled, aggregate)
        got = _back(be, cc.concept_maps(lab, up, aggregate), up)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    concepts = np.random.default_rng(3).random((7, SIZE, SIZE))
    concepts[2] = concepts[1]                      # exact ties: the lower concept; 2 wins nothing
    c = _on(be, concepts)
    ref = cc.segment_map(concepts)
    got = _back(be, cc.segment_map(c), c)
    assert got.dtype == ref.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)


def test_segment_map_widens_past_256_segments(array_backend):
    be = array_backend
    n = 300
    concepts = np.zeros((n + 2, 20, 20), dtype=np.float32)
    concepts[np.arange(n) + 2, np.arange(n) // 20, np.arange(n) % 20] = 1.0   # 1 wins nothing, 0 the ties
    c = _on(be, concepts)
    ref = cc.segment_map(concepts)
    got = _back(be, cc.segment_map(c), c)
    assert ref.dtype == got.dtype == np.uint16 and ref.max() == n
    np.testing.assert_array_equal(got, ref)


# --- footprints and descriptors ------------------------------------------------------------------

def test_footprint_counts_patch_segments_and_descriptors_equal_numpy(array_backend):
    be = array_backend
    maps, labels, _, _ = _image(4)
    segments = cc.segment_image(maps, GRID, SIZE, zeta=0.3)[0]
    segments[0, 0] = segments.max() + 1                         # a sliver: majority of no patch
    s = _on(be, segments)
    np.testing.assert_array_equal(_back(be, cc.patch_segments(s, GRID), s), cc.patch_segments(segments, GRID))
    valid = labels != IGNORE
    for v in (None, valid):
        ref = cc.footprint_counts(labels, v, GRID, 256)
        got = cc.footprint_counts(_on(be, labels), None if v is None else _on(be, v), GRID, 256)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(_back(be, a, s), b)
    tokens = np.random.default_rng(4).standard_normal((GRID, GRID, 16)).astype(np.float16)
    ref = cc.segment_descriptors(segments, tokens)
    t = _on(be, tokens)
    got = _back(be, cc.segment_descriptors(s, t), s)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


# --- the per-image oracle ------------------------------------------------------------------------

def test_per_image_confusion_and_oracle_equal_numpy(array_backend):
    be = array_backend
    maps, labels, _, _ = _image(5)
    segments = cc.segment_image(maps, GRID, SIZE, zeta=0.2)[0]
    s, lab = _on(be, segments), _on(be, labels)
    for n_classes in (4, 6):
        ref = cc.per_image_confusion(segments, labels, n_classes)
        got = _back(be, cc.per_image_confusion(s, lab, n_classes), s)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, ref)
        assert cc.oracle_scores(_on(be, ref)) == cc.oracle_scores(ref)
    empty = _on(be, np.full(labels.shape, IGNORE, np.uint8))
    assert (_back(be, cc.per_image_confusion(s, empty, 4), s) == 0).all()
    with pytest.raises(LabelValueError, match="3"):
        cc.per_image_confusion(s, lab, 3)


# --- ITIoU ---------------------------------------------------------------------------------------

def test_token_masks_and_itiou_equal_numpy(array_backend):
    be = array_backend
    _, labels, scaled, token_labels = _image(6)
    assert (token_labels != IGNORE).any()
    up, lab, tl = _on(be, scaled), _on(be, labels), _on(be, token_labels)
    for tau in (0.0, 0.2, 0.45, 1.0):
        np.testing.assert_array_equal(_back(be, cc.token_masks(up, tau), up), cc.token_masks(scaled, tau))
        value, n = cc.itiou_image(up, tl, lab, tau)
        ref, ref_n = cc.itiou_image(scaled, token_labels, labels, tau)
        assert isinstance(value, float) and n == ref_n
        assert value == pytest.approx(ref, abs=1e-12)
    taus = np.round(np.arange(0, 1.0001, 0.05), 2)[::-1]
    ref, ref_n = cc.itiou_sweep(scaled, token_labels, labels, taus, chunk=7)
    got, n = cc.itiou_sweep(up, tl, lab, taus, chunk=7)
    assert n == ref_n
    np.testing.assert_allclose(_back(be, got, up), ref, atol=1e-12)
    nothing, zero = cc.itiou_image(up, _on(be, np.full(token_labels.shape, IGNORE)), lab)
    assert np.isnan(nothing) and zero == 0
    swept, zero = cc.itiou_sweep(up, _on(be, np.full(token_labels.shape, IGNORE)), lab, [0.1, 0.2])
    assert zero == 0 and np.isnan(_back(be, swept, up)).all()


# --- the host crossing of the clustering ---------------------------------------------------------

@pytest.mark.strict
def test_scipy_linkage_is_reached_only_through_the_explicit_crossing(strict_backend):
    """Without ``cluster``'s ``to_host`` a device array reaches SciPy, which converts it to
    NumPy implicitly: on array-api-strict's device1 that is an error. With it, the labels come
    back to device1."""
    be = strict_backend
    maps, _, _, _ = _image(7)
    x = _on(be, minmax(maps, axis=-1))
    distances = cc.cosine_distances(x)
    with pytest.raises(RuntimeError, match="device1"):
        cc.hierarchy_labels(distances, 0.4, None)
    labels, _ = cc.cluster(x, zeta=0.4)
    assert str(B.device(labels)) == str(be.device)
    np.testing.assert_array_equal(B.to_host(labels), cc.hierarchy_labels(B.to_host(distances), 0.4, None)[0])
