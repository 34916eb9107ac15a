"""Pascal-Part: VOC photos with two label maps, objects (the 21 VOC classes, 255 = void) and
parts (``part_ids.txt``: part id -> ``<VOC class id>:<part name>``, 0 = no part), the two
categories ``pascalpart-objects`` and ``pascalpart-parts`` of PROTOCOL.md section 9.2.

Layout: ``images/``, ``objects/``, ``parts/`` (PNG per image) and ``part_ids.txt``; one split,
halved into ``train`` and ``val`` by a seeded permutation of the image ids (section 9.6;
option ``split_seed``, default 0).

Option ``labels`` chooses the primary label map (evaluate, report):

- ``objects`` (default): the 21 VOC classes.
- ``parts6`` (PROTOCOL.md 12.4, A36): the animal subset with six classes, 0 background (every
  pixel outside the animal masks), 1 head, 2 neck, 3 torso, 4 legs, 5 tail, by the table
  ``PART_GROUPS`` of part names; an animal pixel without a part of its own animal is ignored,
  and so are void pixels (255 in the objects map: VOC's band of unknown pixels around objects,
  which is not known to lie outside an animal).
- ``animals6``: the six animal classes (``ANIMALS``) as labels, every other pixel ignored.

With ``parts6`` and ``animals6`` a split keeps only the images whose objects map shows at least
one animal: its half (the same halves as ``objects``) filtered in id order, so the image list
names exactly the kept images. The parts map stays a further label map in every mode.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from .. import config
from ..errors import ConfigError, DataRootError, DatasetError, LabelValueError, SizeMismatchError
from .registry import register_dataset
from .base import Item, LabelMap, SegmentationDataset, _decode, _open_header, _pil_bomb_check_off
from .voc import VOC_CLASSES

PARTS = "pascalpart-parts"
LABELS = ("objects", "parts6", "animals6")  # the values of the ``labels`` option; the first is the default

ANIMALS = ("bird", "cat", "cow", "dog", "horse", "sheep")  # VOC's animals, the classes of ``animals6``
PARTS6 = ("background", "head", "neck", "torso", "legs", "tail")
# Pascal-Part's part names of the six animals -> the ``parts6`` class (PROTOCOL.md 12.4): head =
# head, ears, eyes, nose, muzzle, beak, horns; torso = torso, wings; legs = legs, paws, hooves, feet
# (l/r = left/right, f/b = front/back, u/l before "leg" = upper/lower, pa = paw, ho = hoof)
PART_GROUPS: dict[str, tuple[str, ...]] = {
    "head": ("head", "lear", "rear", "leye", "reye", "nose", "muzzle", "beak", "lhorn", "rhorn"),
    "neck": ("neck",),
    "torso": ("torso", "lwing", "rwing"),
    "legs": ("lleg", "rleg", "lfoot", "rfoot",                                    # bird
             "lfleg", "rfleg", "lbleg", "rbleg", "lfpa", "rfpa", "lbpa", "rbpa",  # cat, dog
             "lfuleg", "lflleg", "rfuleg", "rflleg", "lbuleg", "lblleg", "rbuleg", "rblleg",  # cow, horse, sheep
             "lfho", "rfho", "lbho", "rbho"),                                     # horse
    "tail": ("tail",),
}
_GROUP_OF = {part: PARTS6.index(group) for group, parts in PART_GROUPS.items() for part in parts}

_OBJECT_VALID = np.zeros(256, dtype=bool)  # raw values an objects map may hold: VOC ids and void
_OBJECT_VALID[: len(VOC_CLASSES)] = True
_OBJECT_VALID[config.IGNORE_INDEX] = True
_ANIMAL_OF = np.full(256, -1, dtype=np.int16)  # VOC class id -> index in ANIMALS, -1 for the rest
_ANIMAL_OF[[VOC_CLASSES.index(a) for a in ANIMALS]] = np.arange(len(ANIMALS))
_LISTING_THREADS = 8  # objects maps read at once while a split's animal images are listed


@register_dataset
class PascalPart(SegmentationDataset):
    name = "pascalpart"
    default_splits = ("train", "val")
    root_layout = "images/, objects/, parts/ and part_ids.txt"
    options_allowed = ("split_seed", "labels")

    def __init__(self, root: str | Path | None = None, **options):
        super().__init__(root, **options)
        labels = self.options.pop("labels", LABELS[0])
        if labels not in LABELS:
            raise ConfigError(f"{self.name}: dataset option labels={labels!r}; one of {', '.join(LABELS)}")
        if labels != LABELS[0]:  # the default stays out of the options, so objects stores keep their fingerprint
            self.options["labels"] = labels
        self._kept: dict[str, list[str]] = {}

    @property
    def labels(self) -> str:
        """The primary label map: ``objects``, ``parts6`` or ``animals6``."""
        return str(self.options.get("labels", LABELS[0]))

    @property
    def classes(self) -> tuple[str, ...]:
        return {"objects": VOC_CLASSES, "parts6": PARTS6, "animals6": ANIMALS}[self.labels]

    @property
    def category(self) -> str:
        return f"pascalpart-{self.labels}"

    @cached_property
    def part_classes(self) -> tuple[str, ...]:
        """``<object>:<part>`` names, in part-id order 1..K."""
        path = self.data_root / "part_ids.txt"
        if not path.is_file():
            raise DataRootError(f"{self.name}: part list {path} does not exist")
        names: dict[int, str] = {}
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            pid, _, rest = line.partition(" ")
            obj, _, part = rest.strip().partition(":")
            names[int(pid)] = f"{VOC_CLASSES[int(obj)]}:{part}"
        if sorted(names) != list(range(1, len(names) + 1)):
            raise DataRootError(f"{self.name}: {path} must number parts 1..K without gaps")
        return tuple(names[i] for i in range(1, len(names) + 1))

    @cached_property
    def _part_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(object, group), two length-256 tables over part ids: the VOC class id a part belongs
        to (-1: none) and its ``parts6`` class (-1: not an animal's part). An animal part whose
        name ``PART_GROUPS`` does not know is an error naming it, never a silent ignore."""
        owner, group = np.full(256, -1, dtype=np.int16), np.full(256, -1, dtype=np.int16)
        for pid, full in enumerate(self.part_classes, start=1):
            obj, _, part = full.partition(":")
            owner[pid] = VOC_CLASSES.index(obj)
            if obj in ANIMALS:
                if part not in _GROUP_OF:
                    raise DatasetError(
                        f"{self.name}: part {pid} {full!r} of {self.data_root / 'part_ids.txt'} is an animal part "
                        f"that the parts6 table does not know; add {part!r} to one of "
                        f"{', '.join(PART_GROUPS)} in pipeline/datasets/pascalpart.py (PART_GROUPS)")
                group[pid] = _GROUP_OF[part]
        return owner, group

    def label_maps(self) -> tuple[LabelMap, ...]:
        n = len(self.part_classes)
        table = np.full(256, self.ignore_index, dtype=np.uint8)
        table[1:n + 1] = np.arange(n, dtype=np.uint8)
        valid = np.zeros(256, dtype=bool)
        valid[:n + 1] = True
        valid[self.ignore_index] = True
        return (LabelMap(PARTS, self.part_classes, table, valid),)

    def _list_items(self, split: str) -> list[Item]:
        root = self.data_root
        images = self._require_dir(root / "images", "images/")
        objects, parts = self._require_dir(root / "objects", "objects/"), self._require_dir(root / "parts", "parts/")
        paths = {p.stem: p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
        ids = self._halves(list(paths), split)
        if self.labels == "parts6":
            self._part_tables  # noqa: B018  (an unknown animal part fails here, before any work)
        if self.labels != "objects":
            if split not in self._kept:
                self._kept[split] = self._with_animals(ids, objects)
            ids = self._kept[split]
        return [Item(i, paths[i], objects / f"{i}.png", ((PARTS, parts / f"{i}.png"),)) for i in ids]

    def _with_animals(self, ids: list[str], objects: Path) -> list[str]:
        """The ids (in their order) whose objects map shows at least one animal pixel; every map
        is read whole and its values checked."""
        def shows_animal(image_id: str) -> bool:
            path = objects / f"{image_id}.png"
            with _pil_bomb_check_off(), _open_header(path, "label", config.MAX_IMAGE_PIXELS) as raw:
                values = np.asarray(self._as_label_image(_decode(raw, path, "label"), path))
            present = np.bincount(values.ravel(), minlength=256) > 0
            _check_objects(present, path)
            return bool((_ANIMAL_OF[present] >= 0).any())

        with ThreadPoolExecutor(max_workers=_LISTING_THREADS) as pool:
            return [i for i, keep in zip(ids, pool.map(shows_animal, ids)) if keep]

    # -- parts6 and animals6: the primary labels come from both maps ---------------------------
    def read_pair(self, item: Item, max_pixels: int | None = config.MAX_IMAGE_PIXELS
                  ) -> tuple[Image.Image, Image.Image | None]:
        """The image and, with ``labels`` parts6 or animals6, the label image of their class ids
        (255 = ignore) made from the objects and parts maps, each file checked (pixel limit,
        size, values on the whole file)."""
        image, objects = super().read_pair(item, max_pixels)
        if self.labels == "objects" or objects is None:
            return image, objects
        try:
            values = np.asarray(objects)
            _check_objects(np.bincount(values.ravel(), minlength=256) > 0, item.label_path)
            animal = _ANIMAL_OF[values]
            if self.labels == "animals6":
                derived = np.where(animal >= 0, animal, self.ignore_index)
            else:
                parts = self._read_parts(item, image.size, max_pixels)
                owner, group = self._part_tables
                derived = np.where(values == self.ignore_index, self.ignore_index, 0)  # outside the animals
                own_part = owner[parts] == values  # a part of the animal this pixel shows
                derived = np.where(animal >= 0, np.where(own_part, group[parts], self.ignore_index), derived)
            return image, Image.fromarray(derived.astype(np.uint8))
        except BaseException:
            image.close()
            raise

    def _read_parts(self, item: Item, size: tuple[int, int], max_pixels: int | None) -> np.ndarray:
        """The raw part ids of ``item`` (its one further map), of the image's ``size``."""
        (name, path), = item.extra_labels
        label_map, = self.label_maps()
        with _pil_bomb_check_off(), _open_header(path, f"{name} label", max_pixels) as raw:
            if raw.size != size:
                raise SizeMismatchError(f"image {item.image_path} is {size[0]}x{size[1]} but its {name} label "
                                        f"{path} is {raw.size[0]}x{raw.size[1]}")
            parts = np.asarray(self._as_label_image(_decode(raw, path, "label"), path))
        bad = np.flatnonzero((np.bincount(parts.ravel(), minlength=256) > 0) & ~label_map.valid)
        if bad.size:
            raise LabelValueError(f"label file {path} holds part ids {bad[:10].tolist()} that part_ids.txt does not "
                                  f"list")
        return parts


def _check_objects(present: np.ndarray, path: Path | str) -> None:
    """Refuse an objects map holding values (``present``: a length-256 bool) outside VOC's."""
    bad = np.flatnonzero(present & ~_OBJECT_VALID)
    if bad.size:
        raise LabelValueError(f"label file {path} holds values {bad[:10].tolist()} outside the class table of "
                              f"pascalpart objects ({len(VOC_CLASSES)} classes, {config.IGNORE_INDEX} = ignore)")
