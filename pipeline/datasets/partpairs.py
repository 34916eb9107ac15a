"""``partpairs``: a small SPair-format set built from Pascal-Part (PROTOCOL.md section 11.5), so
the correspondence path runs on real photos where SPair-71k itself is absent.

Per image and VOC class (SPair's 18 categories; Pascal-Part has no parts for diningtable or
sofa): the class is usable if its mask's largest 8-connected component holds at least
``min_component_fraction`` of its pixels (the maps carry no instance ids). Its keypoints are
its parts of at least ``min_part_area`` pixels, a part's pixels being those of the part id
that the object map also gives to the class (a part pixel under another object is hidden);
left and right parts stay distinct, numbered parts (``wheel_1``, ``door_2``: numbering not
consistent across instances) are dropped. The keypoint is the part pixel nearest to the
part's centroid (ties: the first in row-major order), as integer pixel indices x = column,
y = row (the convention of section 8.2, pixel k spanning [k, k + 1)).

Conventions of the written JSON (SPair's fields; flags 0):
- ``*_bndbox`` [x1, y1, x2, y2] is the tight box of the class mask, half-open: x1 = the
  smallest column, x2 = the largest + 1, so x2 - x1 (PROTOCOL's w_bb, 11.4) is the
  object's width in pixels.
- ``kps_ids``: the part's index in the sorted list of the category's un-numbered part names
  of ``part_ids.txt`` (0-based, as SPair's ids are per category), the same in every image;
  ``kps_names`` (an addition SPair lacks; the ``spair71k`` reader reads it as ``kp_name``)
  gives the part names.
- Pairs: all ordered pairs of distinct usable images of a category, with the parts both
  show; a pair with none is skipped. Pair ids ``<number>-<src>-<trg>:<category>``, numbered
  from 1 in SPair's category order, then source and target name.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .. import config
from ..errors import ConfigError, DatasetError, LabelValueError, SizeMismatchError
from ..location import is_url
from .base import Item, _decode, _open_header, _pil_bomb_check_off
from .geometry import tight_box
from .pascalpart import PascalPart
from .spair import FLAGS, SPAIR_CATEGORIES
from .voc import VOC_CLASSES

_NUMBERED = re.compile(r"_\d+$")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
SPLIT = "test"


@dataclass(frozen=True)
class CategoryCounts:
    """Images where the class appears, those usable, and the pairs and keypoints written."""

    present: int = 0
    usable: int = 0
    pairs: int = 0
    keypoints: int = 0


@dataclass(frozen=True)
class PartPairsSummary:
    """What ``build_partpairs`` wrote: images (``<category>/<name>``), pairs, keypoints."""

    out: Path
    n_images: int
    n_pairs: int
    n_keypoints: int
    per_category: dict[str, CategoryCounts] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The summary as text lines, one per category, for the CLI to print."""
        head = f"partpairs: {self.n_pairs} pairs, {self.n_keypoints} keypoints, {self.n_images} images -> {self.out}"
        return [head] + [f"  {name}: {c.present} images, {c.usable} usable, {c.pairs} pairs, {c.keypoints} keypoints"
                         for name, c in self.per_category.items()]


@dataclass(frozen=True)
class _Instance:
    """One usable (image, category): its box and keypoints {kp_id: (x, y)}."""

    category: str
    name: str
    size: tuple[int, int]
    bbox: tuple[int, int, int, int]
    keypoints: dict[int, tuple[int, int]]


def build_partpairs(pascalpart_root: str | Path, out: str | Path, *, min_component_fraction: float = 0.9,
                    min_part_area: int = 16, max_pixels: int | None = config.MAX_IMAGE_PIXELS) -> PartPairsSummary:
    """Write the ``partpairs`` set of the Pascal-Part sample at ``pascalpart_root`` into the new
    folder ``out`` in SPair's layout (split ``test``). Everything is read and checked first,
    then written to a hidden sibling folder that is renamed into place: an error leaves no
    half-written ``out``."""
    if not 0 < min_component_fraction <= 1:
        raise ConfigError(f"partpairs: min_component_fraction={min_component_fraction}; must lie in (0, 1]")
    if int(min_part_area) != min_part_area or min_part_area < 1:
        raise ConfigError(f"partpairs: min_part_area={min_part_area}; must be a positive integer")
    out = _check_out(out)
    dataset = PascalPart(pascalpart_root)
    kp_names = _keypoint_names(dataset.part_classes)
    items = sorted(dataset._list_items("train") + dataset._list_items("val"), key=lambda it: it.image_id)
    if not items:
        raise DatasetError(f"partpairs: no images under {dataset.data_root / 'images'}")
    present: dict[str, int] = {}
    instances: list[_Instance] = []
    for item in items:
        objects, parts = _read_maps(dataset, item, max_pixels)
        for category in _present(objects):
            present[category] = present.get(category, 0) + 1
        instances += _instances(item.image_id, objects, parts, dataset.part_classes, kp_names,
                                min_component_fraction, min_part_area)
    pairs = _pairs(instances)
    if not pairs:
        raise DatasetError(f"partpairs: {dataset.data_root} yields no pair of usable images of one category "
                           f"sharing a part (min_component_fraction={min_component_fraction}, "
                           f"min_part_area={min_part_area})")
    photos = {it.image_id: it.image_path for it in items}
    _write_atomically(out, lambda tmp: _write(tmp, pairs, kp_names, photos))
    return _summary(out, present, instances, pairs)


