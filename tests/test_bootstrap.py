"""Bootstrap intervals over test images (pipeline/bootstrap.py, docs/uncertainty.md): the
vectorised draws against an independent slow reference that resamples the images explicitly
(the same seed-derived draws), and coverage sanity on populations with a known truth."""
import numpy as np
import pytest

from rep_pipeline.pipeline import bootstrap, metrics
from rep_pipeline.pipeline.backend import get_backend
from rep_pipeline.pipeline.segscore import ClusterMapScores, score_intervals
from rep_pipeline.stages.correspond import pck


def test_weights_are_the_counts_of_the_resampled_indices_and_deterministic():
    idx = bootstrap.resample_indices(7, seed=3)
    w = bootstrap.draw_weights(7, 3)
    assert idx.shape == w.shape == (bootstrap.DRAWS, 7) and (w.sum(1) == 7).all()
    assert all((np.bincount(i, minlength=7) == row).all() for i, row in zip(idx, w))
    assert (bootstrap.draw_weights(7, 3) == w).all() and not (bootstrap.draw_weights(7, 4) == w).all()
    assert not w.flags.writeable  # shared (cached) between settings


def test_interval_is_the_percentile_interval_of_the_finite_draws():
    draws = np.r_[np.arange(1001.0), np.nan, np.inf]
    assert bootstrap.interval(draws) == pytest.approx((25.0, 975.0))
    assert all(np.isnan(bootstrap.interval([np.nan])))
    # basic interval: estimate - (q97.5 - centre) .. estimate - (q2.5 - centre)
    assert bootstrap.basic_interval(10.0, np.arange(1001.0), 500.0) == pytest.approx((-465.0, 485.0))
    assert bootstrap.basic_interval(10.0, np.arange(1001.0) / 100) == pytest.approx((10.25, 19.75))
    assert bootstrap.basic_interval(0.5, np.array([0.6, 0.7, 0.8]), bounds=(0.0, 1.0))[0] >= 0.0
    assert bootstrap.finite_or_none(np.nan) is None and bootstrap.finite_or_none(2.0) == 2.0


def test_batched_statistics_equal_the_point_estimate_formulas():
    rng = np.random.default_rng(0)
    for k, c in ((4, 4), (7, 3), (3, 5)):
        conf = rng.integers(0, 50, (20, k, c))
        conf[3] = 0
        conf[4, :, 1] = 0
        mappings = np.stack([metrics.hungarian_match(x)[0] for x in conf])
        miou, acc = bootstrap.segmentation_scores_batched(conf, mappings)
        for d in range(len(conf)):
            want = metrics.segmentation_scores(conf[d], mappings[d])
            np.testing.assert_allclose([miou[d], acc[d]], [want.miou, want.pixel_accuracy], rtol=1e-12)
    counts = rng.integers(0, 30, (5, 40, 6)).astype(np.float64)
    counts[:, :, 2] = 0
    mi, h = bootstrap.mutual_information(counts)
    for d in range(5):
        pe = metrics.positional_effect(counts[d])
        assert mi[d] == pytest.approx(pe.mi, rel=1e-10) and h[d] == pytest.approx(pe.entropy, rel=1e-10)
    mi32, _ = bootstrap.mutual_information(counts.astype(np.float32))
    np.testing.assert_allclose(mi32, mi, atol=1e-6)
    assert np.isnan(bootstrap.mutual_information(np.zeros((1, 3, 2)))[0][0])


