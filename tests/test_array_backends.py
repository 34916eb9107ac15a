"""The array code of the stages on every backend: NumPy, array-api-strict on its extra device
``device1`` (marker ``strict``: any implicit host crossing, mixed-device operation or call
outside the standard fails), torch, and CuPy where a GPU is present. Results equal NumPy's:
exactly for counts and assignments, to float32 tolerance for centroids and scores."""
import numpy as np
import pytest

from rep_pipeline.pipeline import backend as B
from rep_pipeline.pipeline.kmeans import LloydKMeans, OnlineKMeans, PCAInit, l2_normalize



@pytest.fixture
def other(array_backend):
    """Each backend but the NumPy reference."""
    if array_backend.name == "numpy":
        pytest.skip("the NumPy reference itself")
    return array_backend


def _planted(n=3000, d=24, k=5, seed=0):
    rng = np.random.default_rng(seed)
    centers = l2_normalize(np, rng.standard_normal((k, d)))
    x = centers[rng.integers(0, k, n)] + 0.3 * rng.standard_normal((n, d)) / np.sqrt(d)
    return l2_normalize(np, x).astype(np.float32)


def _train(be, x, ks, passes=4, batch=700, raw_scale=2.0):
    pca = PCAInit(be, x.shape[1])
    for off in range(0, len(x), batch):
        pca.add(be.asarray(raw_scale * x[off:off + batch] + 0.5))
    inits = [pca.centroids(k, seed=3) for k in ks]
    km = LloydKMeans(be, inits, len(x), tol=0.0, max_iter=passes)
    stats = []
    while not km.done:
        for off in range(0, len(x), batch):
            km.accumulate(be.asarray(x[off:off + batch]), off)
        stats.append(km.update())
    return ([B.to_host(c) for c in inits], [B.to_host(c) for c in km.centroids()],
            B.to_host(km.assignments), stats)


@pytest.mark.strict
def test_strict_backend_is_on_another_device(strict_backend):
    be = strict_backend
    a = be.asarray(np.ones(3, np.float32))
    assert str(B.device(a)) != str(B.device(be.xp.asarray([1.0])))
    with pytest.raises(RuntimeError):  # no silent conversion to NumPy off device1
        np.asarray(a)
    np.testing.assert_array_equal(B.to_host(a), np.ones(3))


def test_helpers_equal_numpy(other):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 11, (500, 3)).astype(np.int64)
    x = rng.standard_normal((500, 7)).astype(np.float32)
    ref_sums, ref_counts = B.row_sums(labels, x, 11)
    sums, counts = B.row_sums(other.asarray(labels), other.asarray(x), 11)
    assert str(B.device(sums)) == str(B.device(other.asarray(x)))
    np.testing.assert_array_equal(B.to_host(counts), ref_counts)
    np.testing.assert_allclose(B.to_host(sums), ref_sums, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(B.to_host(B.bincount(other.asarray(labels[:, 0]), 13)),
                                  np.bincount(labels[:, 0], minlength=13))
    moved = B.to_device(np.arange(4), other.asarray(x))
    assert str(B.device(moved)) == str(B.device(other.asarray(x)))


def test_lloyd_and_pca_equal_numpy(other):
    """PCA initialisation (including the random picks beyond the rank: a host crossing),
    several codebooks in one pass, every assignment and the pass statistics."""
    x = _planted()
    ref = _train(B.get_backend("numpy"), x, (3, 5, 30))
    got = _train(other, x, (3, 5, 30))
    for a, b in zip(ref[0], got[0]):
        np.testing.assert_allclose(b, a, atol=2e-4)
    for a, b in zip(ref[1], got[1]):
        np.testing.assert_allclose(b, a, atol=2e-4)
    np.testing.assert_array_equal(got[2][:2], ref[2][:2])       # K = 3, 5: exact
    assert (got[2][2] == ref[2][2]).mean() > 0.995              # K = 30 over 5 clusters: ties may move
    for sa, sb in zip(ref[3], got[3]):
        for a, b in zip(sa, sb):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_online_equals_numpy(other):
    x = _planted(n=1200)
    rng = np.random.default_rng(1)
    inits = [l2_normalize(np, rng.standard_normal((k, x.shape[1]))).astype(np.float32) for k in (4, 7)]
    np_be = B.get_backend("numpy")
    ref = OnlineKMeans(np_be, [np_be.asarray(c) for c in inits], lr=5e-3)
    got = OnlineKMeans(other, [other.asarray(c) for c in inits], lr=5e-3)
    for step in range(12):
        batch = x[step * 100:(step + 1) * 100]
        np.testing.assert_allclose(B.to_host(got.step(other.asarray(batch))), ref.step(batch), rtol=1e-5, atol=1e-6)
    for a, b in zip(ref.centroids(), got.centroids()):
        np.testing.assert_allclose(B.to_host(b), a, atol=1e-5)


def _cluster_maps(n=5, k=4, c=3, size=12, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, (n, size, size))
    labels[:, :2] = 255
    clusters = np.where(rng.random((n, size, size)) < 0.6, labels % k, rng.integers(0, k, (n, size, size)))
    return clusters.astype(np.int16), labels.astype(np.int64)


def test_evaluate_counts_and_matching_equal_numpy(other):
    """Score upsampling, confusion and position counts exactly; the Hungarian's K x C input is
    the one crossing (``hungarian_match`` takes device counts)."""
    from rep_pipeline.pipeline import metrics
    from rep_pipeline.pipeline.segscore import ClusterMapScores, headline
    from rep_pipeline.stages.evaluate.stage import segment

    np_be = B.get_backend("numpy")
    clusters, labels = _cluster_maps()
    dy, dx = metrics.random_shifts(len(clusters), clusters.shape[1], seed=3)
    heads = []
    for be in (np_be, other):
        acc = ClusterMapScores(4, 3, clusters.shape[1], be, seed=1, draws=50)
        acc.add(be.asarray(clusters), be.asarray(labels), (be.asarray(dy), be.asarray(dx)), 255)
        conf = metrics.confusion_matrix(be.asarray(clusters), be.asarray(labels), 4, 3, 255)
        np.testing.assert_array_equal(B.to_host(conf), B.to_host(acc.confusion))
        assert metrics.hungarian_match(conf)[0].tolist() == metrics.hungarian_match(B.to_host(conf))[0].tolist()
        heads.append(headline(acc))
    ref, got = heads
    np.testing.assert_array_equal(got.confusion, ref.confusion)
    np.testing.assert_array_equal(got.counts, ref.counts)
    np.testing.assert_array_equal(got.mapping, ref.mapping)
    assert got.scores.miou == ref.scores.miou and got.positional.nmi == pytest.approx(ref.positional.nmi, abs=1e-12)
    for key, value in ref.intervals.items():
        assert got.intervals[key] == pytest.approx(value, abs=1e-6), key
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 5, 5, 16)).astype(np.float32)
    cents = l2_normalize(np, rng.standard_normal((7, 16))).astype(np.float32)
    want = segment(np_be, feats, cents, (3, 4), 20)
    for a, b in zip(want, segment(other, other.asarray(feats), other.asarray(cents), (3, 4), 20)):
        assert (B.to_host(b) == a).mean() > 0.999  # float32 products: a near tie may flip


