"""SPair-71k: image pairs of the 18 PASCAL categories with keypoints visible in both
(PROTOCOL.md section 11.1), and any set written in its layout (``partpairs``, 11.5).

Layout: ``JPEGImages/<category>/<name>.jpg``, ``PairAnnotation/<split>/<pair>.json`` with
``<pair>`` = ``<number>-<src name>-<trg name>:<category>``, and ``Layout/large/<split>.txt``
listing the split's pairs (one ``<pair>`` a line). A split is any ``Layout/large/*.txt``.

Items: every image of the split's pairs once, in order of first appearance in the list, id
``<category>/<name>``; no label masks (every pixel ignore), geometry ``pad`` by default
(section 8.2), so no keypoint is cut away. The pairs become ``keypoint_pairs`` rows (8.3).

Every annotation is checked when the split is first read (and kept per split): a missing or
unparseable file, a missing key, unequal keypoint lists, non-finite or malformed numbers, a
box with x2 < x1, a keypoint outside its image, a category other than the file name's, or a
missing photo is an error naming the JSON file and the field. A keypoint may lie anywhere in
[0, W] x [0, H]: SPair's coordinates are integers, and VOC's annotations are 1-based.
Beside SPair's own fields an optional ``kps_names`` (one string per keypoint, as
``partpairs`` writes) fills ``kp_name``; SPair has none, so its ``kp_name`` is null. SPair
writes ``kps_ids`` as strings of integers (``["0", "7"]``); integers are read as well.
"""
from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataRootError, DatasetError
from ..location import is_local
from .registry import register_dataset
from .base import Item, SegmentationDataset

SPAIR_CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog", "horse",
    "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)
SPAIR_SPLITS = ("trn", "val", "test")
FLAGS = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")
REQUIRED = ("src_imname", "trg_imname", "category", "src_imsize", "trg_imsize", "src_bndbox", "trg_bndbox",
            "src_kps", "trg_kps", "kps_ids")
_INT16, _INT8 = (-(2**15), 2**15 - 1), (-(2**7), 2**7 - 1)
_READERS = 16  # annotation files read at once from object storage (one request each)


@dataclass(frozen=True)
class KeypointPair:
    """One checked pair annotation: points (K, 2) in original pixels, boxes [x1, y1, x2, y2]."""

    pair_id: str
    category: str
    src_name: str          # file name in JPEGImages/<category>/, with extension
    trg_name: str
    src_kps: np.ndarray    # (K, 2) float64, x y
    trg_kps: np.ndarray
    kp_ids: np.ndarray     # (K,) int
    kp_names: tuple[str, ...] | None
    src_bbox: tuple[float, float, float, float]
    trg_bbox: tuple[float, float, float, float]
    flags: tuple[int | None, ...]  # FLAGS order

    @property
    def src_id(self) -> str:
        return f"{self.category}/{Path(self.src_name).stem}"

    @property
    def trg_id(self) -> str:
        return f"{self.category}/{Path(self.trg_name).stem}"

    def rows(self) -> list[dict[str, Any]]:
        """One ``KEYPOINT_PAIRS`` row per keypoint (all columns but ``dataset_fingerprint``)."""
        shared = {"pair_id": self.pair_id, "category": self.category, "src_image_id": self.src_id,
                  "trg_image_id": self.trg_id,
                  **{f"src_bbox_{c}": v for c, v in zip(("x1", "y1", "x2", "y2"), self.src_bbox)},
                  **{f"trg_bbox_{c}": v for c, v in zip(("x1", "y1", "x2", "y2"), self.trg_bbox)},
                  **dict(zip(FLAGS, self.flags))}
        names = self.kp_names or (None,) * len(self.kp_ids)
        return [{**shared, "kp_id": k, "kp_name": n, "src_x": sx, "src_y": sy, "trg_x": tx, "trg_y": ty}
                for k, n, (sx, sy), (tx, ty) in zip(self.kp_ids.tolist(), names, self.src_kps.tolist(),
                                                    self.trg_kps.tolist())]


# -- parsing one annotation: small parse_* functions that name the file and the field ------------
def _bad(path: Any, key: str, what: str) -> DatasetError:
    return DatasetError(f"pair annotation {path}: field {key!r} {what}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_points(value: Any, path: Any, key: str) -> np.ndarray:
    """A list of [x, y] numbers as a finite (K, 2) float64 array."""
    if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 and all(map(_is_number, p))
                                              for p in value):
        raise _bad(path, key, "must be a list of [x, y] number pairs")
    points = np.asarray(value, dtype=np.float64).reshape(len(value), 2)
    bad = np.flatnonzero(~np.isfinite(points).all(axis=1))
    if bad.size:
        raise _bad(path, key, f"holds non-finite coordinates at keypoint {int(bad[0])}")
    return points


