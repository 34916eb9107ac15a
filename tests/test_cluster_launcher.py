"""ray_cluster.yaml is a file `ray up` accepts, with no shared filesystem, and the batch job it
documents is a real command (tests/test_job_submit.py runs it on a cluster)."""
import itertools
import json
import re
import tomllib
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from rep_pipeline.cli.app import app

LAUNCHER = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


def _schema() -> dict:
    """The schema Ray's cluster launcher checks every config against (shipped with Ray)."""
    return json.loads((resources.files("ray.autoscaler") / "ray-schema.json").read_text())


def test_launcher_file_passes_rays_schema_and_keeps_work_off_the_head():
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.validate(config, _schema())
    nodes = config["available_node_types"]
    head = config["head_node_type"]
    assert head in nodes and nodes[head]["resources"] == {"CPU": 0}
    workers = [n for name, n in nodes.items() if name != head]
    assert workers and all(n["max_workers"] <= config["max_workers"] for n in workers)
    broken = dict(config, max_worker=config["max_workers"])  # a misspelt key is caught
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(broken, _schema())


def _run_config_example() -> dict:
    """The header's first indented block: the keys of run.yaml that become URLs."""
    header = [line for line in LAUNCHER.read_text().splitlines() if line.startswith("#")]
    first = next(i for i, line in enumerate(header) if line.startswith("#   "))
    block = [line[4:] for line in itertools.takewhile(lambda line: line.startswith("#   "), header[first:])]
    return yaml.safe_load("\n".join(block))


def test_documented_job_command_names_real_options(tmp_path, monkeypatch, documented_job):
    """`ray job submit` with real options of its own; the job, `rep-pipeline run` (the package's
    console script) with real options of `run`; the run config's paths all object-storage URLs."""
    from ray.dashboard.modules.job.cli import submit as ray_job_submit

    command = list(documented_job)
    split = command.index("--")
    submit, job = command[:split], command[split + 1:]
    assert submit[:3] == ["ray", "job", "submit"]
    known = {opt for param in ray_job_submit.params for opt in param.opts}
    assert {a for a in submit[3:] if a.startswith("--")} <= known
    assert submit[submit.index("--working-dir") + 1] == "." and submit[submit.index("--address") + 1].endswith(":8265")
    scripts = tomllib.loads((LAUNCHER.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert job[0] in scripts and job[1] == "run" and job[job.index("--address") + 1] == "auto"
    monkeypatch.chdir(tmp_path)  # run.yaml is not here: the command parses, then stops at the config
    result = CliRunner().invoke(app, job[1:])
    assert "No such option" not in result.output and "Usage:" not in result.output, result.output
    assert result.exit_code == 2 and job[2] in result.output, result.output

    example = _run_config_example()
    paradigms = yaml.safe_load((LAUNCHER.parent / "configs/paper/paradigms-keys.yaml").read_text())
    assert {"store", "results", "report"} <= set(example) <= set(paradigms)
    assert set(example["dataset"]) == {"root"} and "root" in paradigms["dataset"]
    urls = [example["store"], example["results"], example["report"], example["dataset"]["root"]]
    assert all(url.startswith("s3://") for url in urls)


def test_nodes_install_the_package_from_the_shipped_checkout():
    """No hand-kept dependency list: every node installs this checkout (file_mounts), so its
    dependencies come from pyproject.toml; no shared filesystem is mounted."""
    config = yaml.safe_load(LAUNCHER.read_text())
    (remote, local), = config["file_mounts"].items()
    assert local == "."
    setup = " ".join(config["setup_commands"])
    assert f'"{remote.replace("~", "$HOME")}"' in setup
    for dependency in ("timm", "zarr", "pyarrow", "duckdb", "obstore"):
        assert dependency not in setup
    assert not re.search(r"mount|efs|fsx|/data\b", setup, re.I)
    workers = [n for name, n in config["available_node_types"].items() if name != config["head_node_type"]]
    assert all("IamInstanceProfile" in n["node_config"] for n in workers)
