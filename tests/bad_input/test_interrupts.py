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