def parse_box(value: Any, path: Any, key: str) -> tuple[float, float, float, float]:
    """[x1, y1, x2, y2], finite, x1 <= x2 and y1 <= y2."""
    if not isinstance(value, list) or len(value) != 4 or not all(map(_is_number, value)):
        raise _bad(path, key, "must be [x1, y1, x2, y2] (4 numbers)")
    x1, y1, x2, y2 = (float(v) for v in value)
    if not all(map(math.isfinite, (x1, y1, x2, y2))):
        raise _bad(path, key, f"holds a non-finite coordinate: {value}")
    if x2 < x1 or y2 < y1:
        raise _bad(path, key, f"is not a box: {value} has x2 < x1 or y2 < y1")
    return x1, y1, x2, y2


def parse_size(value: Any, path: Any, key: str) -> tuple[int, int]:
    """(W, H) from SPair's [W, H, channels]."""
    if (not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in value[:2]) or min(value[:2]) <= 0):
        raise _bad(path, key, "must be [W, H, ...] with positive integers")
    return int(value[0]), int(value[1])


def parse_int(value: Any, path: Any, key: str, bounds: tuple[int, int]) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not bounds[0] <= value <= bounds[1]:
        raise _bad(path, key, f"must be an integer in {bounds[0]}..{bounds[1]}, not {value!r}")
    return value


def parse_kp_id(value: Any, path: Any) -> int:
    """A keypoint id: an integer, or a string of one (SPair writes ``"kps_ids": ["0", "7"]``)."""
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,6}", value.strip()):
        value = int(value)
    return parse_int(value, path, "kps_ids", _INT16)


def parse_image_name(value: Any, path: Any, key: str) -> str:
    if not isinstance(value, str) or not value or "/" in value or "\\" in value or value.startswith("."):
        raise _bad(path, key, f"must be a file name like 2008_000585.jpg, not {value!r}")
    return value


