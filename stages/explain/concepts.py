"""Per-image concepts, segments and their scores (PROTOCOL.md sections 10.3, 10.4, 10.5).

Everything here works on the arrays of one image in memory: the P explanation maps S_i of its
patch tokens (rows of a (P, P) matrix, row-major G x G patches), its S x S label map and the
store's (G, G, D) tokens. No I/O: the explain stage reads, calls these functions per image,
and pools what they return (confusions are summed over the split, ITIoU averaged over images).

Conventions this module fixes where PROTOCOL.md leaves a detail open:

- Min-max scaling M(S) (``pipeline/arrays.py``) is applied per map; a constant map scales to
  0 everywhere. The upsampled scaled map is M(S~_i) = minmax(upsample(S_i))
  (``pipeline/upsample.py``: ``scaled_upsampled``), which equals minmax(upsample(M(S_i)))
  because upsampling is linear with weights summing to one.
- Clustering (10.3, A17): average linkage on cosine distances of the scaled rows M(S_i).
  A row of zeros (a constant map) has no direction: it is at distance 0 from every other
  zero row and at distance 1 from every non-zero row (1 is the largest cosine distance two
  non-negative vectors can have), so all constant maps of an image form one cluster of their
  own at any cut zeta < 1, and join others only at a coarse ``k``. Rows that are exactly
  equal are at distance exactly 0 and distinct rows at a distance of at least machine
  epsilon, so zeta = 0 yields one cluster per distinct map whatever the floating-point
  rounding of 1 - cos (10.11).
- Segments (Eq. 8): argmax over concepts, ties to the lower concept id; concepts that win no
  pixel are dropped and the surviving ids renumbered 0..k_n-1 in concept order. The map is
  uint8 (section 10.9), uint16 only where more than 256 segments survive (tiny zeta on a
  large grid).
- A patch's segment is the segment covering most of its footprint (ties to the lower id);
  a patch's *label* follows the Conventions' rule (``pipeline/footprints.py``: majority class
  with at least half of the footprint, ignore pixels counting in the footprint but not in the
  vote, else no label).
- Confusions of the per-image oracle are (predicted class, true class), as ``mapped`` in
  the evaluate stage; the split's score sums them before ``oracle_scores``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import squareform

from rep_pipeline.pipeline.arrays import minmax
from rep_pipeline.pipeline.config import IGNORE_INDEX
from rep_pipeline.pipeline.errors import ConfigError, LabelValueError
from rep_pipeline.pipeline.footprints import footprint_cells
from rep_pipeline.pipeline.upsample import scaled_upsampled

AGGREGATES = ("sum", "mean")


# --- footprints: patch labels and patch segments (Conventions, A1) ---------------------------------

def _footprint_counts(values: np.ndarray, valid: np.ndarray, grid: int, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts (P, n_bins) of each value among the valid pixels of each footprint, areas (P,)
    of the footprints with invalid pixels included)."""
    size = values.shape[0]
    cell = footprint_cells(size, size, grid)
    area = np.bincount(cell, minlength=grid * grid)
    ok = valid.ravel()
    key = cell[ok] * n_bins + values.ravel()[ok].astype(np.int64)
    counts = np.bincount(key, minlength=grid * grid * n_bins).reshape(grid * grid, n_bins)
    return counts, area


def patch_segments(segments: np.ndarray, grid: int) -> np.ndarray:
    """(S, S) segment map -> (P,) int64: the segment covering most of each patch's footprint
    (ties to the lower id). Segment maps have no ignore, so every patch gets one."""
    segments = _square(segments, "segments")
    counts, _ = _footprint_counts(segments, np.ones(segments.shape, bool), grid, int(segments.max()) + 1)
    return counts.argmax(1).astype(np.int64)


