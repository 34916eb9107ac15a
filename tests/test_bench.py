"""Benches must not rot: every ``bench/*.py`` runs here at its smallest size (a fast test per
script, a subprocess each, as a user runs it). A new bench needs an entry in SMALLEST."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASETS = os.environ.get("REP_PIPELINE_DATASETS", "")

SMALLEST = {  # script: its arguments at the smallest size that still runs every part
    "cluster.py": ["--n", "10000", "--dim", "16", "--iters", "1", "--batch", "512", "--images", "8", "--grid", "4",
                   "--passes", "1", "--rounds", "1"],
    "codecs.py": ["--model", "tiny-vit"],
    "correspond.py": ["--dim", "16", "--grid", "4", "--size", "32", "--keypoints", "2", "--targets", "2",
                      "--repeats", "1"],
    "evaluate.py": ["--dim", "16", "--k", "4", "--size", "32", "--grid", "4", "--images", "1", "--repeats", "1"],
    "explain.py": ["--model", "tiny-vit", "--size", "32", "--chunks", "2", "--targets", "2", "--repeats", "1"],
    "gpu.py": ["--dry-run"],
    "extract.py": ["--models", "tiny-vit", "--images", "2", "--batch", "2", "--repeats", "1"],
    "probe.py": ["--data-root", str(Path(DATASETS) / "cocostuff-sample"), "--model", "tiny-vit", "--rounds", "1",
                 "--limit", "8", "--shots", "1,2", "--trials", "1", "--address", "inline"],
    "scaling.py": ["--model", "tiny-vit", "--images", "16", "--rounds", "1"],
    "storage.py": ["--images", "2", "--rounds", "1"],
}
NEEDS_DATA = {"probe.py"}
ON_RAY = {"scaling.py"}  # extract on one Ray worker node against two: only on a real cluster (integration tier)


def test_every_bench_has_a_smallest_size():
    assert sorted(p.name for p in (ROOT / "bench").glob("*.py")) == sorted(SMALLEST)


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.integration) if s in ON_RAY else s
                                    for s in sorted(SMALLEST)])
def test_bench_runs_at_its_smallest_size(script, tmp_path):
    if script in NEEDS_DATA and not (Path(DATASETS) / "cocostuff-sample").is_dir():
        pytest.skip("REP_PIPELINE_DATASETS does not point at the shared dataset samples")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "REP_PIPELINE_BACKEND": os.environ.get("REP_PIPELINE_BACKEND", "numpy")}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *SMALLEST[script]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip()
