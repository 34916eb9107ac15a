"""Interrupts: a local Ray instance the CLI started ends with the CLI, even when it is killed."""
import signal
import subprocess
import sys
import time

import psutil
import pytest

_DRIVER = """
import time
from rep_pipeline.pipeline import runner
runner.ensure_ray(num_cpus=1)
print("READY", flush=True)
time.sleep(600)
"""


@pytest.mark.integration
def test_a_killed_driver_leaves_no_ray_process_behind():
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().startswith("READY")
        time.sleep(1.0)  # the agents start just after ray.init returns
        started = psutil.Process(driver.pid).children(recursive=True)
        names = {p.name() for p in started}
        assert {"gcs_server", "raylet"} <= names and any("Agent" in n for n in names), names
    finally:
        driver.send_signal(signal.SIGKILL)  # no handler runs: as the OOM killer or a closed terminal
        driver.wait()
    deadline = time.monotonic() + 30
    while alive := [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        if time.monotonic() > deadline:
            for p in alive:
                p.kill()
            pytest.fail(f"still running 30 s after the driver was killed: {[p.name() for p in alive]}")
        time.sleep(0.5)


def _mount_tmpfs(path, size_kb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_stops_the_run_keeps_finished_chunks_and_resumes(ray_local, tmp_path):
    """A real full file system (a small tmpfs): the run stops with one clear error naming the
    array, the chunks already written stay done, and with room again the same command
    completes the store to equal an uninterrupted run."""
    import numpy as np

    from rep_pipeline.pipeline.config import ExtractConfig
    from rep_pipeline.pipeline.errors import StoreError
    from rep_pipeline.pipeline.store import FeatureStore, check_store
    from rep_pipeline.stages.extract import run_extract

    def cfg(store):
        return ExtractConfig(model="tiny-vit", weights="random", store=store, layers=(3,), embeddings=("keys",),
                             chunk_images=2, splits=("train",), dataset_options={"sizes": {"train": 12}})

    reference = cfg(tmp_path / "ref" / "s.zarr")
    run_extract(reference, progress=False)
    used = sum(p.stat().st_size for p in reference.store.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, max(64, used // 2 // 1024)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        target = cfg(disk / "s.zarr")
        with pytest.raises(StoreError, match=r"writing (datasets|models)/\S+ .* failed: \[Errno 28\] No space left"):
            run_extract(target, progress=False)
        group = FeatureStore(target.store).model_split("tiny-vit", "synthetic", "train")
        done = group.done[:]
        assert 0 < done.sum() < len(done)  # some chunks kept, the run did not pretend to finish
        assert check_store(target.store).problems == []  # every chunk marked done reads back whole
        subprocess.run(["mount", "-o", f"remount,size={4 * used // 1024 + 256}k", str(disk)], check=True)
        run_extract(target, progress=False)
        got = FeatureStore(target.store).model_split("tiny-vit", "synthetic", "train").group
        want = FeatureStore(reference.store).model_split("tiny-vit", "synthetic", "train").group
        for name, arr in ((n, a) for n, a in want.arrays() if n != "provenance"):
            np.testing.assert_array_equal(got[name][:], arr[:], err_msg=name)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