def _square(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ConfigError(f"{name} must be one square S x S map, got shape {a.shape}")
    return a


# --- concept discovery (10.3) ----------------------------------------------------------------------

def cosine_distances(rows: np.ndarray) -> np.ndarray:
    """(P, P) float64 cosine distances of the rows, with the conventions of the module
    docstring: zero rows at 0 from each other and 1 from the rest; equal rows at exactly 0,
    distinct rows at >= machine epsilon."""
    x = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    zero = norms == 0
    unit = x / np.where(zero, 1.0, norms)[:, None]
    d = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    _, group = np.unique(x, axis=0, return_inverse=True)
    group = group.ravel()
    same = group[:, None] == group[None, :]
    d = np.where(same, 0.0, np.maximum(d, np.finfo(np.float64).eps))
    either = zero[:, None] | zero[None, :]
    d = np.where(either & ~same, 1.0, d)   # zero vs non-zero: 1 (zero vs zero is "same": 0)
    np.fill_diagonal(d, 0.0)
    return d


def cluster(maps: np.ndarray, zeta: float = 0.4, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Agglomerative clustering of the scaled maps M(S_i) (rows of ``maps``, (P, P)) (A17).

    Average linkage on cosine distances, cut at distance ``zeta`` or, if ``k`` is given,
    into at most ``k`` clusters (scipy's ``maxclust``; ties in the dendrogram can give
    fewer, A18). Returns (labels (P,) int64 in 0..k_n-1, the (P-1, 4) linkage matrix for a
    dendrogram). Zero rows and exact ties are handled as the module docstring says.
    """
    maps = np.asarray(maps)
    if maps.ndim != 2:
        raise ConfigError(f"cluster expects maps as rows (P, P), got shape {maps.shape}")
    if k is None and not zeta >= 0:
        raise ConfigError(f"zeta must be >= 0, got {zeta}")
    if k is not None and k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    n = maps.shape[0]
    if n < 2:
        return np.zeros(n, dtype=np.int64), np.zeros((0, 4))
    tree = linkage(squareform(cosine_distances(maps), checks=False), method="average")
    if k is None:
        flat = fcluster(tree, t=zeta, criterion="distance")
    else:
        flat = fcluster(tree, t=k, criterion="maxclust")
    return np.unique(flat, return_inverse=True)[1].ravel().astype(np.int64), tree


def concept_maps(labels: np.ndarray, upsampled: np.ndarray, aggregate: str = "sum") -> np.ndarray:
    """Sigma_c (Eq. 7): (k_n, S, S) float32, the sum (or mean) of M(S~_i) over the tokens i of
    each cluster c, from cluster ``labels`` (P,) in 0..k_n-1 and ``upsampled`` (P, S, S)."""
    if aggregate not in AGGREGATES:
        raise ConfigError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    labels = np.asarray(labels, dtype=np.int64)
    upsampled = np.asarray(upsampled, dtype=np.float32)
    if labels.shape != upsampled.shape[:1]:
        raise ConfigError(f"{labels.shape[0]} cluster labels for {upsampled.shape[0]} maps")
    n_concepts = int(labels.max()) + 1
    onehot = np.zeros((n_concepts, labels.size), dtype=np.float32)
    onehot[labels, np.arange(labels.size)] = 1.0
    if aggregate == "mean":
        onehot /= np.maximum(onehot.sum(1, keepdims=True), 1.0)
    size = upsampled.shape[1:]
    return (onehot @ upsampled.reshape(labels.size, -1)).reshape(n_concepts, *size)


def segment_map(concepts: np.ndarray) -> np.ndarray:
    """Eq. 8: (k_n, S, S) concept maps -> (S, S) segment ids, argmax (ties to the lower
    concept), renumbered 0..k_n-1 over the concepts that win a pixel; uint8 (uint16 beyond
    256 segments)."""
    winner = np.asarray(concepts).argmax(0)
    _, compact = np.unique(winner, return_inverse=True)
    dtype = np.uint8 if compact.max(initial=0) < 256 else np.uint16
    return compact.reshape(winner.shape).astype(dtype)


def segment_image(maps: np.ndarray, grid: int, size: int, zeta: float = 0.4, k: int | None = None,
                  aggregate: str = "sum", scaled: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """10.3 for one image: patch maps (P, P) (rows S_i after the self-fill) -> (segment map
    (S, S), token clusters (P,), linkage matrix). ``scaled``: M(S~_i) if already computed."""
    labels, tree = cluster(minmax(maps, axis=-1), zeta=zeta, k=k)
    scaled = scaled_upsampled(maps, grid, size) if scaled is None else scaled
    segments = segment_map(concept_maps(labels, scaled, aggregate))
    return segments, labels, tree


# --- segment descriptors (10.4 `dataset`) ---------------------------------------------------------

def segment_descriptors(segments: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """(k_n, D) float32: per segment, the L2-normalised mean of the raw tokens of the patches
    whose footprint lies mostly in it (``patch_segments``).

    A segment that is the majority of no patch footprint (a sliver) takes the mean over every
    patch whose footprint overlaps it at all, unweighted. An id with no pixel at all (only
    possible for a non-compact map) gets a row of zeros. ``tokens`` (G, G, D) may be float16;
    the arithmetic is float32.
    """
    segments = _square(segments, "segments")
    tokens = np.asarray(tokens, dtype=np.float32)
    grid, dim = tokens.shape[0], tokens.shape[-1]
    flat = tokens.reshape(grid * grid, dim)
    n_segments = int(segments.max()) + 1
    counts, _ = _footprint_counts(segments, np.ones(segments.shape, bool), grid, n_segments)  # (P, k_n)
    member = np.zeros_like(counts, dtype=bool)
    member[np.arange(counts.shape[0]), counts.argmax(1)] = True
    empty = ~member.any(0)
    member[:, empty] = counts[:, empty] > 0                      # slivers: every overlapping patch
    weights = member.astype(np.float32)
    means = (weights.T @ flat) / np.maximum(weights.sum(0), 1.0)[:, None]
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    return np.where(norms > 0, means / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)


# --- the per-image oracle (10.4 `per_image`) ---------------------------------------------------------

def per_image_confusion(segments: np.ndarray, labels: np.ndarray, n_classes: int, ignore: int = IGNORE_INDEX) -> np.ndarray:
    """(C, C) int64 pixel counts (predicted class, true class) of one image after matching its
    segments to classes: Hungarian (maximal overlap) between its segments and the classes
    present in its labelled pixels, every unmatched segment to its majority class (A19).
    Ignore pixels are dropped; an image without labelled pixels gives zeros."""
    segments, labels = _square(segments, "segments"), _square(labels, "labels")
    if segments.shape != labels.shape:
        raise ConfigError(f"segments {segments.shape} and labels {labels.shape} differ in size")
    keep = labels != ignore
    if (labels[keep] >= n_classes).any() or (labels[keep] < 0).any():
        bad = np.unique(labels[keep][(labels[keep] >= n_classes) | (labels[keep] < 0)])
        raise LabelValueError(f"label values {bad.tolist()} outside 0..{n_classes - 1} (ignore = {ignore})")
    seg = segments[keep].astype(np.int64)
    lab = labels[keep].astype(np.int64)
    n_segments = int(segments.max()) + 1
    overlap = np.bincount(seg * n_classes + lab, minlength=n_segments * n_classes).reshape(n_segments, n_classes)
    present = np.flatnonzero(overlap.sum(0) > 0)
    mapping = overlap.argmax(1)                              # majority class for the unmatched
    if present.size:
        rows, cols = linear_sum_assignment(overlap[:, present], maximize=True)
        mapping[rows] = present[cols]
    return np.bincount(mapping[seg] * n_classes + lab, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes).astype(np.int64)


def oracle_scores(confusion: np.ndarray) -> dict[str, float]:
    """{miou, pixel_accuracy} of a (predicted, true) confusion: mIoU over the classes with a
    non-empty union (NaN if none), accuracy = trace / total (NaN if empty)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    has = union > 0
    total = confusion.sum()
    return {"miou": float((tp[has] / union[has]).mean()) if has.any() else float("nan"),
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan")}


# --- object selection and ITIoU (10.5) ----------------------------------------------------------------

def token_masks(upsampled_scaled: np.ndarray, tau: float) -> np.ndarray:
    """Binary masks M_i = [M(S~_i) >= tau] (A20), bool like the maps. ``tau`` is compared in
    the maps' dtype, so the sweep and single thresholds agree exactly."""
    maps = np.asarray(upsampled_scaled)
    return maps >= np.asarray(tau, dtype=maps.dtype)


def _labelled(token_labels: np.ndarray, ignore: int, n_maps: int) -> tuple[np.ndarray, np.ndarray]:
    token_labels = np.asarray(token_labels, dtype=np.int64).ravel()
    if token_labels.size != n_maps:
        raise ConfigError(f"{token_labels.size} token labels for {n_maps} maps")
    tokens = np.flatnonzero(token_labels != ignore)
    return tokens, token_labels[tokens]


def _class_mean_of_token_means(iou: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Mean over classes of the mean over each class's tokens; ``iou`` (n_tokens, ...)."""
    uniq, which = np.unique(classes, return_inverse=True)
    sums = np.zeros((uniq.size,) + iou.shape[1:])
    np.add.at(sums, which.ravel(), iou)
    per_class = sums / np.bincount(which.ravel(), minlength=uniq.size).reshape((-1,) + (1,) * (iou.ndim - 1))
    return per_class.mean(0)


def itiou_image(upsampled_scaled: np.ndarray, token_labels: np.ndarray, labels: np.ndarray, tau: float = 0.2,
                ignore: int = IGNORE_INDEX) -> tuple[float, int]:
    """ITIoU_n of one image (Eq. 17) at threshold ``tau``: (value, labelled tokens).

    For each labelled token i (``token_labels`` (P,), ``ignore`` = unlabelled) of class c,
    IoU(M_i, G_c) with ignore pixels removed from both masks; the image's value is the mean
    over classes present among its labelled tokens of the mean over their tokens. (NaN, 0)
    when no token is labelled. An IoU with an empty union (only if a token's class has no
    pixel in ``labels``, which the footprint rule excludes) counts as 0.
    """
    maps = np.asarray(upsampled_scaled)
    tokens, classes = _labelled(token_labels, ignore, maps.shape[0])
    if tokens.size == 0:
        return float("nan"), 0
    lab = np.asarray(labels).ravel()
    valid = lab != ignore
    masks = token_masks(maps[tokens].reshape(tokens.size, -1), tau) & valid
    truth = lab[None, :] == classes[:, None]
    inter = (masks & truth).sum(1)
    union = masks.sum(1) + truth.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return float(_class_mean_of_token_means(iou, classes)), int(tokens.size)


def itiou_sweep(upsampled_scaled: np.ndarray, token_labels: np.ndarray, labels: np.ndarray, taus: Sequence[float],
                ignore: int = IGNORE_INDEX, chunk: int = 32) -> tuple[np.ndarray, int]:
    """ITIoU_n of one image at every threshold of ``taus`` in one pass: ((len(taus),), tokens).

    Each labelled token's valid pixels are binned by how many thresholds they reach
    (``searchsorted``), so mask and intersection sizes at every tau come from cumulative
    counts; equal to ``itiou_image`` per tau. ``chunk`` tokens are binned at a time.
    """
    maps = np.asarray(upsampled_scaled)
    taus = np.asarray(taus, dtype=maps.dtype).ravel()
    tokens, classes = _labelled(token_labels, ignore, maps.shape[0])
    if tokens.size == 0:
        return np.full(taus.size, np.nan), 0
    order = np.argsort(taus, kind="stable")
    sorted_taus = taus[order]
    n_t = taus.size
    lab = np.asarray(labels).ravel()
    valid = lab != ignore
    lab_valid = lab[valid]
    class_size = np.bincount(lab_valid.astype(np.int64), minlength=int(classes.max()) + 1)[classes]
    mask_size = np.zeros((tokens.size, n_t), dtype=np.int64)
    inter = np.zeros((tokens.size, n_t), dtype=np.int64)
    for lo in range(0, tokens.size, chunk):
        sel = slice(lo, min(lo + chunk, tokens.size))
        values = maps[tokens[sel]].reshape(-1, lab.size)[:, valid]            # (t, V)
        reached = np.searchsorted(sorted_taus, values, side="right")          # taus <= value
        rows = np.arange(values.shape[0])[:, None] * (n_t + 1)
        hist = np.bincount((rows + reached).ravel(), minlength=values.shape[0] * (n_t + 1)).reshape(-1, n_t + 1)
        hit = lab_valid[None, :] == classes[sel, None]
        hist_in = np.bincount((rows + reached)[hit], minlength=values.shape[0] * (n_t + 1)).reshape(-1, n_t + 1)
        # pixels >= sorted tau t are those that reach more than t thresholds
        mask_size[sel] = np.cumsum(hist[:, ::-1], 1)[:, ::-1][:, 1:]
        inter[sel] = np.cumsum(hist_in[:, ::-1], 1)[:, ::-1][:, 1:]
    union = mask_size + class_size[:, None] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    values = np.empty(n_t)
    values[order] = _class_mean_of_token_means(iou, classes)
    return values, int(tokens.size)
