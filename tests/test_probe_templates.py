"""The decision rules of PROTOCOL.md section 9 (checks of 9.9) on hand-made and planted data."""
import numpy as np
import pytest

from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.stages.probe.templates import (
    ObjectSet, RoundTrace, _f1_thresholds, balanced_metrics, cosine_probe, evaluate_hyperplane, hard_negatives,
    hyperplane_probe, hyperplane_probes, image_labels,
)


def _patches(n_images=40, per=8, n_concepts=3, dim=8, seed=0, planted=0.0, present=2):
    """Patch objects of one category: each image holds ``present`` of the concepts, every patch
    one of them; concept 0's patches get ``planted`` times a shared unit direction."""
    rng = np.random.default_rng(seed)
    kinds = np.stack([rng.choice(n_concepts, present, replace=False) for _ in range(n_images)])
    image = np.repeat(np.arange(n_images), per)
    label = kinds[image, rng.integers(0, present, image.size)]
    x = rng.standard_normal((image.size, dim)).astype(np.float32)
    u = np.linalg.qr(np.random.default_rng(99).standard_normal((dim, dim)))[0][0]  # the same in every split
    x[label == 0] += (planted * u).astype(np.float32)
    pos = label[:, None] == np.arange(n_concepts)
    return ObjectSet(x, pos, ~pos, image, n_images)


def _tokens(present, dim=8, seed=0):
    """Class-token objects: one per image; positive where present, negative where absent."""
    rng = np.random.default_rng(seed)
    n = present.shape[0]
    return ObjectSet(rng.standard_normal((n, dim)).astype(np.float32), present, ~present, np.arange(n), n)


# --- balanced metrics ------------------------------------------------------------------------------

def test_balanced_metrics_on_a_hand_made_confusion_and_with_every_negative_duplicated():
    tp, fp, tn, fn = 8, 10, 30, 2
    tpr, tnr, fpr = 8 / 10, 30 / 40, 10 / 40
    precision = tpr / (tpr + fpr)
    expect = {"accuracy": (tpr + tnr) / 2, "precision": precision, "recall": tpr,
              "f1": 2 * precision * tpr / (precision + tpr)}
    got = balanced_metrics(np.array(tp), np.array(fp), np.array(tn), np.array(fn))
    doubled = balanced_metrics(np.array(tp), np.array(2 * fp), np.array(2 * tn), np.array(fn))
    for key, value in expect.items():
        assert float(got[key]) == pytest.approx(value, abs=1e-12)
        assert float(doubled[key]) == pytest.approx(value, abs=1e-12)


def test_balanced_metrics_elementwise_and_zero_where_undefined():
    m = balanced_metrics(np.array([0, 5, 0]), np.array([0, 0, 3]), np.array([4, 0, 0]), np.array([3, 0, 0]))
    np.testing.assert_allclose(m["recall"], [0, 1, 0])
    np.testing.assert_allclose(m["precision"], [0, 1, 0])   # TPR = FPR = 0 -> 0; no negatives -> FPR 0
    np.testing.assert_allclose(m["f1"], [0, 1, 0])
    np.testing.assert_allclose(m["accuracy"], [0.5, 0.5, 0.0])


# --- labels ----------------------------------------------------------------------------------------

def test_image_labels_thresholds():
    lab = np.zeros((3, 10, 10), np.uint8)
    lab[0].flat[:5] = 1                 # exactly 5 % -> present
    lab[0].flat[5:9] = 2                # 4 % -> neither present nor absent
    lab[1, :5] = 255                    # 50 labelled pixels: 3 of class 1 = 6 % -> present
    lab[1].flat[50:53] = 1
    lab[2] = 255                        # nothing labelled: no information
    present, absent = image_labels(lab, 4, 255)
    np.testing.assert_array_equal(present, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(absent, [[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]])


# --- cosine templates ------------------------------------------------------------------------------

def test_f1_threshold_prefers_the_largest_maximiser_and_treats_ties_as_one_candidate():
    cos = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.9, 0.1])
    pos = np.array([1, 0, 1, 0, 1, 0, 1, 1], bool)
    seg = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    t, f1 = _f1_thresholds(np, cos, pos, seg, 2)
    # segment 0 (P = 3): t 0.9 -> F1 0.5, 0.7 -> 2*2/(3+3) = 0.667, 0.5 -> 2*3/(6+3) = 0.667: largest t wins
    np.testing.assert_allclose(t, [0.7, 0.1])
    np.testing.assert_allclose(f1, [2 / 3, 1.0])


