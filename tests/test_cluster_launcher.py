"""ray_cluster.yaml is a file `ray up` accepts, and the batch job it documents is a real command."""
import json
import tomllib
import re
import shlex
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


def test_documented_job_command_names_real_options(tmp_path):
    """The `ray job submit ... -- python -m rep_pipeline.cli.app extract ...` of the file's header
    parses, and the wheel it ships is the one `pip wheel` builds from pyproject.toml."""
    header = "".join(re.sub(r"^#\s?", "", line).rstrip("\\\n") for line in LAUNCHER.read_text().splitlines(True)
                     if line.startswith("#   ") or line.startswith("#       "))
    submit, job = header.split(" -- ", 1)
    job = shlex.split(job)
    assert job[:3] == ["python", "-m", "rep_pipeline.cli.app"]
    runtime_env = json.loads(shlex.split(submit)[shlex.split(submit).index("--runtime-env-json") + 1])
    version = tomllib.loads((LAUNCHER.parent / "pyproject.toml").read_text())["project"]["version"]
    assert runtime_env["py_modules"] == [f"dist/rep_pipeline-{version}-py3-none-any.whl"]
    args = job[3:] + ["--weights", "random"]  # the documented pretrained ones: no hub here
    args[args.index("--data-root") + 1] = str(tmp_path / "cocostuff")  # not there: stops at the data check
    args[args.index("--store") + 1] = str(tmp_path / "coco.zarr")
    result = CliRunner().invoke(app, args)
    assert "No such option" not in result.output and "Usage:" not in result.output, result.output
    assert result.exit_code == 2 and "cocostuff" in result.output  # the data-root error, named
    assert not (tmp_path / "coco.zarr").exists()
