"""The SPair-71k reader against a small SPair-format set written here: real JPEGs and JSON files
in SPair's layout, read back field for field, and every malformed annotation refused by name."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from rep_pipeline.pipeline.datasets import build_dataset
from rep_pipeline.pipeline.datasets.geometry import placement
from rep_pipeline.pipeline.datasets.spair import FLAGS, SPAIR_CATEGORIES
from rep_pipeline.pipeline.errors import DataRootError, DatasetError, EmptySplitError
from rep_pipeline.pipeline.location import as_location
from rep_pipeline.storage_schemas.feature_store import KEYPOINT_PAIRS

SIZES = {"cat/c1": (40, 30), "cat/c2": (36, 44), "cat/c3": (48, 32), "dog/d1": (50, 40), "dog/d2": (30, 30)}
TEST_PAIRS = ["000001-c1-c2:cat", "000002-d1-d2:dog", "000003-c2-c3:cat", "000004-c2-c1:cat"]
TRN_PAIRS = ["000010-d2-d1:dog"]


def _doc(pair_id: str, n_kps: int, seed: int) -> dict:
    """A valid annotation of ``pair_id``: keypoints inside both images, flags varied (one missing)."""
    numbered, _, category = pair_id.partition(":")
    _, src, trg = numbered.split("-")
    rng = np.random.default_rng(seed)
    doc = {"src_imname": f"{src}.jpg", "trg_imname": f"{trg}.jpg", "category": category, "mirror": 0}
    for side, name in (("src", src), ("trg", trg)):
        w, h = SIZES[f"{category}/{name}"]
        doc[f"{side}_imsize"] = [w, h, 3]
        doc[f"{side}_bndbox"] = [1, 2, w - 3, h - 1]
        xs, ys = rng.integers(0, w, n_kps), rng.uniform(0, h - 1, n_kps)
        doc[f"{side}_kps"] = [[int(x), float(y)] for x, y in zip(xs, ys)]
    ids = sorted(rng.choice(20, n_kps, replace=False).tolist())
    doc["kps_ids"] = [str(i) for i in ids] if seed % 2 else ids  # SPair writes strings; integers read too
    doc.update(viewpoint_variation=seed % 3, scale_variation=1, truncation=0, occlusion=seed % 2)
    if seed == 2:
        del doc["occlusion"]  # a missing flag reads as null
    return doc


def _write_spair(root):
    """SPair's layout under ``root``: JPEGImages, PairAnnotation/{test,trn}, Layout/large."""
    for image_id, (w, h) in SIZES.items():
        path = root / "JPEGImages" / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    (root / "JPEGImages" / "cat" / "unrelated.txt").write_text("a file that is no photo of any pair")
    docs = {}
    for split, pairs in (("test", TEST_PAIRS), ("trn", TRN_PAIRS)):
        (root / "PairAnnotation" / split).mkdir(parents=True)
        (root / "Layout" / "large").mkdir(parents=True, exist_ok=True)
        (root / "Layout" / "large" / f"{split}.txt").write_text("\n".join(pairs) + "\n\n")
        for seed, pair_id in enumerate(pairs):
            docs[pair_id] = _doc(pair_id, 3 + seed, seed)
            _write_doc(root, split, pair_id, docs[pair_id])
    return docs


def _write_doc(root, split, pair_id, doc):
    (root / "PairAnnotation" / split / f"{pair_id}.json").write_text(json.dumps(doc))


def _expected_rows(pair_ids, docs):
    """The KEYPOINT_PAIRS rows of ``pair_ids``, built from the JSON written."""
    rows = []
    for pair_id in pair_ids:
        d = docs[pair_id]
        src, trg = (f"{d['category']}/{d[k].removesuffix('.jpg')}" for k in ("src_imname", "trg_imname"))
        for k, kp_id in enumerate(d["kps_ids"]):
            rows.append({"pair_id": pair_id, "category": d["category"], "src_image_id": src, "trg_image_id": trg,
                         "kp_id": int(kp_id), "kp_name": None,
                         "src_x": d["src_kps"][k][0], "src_y": d["src_kps"][k][1],
                         "trg_x": d["trg_kps"][k][0], "trg_y": d["trg_kps"][k][1],
                         **{f"{s}_bbox_{c}": d[f"{s}_bndbox"][i] for s in ("src", "trg")
                            for i, c in enumerate(("x1", "y1", "x2", "y2"))},
                         **{f: d.get(f) for f in FLAGS}})
    return rows


