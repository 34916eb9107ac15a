"""Bad input at the dataset boundary (issue 19, points 2, 4, 5 and the missing --data-root of
12): oversized images refused from their header, every PIL mode converted to 8-bit RGB
correctly or refused by name, label files checked as a whole, and datasets without a root.

Real image files are written with PIL/numpy under ``tmp_path`` and read the way the extract
stage reads them: ``build_dataset(name, root).items(split)`` and ``.load(item, S, max_pixels=)``.
Expected pixels are computed here from the colour-space formulas, not by the code under test.
"""
from __future__ import annotations

import colorsys
import struct
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rep_pipeline.pipeline.datasets import build_dataset
from rep_pipeline.pipeline.datasets.base import Item, to_rgb
from rep_pipeline.pipeline.errors import DataRootError, ImageReadError, LabelValueError

S = 16                      # image side: load(item, S) then neither resizes nor crops
WHITE = 255.0               # the documented alpha background (base.ALPHA_BACKGROUND)
RNG = np.random.default_rng(19)


# -- writing files -------------------------------------------------------------------------
def _folder(root: Path, name: str, save, label: np.ndarray | Image.Image | None = None,
            classes: str = "a\nb\nc\n") -> Item:
    """Write ``images/<name>`` with ``save(path)`` (and ``labels/<stem>.png``), return its item."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    save(root / "images" / name)
    if label is not None:
        (root / "labels").mkdir(exist_ok=True)
        (root / "classes.txt").write_text(classes)
        img = label if isinstance(label, Image.Image) else Image.fromarray(label)
        img.save(root / "labels" / f"{Path(name).stem}.png")
    return next(i for i in build_dataset("folder", root).items("all") if i.image_id == Path(name).stem)


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG that declares ``width`` x ``height`` gray pixels but holds almost no data: a
    bomb costs nothing to write, and only a decoder that believes the header pays for it."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _pgm16(path: Path, values: np.ndarray) -> None:
    """Binary PGM with maxval 65535 (Pillow opens it as mode I)."""
    h, w = values.shape
    path.write_bytes(f"P5\n{w} {h}\n65535\n".encode() + values.astype(">u2").tobytes())


def _frombytes(mode: str, arr: np.ndarray) -> Image.Image:
    return Image.frombytes(mode, (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())


def _saver(img: Image.Image, **kwargs):
    return lambda path: img.save(path, **kwargs)


# -- independent expectations ----------------------------------------------------------------
def _scale16(v: np.ndarray) -> np.ndarray:
    """v * 255 / 65535, rounded half up."""
    return np.floor(v.astype(np.float64) * 255 / 65535 + 0.5)


def _over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return color.astype(np.float64) * a + WHITE * (1 - a)


def _gray3(g: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(g, dtype=np.float64)[..., None], 3, axis=2)


def _lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) -> sRGB, with the CIE's exact epsilon/kappa constants. PIL stores L*
    as 0..255 and a*, b* as signed bytes."""
    L = lab[..., 0].astype(np.float64) * 100 / 255
    a = lab[..., 1].view(np.int8).astype(np.float64)
    b = lab[..., 2].view(np.int8).astype(np.float64)
    eps, kappa = 216 / 24389, 24389 / 27
    fy = (L + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200
    xr = np.where(fx**3 > eps, fx**3, (116 * fx - 16) / kappa)
    yr = np.where(L > kappa * eps, fy**3, L / kappa)
    zr = np.where(fz**3 > eps, fz**3, (116 * fz - 16) / kappa)
    xyz = np.stack([xr * 0.95047, yr, zr * 1.08883], axis=-1)
    m = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                  [0.0556434, -0.2040259, 1.0572252]])
    lin = np.clip(xyz @ m.T, 0, 1)
    return 255 * np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)