def test_cosine_threshold_with_empty_negative_support_is_the_minimum_cosine():
    present = np.zeros((40, 2), bool)
    present[:10, 0] = True              # train: exactly k = 10 images with concept 0: support = all of them
    present[10:, 1] = True
    train = _tokens(present, seed=1)
    test = _tokens(np.tile(present, (2, 1))[::-1].copy(), seed=2)
    test.negative[:, 0] = ~test.positive[:, 0]
    from rep_pipeline.pipeline.backend import get_backend

    rows, _ = cosine_probe(get_backend("numpy"), train, test, [0], [10], 2, 5, 0)
    x = train.features[:10]
    a = x.mean(0)
    cos = x @ a / np.linalg.norm(x, axis=1) / np.linalg.norm(a)
    for row in rows:                    # class tokens: D- is empty, t = min cos, F1 = 1 on the support
        assert row["threshold"] == pytest.approx(cos.min(), abs=1e-6)
    t, f1 = _f1_thresholds(np, cos, np.ones(10, bool), np.zeros(10, np.int64), 1)
    assert t[0] == pytest.approx(cos.min()) and f1[0] == 1.0


def _reference_cosine(train, test, concepts, ks, trials, q, seed, shared=False):
    """The documented trial, one (concept, k, trial) at a time with plain loops."""
    def images(s, c):
        with_c = np.unique(s.image[s.positive[:, c]])
        neg_imgs = np.unique(s.image[s.negative[:, c]])
        return with_c, np.setdiff1d(neg_imgs, with_c)

    out = {}
    for k in ks:
        for c in concepts:
            have, _ = images(train, c)
            have_test, without = images(test, c)
            if have.size < k + (q if shared else 0) or have_test.size < q or without.size < q:
                continue
            for t in range(trials):
                rng = np.random.default_rng([seed + t, c, k])
                if shared:                  # one split: support and positive queries drawn disjointly
                    drawn = rng.choice(have, k + q, replace=False)
                    sup, qp = drawn[:k], drawn[k:]
                else:
                    sup, qp = rng.choice(have, k, replace=False), rng.choice(have_test, q, replace=False)
                qn = rng.choice(without, q, replace=False)
                in_sup = np.isin(train.image, sup)
                x = train.features.astype(np.float64)
                dp, dm = x[in_sup & train.positive[:, c]], x[in_sup & train.negative[:, c]]
                a = dp.mean(0)

                def cos(z):
                    return z @ a / np.linalg.norm(z, axis=1) / np.linalg.norm(a)

                cp, cm = cos(dp), cos(dm)
                best, best_t = -1.0, None
                for cand in sorted(np.concatenate([cp, cm]), reverse=True):
                    tp, fp = (cp >= cand).sum(), (cm >= cand).sum()
                    f1 = 2 * tp / (tp + fp + len(cp))
                    if f1 > best + 1e-12:
                        best, best_t = f1, cand
                in_q = np.isin(test.image, np.concatenate([qp, qn]))
                z = test.features.astype(np.float64)
                said_p = cos(z[in_q & test.positive[:, c]]) >= best_t
                said_n = cos(z[in_q & test.negative[:, c]]) >= best_t
                out[c, k, t] = (said_p.sum(), said_n.sum(), (~said_n).sum(), (~said_p).sum(), best_t)
    return out