def test_cosine_probe_equals_numpy(other):
    import dataclasses

    from rep_pipeline.stages.probe.templates import ObjectSet, cosine_probe

    def objects(seed, n_images=40, per=8, dim=16):
        """Patches of three concepts, one per patch; concept 0 shifted along one direction."""
        rng = np.random.default_rng(seed)
        image = np.repeat(np.arange(n_images), per)
        label = rng.integers(0, 3, image.size)
        x = rng.standard_normal((image.size, dim)).astype(np.float32)
        x[label == 0, 0] += 2.0
        pos = label[:, None] == np.arange(3)
        return ObjectSet(x, pos, ~pos, image, n_images)

    train, test = objects(1), objects(2)
    ref = cosine_probe(B.get_backend("numpy"), train, test, [0, 1, 2], [1, 5], 3, 6, 7)
    moved = [dataclasses.replace(s, features=other.asarray(s.features)) for s in (train, test)]
    got = cosine_probe(other, *moved, [0, 1, 2], [1, 5], 3, 6, 7)
    assert got[1] == ref[1]
    assert len(got[0]) == len(ref[0])
    for a, b in zip(ref[0], got[0]):
        assert {k: a[k] for k in ("concept", "k_shot", "trial", "tp", "fp", "tn", "fn")} == \
            {k: b[k] for k in ("concept", "k_shot", "trial", "tp", "fp", "tn", "fn")}
        assert b["threshold"] == pytest.approx(a["threshold"], abs=1e-5)


@pytest.mark.strict
def test_strict_fails_where_an_explicit_crossing_is_removed(monkeypatch, strict_backend):
    """The guard itself: without ``to_device`` (host picks beyond the rank into PCA's device
    sample) or ``to_host`` (the Hungarian's K x C input), the strict backend refuses."""
    import rep_pipeline.pipeline.kmeans as kmeans
    import rep_pipeline.pipeline.metrics as metrics

    strict = strict_backend
    monkeypatch.setattr(kmeans, "to_device", lambda a, like, dtype=None: B.namespace(like).asarray(a, dtype=dtype))
    with pytest.raises(ValueError, match="different devices"):
        _train(strict, _planted(n=800), (30,), passes=1)
    monkeypatch.setattr(metrics, "to_host", lambda a: a)
    with pytest.raises(RuntimeError, match="NumPy"):
        metrics.hungarian_match(strict.asarray(np.eye(3, dtype=np.int64)))
