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
- Arrays (``docs/architecture.md``, "Array code"): the array math here is Array API standard
  code on its inputs' own namespace and device (NumPy, CuPy, torch; the inputs of one call
  share one), with the same results on NumPy as the NumPy original, bit for bit. The
  hierarchical clustering is SciPy's and runs on the host: ``cluster`` computes the cosine
  distances where its maps are, takes them to the host (``to_host``) for ``linkage`` and
  brings the labels back (``to_device``), the one crossing of a segmentation; its linkage
  matrix (a dendrogram) stays a NumPy array. ``per_image_confusion`` takes its small
  segment x class overlap to the host for SciPy's Hungarian step, as ``metrics.
  hungarian_match`` does, and returns the confusion on the inputs' device. Host tables
  (footprint cells, thresholds, interpolation weights) cross with ``to_device``. Results
  that are numbers (``itiou_image``, ``oracle_scores``) come back as Python floats.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from array_api_compat import is_array_api_obj
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import squareform

from rep_pipeline.pipeline.arrays import minmax
from rep_pipeline.pipeline.backend import bincount, device, namespace, to_device, to_host
from rep_pipeline.pipeline.config import IGNORE_INDEX
from rep_pipeline.pipeline.errors import ConfigError, LabelValueError
from rep_pipeline.pipeline.footprints import footprint_cells
from rep_pipeline.pipeline.upsample import scaled_upsampled

AGGREGATES = ("sum", "mean")
_SAME_TOL = 1e-6    # cosine distance up to which two rows are checked for exact equality


def _array(a: Any) -> Any:
    """An Array API array as it is; anything else (a list, a scalar) as a NumPy array."""
    return a if is_array_api_obj(a) else np.asarray(a)


def _arange(xp: Any, n: int, like: Any) -> Any:
    return xp.arange(n, dtype=xp.int64, device=device(like))


# --- footprints: patch labels and patch segments (Conventions, A1) ---------------------------------

def footprint_counts(values: Any, valid: Any, grid: int, n_bins: int) -> tuple[Any, Any]:
    """(counts (P, n_bins) int64 of each value among the valid pixels of each footprint,
    areas (P,) of the footprints with invalid pixels included), on ``values``' device.
    ``valid`` None: every pixel (invalid pixels go to one bin past the end)."""
    xp = namespace(values)
    size, p = values.shape[0], grid * grid
    cell = to_device(footprint_cells(size, size, grid), like=values)      # a host table
    area = bincount(cell, p)
    key = cell * n_bins + xp.astype(xp.reshape(values, (-1,)), xp.int64)
    if valid is None:
        return xp.reshape(bincount(key, p * n_bins), (p, n_bins)), area
    end = xp.asarray(p * n_bins, dtype=xp.int64, device=device(values))
    key = xp.where(xp.reshape(valid, (-1,)), key, end)
    return xp.reshape(bincount(key, p * n_bins + 1)[:-1], (p, n_bins)), area


def patch_segments(segments: Any, grid: int) -> Any:
    """(S, S) segment map -> (P,) int64: the segment covering most of each patch's footprint
    (ties to the lower id). Segment maps have no ignore, so every patch gets one."""
    segments = _square(segments, "segments")
    xp = namespace(segments)
    counts, _ = footprint_counts(segments, None, grid, int(xp.max(segments)) + 1)
    return xp.astype(xp.argmax(counts, axis=1), xp.int64)


def _square(a: Any, name: str) -> Any:
    a = _array(a)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ConfigError(f"{name} must be one square S x S map, got shape {tuple(a.shape)}")
    return a


# --- concept discovery (10.3) ----------------------------------------------------------------------

def _row_groups(x: Any, d: Any, zero: Any) -> Any:
    """(P,) int64: for each row of ``x``, the first row exactly equal to it (itself if none
    before it), so rows i and j are equal exactly where their groups are. A row is compared
    only with the rows before it at cosine distance ``d`` at most ``_SAME_TOL`` (equal rows
    are at ~1e-15) or, for a zero row, with the zero rows before it, and always with itself
    (the last candidate, so a row with NaNs ends its own group): each round compares every
    row still searching with its first remaining candidate and drops the candidate if they
    differ (one round where equal rows are exactly equal and the rest far apart; one more
    per near-duplicate that is not equal)."""
    xp = namespace(x, d)
    n = x.shape[0]
    i = _arange(xp, n, x)
    candidate = (d <= _SAME_TOL) | (zero[:, None] & zero[None, :])
    candidate = ((candidate | candidate.T) & (i[None, :] < i[:, None])) | (i[None, :] == i[:, None])
    group = i
    searching = xp.ones(n, dtype=xp.bool, device=device(x))
    while bool(xp.any(searching)):
        first = xp.argmax(xp.astype(candidate, xp.int8), axis=1)
        equal = xp.all(x == xp.take(x, first, axis=0), axis=1) | (first == i)
        group = xp.where(searching & equal, first, group)
        searching = searching & ~equal
        candidate = candidate & ~(searching[:, None] & (i[None, :] == first[:, None]))
    return group


