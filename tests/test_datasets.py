import numpy as np
import pytest
from PIL import Image

from rep_pipeline.pipeline.datasets import build_dataset, voc_palette
from rep_pipeline.pipeline.datasets.base import resize_shorter_and_crop
from rep_pipeline.pipeline.datasets.cocostuff import COARSE_NAMES, FINE_TO_COARSE
from rep_pipeline.pipeline.errors import (ConfigError, DataRootError, EmptySplitError, ImageReadError, LabelValueError,
                             SizeMismatchError)


def _write_pair(root, split_dir, name, size=(64, 48), label_value=1, label_size=None):
    (root / "images" / split_dir).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split_dir).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / split_dir / f"{name}.png")
    ls = label_size or size
    lab = np.zeros((ls[1], ls[0]), dtype=np.uint8)
    lab[: ls[1] // 2] = label_value
    Image.fromarray(lab).save(root / "labels" / split_dir / f"{name}.png")


def _item(root, image_id):
    return next(i for i in build_dataset("folder", root).items("all") if i.image_id == image_id)


def test_cocostuff_table_maps_every_fine_id_once():
    assert len(COARSE_NAMES) == 27
    assert (FINE_TO_COARSE >= 0).all() and FINE_TO_COARSE.shape == (182,)
    assert np.bincount(FINE_TO_COARSE, minlength=27).min() >= 1
    assert FINE_TO_COARSE[0] == 9 and COARSE_NAMES[9] == "person"      # person
    assert FINE_TO_COARSE[156] == 23 and COARSE_NAMES[23] == "sky"      # sky-other
    assert COARSE_NAMES[2] == "food (thing)" and COARSE_NAMES[14] == "food (stuff)"


def test_voc_palette_is_the_bit_shift_map():
    pal = voc_palette(256)
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0] and pal[2].tolist() == [0, 128, 0]
    assert pal[3].tolist() == [128, 128, 0] and pal[15].tolist() == [192, 128, 128]
    assert len({tuple(c) for c in pal}) == 256


def test_resize_shorter_side_then_centre_crop():
    label = np.zeros((300, 600), dtype=np.uint8)
    label[:, 300:] = 7  # right half
    out = np.asarray(resize_shorter_and_crop(Image.fromarray(label), 100, Image.NEAREST))
    assert out.shape == (100, 100)
    assert set(np.unique(out)) == {0, 7}           # nearest keeps the value set
    assert (out[:, :50] == 0).all() and (out[:, 50:] == 7).all()  # the crop is centred


