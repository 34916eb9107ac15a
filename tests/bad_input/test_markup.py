"""User-supplied strings (paths, image names) are printed as they are: rich markup and emoji
codes in them are never interpreted."""
import subprocess
import sys

import numpy as np
from PIL import Image


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "rep_pipeline.cli.app", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_a_path_with_markup_and_emoji_codes_is_printed_verbatim(tmp_path):
    odd = tmp_path / "x [bold]:x: dir"
    run = _cli("store", "check", str(odd), cwd=tmp_path)
    assert run.returncode != 0
    assert str(odd) in run.stderr + run.stdout, run.stderr
    assert "\u274c" not in run.stderr + run.stdout


def test_an_image_named_like_markup_is_named_in_full(tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "a.png")
    (images / "[bold red]markup.jpg").write_bytes(b"not an image")
    run = _cli("extract", "--model", "tiny-vit", "--weights", "random", "--dataset", "folder", "--data-root",
               str(tmp_path / "data"), "--store", str(tmp_path / "s.zarr"), "--address", "inline", "--layers", "0",
               "--no-progress", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "[bold red]markup.jpg" in run.stderr, run.stderr