def cosine_distances(rows: Any) -> Any:
    """(P, P) float64 cosine distances of the rows, with the conventions of the module
    docstring: zero rows at 0 from each other and 1 from the rest; equal rows at exactly 0,
    distinct rows at >= machine epsilon."""
    x = _array(rows)
    xp = namespace(x)
    x = xp.astype(x, xp.float64, copy=False)
    norms = xp.sqrt(xp.sum(x * x, axis=1))
    zero = norms == 0
    unit = x / xp.where(zero, 1.0, norms)[:, None]
    d = xp.clip(1.0 - unit @ unit.T, min=0.0, max=2.0)
    group = _row_groups(x, d, zero)
    same = group[:, None] == group[None, :]
    d = xp.where(same, 0.0, xp.maximum(d, xp.finfo(xp.float64).eps))
    either = zero[:, None] | zero[None, :]
    d = xp.where(either & ~same, 1.0, d)   # zero vs non-zero: 1 (zero vs zero is "same": 0)
    i = _arange(xp, x.shape[0], x)
    return xp.where(i[:, None] == i[None, :], 0.0, d)


def hierarchy_labels(distances: np.ndarray, zeta: float, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """SciPy's average linkage on a host (P, P) distance matrix, cut at ``zeta`` or into at
    most ``k`` clusters: (labels (P,) int64 in 0..k_n-1, linkage matrix), both NumPy."""
    tree = linkage(squareform(distances, checks=False), method="average")
    if k is None:
        flat = fcluster(tree, t=zeta, criterion="distance")
    else:
        flat = fcluster(tree, t=k, criterion="maxclust")
    return np.unique(flat, return_inverse=True)[1].ravel().astype(np.int64), tree


def cluster(maps: Any, zeta: float = 0.4, k: int | None = None) -> tuple[Any, np.ndarray]:
    """Agglomerative clustering of the scaled maps M(S_i) (rows of ``maps``, (P, P)) (A17).

    Average linkage on cosine distances, cut at distance ``zeta`` or, if ``k`` is given,
    into at most ``k`` clusters (scipy's ``maxclust``; ties in the dendrogram can give
    fewer, A18). Returns (labels (P,) int64 in 0..k_n-1 on the maps' device, the (P-1, 4)
    NumPy linkage matrix for a dendrogram). Zero rows and exact ties are handled as the
    module docstring says. The distances are computed where the maps are; SciPy's linkage
    runs on the host (the explicit crossing: ``to_host`` in, ``to_device`` out).
    """
    maps = _array(maps)
    if maps.ndim != 2:
        raise ConfigError(f"cluster expects maps as rows (P, P), got shape {tuple(maps.shape)}")
    if k is None and not zeta >= 0:
        raise ConfigError(f"zeta must be >= 0, got {zeta}")
    if k is not None and k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    n = maps.shape[0]
    if n < 2:
        return to_device(np.zeros(n, dtype=np.int64), like=maps), np.zeros((0, 4))
    labels, tree = hierarchy_labels(to_host(cosine_distances(maps)), zeta, k)
    return to_device(labels, like=maps), tree


def concept_maps(labels: Any, upsampled: Any, aggregate: str = "sum") -> Any:
    """Sigma_c (Eq. 7): (k_n, S, S) float32, the sum (or mean) of M(S~_i) over the tokens i of
    each cluster c, from cluster ``labels`` (P,) in 0..k_n-1 and ``upsampled`` (P, S, S)."""
    if aggregate not in AGGREGATES:
        raise ConfigError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    labels, upsampled = _array(labels), _array(upsampled)
    xp = namespace(labels, upsampled)
    labels = xp.astype(labels, xp.int64, copy=False)
    upsampled = xp.astype(upsampled, xp.float32, copy=False)
    if tuple(labels.shape) != tuple(upsampled.shape[:1]):
        raise ConfigError(f"{labels.shape[0]} cluster labels for {upsampled.shape[0]} maps")
    n, n_concepts = labels.shape[0], int(xp.max(labels)) + 1
    onehot = xp.astype(_arange(xp, n_concepts, labels)[:, None] == labels[None, :], xp.float32)
    if aggregate == "mean":
        onehot = onehot / xp.maximum(xp.sum(onehot, axis=1, keepdims=True), 1.0)
    size = tuple(upsampled.shape[1:])
    return xp.reshape(onehot @ xp.reshape(upsampled, (n, -1)), (n_concepts, *size))


def segment_map(concepts: Any) -> Any:
    """Eq. 8: (k_n, S, S) concept maps -> (S, S) segment ids, argmax (ties to the lower
    concept), renumbered 0..k_n-1 over the concepts that win a pixel; uint8 (uint16 beyond
    256 segments)."""
    concepts = _array(concepts)
    xp = namespace(concepts)
    winner = xp.reshape(xp.argmax(concepts, axis=0), (-1,))
    present = bincount(winner, concepts.shape[0]) > 0
    rank = xp.cumulative_sum(xp.astype(present, xp.int64)) - 1     # new id of each winning concept
    dtype = xp.uint8 if int(xp.sum(xp.astype(present, xp.int64))) <= 256 else xp.uint16
    return xp.astype(xp.reshape(xp.take(rank, winner, axis=0), tuple(concepts.shape[1:])), dtype)


def segment_image(maps: Any, grid: int, size: int, zeta: float = 0.4, k: int | None = None,
                  aggregate: str = "sum", scaled: Any = None) -> tuple[Any, Any, np.ndarray]:
    """10.3 for one image: patch maps (P, P) (rows S_i after the self-fill) -> (segment map
    (S, S), token clusters (P,), linkage matrix). ``scaled``: M(S~_i) if already computed.
    The segments and clusters are on the maps' device, the linkage matrix on the host."""
    maps = _array(maps)
    labels, tree = cluster(minmax(maps, axis=-1), zeta=zeta, k=k)
    scaled = scaled_upsampled(maps, grid, size) if scaled is None else scaled
    segments = segment_map(concept_maps(labels, scaled, aggregate))
    return segments, labels, tree


# --- segment descriptors (10.4 `dataset`) ---------------------------------------------------------

def segment_descriptors(segments: Any, tokens: Any) -> Any:
    """(k_n, D) float32: per segment, the L2-normalised mean of the raw tokens of the patches
    whose footprint lies mostly in it (``patch_segments``).

    A segment that is the majority of no patch footprint (a sliver) takes the mean over every
    patch whose footprint overlaps it at all, unweighted. An id with no pixel at all (only
    possible for a non-compact map) gets a row of zeros. ``tokens`` (G, G, D) may be float16;
    the arithmetic is float32.
    """
    segments = _square(segments, "segments")
    tokens = _array(tokens)
    xp = namespace(segments, tokens)
    tokens = xp.astype(tokens, xp.float32, copy=False)
    grid, dim = tokens.shape[0], tokens.shape[-1]
    flat = xp.reshape(tokens, (grid * grid, dim))
    n_segments = int(xp.max(segments)) + 1
    counts, _ = footprint_counts(segments, None, grid, n_segments)         # (P, k_n)
    member = _arange(xp, n_segments, counts)[None, :] == xp.argmax(counts, axis=1)[:, None]
    empty = ~xp.any(member, axis=0)
    member = xp.where(empty[None, :], counts > 0, member)                  # slivers: every overlapping patch
    weights = xp.astype(member, xp.float32)
    means = (weights.T @ flat) / xp.maximum(xp.sum(weights, axis=0), 1.0)[:, None]
    norms = xp.sqrt(xp.sum(means * means, axis=1, keepdims=True))
    return xp.astype(xp.where(norms > 0, means / xp.where(norms > 0, norms, 1.0), 0.0), xp.float32, copy=False)


# --- the per-image oracle (10.4 `per_image`) ---------------------------------------------------------

def per_image_confusion(segments: Any, labels: Any, n_classes: int, ignore: int = IGNORE_INDEX) -> Any:
    """(C, C) int64 pixel counts (predicted class, true class) of one image after matching its
    segments to classes: Hungarian (maximal overlap) between its segments and the classes
    present in its labelled pixels, every unmatched segment to its majority class (A19).
    Ignore pixels are dropped; an image without labelled pixels gives zeros.

    The segment x class overlap is counted on the inputs' device; SciPy's Hungarian step and
    the confusion (the overlap's rows added by their segment's class) are small and run on
    the host, and the confusion returns to the inputs' device."""
    segments, labels = _square(segments, "segments"), _square(labels, "labels")
    if tuple(segments.shape) != tuple(labels.shape):
        raise ConfigError(f"segments {tuple(segments.shape)} and labels {tuple(labels.shape)} differ in size")
    xp = namespace(segments, labels)
    lab = xp.astype(xp.reshape(labels, (-1,)), xp.int64)
    keep = lab != ignore
    bad = keep & ((lab >= n_classes) | (lab < 0))
    if bool(xp.any(bad)):
        values = np.unique(to_host(lab)[to_host(bad)])
        raise LabelValueError(f"label values {values.tolist()} outside 0..{n_classes - 1} (ignore = {ignore})")
    seg = xp.astype(xp.reshape(segments, (-1,)), xp.int64)
    n_segments = int(xp.max(seg)) + 1
    end = xp.asarray(n_segments * n_classes, dtype=xp.int64, device=device(seg))
    key = xp.where(keep, seg * n_classes + lab, end)                        # ignore: one bin past the end
    overlap = to_host(xp.reshape(bincount(key, n_segments * n_classes + 1)[:-1], (n_segments, n_classes)))
    present = np.flatnonzero(overlap.sum(0) > 0)
    mapping = overlap.argmax(1)                              # majority class for the unmatched
    if present.size:
        rows, cols = linear_sum_assignment(overlap[:, present], maximize=True)
        mapping[rows] = present[cols]
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, mapping, overlap)
    return to_device(confusion, like=seg)