def test_synthetic_is_deterministic_and_can_be_position_free():
    ds = build_dataset("synthetic", sizes={"train": 40})
    a, b = ds.load(ds.items("train")[3], 64), ds.load(ds.items("train")[3], 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    other = build_dataset("synthetic", seed=1, sizes={"train": 40})
    assert not np.array_equal(other.load(other.items("train")[3], 64)[0], a[0])
    labels = np.stack([ds.load(i, 64)[1] for i in ds.items("train")])
    assert set(np.unique(labels)) <= set(range(6))
    sky_top, sky_bottom = (labels[:, :16] == 0).mean(), (labels[:, -16:] == 0).mean()
    assert sky_top > 0.9 and sky_bottom == 0.0      # layout bias: sky on top
    free = build_dataset("synthetic", layout_bias=False, sizes={"train": 40})
    labels = np.stack([free.load(i, 64)[1] for i in free.items("train")])
    assert 0.1 < (labels[:, -16:] == 0).mean() and 0.1 < (labels[:, :16] == 0).mean()


def test_folder_dataset_with_and_without_labels(tmp_path):
    for i in range(3):
        _write_pair(tmp_path, "", f"im{i}", label_value=2)
    (tmp_path / "classes.txt").write_text("# id name\n0 background\n1 cat\n2 dog\n255 void\n")
    ds = build_dataset("folder", tmp_path)
    assert ds.splits() == ("all",) and ds.classes == ("background", "cat", "dog")
    image, label = ds.load(ds.items("all")[0], 32)
    assert image.shape == (32, 32, 3) and set(np.unique(label)) == {0, 2}
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(bare / "a.jpg")
    ds = build_dataset("folder", bare)
    image, label = ds.load(ds.items("all")[0], 16)
    assert (label == 255).all() and ds.classes == ()


def test_cityscapes_label_ids_shift_by_seven(tmp_path):
    for sub in ("leftImg8bit/val/aachen", "gtFine/val/aachen"):
        (tmp_path / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(tmp_path / "leftImg8bit/val/aachen/a_000_leftImg8bit.png")
    ids = np.array([[0, 6, 7, 8, 26, 33, 34, 255] * 2] * 8, dtype=np.uint8)
    Image.fromarray(ids).save(tmp_path / "gtFine/val/aachen/a_000_gtFine_labelIds.png")
    ds = build_dataset("cityscapes27", tmp_path)
    item = ds.items("val")[0]
    assert item.image_id == "a_000"
    assert ds.map_labels(ids, "x")[0, :8].tolist() == [255, 255, 0, 1, 19, 26, 255, 255]


def test_bad_inputs_name_the_file(tmp_path):
    _write_pair(tmp_path, "", "good")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image at all")
    ds = build_dataset("folder", tmp_path)
    items = {i.image_id: i for i in ds.items("all")}
    with pytest.raises(ImageReadError, match="broken.png"):
        ds.load(items["broken"], 32)
    _write_pair(tmp_path, "", "outofrange", label_value=9)
    with pytest.raises(LabelValueError, match=r"outofrange\.png.*\[9\]"):
        ds.load(_item(tmp_path, "outofrange"), 32)
    _write_pair(tmp_path, "", "mismatch", label_size=(10, 10))
    with pytest.raises(SizeMismatchError, match="mismatch.png"):
        ds.load(_item(tmp_path, "mismatch"), 32)
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "labels" / "good.png")
    with pytest.raises(LabelValueError, match="good.png.*RGB"):
        ds.load(items["good"], 32)


def test_empty_split_wrong_root_and_unknown_names(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(EmptySplitError, match="lists no images"):
        build_dataset("folder", tmp_path).items("all")
    with pytest.raises(DataRootError, match="annotations/val2017|images/val2017"):
        build_dataset("cocostuff27", tmp_path).items("val2017")
    with pytest.raises(DataRootError, match="does not exist"):
        build_dataset("folder", tmp_path / "nowhere").items("all")
    with pytest.raises(EmptySplitError, match="available: train, val"):
        build_dataset("synthetic").items("test")
    with pytest.raises(ConfigError, match="available"):
        build_dataset("imagenet")


@pytest.mark.realdata
def test_cocostuff_sample_labels_follow_the_protocol_table(shared_datasets):
    """27-class labels against the raw fine labels, with the PROTOCOL.md table retyped here
    (a deliberately independent copy) and the raw PNG read without the dataset class."""
    protocol = {
        0: "71-76", 1: "77-82", 2: "51-60", 3: "61-70", 4: "83-90", 5: "43-50", 6: "25-32", 7: "15-24",
        8: "9-14", 9: "0", 10: "33-42", 11: "1-8", 12: "101-102", 13: "100,113-117", 14: "120-121,152,169",
        15: "97,106-107,109,111,122,129,132,155,160,164", 16: "99,131,138,142",
        17: "91-92,103-104,108,130,136,140,151,166-167", 18: "170-176", 19: "179-180",
        20: "94-95,127,150,157,165", 21: "110,124-125,135,139,143-144,146,148,153,158",
        22: "93,96,118,123,128,133,141,162,168", 23: "105,156", 24: "126,134,149,159,161,181",
        25: "98,112,137,145,163", 26: "119,147,154,177-178",
    }
    lut = {255: 255}
    for coarse, spec in protocol.items():
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            lut.update({f: coarse for f in range(int(lo), int(hi or lo) + 1)})
    root = shared_datasets / "cocostuff-sample"
    ds = build_dataset("cocostuff27", root)
    for split, n in (("train2017", 147), ("val2017", 108)):
        items = ds.items(split)
        assert len(items) == n
        for item in items[:12]:
            _, label = ds.load(item, 320)
            raw = np.asarray(resize_shorter_and_crop(Image.open(item.label_path), 320, Image.NEAREST))
            expected = np.vectorize(lut.__getitem__)(raw)
            assert np.array_equal(label, expected), item.label_path
            assert label.shape == (320, 320)


def test_ade150_and_pascal_part_samples_are_halved_and_read_whole(shared_datasets):
    """The one-split samples become train and val halves, disjoint, by a seeded permutation
    (another seed, other halves); every label value is in its class table; Pascal-Part carries
    its parts as a second label map (PROTOCOL.md 9.2, 9.6)."""
    from rep_pipeline.pipeline.datasets import build_dataset

    for name, folder, n_classes in (("ade150", "ade20k-sample", 150), ("pascalpart", "pascalpart-sample", 21)):
        dataset = build_dataset(name, shared_datasets / folder)
        train, val = ([i.image_id for i in dataset.items(s)] for s in ("train", "val"))
        assert dataset.splits() == ("train", "val") and len(dataset.classes) == n_classes
        assert not set(train) & set(val) and abs(len(train) - len(val)) <= 1
        other = build_dataset(name, shared_datasets / folder, split_seed=1)
        assert sorted(i.image_id for i in other.items("train")) != sorted(train)
        for item in dataset.items("val")[:3]:
            image, label = dataset.load(item, 64)
            assert image.shape == (64, 64, 3) and (label[label != 255] < n_classes).all()
            extra = dataset.load_extra(item, 64)
            assert set(extra) == {m.name for m in dataset.label_maps()}
    parts = build_dataset("pascalpart", shared_datasets / "pascalpart-sample")
    assert parts.category == "pascalpart-objects" and parts.label_maps()[0].classes[0] == "person:head"
    fp = parts.fingerprint("val", parts.items("val"), 64)
    assert fp["label_maps"] == {"pascalpart-parts": list(parts.part_classes)} and fp["category"] == "pascalpart-objects"
