"""Faults of the machine around a run that must fail fast, or not at all: an unwritable HOME
for Ray's token, an object-storage endpoint that never answers."""
import os
import socket
import subprocess
import sys
import threading
import time

import pytest


@pytest.fixture
def read_only_home(tmp_path):
    """A HOME on a read-only file system (a tmpfs mounted ro; root only)."""
    home = tmp_path / "home"
    home.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(home)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        yield home
    finally:
        subprocess.run(["umount", str(home)], capture_output=True)


@pytest.mark.integration
def test_extract_on_ray_runs_with_a_read_only_home(read_only_home, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(read_only_home)
    run = subprocess.run([sys.executable, "-m", "rep_pipeline.cli.app", "extract", "--model", "tiny-vit",
                          "--weights", "random", "--dataset", "synthetic", "--limit", "4", "--layers", "0",
                          "--store", str(tmp_path / "s.zarr"), "--no-progress"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Read-only file system" not in run.stderr


@pytest.fixture
def silent_endpoint():
    """An address that accepts connections and never answers (a stalled or firewalled endpoint)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for c in held:
        c.close()
    server.close()


@pytest.mark.parametrize("args", [
    ["store", "check", "s3://bucket/features.zarr"],
    ["extract", "--model", "tiny-vit", "--weights", "random", "--dataset", "synthetic", "--limit", "4",
     "--store", "s3://bucket/features.zarr"],
    ["query", "s3://bucket/results", "SELECT 1"],
])
def test_an_endpoint_that_never_answers_fails_in_seconds_in_one_line(silent_endpoint, tmp_path, args):
    env = {**os.environ, "AWS_ENDPOINT_URL": silent_endpoint, "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "rep_pipeline.cli.app", *args], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    took = time.monotonic() - start
    assert run.returncode != 0
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert len(lines) <= 2, run.stderr
    assert silent_endpoint in run.stderr and "AWS_ENDPOINT_URL" in run.stderr, run.stderr
    assert "s3://bucket" in run.stderr, run.stderr
    assert took < 40, f"took {took:.0f} s"
