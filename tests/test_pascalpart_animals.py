"""Pascal-Part's animal subset (PROTOCOL.md 12.4, A36): ``labels: parts6`` and ``animals6`` on the
real sample, every expected value worked out here from the raw PNGs and part_ids.txt."""
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from rep_pipeline.pipeline.datasets import build_dataset
from rep_pipeline.pipeline.datasets.geometry import place
from rep_pipeline.pipeline.errors import ConfigError, DatasetError, FingerprintMismatchError
from rep_pipeline.pipeline.store import FeatureStore

pytestmark = pytest.mark.realdata

S = 96
VOC_ANIMALS = {3: "bird", 8: "cat", 10: "cow", 12: "dog", 13: "horse", 17: "sheep"}  # VOC class id -> name
# what the sample holds (PROTOCOL.md 12.4: bird 2, cat 3, dog 2, horse 1), read off the objects maps
SAMPLE_ANIMALS = {"2008_001978": "bird", "2010_005511": "bird", "2008_003228": "cat", "2008_006462": "cat",
                  "2010_005275": "cat", "2008_003497": "dog", "2008_005643": "dog", "2010_005243": "horse"}


@pytest.fixture(scope="module")
def root(shared_datasets):
    return shared_datasets / "pascalpart-sample"


def _parts6_class(name):
    """12.4's grouping, by the words of the part names: 1 head (head, ears, eyes, nose, muzzle,
    beak, horns), 2 neck, 3 torso (torso, wings), 4 legs (legs, paws, hooves, feet), 5 tail."""
    if re.fullmatch(r"head|[lr](ear|eye|horn)|nose|muzzle|beak", name):
        return 1
    if name == "neck":
        return 2
    if re.fullmatch(r"torso|[lr]wing", name):
        return 3
    if re.fullmatch(r"[lr]([fb][ul]?)?(leg|pa|ho|foot)", name):
        return 4
    if name == "tail":
        return 5
    raise AssertionError(f"no parts6 class for {name}")


