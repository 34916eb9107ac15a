"""Evaluation formulas against hand-computed cases."""
import math

import numpy as np
import pytest

from rep_pipeline.pipeline.metrics import (aggregate_map, confusion_matrix, hungarian_match, position_class_counts,
                                                  positional_effect, positional_scores, random_shifts,
                                                  segmentation_scores, shifted_counts, spearman)


def hungarian_mapping(confusion):
    mapping, matched = hungarian_match(confusion)
    assert matched.sum() == min(confusion.shape)  # one-to-one for as many clusters as classes allow
    return mapping


def test_hungarian_on_a_confusion_matrix_with_a_known_answer():
    # clusters 0,1,2 x classes 0,1,2: the best one-to-one is 0->2, 1->0, 2->1 (22 pixels)
    conf = np.array([[5, 0, 6], [9, 1, 0], [0, 7, 5]])
    assert hungarian_mapping(conf).tolist() == [2, 0, 1]
    # where taking the largest cell first (0->0, 10 pixels) would lose:
    conf = np.array([[10, 9], [9, 0]])
    assert hungarian_mapping(conf).tolist() == [1, 0]  # 9 + 9 beats 10 + 0


def test_overclustering_maps_leftover_clusters_to_their_majority_class():
    conf = np.array([[8, 1], [0, 9], [5, 2], [1, 3]])
    assert hungarian_mapping(conf).tolist() == [0, 1, 0, 1]


def test_miou_and_pixel_accuracy_by_hand():
    clusters = np.array([[0, 0, 1, 1], [0, 2, 2, 1]])
    labels = np.array([[1, 1, 0, 255], [1, 1, 0, 0]])
    conf = confusion_matrix(clusters, labels, k=3, n_classes=2, ignore=255)
    assert conf.tolist() == [[0, 3], [2, 0], [1, 1]]
    mapping = hungarian_mapping(conf)            # 0->1, 1->0, 2->majority (tie: class 0)
    assert mapping.tolist() == [1, 0, 0]
    s = segmentation_scores(conf, mapping)
    # class 0: TP 3 (cluster1: 2, cluster2: 1), FP 1 (cluster2's class-1 pixel), FN 0 -> 3/4
    # class 1: TP 3, FP 0, FN 1 -> 3/4
    assert s.iou.tolist() == [0.75, 0.75] and s.miou == 0.75
    assert s.pixel_accuracy == 6 / 7


def test_miou_skips_classes_with_an_empty_union():
    conf = np.array([[4, 0, 0], [0, 2, 0]])
    s = segmentation_scores(conf, np.array([0, 1]))
    assert np.isnan(s.iou[2]) and s.miou == 1.0


def test_position_free_labels_have_zero_mi():
    maps = np.repeat(np.arange(4)[:, None, None], 8, 1).repeat(8, 2)   # each image one class
    pe = positional_effect(position_class_counts(maps, 4, 255))
    assert pe.mi == pytest.approx(0.0, abs=1e-12) and pe.entropy == pytest.approx(math.log(4))


def test_top_bottom_layout_has_mi_log_two():
    maps = np.zeros((5, 8, 8), dtype=np.uint8)
    maps[:, 4:] = 1
    pe = positional_effect(position_class_counts(maps, 2, 255))
    assert pe.mi == pytest.approx(math.log(2)) and pe.nmi == pytest.approx(1.0)
    assert pe.classwise_mi.tolist() == pytest.approx([math.log(2) / 2] * 2)


def test_half_the_images_split_half_constant_closed_form():
    # 2 images: top class 0 / bottom class 1; 2 images: all class 0.
    maps = np.zeros((4, 4, 4), dtype=np.uint8)
    maps[:2, 2:] = 1
    pe = positional_effect(position_class_counts(maps, 2, 255))
    # P(c=1) = 1/4. Top half: P(p,0) = 1/2 * 1, bottom half: P(p,0) = P(p,1) = 1/4 in total
    top = 0.5 * math.log(1 / 0.75)
    bottom = 0.25 * math.log(0.5 / 0.75) + 0.25 * math.log(0.5 / 0.25)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert pe.mi == pytest.approx(top + bottom) and pe.nmi == pytest.approx((top + bottom) / h)


