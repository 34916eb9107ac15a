"""Every option declared once: the config fields drive validation, the CLI and the run YAML."""
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rep_pipeline.cli.app import app
from rep_pipeline.cli.run import RunConfig
from rep_pipeline.pipeline.config import ClusterConfig, Comparison, EvaluateConfig, ExtractConfig, ReportConfig
from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.stages import STAGES

DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"


def test_strings_and_lists_pass_the_same_validators():
    a = ExtractConfig.parse({"model": "tiny-vit", "store": "s.zarr", "layers": "0,2-3", "embeddings": "keys,tokens",
                             "dataset_options": ["sizes={train: 4}", "layout_bias=false"]})
    b = ExtractConfig.parse({"model": "tiny-vit", "store": "s.zarr", "layers": [3, 0, 2], "embeddings": ["keys", "tokens"],
                             "dataset_options": {"sizes": {"train": 4}, "layout_bias": False}})
    assert a == b and a.layers == (0, 2, 3) and a.store == Path("s.zarr")
    assert ExtractConfig.parse({"model": "m", "store": "s", "layers": "all"}).layers is None
    c = ClusterConfig.parse({"store": "x/s.zarr", "model": "m", "train_split": "train", "k": "27,97"})
    assert c.k == (27, 97) and c.results == Path("x/results") and c.methods == ("online",)


@pytest.mark.parametrize("values,message", [
    ({"layers": "3-1"}, "layers: the range '3-1' runs backwards"),
    ({"layers": "a-b"}, "layers: cannot read 'a-b'"),
    ({"embeddings": "keys,tokenz"}, "embeddings: 'tokenz' is not one of queries, keys, values, tokens, mid_tokens, "
                                    "mid_normed; did you mean tokens?"),
    ({"embeddings": ""}, "embeddings: needs at least 1 value"),
    ({"rope": "sideways"}, "rope: 'sideways' is not one of before, after"),
    ({"limit": 0}, "limit: 0 is not allowed: must be >= 1"),
    ({"chunk_images": "many"}, "chunk_images: 'many' is not a whole number"),
    ({"dataset_options": ["novalue"]}, "dataset_options: 'novalue': expected KEY=VALUE"),
    ({"rpoe": "before"}, "rpoe: unknown key; did you mean rope? (allowed: chunk_images, "),
])
def test_bad_values_name_where_and_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        ExtractConfig.parse({"model": "tiny-vit", "store": "s.zarr", **values}, "here.yaml")
    assert str(err.value).startswith("here.yaml: ") and message in str(err.value)


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        ClusterConfig.parse({"store": "s", "model": "m", "train_split": "t", "k": "1", "steps": 0, "lr": -1})
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid options" and len(lines) == 4
    assert {line.split(":")[0].strip() for line in lines[1:]} == {"k", "steps", "lr"}


def test_every_option_of_every_stage_is_a_flag_with_the_configs_default():
    runner = CliRunner()
    for name, stage in STAGES.items():
        text = runner.invoke(app, [name, "--help"], env={"COLUMNS": "250"}).output
        models = [stage.config] if name != "report" else [ReportConfig, Comparison]
        for model in models:
            for field_name, info in model.model_fields.items():
                if field_name in ("comparisons",) or (model is ReportConfig and field_name == "title"):
                    continue
                extra = info.json_schema_extra or {}
                flag = "--" + (extra.get("flag") or field_name).replace("_", "-")
                assert flag in text, f"{name}: {flag} missing"
    text = runner.invoke(app, ["cluster", "--help"], env={"COLUMNS": "250"}).output
    assert "5000" in text and "0.005" in text  # steps and lr shown with their one default


def test_a_flag_reaches_the_config_and_bad_ones_exit_with_one_line(tmp_path):
    result = CliRunner().invoke(app, ["extract", "--model", "tiny-vit", "--store", str(tmp_path / "s.zarr"),
                                      "--layers", "3-1"])
    assert result.exit_code == 2 and "layers: the range '3-1' runs backwards" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s.zarr").exists()


def _demo(tmp_path, **changes):
    raw = yaml.safe_load(DEMO.read_text())
    for key, value in changes.items():
        section, _, sub = key.partition(".")
        if sub:
            raw[section][sub] = value
        else:
            raw[section] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_demo_config_validates_into_stage_configs(tmp_path):
    cfg = RunConfig.from_yaml(DEMO)
    assert [name for name, _, _ in cfg.plan()] == ["extract"] * 4 + ["cluster", "cluster", "evaluate", "probe",
                                                                     "probe", "correspond", "correspond", "report"]
    assert [e.dataset for e in cfg.extracts + cfg.keypoint_extracts] == ["synthetic"] * 2 + ["synthetic-pairs"] * 2
    assert cfg.keypoint_extracts[0].splits == ("test",) and cfg.corresponds[1].examples == 2
    assert cfg.probes[0].shots == (1, 5) and cfg.probes[1].model == "tiny-dinov3"
    assert cfg.clusters[0].steps == 300 and cfg.clusters[0].k == (6,)
    assert cfg.extracts[0].splits == ("train", "val") and cfg.evaluate.split == "val"
    assert cfg.report.comparisons[1].models == ("tiny-dinov3",)
    assert isinstance(cfg.evaluate, EvaluateConfig)


