"""The decision rules of PROTOCOL.md section 9 on in-memory arrays: labels, metrics, templates.

No I/O and no Ray: the probe stage reads the store, builds one ``ObjectSet`` per (split,
category, embedding, layer) and calls the functions here. The cosine rule (9.4) is Array API
standard code on the features' own namespace and device (NumPy, CuPy, torch; the host-drawn
index lists cross with ``to_device``, counts come back with ``to_host``); per shot count k every (concept, trial) is one
row of a matrix, so support means, cosines and F1-optimal thresholds of all of them come
from a few matrix products and sorts. The hyperplane rule (9.3) trains with torch: autograd
gives the logistic gradient, ``torch.optim.Adam`` is the optimiser A9 names, the same code
runs on the CPU or on CUDA, and CuPy features cross to torch without a copy via DLPack.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Sequence

import numpy as np

from rep_pipeline.pipeline.backend import Backend, bincount, device, namespace, sparse_product, to_device, to_host
from rep_pipeline.pipeline.errors import ConfigError

MIN_TRAIN_POSITIVES = 10  # A8: a concept needs >= 10 positive train objects (and both classes in test)
ROW_KEYS = ("concept", "k_shot", "trial", "n_pos", "n_neg", "tp", "fp", "tn", "fn", "accuracy", "precision",
            "recall", "f1", "threshold", "seed")


@dataclass
class ObjectSet:
    """The objects of one split for one category: patches (or class tokens) as feature rows."""

    features: Any          # (N, D) float32 array on the backend (numpy or cupy)
    positive: np.ndarray   # (N, C) bool: object i is a positive of concept c
    negative: np.ndarray   # (N, C) bool: object i is a negative of concept c (same-category other concept
    #                        for patches, A7; for class tokens: c absent, A6)
    image: np.ndarray      # (N,) int: the image each object belongs to (0..n_images-1)
    n_images: int


# --- labels ----------------------------------------------------------------------------------------

def _chunks(n: int, per_item: int, budget: int = 1 << 23) -> list[slice]:
    step = max(1, budget // max(per_item, 1))
    return [slice(lo, min(lo + step, n)) for lo in range(0, n, step)]


def image_labels(labels: np.ndarray, n_classes: int, ignore_index: int,
                 min_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(present, absent), (n, C) bool each, from (n, S, S) label maps (A6).

    present: class c covers >= ``min_fraction`` of the image's labelled pixels (pixels that
    are neither ignore nor outside 0..C-1); absent: c covers no pixel. An image without any
    labelled pixel is neither for every class: it says nothing about presence.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    flat = labels.reshape(n, -1)
    counts = np.zeros((n, n_classes), dtype=np.int64)
    for sl in _chunks(n, flat.shape[1]):
        lab = flat[sl]
        ok = (lab != ignore_index) & (lab < n_classes)
        img = np.broadcast_to(np.arange(lab.shape[0])[:, None], lab.shape)
        key = img[ok] * n_classes + lab[ok]
        counts[sl] = np.bincount(key, minlength=lab.shape[0] * n_classes).reshape(-1, n_classes)
    labelled = counts.sum(1, keepdims=True)
    share = counts / np.maximum(labelled, 1)
    present = (counts > 0) & (share >= min_fraction - 1e-12)  # exactly min_fraction counts as present
    absent = (counts == 0) & (labelled > 0)
    return present, absent


# --- balanced metrics (9.5) ------------------------------------------------------------------------

def _namespace(*arrays: Any) -> Any:
    """NumPy or CuPy, whichever holds the arrays (CuPy is only looked up, never imported here)."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            return sys.modules["cupy"]
    return np