def _part_list(root):
    """part id -> (VOC class id, part name), straight from part_ids.txt."""
    out = {}
    for line in (root / "part_ids.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pid, rest = line.split()
            obj, name = rest.split(":")
            out[int(pid)] = (int(obj), name)
    return out


def _raw(root, image_id):
    return (np.asarray(Image.open(root / "objects" / f"{image_id}.png")),
            np.asarray(Image.open(root / "parts" / f"{image_id}.png")))


def _expected(root, image_id, labels):
    """The full-size label map, pixel by pixel from the two raw maps."""
    objects, parts = _raw(root, image_id)
    part_list = _part_list(root)
    out = np.full(objects.shape, 255, dtype=np.uint8)
    if labels == "animals6":
        for voc_id, name in VOC_ANIMALS.items():
            out[objects == voc_id] = sorted(VOC_ANIMALS.values()).index(name)
        return out
    out[(objects != 255) & ~np.isin(objects, list(VOC_ANIMALS))] = 0
    for pid in np.unique(parts[np.isin(objects, list(VOC_ANIMALS))]):
        if pid == 0:
            continue  # an animal pixel without a part: ignored
        owner, name = part_list[int(pid)]
        out[(parts == pid) & (objects == owner)] = _parts6_class(name)
    return out


def _on_grid(label):
    """A full-size class map placed as the dataset places labels (crop, nearest)."""
    return np.asarray(place(Image.fromarray(label), S, "crop", Image.NEAREST, 0))


@pytest.mark.parametrize("labels", ["parts6", "animals6"])
def test_the_kept_images_are_the_animal_ones_in_the_objects_halves(root, labels):
    animal_images = {p.stem for p in (root / "objects").iterdir()
                     if np.isin(np.asarray(Image.open(p)), list(VOC_ANIMALS)).any()}
    assert animal_images == set(SAMPLE_ANIMALS)
    objects = build_dataset("pascalpart", root)
    ds = build_dataset("pascalpart", root, labels=labels)
    kept = []
    for split in ("train", "val"):
        ids = [i.image_id for i in ds.items(split)]
        assert ids == [i.image_id for i in objects.items(split) if i.image_id in SAMPLE_ANIMALS]  # same halves, order
        assert ids == [i.image_id for i in build_dataset("pascalpart", root, labels=labels).items(split)]
        assert ds.fingerprint(split, ds.items(split), S)["n_images"] == len(ids)
        kept += ids
    assert sorted(kept) == sorted(SAMPLE_ANIMALS)
    counts = {a: sum(v == a for v in SAMPLE_ANIMALS.values()) for a in ("bird", "cat", "dog", "horse")}
    assert counts == {"bird": 2, "cat": 3, "dog": 2, "horse": 1}


def test_parts6_labels_equal_the_raw_maps_grouped(root):
    ds = build_dataset("pascalpart", root, labels="parts6")
    assert ds.classes == ("background", "head", "neck", "torso", "legs", "tail")
    seen = np.zeros(6, dtype=int)
    ignored_inside = 0
    for item in ds.items("train") + ds.items("val"):
        want = _expected(root, item.image_id, "parts6")
        objects, parts = _raw(root, item.image_id)
        ignored_inside += int((np.isin(objects, list(VOC_ANIMALS)) & (parts == 0)).sum())
        assert ((want == 255) == (np.isin(objects, list(VOC_ANIMALS)) & (parts == 0))).all()  # 255 only there
        image, label = ds.load(item, S)
        assert image.shape == (S, S, 3)
        np.testing.assert_array_equal(label, _on_grid(want), err_msg=item.image_id)
        seen += np.bincount(want[want != 255], minlength=6)
        assert set(ds.load_extra(item, S)) == {"pascalpart-parts"}  # the parts stay a further map
    assert (seen > 0).all() and ignored_inside > 0  # every class shows, and so do unlabelled animal pixels


def test_a_person_on_a_horse_is_background(root):
    """Everything outside the animal masks is background, other objects included."""
    ds = build_dataset("pascalpart", root, labels="parts6")
    item, = (i for i in ds.items("val") if i.image_id == "2010_005243")
    label = ds.read_pair(item)[1]
    objects, _ = _raw(root, item.image_id)
    assert (np.asarray(label)[objects == 15] == 0).all() and (objects == 15).any()


def test_animals6_labels_are_the_animal_classes_and_ignore_the_rest(root):
    ds = build_dataset("pascalpart", root, labels="animals6")
    assert ds.classes == ("bird", "cat", "cow", "dog", "horse", "sheep")
    for item in ds.items("train") + ds.items("val"):
        want = _expected(root, item.image_id, "animals6")
        _, label = ds.load(item, S)
        np.testing.assert_array_equal(label, _on_grid(want), err_msg=item.image_id)
        present = set(np.unique(want[want != 255]).tolist())
        assert present == {ds.classes.index(SAMPLE_ANIMALS[item.image_id])}


def test_pad_geometry_ignores_the_padding(root):
    ds = build_dataset("pascalpart", root, labels="parts6", geometry="pad")
    item = ds.items("train")[0]
    _, label = ds.load(item, S)
    w, h = Image.open(item.image_path).size
    assert w != h and (label == 255).any() and (label == 0).any()


def test_the_label_option_changes_the_fingerprint_and_a_store_refuses_the_mix(root, tmp_path):
    objects, parts6 = build_dataset("pascalpart", root), build_dataset("pascalpart", root, labels="parts6")
    assert build_dataset("pascalpart", root, labels="objects").options == objects.options  # default = absent
    fp_objects = objects.fingerprint("val", objects.items("val"), S)
    fp_parts6 = parts6.fingerprint("val", parts6.items("val"), S)
    assert fp_parts6["classes"] == list(parts6.classes) and len(fp_parts6["classes"]) == 6
    assert fp_parts6["options"]["labels"] == "parts6" and "labels" not in fp_objects["options"]
    assert fp_parts6["category"] == "pascalpart-parts6" and fp_objects["category"] == "pascalpart-objects"
    store = FeatureStore(tmp_path / "s.zarr", mode="a")
    items = objects.items("val")
    store.require_dataset_split(fp_objects, [i.image_id for i in items], objects.palette, 4)
    with pytest.raises(FingerprintMismatchError, match="refusing to mix"):
        store.check_request("m", fp_parts6, 4, {})


def test_bad_label_option_and_unknown_animal_part_are_errors(root, tmp_path):
    with pytest.raises(ConfigError, match=r"labels='parts7'.*objects, parts6, animals6"):
        build_dataset("pascalpart", root, labels="parts7")
    copy = tmp_path / "pp"
    copy.mkdir()
    for sub in ("images", "objects", "parts"):
        (copy / sub).symlink_to(root / sub)
    listed = (root / "part_ids.txt").read_text()
    shutil.copy(root / "part_ids.txt", copy / "part_ids.txt")
    (copy / "part_ids.txt").write_text(listed.rstrip("\n") + f"\n{len(_part_list(root)) + 1} 12:whisker\n")
    for labels in ("objects", "animals6"):  # these do not group parts
        assert build_dataset("pascalpart", copy, labels=labels).items("val")
    with pytest.raises(DatasetError, match=r"'dog:whisker'.*PART_GROUPS"):
        build_dataset("pascalpart", copy, labels="parts6").items("val")
