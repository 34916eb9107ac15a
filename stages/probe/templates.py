"""The decision rules of PROTOCOL.md section 9 on in-memory arrays: labels, metrics, templates.

No I/O and no Ray: the probe stage reads the store, builds one ``ObjectSet`` per (split,
category, embedding, layer) and calls the functions here. The cosine rule (9.4) is Array API
standard code on the features' own namespace and device (NumPy, CuPy, torch; the host-drawn
index lists cross with ``to_device``, counts come back with ``to_host``); per shot count k every (concept, trial) is one
row of a matrix, so support means, cosines and F1-optimal thresholds of all of them come
from a few matrix products and sorts. The hyperplane rule (9.3) trains with torch, every
template of every feature set handed over (``hyperplane_probes``) as one batched problem:
A9's schedule per template, Adam's update written out (torch's, per template), the logistic
gradient written out; the same code runs on the CPU or on CUDA, and CuPy features cross to
torch without a copy via DLPack.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterator, Sequence

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
    ties to the earlier entry, in pool order; all of ``pool`` when it has at most ``m``.

    What a stable sort of the scores, descending, would take, found by one partition: every
    entry above the m-th highest score, and the earliest of those equal to it."""
    if pool.size <= m:
        return pool
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():  # NaN sorts last; keep the sort's answer
        return pool[np.sort(np.argsort(-s, kind="stable")[:m])]
    cut = np.partition(s, s.size - m)[s.size - m]
    take = s > cut
    take[np.flatnonzero(s == cut)[:m - int(take.sum())]] = True
    return pool[take]