def test_cosine_probe_equals_a_slow_reference_loop(backend):
    train, test = _patches(seed=0, planted=1.0), _patches(seed=1, planted=1.0)
    test.features = backend.asarray(test.features)
    train.features = backend.asarray(train.features)
    rows, skipped = cosine_probe(backend, train, test, [0, 1, 2], [1, 3, 30], 4, 5, 7)
    train.features, test.features = backend.to_numpy(train.features), backend.to_numpy(test.features)
    ref = _reference_cosine(train, test, [0, 1, 2], [1, 3, 30], 4, 5, 7)
    assert {(r["concept"], r["k_shot"], r["trial"]) for r in rows} == set(ref)
    evaluated = {(c, k) for c, k, _ in ref}
    assert {(s["concept"], s["k_shot"]) for s in skipped} == {(c, k) for c in range(3) for k in (1, 3, 30)} - evaluated
    assert 0 < len(skipped) < 3         # k = 30 asks for more train images than some concepts have
    for row in rows:
        tp, fp, tn, fn, t = ref[row["concept"], row["k_shot"], row["trial"]]
        assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (tp, fp, tn, fn)
        assert row["threshold"] == pytest.approx(t, abs=1e-5)
        assert row["seed"] == 7 + row["trial"]


def test_cosine_probe_is_deterministic_and_finds_a_planted_direction():
    from rep_pipeline.pipeline.backend import get_backend

    be = get_backend("numpy")
    train = _patches(n_images=60, seed=0, planted=4.0, dim=16)
    test = _patches(n_images=60, seed=1, planted=4.0, dim=16)
    a = cosine_probe(be, train, test, [0, 1, 2], [5], 3, 10, 0)
    b = cosine_probe(be, train, test, [0, 1, 2], [5], 3, 10, 0)
    assert a == b
    acc = {c: np.mean([r["accuracy"] for r in a[0] if r["concept"] == c]) for c in range(3)}
    assert acc[0] > 0.9 and max(acc[1], acc[2]) < 0.8


def test_cosine_probe_skips_concepts_failing_a8_and_on_one_split_draws_queries_apart_from_support():
    from rep_pipeline.pipeline.backend import get_backend

    s = _patches(n_images=40, seed=3)
    s.positive[:, 2] = False
    s.positive[:3, 2] = True            # 3 positive objects: fewer than 10 (A8)
    have = np.unique(s.image[s.positive[:, 0]]).size
    k = have - 4                        # one split: k + query_images = have + 1 images must contain c
    rows, skipped = cosine_probe(get_backend("numpy"), s, s, [0, 2], [1, k], 2, 5, 0)
    reasons = {(x["concept"], x["k_shot"]): x["reason"] for x in skipped}
    assert "positive train objects" in reasons[2, 1] and (2, k) in reasons
    assert reasons[0, k] == f"{have} train images contain it (< {have + 1})"
    assert {(r["concept"], r["k_shot"]) for r in rows} == {(0, 1)}
    ref = _reference_cosine(s, s, [0], [1], 2, 5, 0, shared=True)
    assert [(r["tp"], r["fp"], r["tn"], r["fn"]) for r in rows] == [ref[0, 1, t][:4] for t in range(2)]


# --- hyperplane templates --------------------------------------------------------------------------