# -- reading -------------------------------------------------------------------------------------
def _check_out(out: str | Path) -> Path:
    if is_url(out):
        raise ConfigError(f"partpairs: the output {out} must be a local folder")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"partpairs: output {out} exists and is not an empty folder; choose a new one")
    return out


def _keypoint_names(part_classes: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Per category, its un-numbered part names sorted: a part's index there is its kp_id."""
    names: dict[str, set[str]] = {}
    for full in part_classes:
        category, _, part = full.partition(":")
        if category in SPAIR_CATEGORIES and not _NUMBERED.search(part):
            names.setdefault(category, set()).add(part)
    return {c: tuple(sorted(v)) for c, v in names.items()}


def _read_maps(dataset: PascalPart, item: Item, max_pixels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(object class ids, part ids) of one image at its size, each file checked (pixel limit,
    size, values on the whole file)."""
    image, raw = dataset.read_pair(item, max_pixels)
    objects = np.asarray(raw)
    dataset.check_label_values(objects, item.label_path)
    (name, path), = item.extra_labels
    label_map, = dataset.label_maps()
    with _pil_bomb_check_off():
        header = _open_header(path, f"{name} label", max_pixels)
        if header.size != image.size:
            header.close()
            raise SizeMismatchError(f"image {item.image_path} is {image.size[0]}x{image.size[1]} but its {name} "
                                    f"label {path} is {header.size[0]}x{header.size[1]}")
        parts = np.asarray(dataset._as_label_image(_decode(header, path, "label"), path))
    bad = np.flatnonzero((np.bincount(parts.ravel(), minlength=256) > 0) & ~label_map.valid)
    if bad.size:
        raise LabelValueError(f"label file {path} holds part ids {bad[:10].tolist()} that part_ids.txt does not list")
    return objects, parts


def _present(objects: np.ndarray) -> list[str]:
    ids = np.flatnonzero(np.bincount(objects.ravel(), minlength=256)[: len(VOC_CLASSES)])
    return [VOC_CLASSES[i] for i in ids if VOC_CLASSES[i] in SPAIR_CATEGORIES]


def _instances(image_id: str, objects: np.ndarray, parts: np.ndarray, part_classes: tuple[str, ...],
               kp_names: dict[str, tuple[str, ...]], min_fraction: float, min_area: int) -> list[_Instance]:
    """The image's usable categories with their boxes and keypoints."""
    found = []
    for category in _present(objects):
        mask = objects == VOC_CLASSES.index(category)
        if _largest_component_fraction(mask) < min_fraction:
            continue
        keypoints = _part_keypoints(np.where(mask, _kp_table(category, part_classes, kp_names)[parts], -1), min_area)
        found.append(_Instance(category, image_id, (mask.shape[1], mask.shape[0]), tight_box(mask), keypoints))
    return found


def _kp_table(category: str, part_classes: tuple[str, ...], kp_names: dict[str, tuple[str, ...]]) -> np.ndarray:
    """(256,) part id -> kp_id for the category's usable parts, -1 for any other value."""
    table = np.full(256, -1, dtype=np.int64)
    names = kp_names.get(category, ())
    for pid, full in enumerate(part_classes, 1):
        cat, _, part = full.partition(":")
        if cat == category and part in names:
            table[pid] = names.index(part)
    return table


def _largest_component_fraction(mask: np.ndarray) -> float:
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    return float(np.bincount(labels.ravel())[1:].max() / mask.sum()) if n else 0.0


def _part_keypoints(kp_map: np.ndarray, min_area: int) -> dict[int, tuple[int, int]]:
    """{kp_id: (x, y)} of every part (``kp_map`` >= 0) of at least ``min_area`` pixels: the part
    pixel nearest to its centroid, ties to the first in row-major order. One pass for all parts."""
    ys, xs = np.nonzero(kp_map >= 0)  # row-major order
    ids = kp_map[ys, xs]
    if not ids.size:
        return {}
    area = np.bincount(ids)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx, cy = np.bincount(ids, weights=xs) / area, np.bincount(ids, weights=ys) / area
    d2 = (xs - cx[ids]) ** 2 + (ys - cy[ids]) ** 2
    order = np.lexsort((d2, ids))  # by part, then distance; stable, so ties keep row-major order
    part, first = np.unique(ids[order], return_index=True)
    nearest = order[first]
    return {int(p): (int(xs[i]), int(ys[i])) for p, i in zip(part, nearest) if area[p] >= min_area}


def _pairs(instances: list[_Instance]) -> list[tuple[str, _Instance, _Instance, list[int]]]:
    """(pair id, source, target, common kp_ids) of every ordered pair sharing a keypoint."""
    by_category: dict[str, list[_Instance]] = {}
    for inst in instances:
        by_category.setdefault(inst.category, []).append(inst)
    pairs = []
    for category in (c for c in SPAIR_CATEGORIES if c in by_category):
        for src, trg in permutations(sorted(by_category[category], key=lambda i: i.name), 2):
            common = sorted(set(src.keypoints) & set(trg.keypoints))
            if common:
                pair_id = f"{len(pairs) + 1:06d}-{src.name}-{trg.name}:{category}"
                pairs.append((pair_id, src, trg, common))
    return pairs


# -- writing -------------------------------------------------------------------------------------
def _annotation(src: _Instance, trg: _Instance, common: list[int], names: tuple[str, ...],
                sizes: dict[str, tuple[int, int]]) -> dict:
    doc: dict = {"src_imname": f"{src.name}.jpg", "trg_imname": f"{trg.name}.jpg", "category": src.category}
    for side, inst in (("src", src), ("trg", trg)):
        doc[f"{side}_imsize"] = [*sizes[inst.name], 3]
        doc[f"{side}_bndbox"] = list(inst.bbox)
        doc[f"{side}_kps"] = [list(inst.keypoints[k]) for k in common]
    return {**doc, "kps_ids": common, "kps_names": [names[k] for k in common], **dict.fromkeys(FLAGS, 0)}


def _write(tmp: Path, pairs: list, kp_names: dict[str, tuple[str, ...]], photos: dict[str, Path]) -> None:
    sizes = {inst.name: inst.size for _, src, trg, _ in pairs for inst in (src, trg)}
    annotations = tmp / "PairAnnotation" / SPLIT
    annotations.mkdir(parents=True)
    for pair_id, src, trg, common in pairs:
        doc = _annotation(src, trg, common, kp_names[src.category], sizes)
        (annotations / f"{pair_id}.json").write_text(json.dumps(doc, indent=1) + "\n")
    for category, name in sorted({(inst.category, inst.name) for _, src, trg, _ in pairs for inst in (src, trg)}):
        _copy_photo(photos[name], tmp / "JPEGImages" / category / f"{name}.jpg")
    (tmp / "Layout" / "large").mkdir(parents=True)
    (tmp / "Layout" / "large" / f"{SPLIT}.txt").write_text("".join(f"{p[0]}\n" for p in pairs))


def _copy_photo(source: Path, target: Path) -> None:
    """The photo's own bytes if it is a JPEG, else re-encoded as one (quality 95)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix.lower() in (".jpg", ".jpeg"):
        target.write_bytes(source.read_bytes())
    else:
        with Image.open(source if isinstance(source, Path) else source.open("rb")) as img:
            img.convert("RGB").save(target, quality=95)


def _write_atomically(out: Path, write) -> None:
    """``write(tmp)`` into a hidden sibling of ``out``, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.partial"  # mkdir: the umask's permissions
    tmp.mkdir()
    try:
        write(tmp)
        _check_out(out)  # still absent or empty
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _summary(out: Path, present: dict[str, int], instances: list[_Instance], pairs: list) -> PartPairsSummary:
    usable = Counter(inst.category for inst in instances)
    n_pairs = Counter(src.category for _, src, _, _ in pairs)
    n_kps = Counter({c: 0 for c in present})
    for _, src, _, common in pairs:
        n_kps[src.category] += len(common)
    per_category = {c: CategoryCounts(present[c], usable[c], n_pairs[c], n_kps[c])
                    for c in SPAIR_CATEGORIES if c in present}
    images = {(inst.category, inst.name) for _, src, trg, _ in pairs for inst in (src, trg)}
    return PartPairsSummary(out, len(images), len(pairs), sum(n_kps.values()), per_category)