def balanced_metrics(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, Any]:
    """accuracy, precision, recall, f1 of section 9.5, elementwise over arrays of counts.

    TPR = TP/P, TNR = TN/N, FPR = FP/N with P = TP + FN, N = TN + FP (each 0 when its
    denominator is); accuracy = (TPR + TNR)/2, precision = TPR/(TPR + FPR), recall = TPR,
    F1 their harmonic mean, 0 where undefined. This reweights positives and negatives to
    equal mass (A11), so duplicating every negative changes nothing.
    """
    xp = _namespace(tp, fp, tn, fn)
    tp, fp, tn, fn = (xp.asarray(a, dtype=xp.float64) for a in (tp, fp, tn, fn))
    pos, neg = tp + fn, tn + fp

    def ratio(a: Any, b: Any) -> Any:
        return xp.where(b > 0, a / xp.where(b > 0, b, 1.0), 0.0)

    tpr, tnr, fpr = ratio(tp, pos), ratio(tn, neg), ratio(fp, neg)
    precision = ratio(tpr, tpr + fpr)
    f1 = ratio(2 * precision * tpr, precision + tpr)
    return {"accuracy": (tpr + tnr) / 2, "precision": precision, "recall": tpr, "f1": f1}


def _row(concept: int, k_shot: int | None, trial: int, counts: Sequence[int], threshold: float, seed: int) -> dict:
    tp, fp, tn, fn = (int(c) for c in counts)
    metrics = balanced_metrics(np.array(tp), np.array(fp), np.array(tn), np.array(fn))
    return {"concept": int(concept), "k_shot": k_shot, "trial": int(trial), "n_pos": tp + fn, "n_neg": tn + fp,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, **{k: float(v) for k, v in metrics.items()},
            "threshold": float(threshold), "seed": int(seed)}


def _eligibility(train: ObjectSet, test: ObjectSet, concept: int) -> str | None:
    """Why ``concept`` is not evaluated (A8), or None."""
    n_train = int(train.positive[:, concept].sum())
    if n_train < MIN_TRAIN_POSITIVES:
        return f"{n_train} positive train objects (< {MIN_TRAIN_POSITIVES})"
    if not test.positive[:, concept].any():
        return "no positive test object"
    if not test.negative[:, concept].any():
        return "no negative test object"
    return None


# --- cosine templates (9.4) ------------------------------------------------------------------------