def _clouds(n=200, dim=16, seed=0, gap=4.0):
    """Two Gaussian clouds on either side of the origin along a random direction: concept 0 and 1."""
    u = np.random.default_rng(99).standard_normal(dim)
    u *= gap / 2 / np.linalg.norm(u)
    rng = np.random.default_rng(seed)
    y = np.arange(2 * n) % 2
    x = (rng.standard_normal((2 * n, dim)) + np.where(y[:, None] == 0, u, -u)).astype(np.float32)
    pos = y[:, None] == np.arange(2)
    return ObjectSet(x, pos, ~pos, np.arange(2 * n) // 4, n // 2)


def test_hyperplane_separates_two_gaussian_clouds_and_is_deterministic():
    train, test = _clouds(seed=0, gap=8.0), _clouds(seed=1, gap=8.0)
    rows, templates, skipped = hyperplane_probe(train, test, [0, 1], seed=3)
    assert skipped == [] and [r["accuracy"] for r in rows] == [1.0, 1.0]
    assert rows[0]["n_pos"] == 200 and rows[0]["k_shot"] is None and rows[0]["threshold"] == templates[0][1]
    again = hyperplane_probe(train, test, [0, 1], seed=3)
    assert again[0] == rows
    np.testing.assert_array_equal(again[1][0][0], templates[0][0])
    w, b = templates[1]
    assert evaluate_hyperplane(w, b, test, 1, seed=3) == rows[1]


def test_hard_negative_round_holds_the_top_scoring_negatives_of_the_previous_round():
    s = _patches(n_images=30, per=10, n_concepts=4, dim=8, seed=5, present=4)
    seen: dict[tuple[int, int], RoundTrace] = {}
    hyperplane_probe(s, s, [0, 1], seed=0, trace=lambda r: seen.__setitem__((r.concept, r.round), r), rounds=4)
    assert sorted(seen) == [(c, r) for c in (0, 1) for r in range(1, 5)]
    for c in (0, 1):
        n_pos = int(s.positive[:, c].sum())
        first = seen[c, 1]
        np.testing.assert_array_equal(first.pool, np.flatnonzero(s.negative[:, c]))  # 3:1, under the 20:1 cap
        assert first.negatives.size == 2 * n_pos and np.isin(first.negatives, first.pool).all()
        for r in range(1, 4):
            before, after = seen[c, r], seen[c, r + 1]
            scores = s.features[before.pool].astype(np.float64) @ before.w - before.b
            chosen = np.isin(before.pool, after.negatives)
            assert chosen.sum() == 2 * n_pos
            assert scores[chosen].min() >= scores[~chosen].max() - 1e-5


def test_hard_negatives_picks_the_top_scores_ties_to_the_earlier_entry():
    pool = np.array([10, 11, 12, 13, 14])
    np.testing.assert_array_equal(hard_negatives(np.array([0.1, 0.5, 0.3, 0.5, 0.3]), pool, 3), [11, 12, 13])
    np.testing.assert_array_equal(hard_negatives(np.zeros(5), pool, 9), pool)


def test_hyperplane_caps_the_pool_skips_by_a8_and_rejects_unknown_options():
    s = _patches(n_images=40, per=10, n_concepts=3, seed=6)
    s.positive[:, 2] = False
    s.positive[:12, 2] = True           # 12 positives, 388 negatives > 20 x 12
    s.negative[:, 2] = ~s.positive[:, 2]
    seen = {}
    rows, templates, skipped = hyperplane_probe(
        s, s, [1, 2], seed=0, rounds=1, trace=lambda r: seen.__setitem__(r.concept, r))
    assert seen[2].pool.size == 240 and seen[1].pool.size == int(s.negative[:, 1].sum())
    s.positive[:, 1] = False
    s.positive[:4, 1] = True
    s.negative[:, 1] = ~s.positive[:, 1]
    _, _, skipped = hyperplane_probe(s, s, [1], seed=0, rounds=1)
    assert skipped == [{"concept": 1, "k_shot": None, "reason": "4 positive train objects (< 10)"}]
    with pytest.raises(ConfigError, match="allowed"):
        hyperplane_probe(s, s, [1], seed=0, learning_rate=1.0)


def test_hyperplane_finds_a_planted_direction():
    train = _patches(n_images=40, per=10, dim=16, seed=0, planted=6.0)
    test = _patches(n_images=40, per=10, dim=16, seed=1, planted=6.0)
    rows, _, _ = hyperplane_probe(train, test, [0, 1], seed=0)
    acc = {r["concept"]: r["accuracy"] for r in rows}
    # raw features, A9's Adam at lr 1e-3 for 15 short epochs: the bias is still far from trained
    assert acc[0] > 0.8 and acc[0] > acc[1] + 0.15


def _reference_hyperplanes(train, concepts, seed, rounds=5, epochs=3, lr=1e-3, batch=256, ratio=20):
    """Section 9.3 and A9 as written, one concept at a time, one Python step per batch:
    ``torch.optim.Adam`` on (w, b), autograd through the batch's mean logistic loss, the
    features centred and the template mapped back (b = b' + w.mu). {c: (w, b, [N_1..N_R])}."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(train.features)
    mu = x.mean(0)
    x = x - mu
    out = {}
    for c in concepts:
        rng = np.random.default_rng([seed, c])
        pos, pool = np.flatnonzero(train.positive[:, c]), np.flatnonzero(train.negative[:, c])
        if pool.size > ratio * pos.size:
            pool = np.sort(rng.choice(pool, ratio * pos.size, replace=False))
        m = 2 * pos.size
        neg = np.sort(rng.choice(pool, m, replace=False)) if pool.size > m else pool
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=lr)
        seen = []
        for r in range(rounds):
            seen.append(neg)
            objs = np.concatenate([pos, neg])
            ys = np.concatenate([np.ones(pos.size), np.zeros(neg.size)]).astype(np.float32)
            for _ in range(epochs):
                perm = rng.permutation(objs.size)
                for lo in range(0, objs.size, batch):
                    at = perm[lo:lo + batch]
                    loss = F.binary_cross_entropy_with_logits(x[objs[at]] @ w - b, torch.from_numpy(ys[at]))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            if r < rounds - 1 and pool.size > m:
                with torch.no_grad():
                    scores = (x[pool] @ w - b).numpy().astype(np.float64)
                neg = pool[np.sort(np.argsort(-scores, kind="stable")[:m])]
        with torch.no_grad():
            out[c] = (w.numpy().copy(), float(b + w @ mu), seen)
    return out


def test_batched_hyperplanes_equal_the_sequential_algorithm():
    """Several sets (two patch sets of different sizes, a class-token set) trained as one batched
    problem give each concept the template, and every round the negatives, of A9 run alone."""
    sets = [(_patches(n_images=40, per=10, n_concepts=4, seed=5, present=4), [0, 1, 2, 3], 11),
            (_patches(n_images=25, per=12, n_concepts=3, dim=8, seed=8, present=2), [0, 1, 2], 12)]
    present = np.random.default_rng(3).random((120, 3)) < [0.5, 0.3, 0.1]
    sets.append((_tokens(present, seed=4), [0, 1, 2], 13))
    small = dict(batch=64, pool_ratio=3)  # many steps, partial batches, capped pools, one pool <= 2 |D+|
    seen = {}
    out = hyperplane_probes([(s, s, cs, seed) for s, cs, seed in sets],
                            trace=lambda i, r: seen.setdefault((i, r.concept), []).append(r), **small)
    for i, (s, cs, seed) in enumerate(sets):
        ref = _reference_hyperplanes(s, cs, seed, batch=64, ratio=3)
        rows, fitted, skipped = out[i]
        assert skipped == [] and sorted(fitted) == cs
        for c in cs:
            w, b, negatives = ref[c]
            scale = np.abs(w).max()
            np.testing.assert_allclose(fitted[c][0], w, rtol=0, atol=1e-5 * scale)
            assert fitted[c][1] == pytest.approx(b, rel=1e-5, abs=1e-5 * scale)
            assert len(seen[i, c]) == 5
            for r, n in zip(seen[i, c], negatives):
                np.testing.assert_array_equal(r.negatives, n)
        alone = hyperplane_probe(s, s, cs, seed, **small)
        assert alone[0] == rows
        for c in cs:
            np.testing.assert_array_equal(alone[1][c][0], fitted[c][0])


def test_cosine_template_reproduces_a_trial_of_the_probe():
    """The d4 figure's cosine masks come from ``cosine_template``: the same support and the same
    threshold as the probe's trial."""
    from rep_pipeline.pipeline.backend import get_backend
    from rep_pipeline.stages.probe.templates import cosine_probe, cosine_template

    train, test = _patches(seed=1, planted=2.0), _patches(seed=2, planted=2.0)
    rows, _ = cosine_probe(get_backend("numpy"), train, test, [0, 1], [5], trials=3, query_images=4, seed=7)
    for r in rows:
        a, t = cosine_template(train, r["concept"], 5, 7, trial=r["trial"])
        assert t == pytest.approx(r["threshold"], rel=1e-5) and a.shape == (8,)