@pytest.fixture
def spair(tmp_path):
    root = tmp_path / "spair"
    return root, _write_spair(root)


def test_items_splits_and_geometry(spair):
    root, _ = spair
    ds = build_dataset("spair71k", root)
    assert ds.splits() == ("trn", "test")  # SPair's order, the splits that have a list
    assert ds.classes == SPAIR_CATEGORIES and len(ds.classes) == 18 and ds.geometry == "pad"
    assert build_dataset("spair71k", root, geometry="crop").geometry == "crop"
    items = ds.items("test")
    assert [it.image_id for it in items] == ["cat/c1", "cat/c2", "dog/d1", "dog/d2", "cat/c3"]  # first appearance
    assert all(it.image_path == root / "JPEGImages" / f"{it.image_id}.jpg" and it.label_path is None for it in items)
    assert [it.image_id for it in ds.items("trn")] == ["dog/d2", "dog/d1"]
    image, label, geometry = ds.load_placed(items[1], 32)
    assert image.shape == (32, 32, 3) and (label == 255).all()
    assert geometry.tolist() == list(placement(36, 44, 32, "pad")) == [36, 44, 26, 32, 3, 0]
    with pytest.raises(EmptySplitError, match="val"):
        ds.items("val")


def test_keypoint_rows_equal_the_json_field_for_field(spair):
    root, docs = spair
    ds = build_dataset("spair71k", root)
    rows = ds.keypoint_pairs("test", ds.items("test"))
    assert rows == _expected_rows(TEST_PAIRS, docs)  # every column of every row, in list order
    assert [r["occlusion"] for r in rows if r["pair_id"] == TEST_PAIRS[2]] == [None] * 5
    assert all(set(r) | {"dataset_fingerprint"} == set(KEYPOINT_PAIRS.names) for r in rows)
    table = pa.Table.from_pylist([dict(r, dataset_fingerprint="x") for r in rows], schema=KEYPOINT_PAIRS)
    assert table.num_rows == sum(len(docs[p]["kps_ids"]) for p in TEST_PAIRS)
    assert ds.keypoint_pairs("trn", ds.items("trn")) == _expected_rows(TRN_PAIRS, docs)
    # only the pairs whose two images are both taken (a --limit run)
    limited = ds.keypoint_pairs("test", ds.items("test", limit=2))
    assert {r["pair_id"] for r in limited} == {TEST_PAIRS[0], TEST_PAIRS[3]}


def test_annotations_are_read_once_per_split(spair):
    root, docs = spair
    ds = build_dataset("spair71k", root)
    first = ds.keypoint_pairs("test", ds.items("test"))
    shutil.rmtree(root / "PairAnnotation" / "test")
    assert ds.keypoint_pairs("test", ds.items("test")) == first
    with pytest.raises(DataRootError, match="does not exist"):
        build_dataset("spair71k", root).items("test")


def test_kps_names_fill_kp_name(spair):
    root, docs = spair
    doc = dict(docs[TEST_PAIRS[0]], kps_names=["a", "b", "c"])
    _write_doc(root, "test", TEST_PAIRS[0], doc)
    ds = build_dataset("spair71k", root)
    assert [r["kp_name"] for r in ds.keypoint_pairs("test", ds.items("test"))][:4] == ["a", "b", "c", None]


def _set(key, value):
    return lambda doc: doc.__setitem__(key, value)


BAD_DOCS = {  # case: (change to the first test pair's annotation, field the message names)
    "missing key": (lambda doc: doc.pop("trg_kps"), "'trg_kps'"),
    "unequal lengths": (lambda doc: doc["kps_ids"].pop(), "kps_ids"),
    "non-finite": (lambda doc: doc["src_kps"][1].__setitem__(0, math.nan), "'src_kps'"),
    "infinite box": (lambda doc: doc["trg_bndbox"].__setitem__(2, math.inf), "'trg_bndbox'"),
    "malformed point": (_set("src_kps", [[1, 2, 3], [4, 5], [6, 7]]), "'src_kps'"),
    "string coordinate": (_set("trg_kps", [["1", 2], [4, 5], [6, 7]]), "'trg_kps'"),
    "box x2 < x1": (_set("src_bndbox", [10, 2, 5, 8]), "'src_bndbox'"),
    "box of 3": (_set("src_bndbox", [10, 2, 5]), "'src_bndbox'"),
    "keypoint outside": (lambda doc: doc["trg_kps"][2].__setitem__(0, 37), "'trg_kps'"),  # c2 is 36 wide
    "negative keypoint": (lambda doc: doc["src_kps"][0].__setitem__(1, -1), "'src_kps'"),
    "bad imsize": (_set("src_imsize", [40]), "'src_imsize'"),
    "category mismatch": (_set("category", "dog"), "'category'"),
    "unknown category": (_set("category", "unicorn"), "'category'"),
    "image names": (_set("trg_imname", "c3.jpg"), "'src_imname'"),
    "bad flag": (_set("truncation", "yes"), "'truncation'"),
    "flag out of int8": (_set("occlusion", 300), "'occlusion'"),
    "repeated kp id": (_set("kps_ids", [1, 1, 2]), "'kps_ids'"),
    "kp id not int": (_set("kps_ids", [1, 2.5, 3]), "'kps_ids'"),
    "kp id not a number": (_set("kps_ids", ["1", "two", "3"]), "'kps_ids'"),
    "kps_names length": (_set("kps_names", ["a"]), "'kps_names'"),
}