def _pool(full: np.ndarray, size: int) -> np.ndarray:
    """(S, S, classes) counts summed into at most POOLED_CELLS x POOLED_CELLS cells, by hand."""
    c = min(bootstrap.POOLED_CELLS, size)
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    out = np.zeros((c, c, full.shape[-1]), dtype=np.int64)
    np.add.at(out, (y * c // size, x * c // size), full)
    return out.reshape(c * c, -1)


def _reference(clusters, labels, dy, dx, k, n_classes, seed, ignore=255):
    """The intervals by explicit resampling: every draw's images concatenated and scored from
    scratch (confusion, Hungarian, counts at full resolution, then pooled by hand)."""
    size = clusters.shape[-1]
    conf = metrics.confusion_matrix(clusters, labels, k, n_classes, ignore)
    mapping = metrics.hungarian_match(conf)[0]
    mapped = mapping[clusters]
    full = metrics.position_class_counts(mapped, n_classes)
    full_null = metrics.shifted_counts(mapped, n_classes, None, dy, dx)
    est = metrics.positional_scores(full, full_null)
    pe, pn = metrics.positional_effect(_pool(full, size)), metrics.positional_effect(_pool(full_null, size))
    centre = {"nmi": pe.nmi, "nmi_bias_aware": (pe.mi - pn.mi) / pe.entropy}
    draws = {m: [] for m in ("miou", "pixel_accuracy", "nmi", "nmi_bias_aware")}
    for idx in bootstrap.resample_indices(len(clusters), seed):
        c, lab = clusters[idx], labels[idx]
        conf_d = metrics.confusion_matrix(c, lab, k, n_classes, ignore)
        mapping_d = metrics.hungarian_match(conf_d)[0]
        s = metrics.segmentation_scores(conf_d, mapping_d)
        m = mapping_d[c]
        pos = metrics.positional_effect(_pool(metrics.position_class_counts(m, n_classes), size))
        null = metrics.positional_effect(_pool(metrics.shifted_counts(m, n_classes, None, dy[idx], dx[idx]), size))
        draws["miou"].append(s.miou)
        draws["pixel_accuracy"].append(s.pixel_accuracy)
        draws["nmi"].append(pos.nmi)
        draws["nmi_bias_aware"].append((pos.mi - null.mi) / pos.entropy)
    q = {m: np.quantile(v, [0.025, 0.975]) for m, v in draws.items()}
    scores = metrics.segmentation_scores(conf, mapping)
    # basic intervals: the estimate minus the draws' deviations from their centre, reversed
    estimate = {"miou": scores.miou, "pixel_accuracy": scores.pixel_accuracy, "nmi": est.nmi,
                "nmi_bias_aware": est.nmi_bias_aware}
    centre.update(miou=scores.miou, pixel_accuracy=scores.pixel_accuracy)
    top = {"miou": 1.0, "pixel_accuracy": 1.0, "nmi": 1.0, "nmi_bias_aware": 1.0}
    bottom = {"miou": 0.0, "pixel_accuracy": 0.0, "nmi": 0.0, "nmi_bias_aware": -np.inf}
    return {m: np.clip(estimate[m] - (q[m][::-1] - centre[m]), bottom[m], top[m]) for m in estimate}


@pytest.mark.parametrize("k,n_classes,size", [(4, 3, 40), (3, 3, 12)])  # K > C pooled; K = C, every pixel a cell
def test_segmentation_intervals_equal_explicit_resampling(array_backend, k, n_classes, size):
    backend = array_backend
    rng = np.random.default_rng(k)
    n = 9
    labels = np.zeros((n, size, size), np.int64)
    labels[:, size // 2:] = 1
    labels[:, :, size * 2 // 3:] = 2
    labels[:, :2] = 255
    base = np.where(labels == 255, 0, labels) % k
    clusters = np.where(rng.random((n, size, size)) < 0.7, base, rng.integers(0, k, (n, size, size))).astype(np.int16)
    dy, dx = metrics.random_shifts(n, size, seed=5)
    acc = ClusterMapScores(k, n_classes, size, backend, seed=11)
    for part in (slice(0, 4), slice(4, n)):  # two chunks, as the stages add them
        acc.add(backend.asarray(clusters[part]), backend.asarray(labels[part]),
                (backend.asarray(dy[part]), backend.asarray(dx[part])), 255)
    conf = backend.to_numpy(acc.confusion)
    mapping = metrics.hungarian_match(conf)[0]
    onehot = np.eye(n_classes, dtype=np.int64)[mapping]
    pos = metrics.positional_scores(backend.to_numpy(acc.counts) @ onehot, backend.to_numpy(acc.null_counts) @ onehot)
    got = score_intervals(acc, mapping, metrics.segmentation_scores(conf, mapping), pos)
    want = _reference(clusters.astype(np.int64), labels, dy, dx, k, n_classes, seed=11)
    for metric, (lo, hi) in want.items():
        assert got[f"{metric}_lo"] == pytest.approx(lo, abs=2e-6), metric
        assert got[f"{metric}_hi"] == pytest.approx(hi, abs=2e-6), metric
        assert got[f"{metric}_lo"] <= got[f"{metric}_hi"]


def test_mean_and_ratio_intervals_equal_explicit_resampling():
    rng = np.random.default_rng(1)
    values = rng.gamma(2.0, 1.0, (3, 25, 4))  # (layer, image, head), as attention_mi
    lo, hi = bootstrap.mean_interval(values, seed=2, axis=1)
    means = np.stack([values[:, idx].mean(1) for idx in bootstrap.resample_indices(25, 2)])
    np.testing.assert_allclose(lo, np.quantile(means, 0.025, axis=0), rtol=1e-12)
    np.testing.assert_allclose(hi, np.quantile(means, 0.975, axis=0), rtol=1e-12)
    hits, points = rng.integers(0, 5, 30).astype(float), rng.integers(5, 9, 30).astype(float)
    ratios = [hits[idx].sum() / points[idx].sum() for idx in bootstrap.resample_indices(30, 0)]
    assert bootstrap.ratio_interval(hits, points, 0) == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])))


