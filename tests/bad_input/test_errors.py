"""Errors a person can act on: one or two lines naming the file, key or value, a traceback only
with --debug, and everything that needs no model or data refused before torch or Ray load."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from rep_pipeline.cli.app import app
from rep_pipeline.pipeline.config import ExtractConfig
from rep_pipeline.pipeline.errors import CheckpointError, ConfigError, UnknownModelError
from rep_pipeline.pipeline.registry import build_model, get_spec
from rep_pipeline.stages.extract import run_extract

runner = CliRunner()

_PROBE = """
import json, sys
from rep_pipeline.cli.app import main
sys.argv = ["rep-pipeline", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exc:
    code = exc.code
import ray
print(json.dumps({"code": code, "loaded": sorted({"torch", "timm"} & set(sys.modules)),
                  "ray_started": ray.is_initialized()}))
"""


@pytest.mark.parametrize("args,message", [
    (["extract", "--model", "dino-b61", "--store", "{tmp}/s.zarr"], "unknown model 'dino-b61'"),
    (["extract", "--model", "tiny-vit", "--weights", "random", "--dataset", "voc", "--store", "{tmp}/s.zarr"],
     "voc needs --data-root"),
    (["extract", "--model", "tiny-vit", "--weights", "random", "--layers", "3-1", "--store", "{tmp}/s.zarr"],
     "runs backwards"),
    (["extract", "--model", "tiny-vit", "--weights", "{tmp}/missing.safetensors", "--store", "{tmp}/s.zarr"],
     "missing.safetensors does not exist"),
    (["extract", "--model", "tiny-vit", "--weights", "random", "--store", "{tmp}/file.zarr"], "is a file"),
    (["extract", "--model", "tiny-vit", "--weights", "random", "-o", "bogus=1", "--store", "{tmp}/s.zarr"],
     "synthetic: unknown dataset option 'bogus'; it takes: geometry, sizes, native_size, seed, layout_bias"),
    (["cluster", "--store", "{tmp}/none.zarr", "--model", "m", "--train-split", "train"], "does not exist"),
    (["evaluate", "--store", "{tmp}/none.zarr", "--split", "val"], "does not exist"),
    (["query", "{tmp}/none", "SELECT 1"], "does not exist"),
])
def test_errors_that_need_no_model_come_before_torch_and_ray(tmp_path, args, message):
    (tmp_path / "file.zarr").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    run = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True, cwd=tmp_path)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"code": 2, "loaded": [], "ray_started": False}, run.stderr
    assert message in " ".join(run.stderr.split()) and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) <= 3, run.stderr


def test_a_misspelt_pretrained_tag_is_refused_even_with_random_weights(tmp_path):
    with pytest.raises(UnknownModelError, match=r"no pretrained tag 'dnio' for vit_base_patch16_224; its tags: .*dino"):
        get_spec("vit_base_patch16_224.dnio")
    out = runner.invoke(app, ["extract", "--model", "vit_base_patch16_224.dnio", "--weights", "random",
                              "--store", str(tmp_path / "s.zarr")])
    assert out.exit_code == 2 and "no pretrained tag 'dnio'" in out.output and not (tmp_path / "s.zarr").exists()


def test_a_checkpoint_of_another_architecture_is_summarised_not_listed(tmp_path):
    path = tmp_path / "large.safetensors"
    save_file({f"blocks.{i}.mlp.fc1.weight": torch.zeros(2, 2) for i in range(200)}, path)
    with pytest.raises(CheckpointError) as err:
        build_model("tiny-vit", str(path))
    message = str(err.value)
    assert str(path) in message and "196 keys unexpected" in message and "keys missing" in message
    assert "4 keys of another shape (e.g. blocks.0.mlp.fc1.weight (2, 2) for (256, 64)" in message
    assert len(message) < 700 and message.count("blocks.") <= 6  # a few examples, not 200 keys


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "s.zarr/keys/c.0.0"))

    import rep_pipeline.stages.extract.stage as stage

    monkeypatch.setattr(stage, "check_weights", broken)
    args = ["extract", "--model", "tiny-vit", "--weights", "random", "--store", str(tmp_path / "s.zarr")]
    out = runner.invoke(app, args)
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "OSError: [Errno 28] No space left on device" in out.output and "--debug" in out.output
    debug = runner.invoke(app, ["--debug", *args])
    assert isinstance(debug.exception, OSError)  # re-raised: the traceback is shown


@pytest.mark.integration
def test_a_local_ray_instance_starts_without_the_token_notice(tmp_path):
    code = "from rep_pipeline.pipeline import runner; import ray; runner.ensure_ray(num_cpus=1); ray.shutdown()"
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_AUTH_MODE"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Token authentication" not in run.stdout + run.stderr


def test_a_layer_beyond_the_model_leaves_no_group_behind(ray_local, tmp_path):
    cfg = ExtractConfig(model="tiny-vit", weights="random", store=tmp_path / "s.zarr", layers=(7,),
                        dataset_options={"sizes": {"train": 2, "val": 2}})
    with pytest.raises(ConfigError, match=r"layers \[7\] do not exist in tiny-vit \(blocks 0..3\)"):
        run_extract(cfg, progress=False)
    assert not (tmp_path / "s.zarr" / "models").exists()
    run_extract(cfg.replace(layers=(3,)), progress=False)  # the correct rerun is not blocked by leftovers


@pytest.mark.parametrize("args,message", [
    (["extract", "--modle", "x"], "No such option: --modle"),
    (["extract"], "Missing option '--model'"),
    (["extract", "--model", "m", "--store", "s", "--limit", "abc"], "Invalid value for '--limit'"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_usage_errors_are_one_line_too(args, message):
    run = subprocess.run([sys.executable, "-m", "rep_pipeline.cli.app", *args], capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr and "--help" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "╭" not in run.stderr


def test_debug_works_after_the_command_too(tmp_path):
    out = runner.invoke(app, ["extract", "--model", "dino-b61", "--store", str(tmp_path / "s.zarr"), "--debug"])
    assert isinstance(out.exception, UnknownModelError)  # re-raised with its traceback, not one red line