@pytest.mark.parametrize("changes,message", [
    ({"cluster.stepz": 3}, "cluster.stepz: unknown key; did you mean steps?"),
    ({"extract.layers": "2-0"}, "extract.layers: the range '2-0' runs backwards"),
    ({"extract.store": "elsewhere.zarr"}, "extract.store: set by the run itself"),
    ({"comparisons": [{"compare": "models", "models": ["tiny-vitt"]}]},
     "comparisons[0].models: 'tiny-vitt' is not a model of this run"),
    ({"comparisons": [{"embedding": "keyz"}]}, "comparisons[0].embedding: 'keyz' is not one of"),
    ({"models": [{"model": "tiny-dinov3", "weights": "missing.safetensors"}]}, "models[0].weights: file missing.safetensors"),
    ({"models": [{"model": "no-such-model"}]}, "models[0].model: unknown model 'no-such-model'"),
    ({"models": [{"model": "tiny-dinov3", "colour": 1}]}, "models[0].colour: unknown key"),
    ({"dataset.root": "no/such/dir"}, "dataset.root: "),
    ({"dataset.name": "imagenet"}, "dataset.name: unknown dataset 'imagenet'"),
    ({"dataset.options": {"sizez": {"train": 4}}}, "dataset.options: synthetic: unknown dataset option 'sizez'"),
    ({"dataset.name": "cocostuff27", "dataset.options": None}, "dataset.root: cocostuff27 needs one"),
    ({"evaluate": {"n_examples": -1}}, "evaluate.n_examples: -1 is not allowed: must be >= 0"),
])
def test_a_run_config_is_checked_whole_before_any_work(tmp_path, monkeypatch, changes, message):
    monkeypatch.chdir(tmp_path)
    path = _demo(tmp_path, **changes)
    with pytest.raises(ConfigError) as err:
        RunConfig.from_yaml(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value), str(err.value)
    assert not (tmp_path / "runs").exists()


def test_any_stage_option_is_accepted_in_its_section(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig.from_yaml(_demo(tmp_path, **{"extract.compile_statistics": True, "cluster.log_every": 7,
                                                 "evaluate": {"images_per_step": 2}}))
    assert all(e.compile_statistics for e in cfg.extracts)
    assert cfg.clusters[1].log_every == 7 and cfg.evaluate.images_per_step == 2


def test_a_run_config_takes_urls_and_storage_options_for_every_stage(tmp_path):
    from rep_pipeline.pipeline.location import ObjectPath

    raw = {"store": "s3://bucket/runs/features.zarr", "storage_options": {"region": "eu-west-1"},
           "dataset": {"name": "synthetic", "train_split": "train", "test_split": "val"},
           "models": [{"model": "tiny-vit", "weights": "random"}]}
    cfg = RunConfig.from_dict(raw, base=tmp_path, storage_options={"endpoint": "http://127.0.0.1:9"})
    options = {"region": "eu-west-1", "endpoint": "http://127.0.0.1:9"}
    for stage_cfg in (*cfg.extracts, *cfg.clusters, cfg.evaluate):
        assert isinstance(stage_cfg.store, ObjectPath) and dict(stage_cfg.store.options) == options
    assert str(cfg.evaluate.results) == "s3://bucket/runs/results" and dict(cfg.evaluate.results.options) == options
    assert str(cfg.report.out) == "s3://bucket/runs/report" and dict(cfg.report.out.options) == options
    local = RunConfig.from_dict({**raw, "store": "runs/f.zarr"}, base=tmp_path)
    assert local.extracts[0].store == tmp_path / "runs/f.zarr" and local.report.out == tmp_path / "runs/report"
    with pytest.raises(ConfigError, match="extract.storage_options: set by the run itself"):
        RunConfig.from_dict({**raw, "extract": {"storage_options": {"region": "x"}}}, base=tmp_path)
    with pytest.raises(ConfigError, match="store: .*unknown storage scheme 'ftp'"):
        ExtractConfig.parse({"model": "tiny-vit", "store": "ftp://host/x.zarr"}, "cli")


def test_storage_options_in_any_usual_spelling_reach_obstore(monkeypatch):
    from rep_pipeline.pipeline.location import _split_options, as_location

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    for spelling in ("endpoint", "endpoint_url", "aws_endpoint", "aws_endpoint_url"):
        url = as_location("s3://bucket/store.zarr", {spelling: "http://127.0.0.1:9000", "key": "k", "region_name": "r"})
        config, client = _split_options(url.scheme, url.options)
        assert config == {"endpoint": "http://127.0.0.1:9000", "access_key_id": "k", "region": "r"}
        assert client == {"allow_http": "true"}  # an http:// endpoint is allowed by itself
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9001")  # from the environment alone, too
    assert _split_options("s3", ())[1] == {"allow_http": "true"}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example.org")
    assert _split_options("s3", ()) == ({}, {})
    assert str(as_location("gcs://b/x")) == "gs://b/x" and str(as_location("s3a://b/x/")) == "s3://b/x"
