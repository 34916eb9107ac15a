"""``partpairs`` on the real Pascal-Part sample (PROTOCOL.md section 11.5): counts per category,
read back by the SPair reader, every keypoint on its part and inside its class's box."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from rep_pipeline.pipeline.datasets import build_dataset
from rep_pipeline.pipeline.datasets.partpairs import CategoryCounts, build_partpairs
from rep_pipeline.pipeline.datasets.voc import VOC_CLASSES
from rep_pipeline.pipeline.errors import ConfigError, DatasetError, ImageReadError

# the sample's images per class (present) and those whose largest component holds >= 90 %
EXPECTED = {"person": CategoryCounts(8, 6, 30, 338), "cat": CategoryCounts(3, 3, 6, 38),
            "car": CategoryCounts(2, 2, 2, 4), "dog": CategoryCounts(2, 1, 0, 0), "bird": CategoryCounts(2, 1, 0, 0)}


@pytest.fixture(scope="module")
def sample(shared_datasets):
    root = shared_datasets / "pascalpart-sample"
    if not (root / "part_ids.txt").is_file():
        pytest.skip(f"no Pascal-Part sample at {root}")
    return root


@pytest.fixture(scope="module")
def built(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("partpairs") / "set"
    return out, build_partpairs(sample, out)


def _part_ids(sample):
    ids = {}
    for line in (sample / "part_ids.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pid, rest = line.split(" ", 1)
            obj, part = rest.split(":")
            ids[f"{VOC_CLASSES[int(obj)]}:{part}"] = int(pid)
    return ids


def test_counts_per_category(built):
    out, summary = built
    print("\n".join(summary.lines()))
    assert {c: summary.per_category[c] for c in EXPECTED} == EXPECTED
    assert (summary.n_pairs, summary.n_keypoints, summary.n_images) == (38, 380, 11)
    assert summary.lines()[0].startswith("partpairs: 38 pairs, 380 keypoints, 11 images")


def test_the_spair_reader_reads_it_back(built, sample):
    out, summary = built
    ds = build_dataset("spair71k", out)
    assert ds.splits() == ("test",) and ds.geometry == "pad"
    items = ds.items("test")
    rows = ds.keypoint_pairs("test", items)
    assert len(items) == summary.n_images and len(rows) == summary.n_keypoints
    assert len({r["pair_id"] for r in rows}) == summary.n_pairs
    for it in items:  # the photo, byte for byte
        assert it.image_path.read_bytes() == (sample / "images" / f"{it.image_id.split('/')[1]}.jpg").read_bytes()
    pair = json.loads((out / "PairAnnotation" / "test" / f"{rows[0]['pair_id']}.json").read_text())
    assert {pair[f] for f in ("viewpoint_variation", "scale_variation", "truncation", "occlusion")} == {0}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_each_keypoint_is_the_part_pixel_nearest_its_centroid_inside_the_class_box(built, sample):
    out, _ = built
    ds = build_dataset("spair71k", out)
    part_ids, maps = _part_ids(sample), {}
    for r in ds.keypoint_pairs("test", ds.items("test")):
        cls = VOC_CLASSES.index(r["category"])
        for side in ("src", "trg"):
            name = r[f"{side}_image_id"].split("/")[1]
            if name not in maps:
                maps[name] = tuple(np.asarray(Image.open(sample / d / f"{name}.png")) for d in ("objects", "parts"))
            objects, parts = maps[name]
            x, y = int(r[f"{side}_x"]), int(r[f"{side}_y"])
            assert (x, y) == (r[f"{side}_x"], r[f"{side}_y"])
            part = (parts == part_ids[f"{r['category']}:{r['kp_name']}"]) & (objects == cls)
            assert part[y, x] and part.sum() >= 16
            ys, xs = np.nonzero(part)
            d2 = (xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2
            assert (y, x) == (ys[np.argmin(d2)], xs[np.argmin(d2)])  # nearest, first in row-major order
            cols, rows_ = np.nonzero((objects == cls).any(0))[0], np.nonzero((objects == cls).any(1))[0]
            box = [r[f"{side}_bbox_{c}"] for c in ("x1", "y1", "x2", "y2")]
            assert box == [cols[0], rows_[0], cols[-1] + 1, rows_[-1] + 1]  # tight, half-open
            assert box[0] <= x < box[2] and box[1] <= y < box[3]
            assert not r["kp_name"].rsplit("_", 1)[-1].isdigit()  # numbered parts dropped


def test_kp_ids_are_consistent_across_pairs(built):
    out, _ = built
    ds = build_dataset("spair71k", out)
    by_name = {}
    for r in ds.keypoint_pairs("test", ds.items("test")):
        by_name.setdefault((r["category"], r["kp_name"]), set()).add(r["kp_id"])
    assert all(len(ids) == 1 for ids in by_name.values())
    person = sorted((name, ids.pop()) for (cat, name), ids in by_name.items() if cat == "person")
    assert [i for _, i in person] == sorted(i for _, i in person)  # ids follow the sorted names
    assert {"lear", "rear"} <= {name for name, _ in person}  # left and right stay distinct


def test_thresholds_change_what_is_usable(sample, tmp_path):
    summary = build_partpairs(sample, tmp_path / "loose", min_component_fraction=0.5, min_part_area=1)
    assert summary.per_category["dog"].usable == 2 and summary.per_category["dog"].pairs == 2
    assert summary.n_keypoints > 380
    with pytest.raises(ConfigError, match="min_component_fraction"):
        build_partpairs(sample, tmp_path / "x", min_component_fraction=0)
    with pytest.raises(ConfigError, match="min_part_area"):
        build_partpairs(sample, tmp_path / "x", min_part_area=0)


def test_an_existing_output_is_refused_and_an_error_leaves_nothing(sample, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="exists and is not an empty folder"):
        build_partpairs(sample, full)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_partpairs(sample, empty).n_pairs == 38  # an empty folder is taken
    broken = tmp_path / "broken"
    shutil.copytree(sample, broken)
    (broken / "parts" / "2010_005275.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="2010_005275.png"):
        build_partpairs(broken, tmp_path / "never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty", "full"]  # no partial folder
