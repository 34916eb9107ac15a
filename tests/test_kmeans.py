"""The k-means engine on planted data, against independent references (torch, SVD)."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from rep_pipeline.pipeline.kmeans import LloydKMeans, OnlineKMeans, PCAInit, l2_normalize


def _planted(k=6, d=32, n=6000, noise=0.15, seed=0, shared=0.0):
    """Unit vectors around k orthogonal centres (plus a ``shared`` common direction, as ViT
    features have), cluster sizes falling geometrically."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    centers = l2_normalize(np, shared * basis[k] + basis[:k])
    sizes = np.geomspace(1, 0.3, k)
    labels = rng.choice(k, n, p=sizes / sizes.sum())
    x = l2_normalize(np, centers[labels] + noise * rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    return x, labels, centers


def _match(a, b):
    """Mean cosine of the best one-to-one matching of two centroid sets."""
    sim = a @ b.T
    r, c = linear_sum_assignment(-sim)
    return sim[r, c].mean(), sim[r, c].min()


def _pca(be, x, k, seed=0):
    init = PCAInit(be, x.shape[1])
    for part in np.array_split(x, 4):
        init.add(be.asarray(part))
    return init.centroids(k, seed)


def _lloyd(be, x, ks, tol=1e-4, batch=1000):
    trainer = LloydKMeans(be, [_pca(be, x, k) for k in ks], len(x), tol, 100)
    curve = []
    while not trainer.done:
        for off in range(0, len(x), batch):
            trainer.accumulate(be.asarray(x[off:off + batch]), off)
        curve.append(trainer.update())
    return [be.to_numpy(c) for c in trainer.centroids()], curve


@pytest.mark.parametrize("seed,shared", [(0, 0.0), (1, 0.0), (2, 0.7), (3, 0.7)])
def test_lloyd_recovers_planted_clusters(array_backend, seed, shared):
    x, labels, centers = _planted(seed=seed, shared=shared)
    (cents,), curve = _lloyd(array_backend, x, (6,))
    mean, worst = _match(cents, centers)
    assert worst > 0.98
    assign = np.argmax(x @ cents.T, axis=1)
    purity = sum(np.bincount(labels[assign == j]).max() for j in range(6) if (assign == j).any()) / len(x)
    assert purity > 0.99
    assert curve[-1][0][1] < 1e-4  # stopped because assignments no longer change
    again, _ = _lloyd(array_backend, x, (6,))
    np.testing.assert_array_equal(again[0], cents)  # deterministic


def test_online_recovers_planted_clusters_agrees_with_lloyd_and_loss_falls(array_backend):
    x, _, centers = _planted()
    trainer = OnlineKMeans(array_backend, [_pca(array_backend, x, 6)], lr=5e-3)
    rng = np.random.default_rng(1)
    losses = []
    for _ in range(600):
        losses.append(float(array_backend.to_numpy(trainer.step(array_backend.asarray(x[rng.integers(0, len(x), 256)])))[0]))
    online = array_backend.to_numpy(trainer.centroids()[0])
    assert _match(online, centers)[1] > 0.97
    (lloyd,), _ = _lloyd(array_backend, x, (6,))
    assert _match(online, lloyd)[1] > 0.98
    assert np.mean(losses[-50:]) < np.mean(losses[:10]) - 0.05


def test_online_step_equals_torch_adam_on_the_same_loss(array_backend):
    x, _, _ = _planted(n=2000)
    rng = np.random.default_rng(2)
    inits = [l2_normalize(np, rng.standard_normal((k, 32))).astype(np.float32) for k in (4, 9)]
    ours = OnlineKMeans(array_backend, [array_backend.asarray(c) for c in inits], lr=5e-3)
    params = [torch.tensor(c, requires_grad=True) for c in inits]
    opt = torch.optim.Adam(params, lr=5e-3)
    for step in range(25):
        batch = x[step * 80:(step + 1) * 80]
        got = array_backend.to_numpy(ours.step(array_backend.asarray(batch)))
        opt.zero_grad()
        losses = [-(torch.from_numpy(batch) @ (w / w.norm(dim=1, keepdim=True)).T).max(1).values.mean() for w in params]
        sum(losses).backward()
        opt.step()
        np.testing.assert_allclose(got, [float(v.detach()) for v in losses], rtol=1e-5, atol=1e-6)
    for mine, w in zip(ours.centroids(), params):
        np.testing.assert_allclose(array_backend.to_numpy(mine), (w / w.norm(dim=1, keepdim=True)).detach().numpy(),
                                   atol=1e-5)


def test_pca_init_matches_svd_and_pads_beyond_the_rank(array_backend):
    x, _, _ = _planted(d=16, k=8)
    raw = x * 3 + 1  # raw embeddings are neither unit nor centred
    comps = array_backend.to_numpy(_pca(array_backend, raw, 5))
    _, _, vt = np.linalg.svd(raw - raw.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs((comps * vt[:5]).sum(1)), 1.0, atol=1e-4)
    wide = array_backend.to_numpy(_pca(array_backend, raw, 20))
    assert wide.shape == (20, 16)
    np.testing.assert_allclose(np.linalg.norm(wide, axis=1), 1.0, atol=1e-5)


def test_codebooks_trained_together_equal_codebooks_trained_alone(array_backend):
    x, _, _ = _planted()
    together, _ = _lloyd(array_backend, x, (4, 6, 8))
    for k, joint in zip((4, 6, 8), together):
        (alone,), _ = _lloyd(array_backend, x, (k,))
        if k <= 6:
            np.testing.assert_array_equal(joint, alone)
        else:  # over-clustered: the shared product's rounding may move a borderline vector
            assert _match(joint, alone)[1] > 0.995


def test_a_cluster_that_loses_every_vector_keeps_its_centroid(array_backend):
    """Every vector lies near +e1; a centroid at -e1 wins none of them in the first pass and must
    stay exactly where it was, while the others move to their means."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32) * 0.1
    x[:, 0] += 1.0
    x = l2_normalize(np, x)
    far = np.zeros(8, dtype=np.float32)
    far[0] = -1.0
    inits = np.stack([x[0], x[1], far])
    km = LloydKMeans(array_backend, [array_backend.asarray(inits)], n_vectors=len(x), tol=0.0, max_iter=5)
    km.accumulate(array_backend.asarray(x), 0)
    km.update()
    cents = array_backend.to_numpy(km.centroids()[0])
    np.testing.assert_array_equal(cents[2], far)
    assert np.isfinite(cents).all() and not np.allclose(cents[:2], inits[:2])
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-5)
