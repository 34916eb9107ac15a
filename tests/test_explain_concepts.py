"""Per-image concepts, segments and scores of PROTOCOL.md 10.3-10.5 (stages/explain/concepts.py)."""
import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage

from rep_pipeline.pipeline.arrays import minmax
from rep_pipeline.pipeline.errors import ConfigError, LabelValueError
from rep_pipeline.pipeline.footprints import patch_labels
from rep_pipeline.pipeline.upsample import scaled_upsampled
from rep_pipeline.stages.explain import concepts as cc

IGNORE = 255


def _block_maps(grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(P, P) maps whose token i highlights the quadrant of its own patch (4 concepts), with a
    little noise, and the quadrant of each token."""
    rng = np.random.default_rng(0)
    rr, cc_ = np.divmod(np.arange(grid * grid), grid)
    quadrant = (rr >= grid // 2) * 2 + (cc_ >= grid // 2)
    maps = (quadrant[:, None] == quadrant[None, :]).astype(np.float64) + 0.05 * rng.random((grid * grid,) * 2)
    return maps, quadrant


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    return len(set(zip(a, b))) == len(set(a)) == len(set(b))


# --- patch labels and patch segments -------------------------------------------------------------

def test_patch_segments_take_the_plurality_of_the_footprint():
    seg = np.zeros((6, 6), dtype=np.uint8)
    seg[0:3, 0:3] = [[1, 1, 2], [1, 2, 2], [0, 0, 2]]   # 1: 3 pixels, 2: 4, 0: 2 -> 2
    seg[3:6, 3:6] = 3
    seg[0:3, 3:6] = [[0, 0, 0], [1, 1, 1], [2, 2, 2]]   # a three-way tie -> 0
    np.testing.assert_array_equal(cc.patch_segments(seg, 2), [2, 0, 0, 3])


# --- clustering ----------------------------------------------------------------------------------

def test_zeta_zero_gives_one_cluster_per_distinct_map():
    rng = np.random.default_rng(3)
    distinct = minmax(rng.random((5, 16)), axis=-1)
    which = np.array([0, 1, 2, 1, 3, 4, 0, 0, 2, 3])
    maps = distinct[which]
    maps = np.vstack([maps, np.zeros((2, 16))])          # two constant maps: a sixth distinct map
    labels, tree = cc.cluster(maps, zeta=0.0)
    assert labels.shape == (12,) and tree.shape == (11, 4)
    assert _same_partition(labels, np.r_[which, 5, 5])
    assert set(labels) == set(range(6))


def test_constant_maps_form_a_cluster_of_their_own_and_distances_are_cosine():
    rng = np.random.default_rng(4)
    maps = minmax(rng.random((8, 9)), axis=-1)
    d = cc.cosine_distances(np.vstack([maps, np.zeros((2, 9))]))
    ref = 1 - (maps / np.linalg.norm(maps, axis=1, keepdims=True)) @ (maps / np.linalg.norm(maps, axis=1)[:, None]).T
    np.testing.assert_allclose(d[:8, :8], np.clip(ref, 0, None) * (1 - np.eye(8)), atol=1e-12)
    assert (d[8:, :8] == 1).all() and (d[8:, 8:] == 0).all()
    labels, _ = cc.cluster(np.vstack([maps, np.zeros((2, 9))]), zeta=0.99)
    assert labels[8] == labels[9] and labels[8] not in set(labels[:8])


def test_clustering_matches_scipy_average_cosine_on_nonzero_maps():
    maps = minmax(np.random.default_rng(5).random((30, 25)), axis=-1)
    ref = linkage(maps, method="average", metric="cosine")
    labels, tree = cc.cluster(maps, zeta=0.2)
    np.testing.assert_allclose(tree[:, 2], ref[:, 2], atol=1e-9)
    assert _same_partition(labels, fcluster(ref, t=0.2, criterion="distance"))


def test_block_structured_maps_are_recovered_by_distance_and_by_maxclust():
    maps, quadrant = _block_maps(8)
    scaled = minmax(maps, axis=-1)
    by_zeta, _ = cc.cluster(scaled, zeta=0.4)
    by_k, _ = cc.cluster(scaled, k=4)
    assert _same_partition(by_zeta, quadrant) and _same_partition(by_k, quadrant)
    two, _ = cc.cluster(scaled, k=2)
    assert len(set(two)) == 2
    one, _ = cc.cluster(scaled, zeta=1.0)
    assert set(one) == {0}


def test_cluster_validates_and_handles_one_map():
    with pytest.raises(ConfigError):
        cc.cluster(np.ones((3, 3)), zeta=-0.1)
    with pytest.raises(ConfigError):
        cc.cluster(np.ones((3, 3)), k=0)
    labels, tree = cc.cluster(np.ones((1, 1)))
    assert labels.tolist() == [0] and tree.shape == (0, 4)


# --- concept maps and segments -------------------------------------------------------------------

def test_concept_maps_and_segment_map_on_a_hand_example():
    up = np.zeros((3, 2, 2), dtype=np.float32)
    up[0] = [[1.0, 0.0], [0.0, 0.0]]
    up[1] = [[0.6, 0.0], [0.5, 0.0]]
    up[2] = [[0.0, 1.0], [0.9, 1.0]]
    labels = np.array([0, 0, 1])
    sums = cc.concept_maps(labels, up)
    np.testing.assert_allclose(sums, [[[1.6, 0.0], [0.5, 0.0]], [[0.0, 1.0], [0.9, 1.0]]])
    np.testing.assert_array_equal(cc.segment_map(sums), [[0, 1], [1, 1]])  # the sum: 0.5 < 0.9
    means = cc.concept_maps(labels, up, aggregate="mean")
    np.testing.assert_allclose(means[0], [[0.8, 0.0], [0.25, 0.0]])
    assert cc.segment_map(sums).dtype == np.uint8
    with pytest.raises(ConfigError):
        cc.concept_maps(labels, up, aggregate="max")


def test_segment_ids_are_compact_and_ties_go_to_the_lower_concept():
    concepts = np.zeros((4, 2, 2))
    concepts[1] = [[1, 1], [0, 0]]
    concepts[3] = [[0, 0], [2, 0]]     # concepts 0 and 2 win nothing; (1, 1) is a tie of all: 0
    np.testing.assert_array_equal(cc.segment_map(concepts), [[1, 1], [2, 0]])


def test_segment_image_recovers_block_concepts():
    maps, quadrant = _block_maps(4)
    segments, labels, tree = cc.segment_image(maps, grid=4, size=16, zeta=0.4)
    assert _same_partition(labels, quadrant) and tree.shape == (15, 4)
    truth = np.kron(quadrant.reshape(4, 4), np.ones((4, 4), dtype=int))
    assert _same_partition(segments, truth)


# --- segment descriptors -------------------------------------------------------------------------

def test_segment_descriptors_are_normalised_means_over_majority_patches():
    tokens = np.zeros((2, 2, 3), dtype=np.float16)
    tokens[0, 0], tokens[0, 1], tokens[1, 0], tokens[1, 1] = [3, 0, 0], [0, 4, 0], [0, 0, 5], [0, 2, 0]
    seg = np.zeros((4, 4), dtype=np.uint8)
    seg[:, 2:] = 1            # patches 1 and 3 in segment 1
    seg[0, 0] = 2             # a sliver in patch 0: no patch majority
    desc = cc.segment_descriptors(seg, tokens)
    assert desc.shape == (3, 3) and desc.dtype == np.float32
    np.testing.assert_allclose(desc[0], np.array([3, 0, 5]) / np.sqrt(34), atol=1e-6)   # patches 0 and 2
    np.testing.assert_allclose(desc[1], [0, 1, 0], atol=1e-6)                           # mean (0, 3, 0)
    np.testing.assert_allclose(desc[2], [1, 0, 0], atol=1e-6)                           # sliver: patch 0
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1, atol=1e-6)


# --- the per-image oracle ------------------------------------------------------------------------

def _labels(rng, size=12, n_classes=5):
    labels = np.kron(rng.integers(0, n_classes, (3, 3)), np.ones((size // 3, size // 3), dtype=int)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.1] = IGNORE
    return labels


def test_a_segmentation_equal_to_the_labels_scores_one():
    rng = np.random.default_rng(6)
    labels = _labels(rng)
    seg = np.where(labels == IGNORE, 0, labels)
    conf = cc.per_image_confusion(seg, labels, 5)
    assert conf.shape == (5, 5) and conf.dtype == np.int64
    assert conf.sum() == (labels != IGNORE).sum() and (conf == np.diag(np.diag(conf))).all()
    assert cc.oracle_scores(conf) == {"miou": 1.0, "pixel_accuracy": 1.0}
    _, ids = np.unique(seg, return_inverse=True)                                # compact ids, renamed
    permuted = np.random.default_rng(7).permutation(ids.max() + 1)[ids.reshape(seg.shape)]
    assert cc.oracle_scores(cc.per_image_confusion(permuted, labels, 5)) == {"miou": 1.0, "pixel_accuracy": 1.0}


def test_unmatched_segments_take_their_majority_class_and_ignore_is_dropped():
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, IGNORE], [0, 0, 1, IGNORE]], dtype=np.uint8)
    seg = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 0], [2, 2, 1, 0]], dtype=np.uint8)
    conf = cc.per_image_confusion(seg, labels, 3)
    # Hungarian: 0 -> 0 (4 px), 1 -> 1 (6 px); segment 2 (4 px of class 0) unmatched -> 0
    np.testing.assert_array_equal(conf, [[8, 0, 0], [0, 6, 0], [0, 0, 0]])
    scores = cc.oracle_scores(conf)
    assert scores == {"miou": 1.0, "pixel_accuracy": 1.0}          # class 2: empty union, skipped
    one = cc.per_image_confusion(np.zeros((4, 4), np.uint8), labels, 3)     # one segment, two classes
    np.testing.assert_array_equal(one, [[8, 6, 0], [0, 0, 0], [0, 0, 0]])
    assert cc.oracle_scores(one) == pytest.approx({"miou": (8 / 14 + 0) / 2, "pixel_accuracy": 8 / 14})


def test_oracle_rejects_labels_outside_the_classes_and_handles_empty_images():
    with pytest.raises(LabelValueError, match="7"):
        cc.per_image_confusion(np.zeros((2, 2), np.uint8), np.full((2, 2), 7, np.uint8), 3)
    empty = cc.per_image_confusion(np.zeros((2, 2), np.uint8), np.full((2, 2), IGNORE, np.uint8), 3)
    assert (empty == 0).all()
    scores = cc.oracle_scores(empty)
    assert np.isnan(scores["miou"]) and np.isnan(scores["pixel_accuracy"])


# --- ITIoU ---------------------------------------------------------------------------------------

def test_masks_equal_to_the_ground_truth_give_itiou_one():
    rng = np.random.default_rng(8)
    labels = _labels(rng, size=16, n_classes=4)
    grid = 4
    token_labels = patch_labels(labels, grid).ravel()
    assert (token_labels != IGNORE).any()
    maps = np.stack([(labels == c).astype(np.float32) if c != IGNORE else np.zeros(labels.shape, np.float32)
                     for c in token_labels])
    maps[token_labels != IGNORE] += 0.01 * (labels == IGNORE)   # ignore pixels are removed from both masks
    value, n = cc.itiou_image(maps, token_labels, labels, tau=0.2)
    assert value == pytest.approx(1.0) and n == (token_labels != IGNORE).sum()
    swept, n_swept = cc.itiou_sweep(maps, token_labels, labels, [0.2, 0.5, 1.0])
    np.testing.assert_allclose(swept, 1.0)
    assert n_swept == n


def test_itiou_on_a_hand_case():
    labels = np.array([[0, 0, 1, 1]] * 4, dtype=np.uint8)
    labels[3, 3] = IGNORE
    token_labels = np.array([0, 0, 1, IGNORE])
    maps = np.zeros((4, 4, 4), dtype=np.float32)
    maps[0, :, :2] = 1.0                      # exactly class 0: IoU 1
    maps[1, :2, :] = 0.5                      # 4 of 8 class-0 pixels, mask 8: IoU 4/12
    maps[2, :, 2:] = 0.3                      # class 1 without the ignore pixel: IoU 1; at tau 0.4: 0
    maps[2, 0, 0] = 0.9                       # ... plus one class-0 pixel: IoU 7/8; at tau 0.4: 0
    maps[3] = 1.0                             # unlabelled token: skipped
    value, n = cc.itiou_image(maps, token_labels, labels, tau=0.2)
    assert n == 3
    assert value == pytest.approx(((1 + 4 / 12) / 2 + 7 / 8) / 2)
    value_04, _ = cc.itiou_image(maps, token_labels, labels, tau=0.4)
    assert value_04 == pytest.approx(((1 + 4 / 12) / 2 + 0.0) / 2)
    swept, _ = cc.itiou_sweep(maps, token_labels, labels, [0.4, 0.2])
    np.testing.assert_allclose(swept, [value_04, value])
    nothing, zero = cc.itiou_image(maps, np.full(4, IGNORE), labels)
    assert np.isnan(nothing) and zero == 0
    assert np.isnan(cc.itiou_sweep(maps, np.full(4, IGNORE), labels, [0.1, 0.2])[0]).all()


def test_itiou_sweep_equals_one_threshold_at_a_time():
    rng = np.random.default_rng(9)
    labels = _labels(rng, size=24, n_classes=4)
    grid = 6
    maps = scaled_upsampled(rng.random((grid * grid, grid * grid)), grid, 24)
    token_labels = patch_labels(labels, grid).ravel()
    taus = np.round(np.arange(0, 1.0001, 0.05), 2)
    swept, n = cc.itiou_sweep(maps, token_labels, labels, taus, chunk=7)
    one_by_one = [cc.itiou_image(maps, token_labels, labels, tau)[0] for tau in taus]
    np.testing.assert_allclose(swept, one_by_one, atol=1e-12)
    assert n == (token_labels != IGNORE).sum()
    masks = cc.token_masks(maps, 0.2)
    assert masks.dtype == bool and (masks == (maps >= np.float32(0.2))).all()
