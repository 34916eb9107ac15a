"""What every dataset shares: items, the geometry of PROTOCOL.md section 3, label tables."""
from __future__ import annotations

import difflib
import hashlib
import io
import os
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import config
from ..errors import ConfigError, DataRootError, EmptySplitError, ImageReadError, LabelValueError, SizeMismatchError
from ..location import as_location, is_local
from .geometry import GEOMETRIES, PAD_FILL_RGB, place, placement


@dataclass(frozen=True)
class Item:
    """One image of a split: its id and where its pixels and labels come from."""

    image_id: str
    image_path: Path | None = None      # None: the dataset renders the image itself
    label_path: Path | None = None      # None: no labels (every pixel = ignore)
    extra_labels: tuple[tuple[str, Path], ...] = ()  # (label map name, file) of further maps


@dataclass(frozen=True)
class LabelMap:
    """A further label map of a dataset beside its primary one (Pascal-Part's parts beside its
    objects): its own category of concepts, class list and raw-value table."""

    name: str                     # the category, e.g. "pascalpart-parts"
    classes: tuple[str, ...]
    table: np.ndarray             # (256,) raw value -> class id or ignore_index
    valid: np.ndarray             # (256,) bool: raw values that may appear


def voc_palette(n: int = 256) -> np.ndarray:
    """The Pascal VOC bit-shift colour map, (n, 3) uint8: 0 black, 1 (128, 0, 0), ..."""
    idx = np.arange(n)
    rgb = np.zeros((n, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            rgb[:, channel] |= ((idx >> (3 * (7 - shift) + channel)) & 1) << shift
    return rgb.astype(np.uint8)


def resize_shorter_and_crop(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize the shorter side to ``size``, then centre-crop ``size`` x ``size`` (``crop``)."""
    return place(img, size, "crop", resample, 0)


# -- reading files: the size limit before decoding, every PIL mode to 8-bit RGB ---------------

ALPHA_BACKGROUND = (255, 255, 255)
"""What transparent pixels are composited on: white, as a viewer shows a transparent image
on a page (and as e.g. Hugging Face's ``convert_to_rgb`` does). Dropping alpha instead would
show whatever colour the encoder left under it (often black, sometimes garbage)."""

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
# modes whose PIL conversion to RGB is exact or the standard formula (CMYK: naive, YCbCr:
# JFIF, HSV); an ICC profile embedded in the file is not applied. LAB has its own (to_rgb).
PLAIN_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
LABEL_MODES = ("L", "P", "I", *SIXTEEN_BIT_MODES)


class _PilBombCheckOff:
    """Switch PIL's own decompression-bomb check off while our reads run, so the size limit
    that answers is ours (``max_pixels``, named in the error with the file) and PIL's
    warning or ``DecompressionBombError`` never fires first or leaks.

    ``Image.MAX_IMAGE_PIXELS`` is a process global, so loads on a thread pool share one
    window: the first reader saves PIL's value, the last one restores it, under a lock.
    Every file is checked against ``max_pixels`` from its header before it is decoded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: int | None = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    Image.MAX_IMAGE_PIXELS = self._saved


_pil_bomb_check_off = _PilBombCheckOff()


def require_regular_file(path: Path, what: str) -> None:
    """Refuse, by name, a path that is there but no regular file (missing files are left to
    the readers, which name them in their own words)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ImageReadError(f"{what} file {path} cannot be read: {exc}") from exc
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else \
            "a folder" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special"
        raise ImageReadError(f"{what} file {path} is {kind}, not a regular file; only regular files are read")


def read_local_file(path: Path, what: str) -> io.BytesIO:
    """A local file's bytes: only a regular file (a FIFO, socket or device would block or never
    end), read within ``config.READ_TIMEOUT_SECONDS`` (a stalled network mount fails by name)."""
    require_regular_file(path, what)
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(_read_or_error(path)), daemon=True)
    reader.start()
    reader.join(config.READ_TIMEOUT_SECONDS)
    if not got:
        raise ImageReadError(f"{what} file {path}: no data within {config.READ_TIMEOUT_SECONDS} s (a stalled disk or mount?)")
    if isinstance(got[0], OSError):
        raise ImageReadError(f"{what} file {path} cannot be read: {got[0]}") from got[0]
    return io.BytesIO(got[0])


def _read_or_error(path: Path) -> bytes | OSError:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc


def _open_header(path: Path, what: str, max_pixels: int | None) -> Image.Image:
    """Open ``path`` reading only its header, and refuse it if it has more pixels than
    ``max_pixels`` (None: no limit) before any decoding work."""
    try:
        img = Image.open(read_local_file(path, what) if is_local(path) else path.open("rb"))  # an object is fetched whole
    except ImageReadError:
        raise
    except FileNotFoundError as exc:
        raise ImageReadError(f"{what} file {path} does not exist") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{what} file {path} cannot be decoded: {exc}") from exc
    w, h = img.size
    # TIFF decodes into a buffer of its tile size, which a crafted file may make larger
    tw, th = getattr(img, "_tile_size", None) or img.size
    if w <= 0 or h <= 0:
        img.close()
        raise ImageReadError(f"{what} file {path} is empty ({w}x{h} pixels)")
    if max_pixels is not None and max(w * h, tw * th) > max_pixels:
        img.close()
        raise ImageReadError(
            f"{what} file {path} is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,}; "
            f"it was not decoded. If the file is trusted, raise the limit with --max-image-pixels"
        )
    return img


def _decode(img: Image.Image, path: Path, what: str) -> Image.Image:
    """Decode now, so a truncated file fails here and names itself."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        img.close()
        raise ImageReadError(f"{what} file {path} cannot be decoded: {exc}") from exc
    return img


def _has_alpha(img: Image.Image) -> bool:
    if img.mode in ALPHA_MODES or img.info.get("transparency") is not None:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def _composite(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image, path: Path | str) -> Image.Image:
    """A decoded image of any mode PIL opens as the model's 8-bit RGB input, or an
    ``ImageReadError`` naming the file and the mode.

    - ``1``, ``L``, ``P``, ``RGBX``, ``CMYK``, ``YCbCr``, ``HSV``: PIL's conversion.
    - ``LAB``: CIE L*a*b* (D65 white) to sRGB exactly (``_lab_to_rgb``); PIL's own
      conversion is off by up to ~20 levels in dark saturated colours.
    - Transparency (``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, a ``transparency`` key or an
      RGBA palette): composited on ``ALPHA_BACKGROUND`` (white).
    - 16-bit grayscale (``I;16*``): scaled from the full 16-bit range, 255/65535.
    - ``I`` (32-bit int): read as 16-bit samples, which is what Pillow widens to ``I`` (16-bit
      PPM/PGM of any maxval, some PNG/TIFF); values outside 0..65535 are refused, since the
      white level is then unknown. The scale follows the type, never the image's own
      min/max, so the same scene keeps the same brightness whatever it contains.
    - ``F`` (32-bit float) is refused: floats have no defined white level (0..1, 0..255 or
      HDR radiance all occur).
    """
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        return _gray16_to_rgb(img, path)
    if mode == "LAB":
        return _lab_to_rgb(img)
    if mode == "F":
        raise ImageReadError(
            f"image file {path} has mode F (32-bit float), which has no defined white level; "
            f"convert it to 8- or 16-bit first"
        )
    if mode not in PLAIN_MODES and mode not in ALPHA_MODES:
        raise ImageReadError(
            f"image file {path} has mode {mode}, which rep-pipeline cannot convert to 8-bit RGB "
            f"correctly; convert it to RGB first"
        )
    if _has_alpha(img):
        if mode == "La":  # premultiplied: PIL converts it only through RGBa
            lum, alpha = img.split()
            img = Image.merge("RGBa", (lum, lum, lum, alpha))
        return _composite(img.convert("RGBA"))
    return img if mode == "RGB" else img.convert("RGB")


_SRGB_FROM_XYZ = np.array([[3.2404542, -1.5371385, -0.4985314],
                           [-0.9692660, 1.8760108, 0.0415560],
                           [0.0556434, -0.2040259, 1.0572252]], dtype=np.float32)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)


def _lab_to_rgb(img: Image.Image) -> Image.Image:
    """PIL's ``LAB`` (L* as 0..255 for 0..100, a* and b* as signed bytes, as TIFF CIELab
    stores them) to 8-bit sRGB: CIE Lab -> XYZ (D65 white, sRGB's own) -> linear sRGB,
    clipped to the gamut, then the sRGB transfer curve. Done in blocks of rows so a large
    image needs no full-size float temporaries."""
    lab = np.asarray(img)
    out = np.empty(lab.shape, dtype=np.uint8)
    step = max(1, (1 << 20) // max(1, lab.shape[1]))
    for top in range(0, lab.shape[0], step):
        block = lab[top: top + step]
        fy = (block[..., 0].astype(np.float32) * (100 / 255) + 16) / 116
        fx = fy + block[..., 1].view(np.int8).astype(np.float32) / 500
        fz = fy - block[..., 2].view(np.int8).astype(np.float32) / 200
        f = np.stack([fx, fy, fz], axis=-1)
        xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _D65_WHITE
        lin = np.clip(xyz @ _SRGB_FROM_XYZ.T, 0, 1)
        srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
        out[top: top + step] = np.rint(srgb * 255).astype(np.uint8)
    return Image.fromarray(out)


def _gray16_to_rgb(img: Image.Image, path: Path | str) -> Image.Image:
    """16-bit samples v -> round(v * 255 / 65535), as RGB; a ``transparency`` value is
    composited like any alpha."""
    arr = np.asarray(img)
    if img.mode == "I":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ImageReadError(
                f"image file {path} has mode I (32-bit integers) with values {lo}..{hi}, outside the "
                f"16-bit range 0..65535, so its white level is unknown; convert it to 8- or 16-bit first"
            )
    wide = arr.astype(np.uint32)
    gray = ((wide + 128) // 257).astype(np.uint8)  # round(v / 257), exact for 0..65535
    rgb = np.repeat(gray[..., None], 3, axis=2)
    key = img.info.get("transparency")
    if isinstance(key, int):
        rgb[wide == key] = ALPHA_BACKGROUND
    return Image.fromarray(rgb)


class SegmentationDataset:
    """Base of every dataset: subclasses list items and describe their label table.

    ``label_table`` maps a raw label value (0..255) to a class id or ``ignore_index``;
    ``label_valid`` says which raw values may appear at all. A value outside it is an error
    that names the file, never a silent ignore.
    """

    name: ClassVar[str]
    default_splits: ClassVar[tuple[str, ...]]
    ignore_index: ClassVar[int] = config.IGNORE_INDEX
    needs_root: ClassVar[bool] = True          # False: the dataset makes its own images
    root_layout: ClassVar[str] = "the dataset"  # what --data-root must hold, for the error
    options_allowed: ClassVar[tuple[str, ...]] = ()  # the dataset options (``-o KEY=VALUE``) it reads
    default_geometry: ClassVar[str] = "crop"  # PROTOCOL.md section 3; keypoint datasets: pad (8.2)

    def __init__(self, root: str | Path | None = None, **options: Any):
        allowed = ("geometry", *self.options_allowed)  # every dataset takes the geometry option
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            close = difflib.get_close_matches(unknown[0], allowed, n=1)
            raise ConfigError(f"{self.name}: unknown dataset option {unknown[0]!r}; it takes: {', '.join(allowed)}"
                              + (f"; did you mean {close[0]}?" if close else ""))
        geometry = options.get("geometry", self.default_geometry)
        if geometry not in GEOMETRIES:
            raise ConfigError(f"{self.name}: dataset option geometry={geometry!r}; one of {', '.join(GEOMETRIES)}")
        self.root = as_location(root) if root is not None else None  # a folder, or an object-storage URL
        self.options = {**options, "geometry": geometry}

    @property
    def geometry(self) -> str:
        """How images are placed on the S x S grid: ``crop`` or ``pad`` (``geometry.py``)."""
        return str(self.options["geometry"])

    # -- what subclasses provide ---------------------------------------------------------
    @property
    def classes(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _list_items(self, split: str) -> list[Item]:
        raise NotImplementedError

    def _raw_label_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(table, valid): two length-256 arrays over raw label values."""
        n = len(self.classes)
        table = np.full(256, self.ignore_index, dtype=np.uint8)
        table[:n] = np.arange(n, dtype=np.uint8)
        valid = np.zeros(256, dtype=bool)
        valid[:n] = True
        valid[self.ignore_index] = True
        return table, valid

    # -- shared behaviour ----------------------------------------------------------------
    @property
    def data_root(self) -> Path:
        """The root, or a ``DataRootError`` saying ``--data-root`` is missing (never a
        ``TypeError`` from ``None / "x"``): every method that reads the root goes through it."""
        if self.root is None:
            raise DataRootError(f"{self.name} needs --data-root: the folder that holds {self.root_layout}")
        return self.root

    @property
    def palette(self) -> np.ndarray:
        return voc_palette(256)[: len(self.classes)]

    def items(self, split: str, limit: int | None = None) -> list[Item]:
        """The split's items in list order, the first ``limit`` of them if given."""
        if self.needs_root:
            self.data_root  # noqa: B018  (raises without a root)
        if split not in self.splits():
            raise EmptySplitError(
                f"{self.name}: no split {split!r} under {self.root}; available: {', '.join(self.splits()) or 'none'}"
            )
        items = self._list_items(split)
        if not items:
            raise EmptySplitError(f"{self.name}: split {split!r} under {self.root} lists no images")
        items = items[:limit] if limit is not None else items
        for item in items:  # a FIFO or device among the files is named before any work
            for what, path in (("image", item.image_path), ("label", item.label_path)):
                if path is not None and is_local(path):
                    require_regular_file(path, what)
        return items

    def splits(self) -> tuple[str, ...]:
        if self.needs_root:
            self.data_root  # noqa: B018  (raises without a root)
        return self.default_splits

    def load(self, item: Item, image_size: int, max_pixels: int | None = config.MAX_IMAGE_PIXELS
             ) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 (S, S, 3), class ids uint8 (S, S)) placed by the dataset's geometry."""
        image, label, _ = self.load_placed(item, image_size, max_pixels)
        return image, label

    def load_placed(self, item: Item, image_size: int, max_pixels: int | None = config.MAX_IMAGE_PIXELS
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(RGB uint8 (S, S, 3), class ids uint8 (S, S), geometry int32 (6,)): the image placed
        on the grid by the dataset's geometry (``crop`` or ``pad``) and the row that maps grid
        positions back to its pixels.

        Files of more than ``max_pixels`` pixels are refused from their header, before
        decoding; label values are checked on the whole file, not only the crop."""
        with _pil_bomb_check_off():  # PIL checks crops too: ours is the limit throughout
            image, raw = self.read_pair(item, max_pixels)
            if raw is None:
                label = np.full((image_size, image_size), self.ignore_index, dtype=np.uint8)
            else:
                table = self.check_label_values(np.asarray(raw), item.label_path or item.image_id)
                label = table[np.asarray(self._place_label(raw, image_size))]
            geometry = np.asarray(placement(*image.size, image_size, self.geometry), dtype=np.int32)
            image = place(image, image_size, self.geometry, Image.BILINEAR, PAD_FILL_RGB)
        return np.asarray(image, dtype=np.uint8), label, geometry

    def _place_label(self, raw: Image.Image, image_size: int) -> Image.Image:
        """A raw label image on the grid (nearest); padding gets the raw value of ``ignore``."""
        ignore = int(np.flatnonzero(self._raw_label_table()[0] == self.ignore_index)[-1]) \
            if self.geometry == "pad" else 0
        return place(raw, image_size, self.geometry, Image.NEAREST, ignore)

    def read_pair(self, item: Item, max_pixels: int | None = config.MAX_IMAGE_PIXELS
                  ) -> tuple[Image.Image, Image.Image | None]:
        """The decoded image (8-bit RGB, see ``to_rgb``) and raw label image (one channel of
        0..255) at their native size, before placement on the grid (``load_placed`` places them;
        ``partpairs`` reads them whole). Both headers are checked (pixel limit, equal sizes)
        before either is decoded."""
        with _pil_bomb_check_off():
            image = _open_header(item.image_path, "image", max_pixels)
            raw = None
            try:
                if item.label_path is not None:
                    raw = _open_header(item.label_path, "label", max_pixels)
                    if raw.size != image.size:
                        raise SizeMismatchError(
                            f"image {item.image_path} is {image.size[0]}x{image.size[1]} but its label "
                            f"{item.label_path} is {raw.size[0]}x{raw.size[1]}"
                        )
                rgb = to_rgb(_decode(image, item.image_path, "image"), item.image_path)
                if raw is None:
                    return rgb, None
                return rgb, self._as_label_image(_decode(raw, item.label_path, "label"), item.label_path)
            except BaseException:
                image.close()
                if raw is not None:
                    raw.close()
                raise

    def _as_label_image(self, raw: Image.Image, path: Path) -> Image.Image:
        """One channel of raw values 0..255: ``L`` and ``P`` (palette indices) as they are;
        ``I`` and 16-bit images only if every value fits 0..255; any other mode is refused."""
        if raw.mode in ("L", "P"):
            return raw
        if raw.mode in LABEL_MODES:
            arr = np.asarray(raw)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > 255:
                bad = np.unique(arr[(arr < 0) | (arr > 255)])
                raise LabelValueError(
                    f"label file {path} ({raw.mode}) holds values {bad[:10].tolist()} (range {lo}..{hi}), "
                    f"outside 0..255; class ids must fit 8 bits"
                )
            return Image.fromarray(arr.astype(np.uint8))
        raise LabelValueError(
            f"label file {path} is a {raw.mode} image; expected one channel of class ids (mode L or P)"
        )

    def check_label_values(self, raw: np.ndarray, path: Path | str) -> np.ndarray:
        """Refuse raw values outside the class table anywhere in ``raw`` (uint8, the whole
        file); returns the lookup table. One ``bincount`` pass, no full-size temporaries."""
        table, valid = self._raw_label_table()
        arr = np.asarray(raw)
        if arr.dtype != np.uint8:
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise LabelValueError(f"label file {path} holds values {arr.min()}..{arr.max()}, outside 0..255")
            arr = arr.astype(np.uint8)
        present = np.bincount(arr.ravel(), minlength=256) > 0
        bad = np.flatnonzero(present & ~valid)
        if bad.size:
            raise LabelValueError(
                f"label file {path} holds values {bad[:10].tolist()} outside the class table of "
                f"{self.name} ({len(self.classes)} classes, {self.ignore_index} = ignore)"
            )
        return table

    def map_labels(self, raw: np.ndarray, path: Path | str) -> np.ndarray:
        """Class ids of raw label values, every value checked first."""
        return self.check_label_values(raw, path)[raw]

    # -- categories: the primary label map and any further ones ----------------------------------
    @property
    def category(self) -> str:
        """The category of the primary label map's concepts (PROTOCOL.md section 9.2)."""
        return self.name

    def label_maps(self) -> tuple[LabelMap, ...]:
        """Further label maps (none for most datasets)."""
        return ()

    def load_extra(self, item: Item, image_size: int, max_pixels: int | None = config.MAX_IMAGE_PIXELS
                   ) -> dict[str, np.ndarray]:
        """Class ids (S, S) uint8 of each further label map of ``item``, cropped as its image;
        each file checked like the primary labels (pixel limit, size, values, whole file)."""
        maps = {m.name: m for m in self.label_maps()}
        out = {}
        with _pil_bomb_check_off():
            size = None
            if item.image_path is not None and item.extra_labels:
                with _open_header(item.image_path, "image", max_pixels) as header:
                    size = header.size
            for name, path in item.extra_labels:
                label_map = maps[name]
                with _open_header(path, f"{name} label", max_pixels) as raw:
                    if size is not None and raw.size != size:
                        raise SizeMismatchError(f"image {item.image_path} is {size[0]}x{size[1]} but its {name} "
                                                f"label {path} is {raw.size[0]}x{raw.size[1]}")
                    raw = self._as_label_image(_decode(raw, path, "label"), path)
                    values = np.asarray(raw)
                    bad = np.flatnonzero((np.bincount(values.ravel(), minlength=256) > 0) & ~label_map.valid)
                    if bad.size:
                        raise LabelValueError(f"label file {path} holds values {bad[:10].tolist()} outside the class "
                                              f"table of {name} ({len(label_map.classes)} classes)")
                    placed = place(raw, image_size, self.geometry, Image.NEAREST,
                                   int(np.flatnonzero(label_map.table == self.ignore_index)[-1]))
                    out[name] = label_map.table[np.asarray(placed)]
        return out

    def fingerprint(self, split: str, items: Sequence[Item], image_size: int) -> dict[str, Any]:
        """What identifies the labels this split produces; stored and checked on reuse."""
        ids = hashlib.sha256("\n".join(i.image_id for i in items).encode()).hexdigest()
        extra = {"label_maps": {m.name: list(m.classes) for m in self.label_maps()}} if self.label_maps() else {}
        if self.category != self.name:  # the primary map's category, where it is not the dataset's name
            extra["category"] = self.category
        return {**extra,
            "dataset": self.name,
            "split": split,
            "n_images": len(items),
            "image_size": image_size,
            "classes": list(self.classes),
            "ignore_index": self.ignore_index,
            "image_ids_sha256": ids,
            "options": {k: v for k, v in sorted(self.options.items())},  # geometry included (8.2)
        }

    # -- keypoint pairs (PROTOCOL.md sections 8.3, 11) -------------------------------------------
    def keypoint_pairs(self, split: str, items: Sequence[Item]) -> list[dict[str, Any]] | None:
        """The keypoint pairs of ``split`` whose two images are both among ``items`` (all of them,
        or the first ``--limit``), one dict per (pair, keypoint) with the columns of
        ``storage_schemas.feature_store.KEYPOINT_PAIRS`` but ``dataset_fingerprint``; None for a
        dataset without pairs (most). Checked here, before anything is written."""
        return None

    def _halves(self, ids: Sequence[str], split: str) -> list[str]:
        """``train`` or ``val``: one half of a sample that comes as one split, by a permutation
        of its sorted ids seeded with the ``split_seed`` option (PROTOCOL.md section 9.6)."""
        ordered = sorted(ids)
        perm = np.random.default_rng(int(self.options.get("split_seed", 0))).permutation(len(ordered))
        half = len(ordered) // 2
        chosen = perm[:half] if split == "train" else perm[half:]
        return [ordered[i] for i in sorted(chosen)]

    def _require_dir(self, path: Path, what: str) -> Path:
        if not path.is_dir():
            raise DataRootError(f"{self.name}: expected {what} at {path}; is --data-root {self.root} right?")
        return path