def test_pck_intervals_resample_pairs_with_their_keypoints():
    rng = np.random.default_rng(4)
    pair = np.repeat([f"p{i:02d}" for i in range(20)], rng.integers(1, 6, 20))
    error, threshold = rng.random(len(pair)) * 20, np.full(len(pair), 50.0)
    row = pck.pck(error, threshold, pair, 0.2)
    codes = np.unique(pair)
    point, image = [], []
    for idx in bootstrap.resample_indices(len(codes), pck.SEED):
        sel = np.concatenate([np.flatnonzero(pair == codes[i]) for i in idx])
        correct = error[sel] <= 0.2 * threshold[sel]
        point.append(correct.mean())
        image.append(np.mean([np.mean(error[pair == codes[i]] <= 10.0) for i in idx]))
    assert (row["pck_point_lo"], row["pck_point_hi"]) == pytest.approx(tuple(np.quantile(point, [0.025, 0.975])))
    assert (row["pck_image_lo"], row["pck_image_hi"]) == pytest.approx(tuple(np.quantile(image, [0.025, 0.975])))
    assert row["pck_point_lo"] <= row["pck_point"] <= row["pck_point_hi"]
    empty = pck.pck(np.zeros(0), np.zeros(0), np.zeros(0, str), 0.1)
    assert empty["pck_point_lo"] is None and empty["pck_image_hi"] is None


def test_coverage_of_a_mean_and_of_a_pooled_ratio():
    """Sanity: over many test sets drawn from a known population, the 95 % intervals cover the
    truth about 95 % of the time (percentile bootstrap, n = 40: a little under)."""
    rng = np.random.default_rng(0)
    covered_mean = covered_ratio = 0
    trials = 300
    for t in range(trials):
        x = rng.exponential(1.0, 40)                      # true mean 1
        lo, hi = bootstrap.mean_interval(x, seed=t)
        covered_mean += lo <= 1.0 <= hi
        points = rng.integers(1, 8, 40).astype(float)      # true ratio 0.3
        hits = rng.binomial(points.astype(int), 0.3).astype(float)
        lo, hi = bootstrap.ratio_interval(hits, points, seed=t)
        covered_ratio += lo <= 0.3 <= hi
    assert 0.87 <= covered_mean / trials <= 0.99 and 0.88 <= covered_ratio / trials <= 0.99


def test_coverage_of_pixel_accuracy_with_rematching():
    """Sanity for the segmentation path: images whose clusters are a permutation of the classes
    with per-image noise; the pixel accuracy's interval covers the population's about 95 %."""
    be = get_backend("numpy")
    rng = np.random.default_rng(1)
    size, k, trials, n = 8, 3, 40, 30
    covered = 0
    for t in range(trials):
        labels = rng.integers(0, k, (n, size, size))
        noise = rng.beta(2, 8, n)[:, None, None]          # per-image error rate, mean 0.2
        flip = rng.random((n, size, size)) < noise
        clusters = np.where(flip, (labels + 2) % k, (labels + 1) % k)
        acc = ClusterMapScores(k, k, size, be, seed=t)
        acc.add(clusters.astype(np.int16), labels, (np.zeros(n, np.int64), np.zeros(n, np.int64)), 255)
        conf = be.to_numpy(acc.confusion)
        mapping = metrics.hungarian_match(conf)[0]
        scores = metrics.segmentation_scores(conf, mapping)
        pos = metrics.positional_scores(np.ones((2, 2, k)), np.ones((2, 2, k)))
        ci = score_intervals(acc, mapping, scores, pos)
        covered += ci["pixel_accuracy_lo"] <= 0.8 <= ci["pixel_accuracy_hi"]
    assert covered / trials >= 0.85, covered