# -- the mode cases: (file suffix or None for in-memory, image, save kwargs, mode on reopen,
#    expected float RGB, tolerance) --------------------------------------------------------
def _cases():
    ramp16 = np.linspace(0, 65535, S * S).round().astype(np.uint16).reshape(S, S)
    g8 = RNG.integers(0, 256, (S, S), dtype=np.uint8)
    rgb = RNG.integers(0, 256, (S, S, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (S, S), dtype=np.uint8)
    alpha[0, :4] = (0, 255, 1, 254)
    idx = RNG.integers(0, 8, (S, S), dtype=np.uint8)
    pal = RNG.integers(0, 256, (8, 3), dtype=np.uint8)

    def pimage(data=idx):
        img = _frombytes("P", data)
        img.putpalette(pal.tobytes())
        return img

    cases = {}
    cases["I;16 png ramp"] = ("png", Image.fromarray(ramp16), {}, "I;16", _gray3(_scale16(ramp16)), 0)
    cases["I;16B tiff"] = ("tif", _frombytes("I;16B", ramp16.astype(">u2")), {}, "I;16B", _gray3(_scale16(ramp16)), 0)
    cases["I;16L"] = (None, _frombytes("I;16L", ramp16.astype("<u2")), {}, "I;16L", _gray3(_scale16(ramp16)), 0)
    cases["I;16N"] = (None, _frombytes("I;16N", ramp16.astype("=u2")), {}, "I;16N", _gray3(_scale16(ramp16)), 0)
    cases["I 16-bit pgm"] = ("pgm", ramp16, {}, "I", _gray3(_scale16(ramp16)), 0)
    cases["I tiff"] = ("tif", Image.fromarray(ramp16.astype(np.int32)), {}, "I", _gray3(_scale16(ramp16)), 0)
    key16 = ramp16.copy()
    key16[3] = 4112
    cases["I;16 png transparency key"] = (
        "png", Image.fromarray(key16), {"transparency": 4112}, "I;16",
        np.where((key16 == 4112)[..., None], WHITE, _gray3(_scale16(key16))), 0)
    bits = (np.indices((S, S)).sum(0) % 3 == 0)
    cases["1 bilevel"] = ("png", Image.fromarray(bits), {}, "1", _gray3(bits * 255.0), 0)
    cases["L"] = ("png", Image.fromarray(g8), {}, "L", _gray3(g8), 0)
    cases["L transparency key"] = ("png", Image.fromarray(g8), {"transparency": int(g8[0, 0])}, "L",
                                   np.where((g8 == g8[0, 0])[..., None], WHITE, _gray3(g8)), 0)
    cases["LA"] = ("png", _frombytes("LA", np.stack([g8, alpha], -1)), {}, "LA", _over_white(_gray3(g8), alpha), 1)
    g_p = np.floor(g8.astype(np.float64) * alpha / 255 + 0.5).astype(np.uint8)   # premultiplied
    cases["La premultiplied"] = (None, _frombytes("La", np.stack([g_p, alpha], -1)), {}, "La",
                                 _gray3(g_p) + WHITE * (1 - _gray3(alpha) / 255), 2)
    cases["RGB"] = ("png", Image.fromarray(rgb), {}, "RGB", rgb.astype(np.float64), 0)
    cases["RGB transparency key"] = ("png", Image.fromarray(rgb), {"transparency": tuple(int(c) for c in rgb[0, 0])},
                                     "RGB", np.where((rgb == rgb[0, 0]).all(-1)[..., None], WHITE, rgb), 0)
    cases["RGBA"] = ("png", Image.fromarray(np.dstack([rgb, alpha])), {}, "RGBA", _over_white(rgb, alpha), 1)
    rgb_p = np.floor(rgb.astype(np.float64) * alpha[..., None] / 255 + 0.5).astype(np.uint8)
    cases["RGBa premultiplied"] = (None, _frombytes("RGBa", np.dstack([rgb_p, alpha])), {}, "RGBa",
                                   rgb_p + WHITE * (1 - _gray3(alpha) / 255), 2)
    cases["RGBX"] = (None, _frombytes("RGBX", np.dstack([rgb, alpha])), {}, "RGBX", rgb.astype(np.float64), 0)
    cases["P palette"] = ("png", pimage(), {}, "P", pal[idx].astype(np.float64), 0)
    cases["P transparent index"] = ("png", pimage(), {"transparency": 3}, "P",
                                    np.where((idx == 3)[..., None], WHITE, pal[idx]), 0)
    trns = bytes([0, 60, 128, 255, 200])   # alpha of indices 0..4; 5..7 opaque
    index_alpha = np.array(list(trns) + [255] * 3, dtype=np.uint8)
    cases["P alpha per index"] = ("png", pimage(), {"transparency": trns}, "P",
                                  _over_white(pal[idx], index_alpha[idx]), 1)
    pa = _frombytes("PA", np.stack([idx, alpha], -1))
    pa.putpalette(pal.tobytes())
    cases["PA tiff"] = ("tif", pa, {}, "PA", _over_white(pal[idx], alpha), 1)
    cmyk = RNG.integers(0, 256, (S, S, 4), dtype=np.uint8).astype(np.float64)
    cases["CMYK tiff"] = ("tif", _frombytes("CMYK", cmyk.astype(np.uint8)), {}, "CMYK",
                          (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255, 1)
    ycc = RNG.integers(0, 256, (S, S, 3), dtype=np.uint8)
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    jfif = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                     y + 1.772 * (cb - 128)], -1).clip(0, 255)
    cases["YCbCr tiff"] = ("tif", _frombytes("YCbCr", ycc), {}, "YCbCr", jfif, 1)
    lab = np.dstack([np.linspace(0, 255, S * S).reshape(S, S).astype(np.uint8),
                     RNG.integers(-60, 60, (S, S)).astype(np.int8).view(np.uint8),
                     RNG.integers(-60, 60, (S, S)).astype(np.int8).view(np.uint8)])
    lab[0, 0], lab[0, 1] = (136, 80, 67), (255, 0, 0)     # ~ sRGB red, white
    cases["LAB tiff"] = ("tif", _frombytes("LAB", lab), {}, "LAB", _lab_to_srgb(lab), 1)
    hsv = RNG.integers(0, 256, (S, S, 3), dtype=np.uint8)
    hsv_rgb = np.array([[colorsys.hsv_to_rgb(*(p / 255)) for p in row] for row in hsv.astype(np.float64)]) * 255
    cases["HSV"] = (None, _frombytes("HSV", hsv), {}, "HSV", hsv_rgb, 1)
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_becomes_the_expected_8bit_rgb(tmp_path, case):
    suffix, img, kwargs, mode, expected, tol = CASES[case]
    if suffix is None:   # no file format yields this mode: the conversion itself
        assert img.mode == mode
        out = np.asarray(to_rgb(img, "in-memory"))
    else:
        name = f"x.{suffix}"
        if suffix == "pgm":   # not a folder-dataset suffix: an item made by hand, as a dataset would
            (tmp_path / "images").mkdir()
            _pgm16(tmp_path / "images" / name, img)
            item = Item("x", tmp_path / "images" / name)
        else:
            item = _folder(tmp_path, name, _saver(img, **kwargs))
        with Image.open(item.image_path) as reopened:
            assert reopened.mode == mode          # the file really is in the mode under test
        out, label = build_dataset("folder", tmp_path).load(item, S, max_pixels=S * S)
        assert (label == 255).all()
    assert out.dtype == np.uint8 and out.shape == (S, S, 3)
    diff = np.abs(out.astype(np.float64) - np.floor(expected + 0.5))
    assert diff.max() <= tol, (case, diff.max())