def oracle_scores(confusion: Any) -> dict[str, float]:
    """{miou, pixel_accuracy} of a (predicted, true) confusion: mIoU over the classes with a
    non-empty union (NaN if none), accuracy = trace / total (NaN if empty). A device confusion
    crosses to the host (``to_host``)."""
    confusion = np.asarray(to_host(_array(confusion)), dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    has = union > 0
    total = confusion.sum()
    return {"miou": float((tp[has] / union[has]).mean()) if has.any() else float("nan"),
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan")}


# --- object selection and ITIoU (10.5) ----------------------------------------------------------------

def token_masks(upsampled_scaled: Any, tau: float) -> Any:
    """Binary masks M_i = [M(S~_i) >= tau] (A20), bool like the maps. ``tau`` is compared in
    the maps' dtype, so the sweep and single thresholds agree exactly."""
    maps = _array(upsampled_scaled)
    xp = namespace(maps)
    return maps >= xp.asarray(tau, dtype=maps.dtype, device=device(maps))


def _labelled(token_labels: Any, ignore: int, n_maps: int) -> tuple[Any, Any]:
    """(indices of the labelled tokens, their classes), both int64."""
    token_labels = _array(token_labels)
    xp = namespace(token_labels)
    token_labels = xp.reshape(xp.astype(token_labels, xp.int64, copy=False), (-1,))
    if token_labels.shape[0] != n_maps:
        raise ConfigError(f"{token_labels.shape[0]} token labels for {n_maps} maps")
    tokens = xp.nonzero(token_labels != ignore)[0]
    return tokens, xp.take(token_labels, tokens, axis=0)


def _class_mean_of_token_means(iou: Any, classes: Any) -> Any:
    """Mean over classes of the mean over each class's tokens; ``iou`` (n_tokens, ...) float64.
    Per-class sums are ``bincount`` weights (added in token order, as ``np.add.at``)."""
    xp = namespace(iou, classes)
    rest = tuple(iou.shape[1:])
    width = int(np.prod(rest, dtype=np.int64))
    n_bins = int(xp.max(classes)) + 1
    count = bincount(classes, n_bins)
    key = classes[:, None] * width + _arange(xp, width, classes)[None, :]  # (class, column) bins
    sums = xp.reshape(bincount(xp.reshape(key, (-1,)), n_bins * width, weights=xp.reshape(iou, (-1,))),
                      (n_bins, width))
    present = count > 0
    per_class = sums / xp.astype(xp.where(present, count, 1), xp.float64)[:, None]
    per_class = xp.take(per_class, xp.nonzero(present)[0], axis=0)        # the classes present, in order
    return xp.reshape(xp.mean(per_class, axis=0), rest)


def itiou_image(upsampled_scaled: Any, token_labels: Any, labels: Any, tau: float = 0.2,
                ignore: int = IGNORE_INDEX) -> tuple[float, int]:
    """ITIoU_n of one image (Eq. 17) at threshold ``tau``: (value, labelled tokens).

    For each labelled token i (``token_labels`` (P,), ``ignore`` = unlabelled) of class c,
    IoU(M_i, G_c) with ignore pixels removed from both masks; the image's value is the mean
    over classes present among its labelled tokens of the mean over their tokens. (NaN, 0)
    when no token is labelled. An IoU with an empty union (only if a token's class has no
    pixel in ``labels``, which the footprint rule excludes) counts as 0. The arrays share one
    namespace and device.
    """
    maps, labels = _array(upsampled_scaled), _array(labels)
    xp = namespace(maps, labels)
    tokens, classes = _labelled(token_labels, ignore, maps.shape[0])
    n_tokens = tokens.shape[0]
    if n_tokens == 0:
        return float("nan"), 0
    lab = xp.reshape(labels, (-1,))
    valid = lab != ignore
    masks = token_masks(xp.reshape(xp.take(maps, tokens, axis=0), (n_tokens, -1)), tau) & valid[None, :]
    truth = lab[None, :] == classes[:, None]
    inter = xp.count_nonzero(masks & truth, axis=1)
    union = xp.count_nonzero(masks, axis=1) + xp.count_nonzero(truth, axis=1) - inter
    iou = xp.where(union > 0, xp.astype(inter, xp.float64) / xp.astype(xp.maximum(union, 1), xp.float64), 0.0)
    return float(to_host(_class_mean_of_token_means(iou, classes))), int(n_tokens)


def itiou_sweep(upsampled_scaled: Any, token_labels: Any, labels: Any, taus: Sequence[float],
                ignore: int = IGNORE_INDEX, chunk: int = 32) -> tuple[Any, int]:
    """ITIoU_n of one image at every threshold of ``taus`` in one pass: ((len(taus),), tokens).

    Each labelled token's valid pixels are binned by how many thresholds they reach
    (``searchsorted``), so mask and intersection sizes at every tau come from cumulative
    counts; equal to ``itiou_image`` per tau. ``chunk`` tokens are binned at a time. The
    values (float64) are on the maps' device; ``taus`` (host numbers) cross there.
    """
    maps, labels = _array(upsampled_scaled), _array(labels)
    xp = namespace(maps, labels)
    host_taus = np.asarray(to_host(taus) if is_array_api_obj(taus) else taus, dtype=np.float64).ravel()
    taus = xp.astype(to_device(host_taus, like=maps), maps.dtype)          # rounded to the maps' dtype
    n_t = taus.shape[0]
    tokens, classes = _labelled(token_labels, ignore, maps.shape[0])
    n_tokens = tokens.shape[0]
    if n_tokens == 0:
        return xp.full(n_t, float("nan"), dtype=xp.float64, device=device(maps)), 0
    order = xp.argsort(taus, stable=True)
    sorted_taus = xp.take(taus, order, axis=0)
    lab = xp.reshape(labels, (-1,))
    valid = xp.nonzero(lab != ignore)[0]
    lab_valid = xp.take(lab, valid, axis=0)
    class_size = xp.take(bincount(xp.astype(lab_valid, xp.int64), int(xp.max(classes)) + 1), classes, axis=0)
    mask_size, inter = [], []
    for lo in range(0, n_tokens, chunk):
        sel = slice(lo, min(lo + chunk, n_tokens))
        rows_of = xp.reshape(xp.take(maps, tokens[sel], axis=0), (-1, lab.shape[0]))
        values = xp.take(rows_of, valid, axis=1)                           # (t, V)
        reached = xp.searchsorted(sorted_taus, values, side="right")       # taus <= value
        t = values.shape[0]
        key = xp.reshape(_arange(xp, t, values)[:, None] * (n_t + 1) + reached, (-1,))
        hist = xp.reshape(bincount(key, t * (n_t + 1)), (t, n_t + 1))
        hit = xp.reshape(lab_valid[None, :] == classes[sel, None], (-1,))
        hist_in = xp.reshape(bincount(key[hit], t * (n_t + 1)), (t, n_t + 1))
        # pixels >= sorted tau t are those that reach more than t thresholds
        mask_size.append(_tail_sums(hist))
        inter.append(_tail_sums(hist_in))
    mask_size, inter = xp.concat(mask_size, axis=0), xp.concat(inter, axis=0)
    union = mask_size + class_size[:, None] - inter
    iou = xp.where(union > 0, xp.astype(inter, xp.float64) / xp.astype(xp.maximum(union, 1), xp.float64), 0.0)
    values = xp.take(_class_mean_of_token_means(iou, classes), xp.argsort(order), axis=0)
    return values, int(n_tokens)


def _tail_sums(hist: Any) -> Any:
    """(t, n + 1) counts -> (t, n): column j holds the sum of columns j + 1.. of ``hist``."""
    xp = namespace(hist)
    return xp.flip(xp.cumulative_sum(xp.flip(hist, axis=1), axis=1), axis=1)[:, 1:]