@dataclass
class _Images:
    """Objects grouped by image, and per (image, concept) how many positives / negatives."""

    order: np.ndarray      # object ids sorted by image
    starts: np.ndarray     # (n_images,) first position of each image in ``order``
    counts: np.ndarray     # (n_images,) objects per image
    n_pos: np.ndarray      # (n_images, C) positive objects of c in the image
    n_neg: np.ndarray      # (n_images, C)

    @classmethod
    def of(cls, s: ObjectSet) -> "_Images":
        image = np.asarray(s.image, dtype=np.int64)
        counts = np.bincount(image, minlength=s.n_images)
        n_c = s.positive.shape[1]

        def per_image(mask: np.ndarray) -> np.ndarray:
            obj, c = np.nonzero(mask)
            return np.bincount(image[obj] * n_c + c, minlength=s.n_images * n_c).reshape(s.n_images, n_c)

        return cls(np.argsort(image, kind="stable"), np.cumsum(counts) - counts, counts,
                   per_image(s.positive), per_image(s.negative))

    def containing(self, c: int) -> np.ndarray:
        """Images with a positive object of c."""
        return np.flatnonzero(self.n_pos[:, c] > 0)

    def without(self, c: int) -> np.ndarray:
        """Images with no positive and at least one negative object of c (class tokens: c absent)."""
        return np.flatnonzero((self.n_pos[:, c] == 0) & (self.n_neg[:, c] > 0))

    def expand(self, seg: np.ndarray, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(object, segment) pairs: every object of image ``img[j]`` paired with ``seg[j]``."""
        n = self.counts[img]
        local = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        return self.order[np.repeat(self.starts[img], n) + local], np.repeat(seg, n)


def _labelled_pairs(s: ObjectSet, images: _Images, concept_of_seg: np.ndarray, seg: np.ndarray,
                    img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The objects of the given images that are positive or negative for their segment's concept:
    (object, segment, is_positive)."""
    obj, sg = images.expand(seg, img)
    c = concept_of_seg[sg]
    pos, neg = s.positive[obj, c], s.negative[obj, c]
    keep = pos | neg
    return obj[keep], sg[keep], pos[keep]


def _row_norms(xp: Any, x: Any) -> Any:
    xp = namespace(x)
    return xp.sqrt(xp.linalg.vecdot(x, x))


def _pair_cosines(be: Backend, x: Any, norms: Any, directions: Any, obj: np.ndarray, seg: np.ndarray,
                  block: int = 16384) -> Any:
    """cos(x[obj[j]], directions[seg[j]]) for every pair j: the objects that occur in any pair
    against all directions, as one matrix product (blocked over rows to bound temporaries).
    The pairs are host index lists; they cross to the features' device explicitly."""
    xp, dev = namespace(x, directions), device(x)
    used = np.zeros(x.shape[0], dtype=bool)
    used[obj] = True
    rows = np.flatnonzero(used)
    where = np.cumsum(used) - 1
    unit = directions / xp.clip(_row_norms(xp, directions), min=1e-30)[:, None]
    n_dir = directions.shape[0]
    cos = xp.empty((rows.size, n_dir), dtype=xp.float32, device=dev)
    for lo in range(0, rows.size, block):
        r = to_device(rows[lo:lo + block], x)
        hi = lo + r.shape[0]
        cos[lo:hi, :] = (xp.take(x, r, axis=0) @ unit.T) / xp.clip(xp.take(norms, r), min=1e-30)[:, None]
    pick = to_device(where[obj].astype(np.int64) * n_dir + np.asarray(seg, dtype=np.int64), x)
    return xp.take(xp.reshape(cos, (-1,)), pick)


def _stable_argsort(xp: Any, a: Any) -> Any:
    """A stable argsort (the standard's ``stable=True``; NumPy's by ``kind="stable"``)."""
    return namespace(a).argsort(a, stable=True)


def _sort_within(xp: Any, seg: Any, key: Any) -> Any:
    """Order putting segments in ascending order and, inside each, ``key`` descending; equal
    keys keep their input order (two stable sorts, as ``lexsort`` does)."""
    xp = namespace(seg, key)
    first = _stable_argsort(xp, -key)
    return xp.take(first, _stable_argsort(xp, xp.take(seg, first)))


def _f1_thresholds(xp: Any, cos: Any, is_pos: Any, seg: Any, n_seg: int) -> tuple[Any, Any]:
    """Per segment, the F1-optimal threshold over its candidates and the F1 it reaches (Eq. 3).

    Candidates are the segment's cosines; the threshold t predicts cos >= t. Sorting each
    segment by cosine descending turns (TP, FP) at every candidate into running sums; tied
    cosines are one candidate, read at the last of the tie. F1 = 2TP/(TP + FP + P) is compared
    as TP/(TP + FP + P), a correctly rounded quotient of integers, so equal F1s compare equal
    and the first maximiser in descending order (the largest t) wins.
    """
    xp, dev = namespace(cos, is_pos, seg), device(cos)
    order = _sort_within(xp, seg, cos)
    c, p, s = xp.take(cos, order), xp.astype(xp.take(is_pos, order), xp.float64), xp.take(seg, order)
    n = s.shape[0]
    sizes = bincount(s, n_seg)
    starts = xp.cumulative_sum(sizes) - sizes
    n_pos = bincount(s, n_seg, weights=p)
    run = xp.cumulative_sum(p)
    before = xp.take(xp.concat([xp.zeros(1, dtype=run.dtype, device=dev), run]), starts)
    tp = run - xp.take(before, s)
    fp = xp.astype(xp.arange(n, dtype=xp.int64, device=dev) - xp.take(starts, s) + 1, xp.float64) - tp
    last = xp.ones(n, dtype=xp.bool, device=dev)
    last[:-1] = (s[1:] != s[:-1]) | (c[1:] != c[:-1])
    score = xp.where(last, tp / (tp + fp + xp.take(n_pos, s)), -1.0)
    best = xp.take(_sort_within(xp, s, score), starts)
    return xp.take(c, best), 2 * xp.take(score, best)


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(pool, size=n, replace=False)


def cosine_template(train: ObjectSet, concept: int, k: int, seed: int, trial: int = 0) -> tuple[np.ndarray, float]:
    """The direction a and threshold t of one trial of ``cosine_probe`` with two splits (the
    same support images, drawn from the same generator), for figures: (a (D,), t)."""
    images = _Images.of(train)
    rng = np.random.default_rng([seed + trial, int(concept), int(k)])
    support = _draw(rng, images.containing(concept), k)
    x = train.features.get() if hasattr(train.features, "get") else np.asarray(train.features)
    chosen = np.isin(train.image, support)
    pos, neg = chosen & train.positive[:, concept], chosen & train.negative[:, concept]
    a = x[pos].mean(0)
    objects = np.flatnonzero(pos | neg)
    cos = x[objects] @ a / (np.linalg.norm(x[objects], axis=1) * np.linalg.norm(a) + 1e-30)
    order = np.argsort(-cos, kind="stable")                   # highest first
    cos, is_pos = cos[order], pos[objects][order]
    last = np.r_[cos[1:] != cos[:-1], True]                   # the last of each run of equal cosines
    tp, fp = np.cumsum(is_pos)[last], np.cumsum(~is_pos)[last]  # counts at t = each distinct cosine
    f1 = 2 * tp / (tp + fp + is_pos.sum())
    return a, float(cos[last][int(np.argmax(f1))])             # among equal F1 the largest t


def cosine_probe(be: Backend, train: ObjectSet, test: ObjectSet, concepts: Sequence[int], ks: Sequence[int],
                 trials: int, query_images: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Section 9.4 for every concept, k and trial; returns (rows, skipped).

    Support comes from ``train``, queries from ``test``. A trial of (concept c, k) draws k
    train images containing c (a positive object of c), ``query_images`` test images
    containing c and ``query_images`` test images without it (no positive and at least one
    negative object of c: for class tokens, c absent). With two splits, c is skipped at k
    when train has fewer than k images containing it or test fewer than ``query_images``
    with or without it; when ``test is train`` the support and the positive queries come
    disjointly from one pool, and the rule is 9.4's literal "k + 50 containing, 50 without".
    Concepts failing A8 are skipped at every k. D+ / D- are the support images' positive /
    negative objects of c (A7), the query objects all objects of the query images labelled
    in c's category (A10).

    Trial t has seed ``seed + t`` (seeds 0..9 for the default run seed 0); its images come
    from ``np.random.default_rng([seed + t, c, k])``, so a trial does not depend on the other
    concepts or ks asked for. Per k, the (concept, trial) pairs are rows of one computation:
    support means = a sparse selection matrix times per-(image, concept) sums of the
    positive features (themselves one sparse product with the features), cosines of all
    support (query) objects to all directions one product, thresholds from two segmented
    sorts, counts from ``bincount``.
    """
    rows: list[dict] = []
    skipped: list[dict] = []
    shared = test is train
    tr_img = _Images.of(train)
    te_img = tr_img if shared else _Images.of(test)
    n_c = train.positive.shape[1]
    x_tr, x_te = train.features, test.features
    xp = namespace(x_tr, x_te)
    norms_tr = _row_norms(xp, x_tr)
    norms_te = norms_tr if shared else _row_norms(xp, x_te)

    # per (image, concept) sums of positive features: one sparse product with the features
    obj, cc = np.nonzero(train.positive)
    key = np.asarray(train.image, dtype=np.int64)[obj] * n_c + cc
    order = np.argsort(key, kind="stable")
    keys, sizes = np.unique(key[order], return_counts=True)
    gather_rows = np.repeat(np.arange(keys.size), sizes)
    sums = sparse_product(to_device(gather_rows, x_tr), to_device(obj[order], x_tr),
                          to_device(np.ones(obj.size, np.float32), x_tr), (keys.size, x_tr.shape[0]), x_tr)

    reasons = {c: _eligibility(train, test, c) for c in concepts}
    for k in ks:
        plan: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]] = []
        for c in concepts:
            if reasons[c] is not None:
                skipped.append({"concept": int(c), "k_shot": int(k), "reason": reasons[c]})
                continue
            have, without = tr_img.containing(c), te_img.without(c)
            need = k + query_images if shared else k
            test_have = have.size if shared else te_img.containing(c).size
            why = (f"{have.size} train images contain it (< {need})" if have.size < need else
                   f"{test_have} test images contain it (< {query_images})" if test_have < query_images else
                   f"{without.size} test images without it (< {query_images})" if without.size < query_images else None)
            if why is not None:
                skipped.append({"concept": int(c), "k_shot": int(k), "reason": why})
                continue
            for t in range(trials):
                rng = np.random.default_rng([seed + t, int(c), int(k)])
                if shared:
                    drawn = _draw(rng, have, k + query_images)
                    support, qpos = drawn[:k], drawn[k:]
                else:
                    support, qpos = _draw(rng, have, k), _draw(rng, te_img.containing(c), query_images)
                plan.append((int(c), t, support, qpos, _draw(rng, without, query_images)))
        if not plan:
            continue
        n_seg = len(plan)
        concept_of = np.array([p[0] for p in plan])
        support = np.stack([p[2] for p in plan])                                 # (R, k)
        queries = np.concatenate([np.stack([p[3] for p in plan]), np.stack([p[4] for p in plan])], 1)

        # directions: a = mean of D+ (raw features, Eq. 2)
        sel_rows = np.searchsorted(keys, support * n_c + concept_of[:, None])     # (R, k) rows of ``sums``
        n_plus = tr_img.n_pos[support, concept_of[:, None]].sum(1)
        weights = np.repeat(1.0 / n_plus, k).astype(np.float32)
        directions = sparse_product(to_device(np.repeat(np.arange(n_seg), k), sums),
                                    to_device(sel_rows.ravel().astype(np.int64), sums), to_device(weights, sums),
                                    (n_seg, keys.size), sums)

        # thresholds on the support objects (D+ and D-)
        seg_ids = np.arange(n_seg)
        s_obj, s_seg, s_pos = _labelled_pairs(train, tr_img, concept_of, np.repeat(seg_ids, k), support.ravel())
        s_cos = _pair_cosines(be, x_tr, norms_tr, directions, s_obj, s_seg)
        thresholds, _ = _f1_thresholds(xp, s_cos, to_device(s_pos, s_cos), to_device(s_seg, s_cos), n_seg)

        # counts on the query objects
        q = queries.shape[1]
        q_obj, q_seg, q_pos = _labelled_pairs(test, te_img, concept_of, np.repeat(seg_ids, q), queries.ravel())
        q_cos = _pair_cosines(be, x_te, norms_te, directions, q_obj, q_seg)
        seg_d, pos_d = to_device(q_seg, q_cos), to_device(q_pos, q_cos)
        said = q_cos >= xp.take(thresholds, seg_d)
        counts = [to_host(bincount(seg_d, n_seg, weights=xp.astype(m, xp.float64))).astype(np.int64)
                  for m in (said & pos_d, said & ~pos_d, ~said & ~pos_d, ~said & pos_d)]   # tp, fp, tn, fn
        t_host = to_host(thresholds)
        for r, (c, t, *_) in enumerate(plan):
            rows.append(_row(c, int(k), t, [cn[r] for cn in counts], t_host[r], seed + t))
    rows.sort(key=lambda row: (row["concept"], row["k_shot"], row["trial"]))
    return rows, skipped


# --- hyperplane templates (9.3) --------------------------------------------------------------------

@dataclass(frozen=True)
class HyperplaneSettings:
    """Section 9.3 and A9; ``hyperplane_probe(..., **overrides)`` replaces fields by name."""

    rounds: int = 5                  # hard-negative mining rounds
    epochs: int = 3                  # epochs per round
    lr: float = 1e-3                 # Adam, default betas, no weight decay
    batch: int = 256
    negatives_per_positive: int = 2  # |N_r| = 2 |D+| (all of D- if smaller)
    pool_ratio: int = 20             # |D-| <= 20 |D+| ("no more than 20 : 1")

    @classmethod
    def with_overrides(cls, **overrides: Any) -> "HyperplaneSettings":
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown hyperplane option(s) {unknown}; allowed: {allowed}")
        return replace(cls(), **overrides)


@dataclass(frozen=True)
class RoundTrace:
    """What ``hyperplane_probe(trace=...)`` sees after each round of one concept."""

    concept: int
    round: int               # 1-based
    pool: np.ndarray         # D- after the 20:1 cap (train object ids)
    negatives: np.ndarray    # N_r, the negatives this round trained on
    w: np.ndarray            # the template after this round
    b: float


def hard_negatives(scores: Any, pool: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` entries of ``pool`` with the highest ``scores`` (w . z - b of each pool entry),
    ties to the earlier entry, in pool order; all of ``pool`` when it has at most ``m``."""
    if pool.size <= m:
        return pool
    s = np.asarray(scores, dtype=np.float64)
    top = np.argsort(-s, kind="stable")[:m]
    return pool[np.sort(top)]


def _to_torch(a: Any, device: str) -> Any:
    """A NumPy or CuPy float32 array as a torch tensor on ``device`` (no copy where it can be
    shared: ``from_numpy`` on the host, DLPack from CuPy)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else torch.from_dlpack(a)
    return t.to(device=device, dtype=torch.float32)


@dataclass
class _Concept:
    """One concept's training state: its pools, its generator, its parameters."""

    concept: int
    rng: np.random.Generator
    positives: np.ndarray
    pool: np.ndarray
    negatives: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # N_r of the current round


def _round_schedule(states: list[_Concept], batch: int, epochs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one round: (objects (C, steps, batch), labels, valid) with -1 / False padding. Each
    concept runs ``epochs`` shuffles of D+ plus N_r in batches (the last of an epoch partial)."""
    per: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
    for st in states:
        objs = np.concatenate([st.positives, st.negatives])
        ys = np.concatenate([np.ones(st.positives.size, np.float32), np.zeros(st.negatives.size, np.float32)])
        bo, by = [], []
        for _ in range(epochs):
            perm = st.rng.permutation(objs.size)
            bo += np.array_split(objs[perm], range(batch, objs.size, batch))
            by += np.array_split(ys[perm], range(batch, objs.size, batch))
        per.append((bo, by))
    steps = max(len(bo) for bo, _ in per)
    obj = np.full((len(states), steps, batch), -1, dtype=np.int64)
    lab = np.zeros((len(states), steps, batch), dtype=np.float32)
    for i, (bo, by) in enumerate(per):
        for s, (o, y) in enumerate(zip(bo, by)):
            obj[i, s, :o.size], lab[i, s, :o.size] = o, y
    return obj, lab, obj >= 0


class _RowAdam:
    """Adam (torch's update, default betas and eps, no weight decay) over the rows of one
    parameter matrix, each row with its own step count: a step updates only the rows given,
    so every concept's template follows exactly the trajectory it would have alone, while
    one vectorised step serves all concepts (``torch.optim.Adam`` over one tensor per concept
    gave the same trajectories at several times the per-step cost)."""

    def __init__(self, param: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        import torch

        self.param, self.lr, (self.b1, self.b2), self.eps = param, lr, betas, eps
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)
        self.steps = torch.zeros(param.shape[0], dtype=torch.float64, device=param.device)

    def step(self, rows: Any, grad: Any) -> None:
        self.steps[rows] += 1
        t = self.steps[rows].view(-1, *([1] * (grad.dim() - 1)))
        m = self.m[rows].mul_(self.b1).add_(grad, alpha=1 - self.b1)
        v = self.v[rows].mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        self.m[rows], self.v[rows] = m, v
        bias1, bias2 = (1 - self.b1 ** t).to(grad.dtype), (1 - self.b2 ** t).to(grad.dtype)
        denom = (v.sqrt() / bias2.sqrt()).add_(self.eps)
        self.param[rows] -= (self.lr / bias1) * m / denom


def _train(x: Any, states: list[_Concept], cfg: HyperplaneSettings, device: str,
           trace: Callable[[RoundTrace], None] | None) -> tuple[np.ndarray, np.ndarray]:
    """Every concept's hyperplane, trained side by side: (W (C, D), b (C,)).

    Each concept has its own row of W and b and its own Adam state (``_RowAdam``); a step
    gathers the current batch of every concept that still has one this round and updates
    those rows only, so each concept is trained exactly as alone, on its own data, while one
    step serves all of them. The logistic loss's gradient is written out (sigmoid(s) - y per
    object, averaged over the concept's batch): no autograd graph per step. Mining scores
    every pool object of every concept in one product.

    The optimiser sees the features centred (the split's mean object subtracted) and the
    templates are mapped back to raw coordinates, b = b' + w.mu, as section 9.1 allows: on
    uncentred features Adam at lr 1e-3 moves b about lr per step, and a template whose
    direction ranks the positives perfectly still misplaces its threshold. (Scaling the
    channels too would slow the separating directions, whose spread is the largest.)
    """
    import torch

    mu = x.mean(0)
    x = x - mu

    def raw(W: Any, B: Any) -> tuple[np.ndarray, np.ndarray]:
        return W.cpu().numpy(), (B + W @ mu).cpu().numpy()

    d = x.shape[1]
    W = torch.zeros((len(states), d), device=device)
    B = torch.zeros(len(states), device=device)
    adam_w, adam_b = _RowAdam(W, cfg.lr), _RowAdam(B, cfg.lr)
    for st in states:
        m = cfg.negatives_per_positive * st.positives.size
        st.negatives = np.sort(st.rng.choice(st.pool, m, replace=False)) if st.pool.size > m else st.pool
    for rnd in range(1, cfg.rounds + 1):
        obj, lab, valid = _round_schedule(states, cfg.batch, cfg.epochs)
        obj_t = torch.from_numpy(np.maximum(obj, 0)).to(device)
        lab_t, valid_t = torch.from_numpy(lab).to(device), torch.from_numpy(valid).to(device)
        live = valid.any(2)                                                  # (C, steps)
        with torch.no_grad():
            for s in range(obj.shape[1]):
                a = torch.from_numpy(np.flatnonzero(live[:, s])).to(device)
                z = x[obj_t[a, s]]                                           # (A, batch, D)
                logits = torch.einsum("abd,ad->ab", z, W[a]) - B[a, None]
                v = valid_t[a, s].to(z.dtype)
                dl = (torch.sigmoid(logits) - lab_t[a, s]) * v / v.sum(1, keepdim=True)
                adam_w.step(a, torch.einsum("ab,abd->ad", dl, z))
                adam_b.step(a, -dl.sum(1))
            if rnd < cfg.rounds:  # one product of every pool object with every template (row blocks)
                scored = np.unique(np.concatenate([st.pool for st in states]))
                where = np.full(x.shape[0], -1, dtype=np.int64)
                where[scored] = np.arange(scored.size)
                scores = np.concatenate([(x[torch.from_numpy(part).to(device)] @ W.T - B).cpu().numpy()
                                         for part in np.array_split(scored, range(65536, scored.size, 65536))])
            w_host, b_host = raw(W, B)
        for i, st in enumerate(states):
            if trace is not None:
                trace(RoundTrace(st.concept, rnd, st.pool, st.negatives, w_host[i].copy(), float(b_host[i])))
            if rnd < cfg.rounds:
                m = cfg.negatives_per_positive * st.positives.size
                st.negatives = hard_negatives(scores[where[st.pool], i], st.pool, m)
    return w_host, b_host


def _hyperplane_counts(features: Any, w: Any, b: Any, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """(C, 4) counts tp, fp, tn, fn of templates w (C, D), b (C,) on the objects labelled
    positive / negative (N, C); one product of the labelled objects with all templates."""
    xp = _namespace(features)
    labelled = np.flatnonzero((positive | negative).any(1))
    said = (features[xp.asarray(labelled)] @ xp.asarray(w, dtype=xp.float32).T - xp.asarray(b, dtype=xp.float32)) >= 0
    said = np.asarray(said.get() if xp is not np else said)
    pos, neg = positive[labelled], negative[labelled]
    return np.stack([(said & pos).sum(0), (said & neg).sum(0), (~said & neg).sum(0), (~said & pos).sum(0)], 1)


def evaluate_hyperplane(w: np.ndarray, b: float, test: ObjectSet, concept: int, seed: int = 0) -> dict:
    """A row of counts and balanced metrics of a (stored) template (w, b) on the test objects of
    ``concept`` (positives: label c, negatives: the other concepts of its category)."""
    counts = _hyperplane_counts(test.features, np.asarray(w)[None], np.asarray([b]),
                                test.positive[:, [concept]], test.negative[:, [concept]])[0]
    return _row(concept, None, 0, counts, b, seed)


def evaluate_hyperplanes(train: ObjectSet, test: ObjectSet, fitted: dict[int, tuple[np.ndarray, float]],
                         concepts: Sequence[int], seed: int) -> tuple[list[dict], list[dict]]:
    """(rows, skipped) of stored templates ``fitted`` {concept: (w, b)}, as ``hyperplane_probe``
    would give them: the same eligibility (A8), every eligible concept in one product."""
    skipped, ids = [], []
    for c in concepts:
        why = _eligibility(train, test, c)
        if why is not None:
            skipped.append({"concept": int(c), "k_shot": None, "reason": why})
        else:
            ids.append(int(c))
    if not ids:
        return [], skipped
    w = np.stack([np.asarray(fitted[c][0], np.float32) for c in ids])
    b = np.asarray([fitted[c][1] for c in ids], np.float32)
    counts = _hyperplane_counts(test.features, w, b, test.positive[:, ids], test.negative[:, ids])
    return [_row(c, None, 0, counts[i], float(b[i]), seed) for i, c in enumerate(ids)], skipped


def hyperplane_probe(train: ObjectSet, test: ObjectSet, concepts: Sequence[int], seed: int, device: str = "cpu", *,
                     trace: Callable[[RoundTrace], None] | None = None,
                     **hyper: Any) -> tuple[list[dict], dict[int, tuple[np.ndarray, float]], list[dict]]:
    """Section 9.3 for every concept; returns (rows, templates {concept: (w (D,), b)}, skipped).

    Pools from ``train``: D+ = positives of c, D- = its negatives (A7), capped at random to
    ``pool_ratio`` |D+|. Logistic loss on w . z - b (positive iff >= 0), w = 0, b = 0, Adam
    (lr 1e-3, batch 256, float32, A9), ``rounds`` rounds of ``epochs`` epochs on D+ plus N_r
    (2 |D+| negatives: random in round 1, then the top scorers of D- under the previous
    round's template), parameters and Adam state carried across rounds (warm start). The
    features enter raw: no standardisation. Concept c draws from
    ``np.random.default_rng([seed, c])``: the stage passes the seed of its (embedding, layer),
    so the seed is per (concept, embedding, layer) as A9 asks; rows report ``seed``.
    Concepts failing A8 go to ``skipped``. ``hyper`` overrides ``HyperplaneSettings`` fields;
    ``trace`` sees every (concept, round). Cost: one Python step per batch of the largest
    concept (5 x 3 x 3 |D+|max / 256 steps), each a batched product over all concepts.
    """
    cfg = HyperplaneSettings.with_overrides(**hyper)
    skipped: list[dict] = []
    states: list[_Concept] = []
    for c in concepts:
        why = _eligibility(train, test, c)
        if why is not None:
            skipped.append({"concept": int(c), "k_shot": None, "reason": why})
            continue
        rng = np.random.default_rng([seed, int(c)])
        pos, pool = np.flatnonzero(train.positive[:, c]), np.flatnonzero(train.negative[:, c])
        if pool.size > cfg.pool_ratio * pos.size:
            pool = np.sort(rng.choice(pool, cfg.pool_ratio * pos.size, replace=False))
        states.append(_Concept(int(c), rng, pos, pool))
    if not states:
        return [], {}, skipped
    w, b = _train(_to_torch(train.features, device), states, cfg, device, trace)
    ids = [st.concept for st in states]
    counts = _hyperplane_counts(test.features, w, b, test.positive[:, ids], test.negative[:, ids])
    rows = [_row(c, None, 0, counts[i], b[i], seed) for i, c in enumerate(ids)]
    return rows, {c: (w[i], float(b[i])) for i, c in enumerate(ids)}, skipped