def test_16bit_gray_keeps_its_range_and_is_not_clipped_to_white(tmp_path):
    values = np.array([[0, 257, 4096, 32768, 65535, 65278, 128, 129]] * 8, dtype=np.uint16)
    item = _folder(tmp_path, "deep.png", _saver(Image.fromarray(values)))
    out, _ = build_dataset("folder", tmp_path).load(item, 8)
    assert out[0, :, 0].tolist() == [0, 1, 16, 128, 255, 254, 0, 1]
    assert (out == out[..., :1]).all()                  # gray stays gray


def test_cmyk_converts_like_pil(tmp_path):
    cmyk = _frombytes("CMYK", RNG.integers(0, 256, (S, S, 4), dtype=np.uint8))
    for suffix in ("tif", "jpg"):
        item = _folder(tmp_path / suffix, f"c.{suffix}", _saver(cmyk))
        out, _ = build_dataset("folder", tmp_path / suffix).load(item, S)
        with Image.open(item.image_path) as img:
            assert img.mode == "CMYK"
            assert np.array_equal(out, np.asarray(img.convert("RGB")))


@pytest.mark.parametrize("mode, make, says", [
    ("F", lambda: Image.fromarray(RNG.random((S, S)).astype(np.float32)), "mode F"),
    ("I", lambda: Image.fromarray(np.full((S, S), 70000, dtype=np.int32)), r"mode I .*70000"),
    ("I", lambda: Image.fromarray(np.full((S, S), -5, dtype=np.int32)), r"mode I .*-5"),
])
def test_modes_without_a_defined_white_are_refused_by_name(tmp_path, mode, make, says):
    item = _folder(tmp_path, "odd.tif", _saver(make()))
    with Image.open(item.image_path) as img:
        assert img.mode == mode
    with pytest.raises(ImageReadError, match=rf"odd\.tif.*{says}"):
        build_dataset("folder", tmp_path).load(item, S)


def test_a_mode_pil_may_add_later_is_refused_by_name():
    class Future:
        mode, info = "RGB;48", {}
    with pytest.raises(ImageReadError, match=r"future\.img has mode RGB;48"):
        to_rgb(Future(), "future.img")


# -- the size limit ----------------------------------------------------------------------------
def test_a_huge_image_is_refused_from_its_header_fast(tmp_path):
    item = _folder(tmp_path, "bomb.png", lambda p: _png_header(p, 20000, 20000))
    assert item.image_path.stat().st_size < 200
    ds = build_dataset("folder", tmp_path)
    before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # PIL's DecompressionBombWarning must not fire first
        with pytest.raises(ImageReadError) as err:
            ds.load(item, 32)
    assert time.perf_counter() - start < 0.5
    msg = str(err.value)
    assert "bomb.png" in msg and "20000x20000" in msg and "400,000,000" in msg
    assert "100,000,000" in msg and "--max-image-pixels" in msg
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's own limit is left as it was


