"""Files in a data folder that are not regular files (a FIFO would block extract forever) are
named before any work, and a file that yields no data in time is named too."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rep_pipeline.pipeline import config
from rep_pipeline.pipeline.datasets import build_dataset
from rep_pipeline.pipeline.errors import ImageReadError


@pytest.fixture
def folder_with_a_fifo(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(images / f"im{i}.jpg")
    os.mkfifo(images / "zz.jpg")
    return tmp_path


def test_a_fifo_among_the_images_is_named_when_the_split_is_listed(folder_with_a_fifo):
    with pytest.raises(ImageReadError, match=r"zz\.jpg is a FIFO, not a regular file"):
        build_dataset("folder", folder_with_a_fifo).items("all")


def test_extract_refuses_a_fifo_before_creating_the_store(folder_with_a_fifo, tmp_path):
    store = tmp_path / "s.zarr"
    run = subprocess.run([sys.executable, "-m", "rep_pipeline.cli.app", "extract", "--model", "tiny-vit",
                          "--weights", "random", "--dataset", "folder", "--data-root", str(folder_with_a_fifo),
                          "--store", str(store), "--address", "inline", "--layers", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "zz.jpg is a FIFO" in run.stderr
    assert not store.exists()


def test_a_file_that_yields_no_data_in_time_is_named(folder_with_a_fifo, monkeypatch):
    """The read itself has a time limit: a FIFO past the listing check stands in for a stalled mount."""
    from rep_pipeline.pipeline.datasets import base

    monkeypatch.setattr(config, "READ_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(base, "require_regular_file", lambda path, what: None)
    fifo = folder_with_a_fifo / "images" / "zz.jpg"
    with pytest.raises(ImageReadError, match=r"zz\.jpg: no data within 0.5 s"):
        base.read_local_file(fifo, "image")
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the stalled reader gets its end of file