@pytest.mark.parametrize("case", BAD_DOCS)
def test_a_malformed_annotation_is_refused_naming_the_file_and_field(spair, case):
    root, docs = spair
    change, field = BAD_DOCS[case]
    doc = json.loads(json.dumps(docs[TEST_PAIRS[0]]))
    change(doc)
    _write_doc(root, "test", TEST_PAIRS[0], doc)
    with pytest.raises(DatasetError) as err:
        build_dataset("spair71k", root).items("test")
    assert f"{TEST_PAIRS[0]}.json" in str(err.value) and field in str(err.value), str(err.value)


def test_files_that_are_missing_or_unreadable_are_named(spair):
    root, docs = spair
    path = root / "PairAnnotation" / "test" / f"{TEST_PAIRS[2]}.json"
    path.write_text("{not json")
    with pytest.raises(DatasetError, match=f"{TEST_PAIRS[2]}.json is not valid JSON"):
        build_dataset("spair71k", root).items("test")
    path.write_text("[1, 2]")
    with pytest.raises(DatasetError, match=f"{TEST_PAIRS[2]}.json must hold a JSON object"):
        build_dataset("spair71k", root).items("test")
    path.unlink()
    with pytest.raises(DataRootError, match=f"{TEST_PAIRS[2]}.json does not exist"):
        build_dataset("spair71k", root).items("test")
    _write_doc(root, "test", TEST_PAIRS[2], docs[TEST_PAIRS[2]])
    (root / "JPEGImages" / "cat" / "c3.jpg").unlink()
    with pytest.raises(DataRootError, match=rf"{TEST_PAIRS[2]}.json: field 'trg_imname' names .*c3.jpg"):
        build_dataset("spair71k", root).items("test")
    shutil.rmtree(root / "JPEGImages" / "dog")
    with pytest.raises(DataRootError, match=rf"{TEST_PAIRS[1]}.json: field 'src_imname' names .*d1.jpg"):
        build_dataset("spair71k", root).items("test")


def test_pair_lists_that_are_missing_or_repeat_a_pair_are_named(spair):
    root, _ = spair
    ds = build_dataset("spair71k", root)
    with pytest.raises(DataRootError, match="val.txt does not exist"):
        ds.pairs("val")
    (root / "Layout" / "large" / "test.txt").write_text("\n".join(TEST_PAIRS + TEST_PAIRS[1:2]))
    with pytest.raises(DatasetError, match=f"test.txt names pair '{TEST_PAIRS[1]}' twice"):
        build_dataset("spair71k", root).items("test")
    shutil.rmtree(root / "Layout")
    with pytest.raises(DataRootError, match="Layout/large"):
        build_dataset("spair71k", root).splits()
    with pytest.raises(DataRootError, match="--data-root"):
        build_dataset("spair71k").splits()


def test_a_root_in_object_storage_reads_alike(spair, s3):
    root, _ = spair
    remote = as_location(s3.url("spair"))
    for path in (p for p in root.rglob("*") if p.is_file()):
        (remote / path.relative_to(root).as_posix()).write_bytes(path.read_bytes())
    local, ds = build_dataset("spair71k", root), build_dataset("spair71k", str(remote))
    assert ds.splits() == local.splits()
    items = ds.items("test")
    assert [it.image_id for it in items] == [it.image_id for it in local.items("test")]
    assert ds.keypoint_pairs("test", items) == local.keypoint_pairs("test", local.items("test"))
    assert np.array_equal(ds.load(items[0], 32)[0], local.load(local.items("test")[0], 32)[0])