def test_max_pixels_sets_the_limit_and_pils_own_limit_does_not_answer(tmp_path, monkeypatch):
    item = _folder(tmp_path, "wide.png", _saver(Image.fromarray(RNG.integers(0, 256, (80, 100, 3), dtype=np.uint8))))
    ds = build_dataset("folder", tmp_path)
    with pytest.raises(ImageReadError, match=r"wide\.png is 100x80 = 8,000 pixels.*limit of 7,999"):
        ds.load(item, 32, max_pixels=7999)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # PIL alone would raise (> 2 x 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image, _ = ds.load(item, 32, max_pixels=8000)
    assert image.shape == (32, 32, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_pil_limit_is_restored_after_concurrent_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for i in range(6):
        _folder(tmp_path, f"im{i}.png", _saver(Image.fromarray(RNG.integers(0, 256, (60, 60, 3), dtype=np.uint8))))
    _png_header(tmp_path / "images" / "huge.png", 30000, 30000)
    ds = build_dataset("folder", tmp_path)
    items = ds.items("all") * 8

    def load(item):
        try:
            return ds.load(item, 16, max_pixels=5000)[0].shape
        except ImageReadError as exc:
            return str(exc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(load, items))
    assert sum(r == (16, 16, 3) for r in results) == 6 * 8
    assert all("huge.png" in r for r in results if isinstance(r, str)) and len(results) == 7 * 8
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_a_huge_label_is_refused_before_decoding(tmp_path):
    item = _folder(tmp_path, "im.png", _saver(Image.fromarray(np.zeros((10, 10), np.uint8))),
                   label=np.zeros((10, 10), np.uint8))
    _png_header(item.label_path, 20000, 20000)
    with pytest.raises(ImageReadError, match=r"label file .*im\.png is 20000x20000.*limit of 100,000,000"):
        build_dataset("folder", tmp_path).load(item, 8)


# -- labels ------------------------------------------------------------------------------------
def test_label_values_are_checked_on_the_whole_file_not_the_crop(tmp_path):
    image = Image.fromarray(np.zeros((16, 64, 3), np.uint8))   # wide: the crop keeps columns 24..39
    label = np.ones((16, 64), np.uint8)
    ds_root = tmp_path / "good"
    good = _folder(ds_root, "w.png", _saver(image), label=label)
    assert (build_dataset("folder", ds_root).load(good, 16)[1] == 1).all()
    label[5, 0] = 9                                            # far outside the crop
    item = _folder(tmp_path / "bad", "w.png", _saver(image), label=label)
    with pytest.raises(LabelValueError, match=r"w\.png holds values \[9\] outside the class table"):
        build_dataset("folder", tmp_path / "bad").load(item, 16)


def test_16bit_labels_within_0_255_load_and_above_are_refused(tmp_path):
    lab = np.zeros((S, S), np.uint16)
    lab[:, 8:] = 2
    ok = _folder(tmp_path / "ok", "a.png", _saver(Image.fromarray(np.zeros((S, S), np.uint8))),
                 label=Image.fromarray(lab))
    with Image.open(ok.label_path) as img:
        assert img.mode == "I;16"
    out = build_dataset("folder", tmp_path / "ok").load(ok, S)[1]
    assert set(np.unique(out)) == {0, 2}
    lab[0, 0], lab[15, 15] = 300, 65535                       # both outside any crop test
    bad = _folder(tmp_path / "bad", "b.png", _saver(Image.fromarray(np.zeros((S, S), np.uint8))),
                  label=Image.fromarray(lab))
    with pytest.raises(LabelValueError, match=r"b\.png \(I;16\) holds values \[300, 65535\]"):
        build_dataset("folder", tmp_path / "bad").load(bad, S)


def test_labels_in_other_modes_are_refused_by_name(tmp_path):
    item = _folder(tmp_path, "c.png", _saver(Image.fromarray(np.zeros((S, S), np.uint8))),
                   label=Image.fromarray(np.zeros((S, S, 4), np.uint8)))
    with pytest.raises(LabelValueError, match=r"c\.png is a RGBA image"):
        build_dataset("folder", tmp_path).load(item, S)


# -- datasets without a root -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cocostuff27", "cityscapes27", "voc", "folder"])
def test_a_dataset_without_data_root_says_so(name):
    ds = build_dataset(name, None)
    split = ds.default_splits[0]
    calls = [lambda: ds.items(split), ds.splits]
    if name == "folder":
        calls.append(lambda: ds.classes)
    for call in calls:
        with pytest.raises(DataRootError, match=rf"^{name} needs --data-root"):
            call()


def test_synthetic_needs_no_root():
    ds = build_dataset("synthetic", None, sizes={"train": 2})
    assert ds.splits() == ("train",) and len(ds.items("train")) == 2
