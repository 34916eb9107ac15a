"""``synthetic-pairs``: keypoints that are the rendered shapes' centres exactly, placed on the grid
by the geometry of section 8.2, and every image a function of the seed."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rep_pipeline.pipeline.datasets import build_dataset
from rep_pipeline.pipeline.datasets.geometry import to_grid
from rep_pipeline.pipeline.datasets.synthetic import CLASSES, TRIANGLE
from rep_pipeline.pipeline.datasets.synthetic_pairs import SHAPES
from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.storage_schemas.feature_store import KEYPOINT_PAIRS


@pytest.fixture(scope="module")
def pairs():
    ds = build_dataset("synthetic-pairs", pairs=12)
    return ds, ds.keypoint_pairs("test", ds.items("test"))


def test_items_split_and_geometry(pairs):
    ds, rows = pairs
    assert ds.splits() == ("test",) and ds.geometry == "pad" and ds.classes == CLASSES
    assert [it.image_id for it in ds.items("test")][:4] == ["pair-0-src", "pair-0-trg", "pair-1-src", "pair-1-trg"]
    image, label, geometry = ds.load_placed(ds.items("test")[0], 64)
    assert image.shape == (64, 64, 3) and geometry.tolist() == [320, 240, 64, 48, 0, 8]
    assert (label[:8] == 255).all() and (label[56:] == 255).all() and (label[8:56] < len(CLASSES)).all()
    assert all(set(r) | {"dataset_fingerprint"} == set(KEYPOINT_PAIRS.names) for r in rows)
    pa.Table.from_pylist([dict(r, dataset_fingerprint="x") for r in rows], schema=KEYPOINT_PAIRS)


def test_keypoints_are_the_rendered_shapes_centres_exactly(pairs):
    ds, rows = pairs
    for i in range(ds.n_pairs):
        mine = [r for r in rows if r["pair_id"] == f"pair-{i}"]
        assert 2 <= len(mine) <= 3 and len({r["kp_id"] for r in mine}) == len(mine)
        for side in ("src", "trg"):
            rgb, label = ds.render(i, side)
            shapes = label >= CLASSES.index("disc")
            cols, rows_ = np.flatnonzero(shapes.any(0)), np.flatnonzero(shapes.any(1))
            box = [cols[0], rows_[0], cols[-1] + 1, rows_[-1] + 1]  # tight, half-open
            for r in mine:
                cls = CLASSES.index(r["kp_name"])
                assert r["category"] == "synthetic" and r["kp_id"] == SHAPES.index(cls)
                assert [r[f"{side}_bbox_{c}"] for c in ("x1", "y1", "x2", "y2")] == box
                ys, xs = np.nonzero(label == cls)
                x, y = r[f"{side}_x"], r[f"{side}_y"]
                assert xs.mean() == pytest.approx(x, abs=1e-9)
                if cls == TRIANGLE:  # symmetric in x only: its box is centred on the keypoint
                    assert (ys.min() + ys.max()) / 2 == pytest.approx(y, abs=1e-9)
                    assert ys.mean() > y  # the centroid lies lower, towards the base
                else:
                    assert ys.mean() == pytest.approx(y, abs=1e-9)
                assert label[round(y), round(x)] == cls
        src_area = {r["kp_name"]: (ds.labels(i, "src") == CLASSES.index(r["kp_name"])).sum() for r in mine}
        trg_area = {r["kp_name"]: (ds.labels(i, "trg") == CLASSES.index(r["kp_name"])).sum() for r in mine}
        assert all(src_area[n] != trg_area[n] for n in src_area)  # scaled
        assert all((r["src_x"], r["src_y"]) != (r["trg_x"], r["trg_y"]) for r in mine)  # moved


def test_keypoints_land_on_their_shape_on_the_grid(pairs):
    ds, rows = pairs
    items = {it.image_id: it for it in ds.items("test")}
    for r in rows[:12]:
        for side in ("src", "trg"):
            _, label, geometry = ds.load_placed(items[r[f"{side}_image_id"]], 160)
            u, v = to_grid(r[f"{side}_x"], r[f"{side}_y"], geometry)
            assert label[int(np.rint(v)), int(np.rint(u))] == CLASSES.index(r["kp_name"])


def test_deterministic_from_the_seed(pairs):
    ds, rows = pairs
    again = build_dataset("synthetic-pairs", pairs=12)
    assert again.keypoint_pairs("test", again.items("test")) == rows
    for i in (0, 5):
        for side in ("src", "trg"):
            assert all(np.array_equal(a, b) for a, b in zip(ds.render(i, side), again.render(i, side)))
    other = build_dataset("synthetic-pairs", pairs=12, seed=1)
    assert other.keypoint_pairs("test", other.items("test")) != rows
    assert not np.array_equal(other.render(0, "src")[0], ds.render(0, "src")[0])
    taken = ds.items("test", limit=3)  # pair 0 whole, pair 1 half: only pair 0's rows
    assert {r["pair_id"] for r in ds.keypoint_pairs("test", taken)} == {"pair-0"}


def test_options_are_checked():
    square = build_dataset("synthetic-pairs", pairs=2, native_size=(64, 64))
    assert square.render(1, "trg")[1].shape == (64, 64)
    with pytest.raises(ConfigError, match="pairs"):
        build_dataset("synthetic-pairs", pairs=0)
    with pytest.raises(ConfigError, match="native_size"):
        build_dataset("synthetic-pairs", native_size=(16, 320))
    with pytest.raises(ConfigError, match="sizes"):
        build_dataset("synthetic-pairs", sizes={"test": 2})