def test_ignore_pixels_are_dropped_and_shift_null_removes_layout():
    maps = np.zeros((200, 8, 8), dtype=np.uint8)
    maps[:, 4:] = 1
    maps[:, :, 0] = 255
    counts = position_class_counts(maps, 2, 255)
    assert counts[:, 0].sum() == 0 and counts.sum() == 200 * 8 * 7
    null = positional_effect(shifted_counts(maps, 2, 255, *random_shifts(len(maps), 8, seed=0)))
    assert null.mi < 0.05 * positional_effect(counts).mi


def test_shifts_roll_each_map_by_its_own_offset():
    maps = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    dy, dx = np.array([1, 0]), np.array([0, 2])
    counts = shifted_counts(maps, 18, None, dy, dx)
    want = position_class_counts(np.stack([np.roll(maps[0], -1, 0), np.roll(maps[1], -2, 1)]), 18)
    assert (counts == want).all()


def test_bias_aware_nmi_of_a_single_class_is_nan_not_an_error():
    """A test split with one class: H(C) = 0, so the NMIs are undefined (NaN), not a crash."""
    maps = np.zeros((4, 6, 6), dtype=np.uint8)
    counts = position_class_counts(maps, 1, 255)
    null = shifted_counts(maps, 1, 255, *random_shifts(4, 6, seed=0))
    scores = positional_scores(counts, null)
    assert scores.mi == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(scores.nmi) and math.isnan(scores.nmi_bias_aware)


def test_bias_aware_nmi_subtracts_the_null():
    maps = np.zeros((50, 8, 8), dtype=np.uint8)
    maps[:, 4:] = 1
    s = positional_scores(position_class_counts(maps, 2, 255),
                          shifted_counts(maps, 2, 255, *random_shifts(50, 8, seed=3)))
    assert s.nmi == pytest.approx(1.0)
    assert s.nmi_bias_aware == pytest.approx((s.mi - s.mi_null) / math.log(2))
    assert 0 < s.mi_null < s.mi


def test_aggregate_map_of_constant_maps_is_the_palette_colour():
    palette = np.array([[0, 0, 0], [200, 10, 30], [0, 128, 0]], dtype=np.uint8)
    maps = np.full((3, 4, 4), 1, dtype=np.uint8)
    agg = aggregate_map(position_class_counts(maps, 3, 255), palette)
    assert (agg == [200, 10, 30]).all()
    maps[1:] = 2  # one image class 1, two class 2: a per-pixel mixture
    agg = aggregate_map(position_class_counts(maps, 3, 255), palette)
    assert agg[0, 0].tolist() == [67, round(10 / 3 + 2 * 128 / 3), 10]


def test_spearman_needs_three_pairs():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 50])[0] == pytest.approx(1.0)
    assert math.isnan(spearman([1, 2], [2, 1])[0])


def test_spearman_gives_n_and_the_p_value_of_scipy():
    from scipy.stats import spearmanr

    x = np.array([1.0, 2, 3, 4, 5, 6, 7, np.nan])
    y = np.array([2.0, 1, 4, 3, 7, 5, 6, 0])
    rho, n, p = spearman(x, y)
    want = spearmanr(x[:7], y[:7])
    assert n == 7 and rho == pytest.approx(want.statistic) and p == pytest.approx(want.pvalue) and 0 < p < 0.05
    assert spearman(x, y).p_value == p
    short = spearman([1, 2], [2, 1])
    assert short.n == 2 and math.isnan(short.p_value)
    constant = spearman([1, 2, 3, 4], [5, 5, 5, 5])  # undefined: NaN, no warning as an error
    assert constant.n == 4 and math.isnan(constant.rho) and math.isnan(constant.p_value)