def _to_torch(a: Any, device: str) -> Any:
    """A NumPy or CuPy float32 array as a torch tensor on ``device`` (no copy where it can be
    shared: ``from_numpy`` on the host, DLPack from CuPy)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else torch.from_dlpack(a)
    return t.to(device=device, dtype=torch.float32)


@dataclass
class _Problem:
    """One template to train: a concept of one feature set, its pools and its generator."""

    concept: int
    source: int            # which training feature set (a row block of the stacked features)
    rng: np.random.Generator
    positives: np.ndarray
    pool: np.ndarray
    negatives: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # N_r of the current round

    def n_negatives(self, cfg: "HyperplaneSettings") -> int:
        """|N_r|: 2 |D+|, or all of D- if it is smaller (the same in every round)."""
        return min(cfg.negatives_per_positive * self.positives.size, self.pool.size)

    def steps(self, cfg: "HyperplaneSettings") -> int:
        """Adam steps per round: ``epochs`` passes over D+ plus N_r in batches, the last partial."""
        return cfg.epochs * -(-(self.positives.size + self.n_negatives(cfg)) // cfg.batch)


def _round_schedule(problems: list[_Problem], offsets: np.ndarray, cfg: "HyperplaneSettings",
                    n_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One round of every problem as (rows, labels, weights), each (steps, problems, batch).

    rows[s, k] is problem k's batch at its step s as rows of the stacked features: each
    epoch a permutation of D+ then N_r (from the problem's generator, drawn in the order the
    sequential algorithm draws them) cut into consecutive batches. Labels are 1 for D+;
    weights 1 / the batch's size, so a product with them is the batch mean; padding (the
    rest of a partial batch, the steps after a problem's last) has weight 0 and row 0."""
    b = cfg.batch
    rows = np.zeros((n_steps, len(problems), b), np.int64)
    labels = np.zeros((n_steps, len(problems), b), np.float32)
    weights = np.zeros((n_steps, len(problems), b), np.float32)
    for k, pr in enumerate(problems):
        objs = offsets[pr.source] + np.concatenate([pr.positives, pr.negatives])
        n, n_pos = objs.size, pr.positives.size
        per_epoch = -(-n // b)
        j = np.arange(n)
        step, slot = j // b, j % b
        size = np.minimum(b, n - step * b)  # the size of the batch each position falls in
        w = (1.0 / size).astype(np.float32)
        for e in range(cfg.epochs):
            perm = pr.rng.permutation(n)
            at = e * per_epoch + step
            rows[at, k, slot], labels[at, k, slot], weights[at, k, slot] = objs[perm], perm < n_pos, w
    return rows, labels, weights


def _adam_tables(steps: np.ndarray, done: np.ndarray, n_steps: int, cfg: "HyperplaneSettings",
                 betas: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Adam's bias corrections for one round, (steps, problems) each: lr / (1 - b1^t) and
    sqrt(1 - b2^t) at problem k's step count t = done[k] + s + 1 (1 where k has no step s)."""
    t = done[None, :] + np.arange(1, n_steps + 1)[:, None]
    t = np.where(np.arange(n_steps)[:, None] < steps[None, :], t, 1).astype(np.float64)
    return (cfg.lr / (1 - betas[0] ** t)).astype(np.float32), np.sqrt(1 - betas[1] ** t).astype(np.float32)


GATHER_BYTES = 1 << 20  # a step gathers its batches in chunks of about this size (a core's L2 cache)


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block (None: unchanged). The steps'
    operations are on cache-sized chunks, where waking a second thread costs more than it
    saves, and on a busy machine far more (a step waits for the slowest thread)."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _lanes(n: int) -> Iterator[Any]:
    """A pool of ``n - 1`` threads beside the caller's (torch's kernels release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, n - 1), thread_name_prefix="hyperplanes") as pool:
        yield pool


def _train(xs: list[Any], problems: list[_Problem], cfg: "HyperplaneSettings", device: str,
           trace: Callable[[int, RoundTrace], None] | None) -> tuple[np.ndarray, np.ndarray]:
    """Every problem's hyperplane as one batched problem: (W (P, D), b (P,)).

    ``xs`` are the training feature sets (N_j, D) as torch tensors; problem k trains on the
    rows of ``xs[problems[k].source]``. Each problem is trained exactly as alone (its own
    parameters, Adam state and step count, its own schedule), but the problems are stacked:
    the feature sets centred (each its own mean object subtracted), a column of -1 appended
    (so (w, b) is one row theta of a (P, D + 1) matrix and z.w - b one dot product), one
    (N, D + 1) matrix; the problems sorted by their steps per round, longest first, so those
    with a step s left are a prefix and their parameters and Adam moments contiguous views.
    A round's sample schedule is drawn before its steps (``_round_schedule``), and a step is
    one gather of every live problem's batch, two batched products (the logits and the
    logistic gradient, sigmoid(s) - y averaged over the batch, written out: no autograd) and
    Adam (torch's update, default betas and eps) on the prefix. Mining scores every object
    of a feature set under all its problems' templates in one product per set.

    The optimiser sees the features centred and the templates are mapped back to raw
    coordinates, b = b' + w.mu, as section 9.1 allows: on uncentred features Adam at lr 1e-3
    moves b about lr per step, and a template whose direction ranks the positives perfectly
    still misplaces its threshold. (Scaling the channels too would slow the separating
    directions, whose spread is the largest.)
    """
    import torch

    d = xs[0].shape[1]
    width = -(-(d + 1) // 16) * 16  # D + 1 columns padded to 64 bytes (zero columns stay zero)
    sizes = np.array([x.shape[0] for x in xs])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    stacked = torch.zeros((int(sizes.sum()), width), device=device)
    mus = torch.stack([x.mean(0) for x in xs])
    for x, mu, lo in zip(xs, mus, offsets):
        stacked[lo:lo + x.shape[0], :d] = x - mu
        stacked[lo:lo + x.shape[0], d] = -1.0
    steps = np.array([pr.steps(cfg) for pr in problems])
    order = np.argsort(-steps, kind="stable")          # position -> problem, longest first
    ordered = [problems[k] for k in order]
    steps = steps[order]
    n_steps = int(steps[0])
    live = [int(a) for a in (steps[None, :] > np.arange(n_steps)[:, None]).sum(1)]   # prefix length per step
    sources = np.array([pr.source for pr in ordered])
    members = [np.flatnonzero(sources == j) for j in range(len(xs))]
    betas, eps = (0.9, 0.999), 1e-8
    theta = torch.zeros((len(problems), width), device=device)
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    b = cfg.batch

    def raw() -> tuple[np.ndarray, np.ndarray]:
        w = theta[:, :d]
        bias = theta[:, d] + torch.einsum("pd,pd->p", w, mus[torch.from_numpy(sources).to(device)])
        back = np.empty(len(problems), np.int64)
        back[order] = np.arange(len(problems))
        return w.cpu().numpy()[back], bias.cpu().numpy()[back]

    # a step's batches in chunks of problems small enough to stay in a core's cache between the
    # gather and the two products (one problem at D = 768), into buffers allocated once
    # on the CPU split between threads, each its own gather buffer, one intra-op thread each
    chunk = max(1, GATHER_BYTES // (b * width * 4))
    lanes = torch.get_num_threads() if device == "cpu" else 1
    zbufs = [torch.empty((min(chunk, len(problems)) * b, width), device=device) for _ in range(lanes)]
    lbuf = torch.empty((len(problems), b, 1), device=device)
    gbuf = torch.empty((len(problems), 1, width), device=device)

    def gradients(s: int, lo: int, hi: int, zbuf: Any) -> None:
        """Problems lo..hi-1 at step s: their batches' mean logistic gradients into ``gbuf``."""
        for c0 in range(lo, hi, chunk):
            c1 = min(c0 + chunk, hi)
            z = torch.index_select(stacked, 0, rows[s, c0:c1].reshape(-1), out=zbuf[:(c1 - c0) * b])
            z = z.view(c1 - c0, b, width)
            dl = torch.bmm(z, theta[c0:c1, :, None], out=lbuf[c0:c1]).view(c1 - c0, b)
            dl.sigmoid_().sub_(labels[s, c0:c1]).mul_(weights[s, c0:c1])
            torch.bmm(dl.view(c1 - c0, 1, b), z, out=gbuf[c0:c1])

    ubuf, dbuf = torch.empty_like(theta), torch.empty_like(theta)
    for pr in ordered:
        n = pr.n_negatives(cfg)
        pr.negatives = np.sort(pr.rng.choice(pr.pool, n, replace=False)) if pr.pool.size > n else pr.pool
    for rnd in range(1, cfg.rounds + 1):
        schedule = _round_schedule(ordered, offsets, cfg, n_steps)
        rows, labels, weights = (torch.from_numpy(a).to(device) for a in schedule)
        step_size, bias2 = (torch.from_numpy(a).to(device)[..., None]
                            for a in _adam_tables(steps, (rnd - 1) * steps, n_steps, cfg, betas))
        with torch.no_grad(), _threads(1 if device == "cpu" else None), _lanes(lanes) as pool:
            for s in range(n_steps):
                a = live[s]
                cut = np.linspace(0, a, lanes + 1).astype(int) if a > chunk else np.array([0, a])
                done = [pool.submit(gradients, s, int(lo), int(hi), zbuf)
                        for lo, hi, zbuf in zip(cut[1:-1], cut[2:], zbufs[1:])]
                gradients(s, int(cut[0]), int(cut[1]), zbufs[0])
                for f in done:
                    f.result()
                g, th, m_a, v_a = gbuf[:a, 0], theta[:a], m[:a], v[:a]   # Adam on the prefix
                m_a.mul_(betas[0]).add_(g, alpha=1 - betas[0])
                v_a.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
                denom = torch.sqrt(v_a, out=dbuf[:a]).div_(bias2[s, :a]).add_(eps)
                th.sub_(torch.mul(m_a, step_size[s, :a], out=ubuf[:a]).div_(denom))
        with torch.no_grad():
            if rnd < cfg.rounds:  # per feature set, one product of its objects with its problems' templates
                scores = [(stacked[lo:lo + n] @ theta[ks].T).cpu().numpy() if ks.size else None
                          for lo, n, ks in zip(offsets, sizes, members)]
            w_host, b_host = raw()
        for k in range(len(problems)):
            pr = problems[k]
            if trace is not None:
                trace(k, RoundTrace(pr.concept, rnd, pr.pool, pr.negatives, w_host[k].copy(), float(b_host[k])))
        if rnd < cfg.rounds:
            for j, ks in enumerate(members):
                for col, i in enumerate(ks):
                    pr = ordered[i]
                    pr.negatives = hard_negatives(scores[j][pr.pool, col], pr.pool, pr.n_negatives(cfg))
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
    ``trace`` sees every (concept, round). ``hyperplane_probes`` trains several such sets at
    once.
    """
    tracer = None if trace is None else (lambda _, r: trace(r))
    return hyperplane_probes([(train, test, concepts, seed)], device, trace=tracer, **hyper)[0]


def hyperplane_probes(sets: Sequence[tuple[ObjectSet, ObjectSet, Sequence[int], int]], device: str = "cpu", *,
                      trace: Callable[[int, RoundTrace], None] | None = None,
                      **hyper: Any) -> list[tuple[list[dict], dict[int, tuple[np.ndarray, float]], list[dict]]]:
    """``hyperplane_probe`` of every (train, test, concepts, seed) of ``sets``, trained together.

    The result of each set is the one ``hyperplane_probe`` gives it alone (each template
    follows its own schedule and generator); the templates of all sets and concepts are one
    batched problem (``_train``), so the Python steps are those of the longest template, not
    their sum. Sets whose train objects are the same ``ObjectSet`` share its stacked rows.
    ``trace(i, r)`` sees every (concept, round) of set i. Cost: per step, one gather of every
    live template's batch and two batched products; steps 5 x 3 x 3 |D+|max / 256.
    """
    cfg = HyperplaneSettings.with_overrides(**hyper)
    skipped: list[list[dict]] = [[] for _ in sets]
    problems: dict[int, list[tuple[int, _Problem]]] = {}   # by feature width: (set, problem)
    sources: dict[int, int] = {}                           # id of a train ObjectSet -> its source
    xs: dict[int, list[Any]] = {}
    for i, (train, test, concepts, seed) in enumerate(sets):
        for c in concepts:
            why = _eligibility(train, test, c)
            if why is not None:
                skipped[i].append({"concept": int(c), "k_shot": None, "reason": why})
                continue
            rng = np.random.default_rng([seed, int(c)])
            pos, pool = np.flatnonzero(train.positive[:, c]), np.flatnonzero(train.negative[:, c])
            if pool.size > cfg.pool_ratio * pos.size:
                pool = np.sort(rng.choice(pool, cfg.pool_ratio * pos.size, replace=False))
            d = int(train.features.shape[1])
            if id(train) not in sources:
                xs.setdefault(d, []).append(_to_torch(train.features, device))
                sources[id(train)] = len(xs[d]) - 1
            problems.setdefault(d, []).append((i, _Problem(int(c), sources[id(train)], rng, pos, pool)))
    fitted: list[dict[int, tuple[np.ndarray, float]]] = [{} for _ in sets]
    for d, group in problems.items():
        tracer = None if trace is None else (lambda k, r, group=group: trace(group[k][0], r))
        w, b = _train(xs[d], [pr for _, pr in group], cfg, device, tracer)
        for k, (i, pr) in enumerate(group):
            fitted[i][pr.concept] = (w[k], float(b[k]))
    out = []
    for i, (train, test, concepts, seed) in enumerate(sets):
        ids = list(fitted[i])
        if not ids:
            out.append(([], {}, skipped[i]))
            continue
        w = np.stack([fitted[i][c][0] for c in ids])
        b = np.array([fitted[i][c][1] for c in ids], np.float32)
        counts = _hyperplane_counts(test.features, w, b, test.positive[:, ids], test.negative[:, ids])
        rows = [_row(c, None, 0, counts[k], b[k], seed) for k, c in enumerate(ids)]
        out.append((rows, fitted[i], skipped[i]))
    return out
