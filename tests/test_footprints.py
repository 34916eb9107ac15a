"""Patch footprints and the patch label rule of PROTOCOL.md's Conventions (A1):
pipeline/footprints.py, the one rule of the direction probes (section 9) and ULTra's ITIoU (10.5)."""
import numpy as np
import pytest

from rep_pipeline.pipeline.config import IGNORE_INDEX as IGNORE
from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.pipeline.footprints import footprint_cells, patch_labels


def test_patch_labels_footprint_majority_with_ignore_in_the_footprint_not_in_the_vote():
    lab = np.full((1, 10, 10), 2, np.uint8)
    lab[0, :5, :5].flat[:15] = 0                            # 60 % a -> a
    lab[0, :5, 5:].flat[:] = [0] * 10 + [1] * 10 + [IGNORE] * 5  # 40 % a, 40 % b, 20 % ignore -> none
    lab[0, 5:, :5].flat[:] = [0] * 10 + [IGNORE] * 15            # a is the only voter, 40 % of the footprint -> none
    lab[0, 5:, 5:].flat[:] = [1] * 13 + [IGNORE] * 12            # ignore is no class: b with 52 % -> b
    got = patch_labels(lab, 2, IGNORE)
    np.testing.assert_array_equal(got[0], [[0, IGNORE], [IGNORE, 1]])
    assert got.dtype == np.uint8


def test_patch_labels_equal_a_loop_over_footprints_when_s_is_not_a_multiple_of_g():
    rng = np.random.default_rng(0)
    lab = rng.choice(np.array([0, 1, 2, IGNORE], np.uint8), size=(3, 23, 23), p=[0.5, 0.2, 0.1, 0.2])
    grid, edges = 5, (np.arange(6) * 23) // 5
    got = patch_labels(lab, grid, IGNORE)
    for i in range(3):
        for y in range(grid):
            for x in range(grid):
                fp = lab[i, edges[y]:edges[y + 1], edges[x]:edges[x + 1]]
                votes = np.bincount(fp[fp != IGNORE], minlength=3)
                want = votes.argmax() if 2 * votes.max() >= fp.size else IGNORE
                assert got[i, y, x] == want


def test_patch_labels_follow_the_footprint_rule():
    labels = np.full((4, 4), IGNORE, dtype=np.uint8)
    labels[0:2, 0:2] = [[1, 1], [2, IGNORE]]        # 1 has half the footprint: labelled 1
    labels[0:2, 2:4] = [[3, 4], [IGNORE, IGNORE]]   # 3 and 4 a quarter each: no label
    labels[2:4, 0:2] = [[5, 6], [5, 6]]             # a tie at one half: the lower id
    labels[2:4, 2:4] = 7
    np.testing.assert_array_equal(patch_labels(labels, 2).ravel(), [1, IGNORE, 5, 7])
    assert (patch_labels(np.full((4, 4), IGNORE, np.uint8), 2) == IGNORE).all()


def test_one_map_or_a_stack_and_the_footprint_cells():
    rng = np.random.default_rng(4)
    labels = rng.choice(np.array([0, 3, IGNORE], np.uint8), size=(2, 3, 30, 30))
    stacked = patch_labels(labels, 7)
    assert stacked.shape == (2, 3, 7, 7) and stacked.dtype == np.uint8
    np.testing.assert_array_equal(patch_labels(labels[1, 2], 7), stacked[1, 2])
    np.testing.assert_array_equal(patch_labels(labels.astype(np.int64), 7), stacked)
    cells = footprint_cells(30, 30, 7).reshape(30, 30)
    edges = (np.arange(8) * 30) // 7                   # floor(i S / G)
    for y in range(7):
        for x in range(7):
            assert (cells[edges[y]:edges[y + 1], edges[x]:edges[x + 1]] == y * 7 + x).all()
    with pytest.raises(ConfigError):
        footprint_cells(3, 3, 4)
    with pytest.raises(ConfigError):
        patch_labels(np.zeros((4, 4), np.float32), 2)