def parse_pair(pair_id: str, text: str, path: Any) -> KeypointPair:
    """One annotation file's text as a checked ``KeypointPair``; ``pair_id`` is its stem."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"pair annotation {path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise DatasetError(f"pair annotation {path} must hold a JSON object, not {type(doc).__name__}")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise DatasetError(f"pair annotation {path}: missing key {missing[0]!r}")
    category, named = doc["category"], pair_id.rpartition(":")[2]
    if category not in SPAIR_CATEGORIES:
        raise _bad(path, "category", f"is {category!r}, not one of the SPair categories")
    if category != named:
        raise _bad(path, "category", f"is {category!r} but the file name says {named!r}")
    src, trg = (parse_image_name(doc[k], path, k) for k in ("src_imname", "trg_imname"))
    expected = f"-{Path(src).stem}-{Path(trg).stem}:{category}"
    if not pair_id.endswith(expected) or len(pair_id) == len(expected):
        raise _bad(path, "src_imname", f"and 'trg_imname' ({src}, {trg}) do not match the file name, "
                                       f"which should be <number>{expected}.json")
    src_kps, trg_kps = parse_points(doc["src_kps"], path, "src_kps"), parse_points(doc["trg_kps"], path, "trg_kps")
    kp_ids = np.asarray([parse_kp_id(v, path) for v in _list(doc["kps_ids"], path, "kps_ids")], dtype=np.int64)
    if not len(src_kps) == len(trg_kps) == len(kp_ids):
        raise DatasetError(f"pair annotation {path}: src_kps, trg_kps and kps_ids have unequal lengths "
                           f"{len(src_kps)}, {len(trg_kps)}, {len(kp_ids)}")
    if len(np.unique(kp_ids)) != len(kp_ids):
        raise _bad(path, "kps_ids", f"repeats a keypoint id: {kp_ids.tolist()}")
    for side, points in (("src", src_kps), ("trg", trg_kps)):
        _check_inside(points, parse_size(doc[f"{side}_imsize"], path, f"{side}_imsize"), path, f"{side}_kps")
    return KeypointPair(
        pair_id, category, src, trg, src_kps, trg_kps, kp_ids, _names(doc.get("kps_names"), len(kp_ids), path),
        parse_box(doc["src_bndbox"], path, "src_bndbox"), parse_box(doc["trg_bndbox"], path, "trg_bndbox"),
        tuple(None if doc.get(f) is None else parse_int(doc[f], path, f, _INT8) for f in FLAGS))


def _list(value: Any, path: Any, key: str) -> list:
    if not isinstance(value, list):
        raise _bad(path, key, "must be a list")
    return value


def _names(value: Any, n: int, path: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n or not all(isinstance(v, str) for v in value):
        raise _bad(path, "kps_names", f"must be a list of {n} strings (one per keypoint)")
    return tuple(value)


def _check_inside(points: np.ndarray, size: tuple[int, int], path: Any, key: str) -> None:
    outside = ((points < 0) | (points > np.asarray(size, dtype=np.float64))).any(axis=1)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise _bad(path, key, f"keypoint {k} at {points[k].tolist()} lies outside the image of "
                              f"{size[0]}x{size[1]} pixels")


# -- the dataset --------------------------------------------------------------------------------
@register_dataset
class SPair71k(SegmentationDataset):
    name = "spair71k"
    default_splits = SPAIR_SPLITS
    default_geometry = "pad"
    root_layout = "JPEGImages/<category>/, PairAnnotation/<split>/ and Layout/large/<split>.txt"

    def __init__(self, root: str | Path | None = None, **options: Any):
        super().__init__(root, **options)
        self._pairs_cache: dict[str, tuple[KeypointPair, ...]] = {}

    @property
    def classes(self) -> tuple[str, ...]:
        """The 18 categories, in SPair's order; they only name the pairs' categories (labels are
        all ignore)."""
        return SPAIR_CATEGORIES

    @property
    def _layout_dir(self) -> Path:
        return self._require_dir(self.data_root / "Layout" / "large", "Layout/large/")

    def splits(self) -> tuple[str, ...]:
        """Every ``Layout/large/<split>.txt``: SPair's trn, val, test first, then any other."""
        found = {p.stem for p in self._layout_dir.iterdir() if p.suffix == ".txt"}
        return tuple(s for s in SPAIR_SPLITS if s in found) + tuple(sorted(found - set(SPAIR_SPLITS)))

    def pairs(self, split: str) -> tuple[KeypointPair, ...]:
        """The split's checked pair annotations, in list order (read once per split)."""
        if split not in self._pairs_cache:
            self._pairs_cache[split] = self._read_pairs(split)
        return self._pairs_cache[split]

    def _list_items(self, split: str) -> list[Item]:
        root = self.data_root / "JPEGImages"
        seen: dict[str, Item] = {}
        for pair in self.pairs(split):
            for image_id, name in ((pair.src_id, pair.src_name), (pair.trg_id, pair.trg_name)):
                if image_id not in seen:
                    seen[image_id] = Item(image_id, root / pair.category / name)
        return list(seen.values())

    def keypoint_pairs(self, split: str, items: Sequence[Item]) -> list[dict[str, Any]]:
        """One row per (pair, keypoint) of the pairs whose two images are both in ``items``."""
        taken = {it.image_id for it in items}
        return [row for pair in self.pairs(split) if pair.src_id in taken and pair.trg_id in taken
                for row in pair.rows()]

    # -- reading -------------------------------------------------------------------------------
    def _pair_ids(self, split: str) -> list[str]:
        path = self._layout_dir / f"{split}.txt"
        if not path.is_file():
            raise DataRootError(f"{self.name}: pair list {path} does not exist")
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        seen: set[str] = set()
        for number, pair_id in enumerate(ids, 1):
            if pair_id in seen:
                raise DatasetError(f"{self.name}: pair list {path} names pair {pair_id!r} twice (line {number})")
            seen.add(pair_id)
        return ids

    def _read_pairs(self, split: str) -> tuple[KeypointPair, ...]:
        folder = self.data_root / "PairAnnotation" / split
        ids = self._pair_ids(split)
        paths = [folder / f"{pair_id}.json" for pair_id in ids]
        if is_local(folder):
            texts = list(map(_read_text, paths))
        else:  # one request per file: many in flight at once
            with ThreadPoolExecutor(_READERS) as pool:
                texts = list(pool.map(_read_text, paths))
        pairs = tuple(parse_pair(pair_id, text, path) for pair_id, text, path in zip(ids, texts, paths))
        self._check_photos(pairs, paths)
        return pairs

    def _check_photos(self, pairs: Sequence[KeypointPair], paths: Sequence[Any]) -> None:
        """Every photo a pair names exists: one listing per category folder."""
        root = self.data_root / "JPEGImages"
        listed: dict[str, set[str]] = {}
        for pair, path in zip(pairs, paths):
            if pair.category not in listed:
                folder = root / pair.category
                listed[pair.category] = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
            for key, name in (("src_imname", pair.src_name), ("trg_imname", pair.trg_name)):
                if name not in listed[pair.category]:
                    raise DataRootError(f"pair annotation {path}: field {key!r} names {root / pair.category / name}, "
                                        f"which does not exist")


def _read_text(path: Any) -> str:
    try:
        return path.read_text()
    except FileNotFoundError as exc:
        raise DataRootError(f"pair annotation {path} does not exist (it is listed in the split's "
                            f"Layout/large file)") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"pair annotation {path} is not UTF-8 text: {exc}") from exc
