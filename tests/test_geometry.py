"""The crop and pad geometries (PROTOCOL.md section 8.2): placement rows, the map to the grid and
back, padding labels, and the pixels the model sees."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rep_pipeline.pipeline.datasets import build_dataset
from rep_pipeline.pipeline.datasets.geometry import inside, place, placement, tight_box, to_grid, to_original
from rep_pipeline.pipeline.errors import ConfigError


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (320, 320), (101, 403)])
@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_placement_follows_the_protocol(size, mode):
    w, h = size
    W, H, nw, nh, ox, oy = placement(w, h, 320, mode)
    assert (W, H) == (w, h)
    if mode == "pad":
        s = 320 / max(w, h)
        assert (nw, nh) == (round(w * s), round(h * s)) and max(nw, nh) == 320
        assert (ox, oy) == ((320 - nw) // 2, (320 - nh) // 2)
    else:
        assert min(nw, nh) == 320 and ox <= 0 and oy <= 0
        assert (-ox, -oy) == ((nw - 320) // 2, (nh - 320) // 2)


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_grid_map_round_trips_and_matches_the_resize(mode):
    """An original pixel's centre lands where PIL's resize puts it; the inverse map undoes it."""
    w, h = 400, 250
    geometry = np.asarray(placement(w, h, 160, mode))
    x, y = np.random.default_rng(0).uniform(0, [w - 1, h - 1], size=(100, 2)).T
    u, v = to_grid(x, y, geometry)
    back = to_original(u, v, geometry)
    np.testing.assert_allclose(back, (x, y), atol=1e-9)
    # a bright block centred at an original point stays centred there on the grid
    img = np.zeros((h, w), np.float32)
    img[100:110, 200:210] = 255
    grid = np.asarray(place(Image.fromarray(img), 160, mode, Image.BILINEAR, 0), dtype=np.float64)
    rows, cols = np.indices(grid.shape)
    cu, cv = (grid * cols).sum() / grid.sum(), (grid * rows).sum() / grid.sum()
    eu, ev = to_grid(204.5, 104.5, geometry)
    assert abs(cu - eu) < 0.1 and abs(cv - ev) < 0.1


def test_pad_labels_are_ignore_outside_the_image_and_the_inside_mask_agrees():
    ds = build_dataset("synthetic", geometry="pad", sizes={"train": 2})
    image, label, geometry = ds.load_placed(ds.items("train")[0], 96)
    shown = inside(geometry, 96)
    assert (label[~shown] == 255).all() and (label[shown] != 255).all()
    assert shown.sum() == geometry[2] * geometry[3]
    assert tuple(image[~shown][0]) == (124, 116, 104)


def test_geometry_is_an_option_of_every_dataset_and_part_of_the_fingerprint():
    crop, pad = build_dataset("synthetic"), build_dataset("synthetic", geometry="pad")
    items = crop.items("train")
    assert crop.fingerprint("train", items, 64)["options"]["geometry"] == "crop"
    assert pad.fingerprint("train", items, 64)["options"]["geometry"] == "pad"
    with pytest.raises(ConfigError, match="geometry='square'"):
        build_dataset("synthetic", geometry="square")


def test_the_model_sees_zero_on_the_padding():
    """After normalisation the canvas outside the image is exactly 0 (the model's mean colour)."""
    torch = pytest.importorskip("torch")
    from rep_pipeline.pipeline.config import ExtractConfig
    from rep_pipeline.stages.extract.extractor import Extractor

    cfg = ExtractConfig(model="tiny-vit", weights="random", store="/tmp/unused.zarr", image_size=64,
                        dataset_options={"geometry": "pad", "sizes": {"train": 2}})
    ex = Extractor(cfg)
    images, _, _, geometry = ex.load_batch(ex.items("train"))
    x = ex.to_model_input(images, geometry)
    shown = torch.from_numpy(np.stack([inside(g, 64) for g in geometry]))[:, None].float()
    shown = torch.nn.functional.interpolate(shown, size=x.shape[-1], mode="nearest").expand_as(x)
    assert (x[shown == 0] == 0).all() and (x[shown == 1] != 0).float().mean() > 0.9


def test_tight_box_is_half_open_in_original_pixels():
    mask = np.zeros((7, 9), bool)
    mask[2:5, 3] = mask[4, 6] = True
    assert tight_box(mask) == (3, 2, 7, 5) and all(type(v) is int for v in tight_box(mask))
