"""Every option declared once: the config fields drive validation, the CLI and the run YAML."""
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rep_pipeline.cli.app import app
from rep_pipeline.cli.run import SET_BY_RUN, RunConfig
from rep_pipeline.pipeline.config import (ClusterConfig, Comparison, EvaluateConfig, ExplainConfig, ExtractConfig,
                                          ReportConfig, SensitivityConfig)
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
    assert cfg.clusters[0].steps == 100 and cfg.clusters[0].k == (6,)
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


# -- errors in the user's terms: the YAML key path or the flag, never a class name or a list index --
def _run_error(tmp_path, monkeypatch, mutate) -> str:
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(DEMO.read_text())
    mutate(raw)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        RunConfig.from_yaml(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "_Dataset" not in message and "_Sensitivity" not in message
    assert not re.search(r"\.\d", message.removeprefix(str(path))), message  # no "k.0", "models.0"
    return message.removeprefix(f"{path}: ")


@pytest.mark.parametrize("mutate,expected", [
    (lambda r: r["dataset"].update(nmae="x"), "dataset.nmae: unknown key; did you mean name? (allowed: limit, name, "
                                              "options, root, test_split, train_split)"),
    (lambda r: r["dataset"].update(limit=0), "dataset.limit: 0 is not allowed: must be >= 1"),
    (lambda r: r["dataset"].pop("test_split"), "dataset.test_split: required"),
    (lambda r: r["cluster"].update(k=[6, 0]), "cluster.k: 0 is not allowed: every value must be >= 2"),
    (lambda r: r["extract"].update(embeddings=["keys", "tokenz"]),
     "extract.embeddings: 'tokenz' is not one of queries, keys, values, tokens, mid_tokens, mid_normed; "
     "did you mean tokens?"),
    (lambda r: r["models"][1].update(layers="3-1"), "models[1].layers: the range '3-1' runs backwards"),
    (lambda r: r["models"][1].update(weigths="random"), "models[1].weigths: unknown key; did you mean weights?"),
    (lambda r: r["correspond"]["dataset"].update(splt="test"), "correspond.dataset.splt: unknown key; did you mean "
                                                               "split?"),
    (lambda r: r.update(sensitivity={"model": "tiny-dinov3", "seedz": [1]}),
     "sensitivity.seedz: unknown key; did you mean seeds?"),
    (lambda r: r.update(sensitivity={"model": "tiny-dinov3", "embedding": "tokns"}),
     "sensitivity.embedding: 'tokns' is not one of"),
    (lambda r: r.update(titel="x"), "titel: unknown key; did you mean title?"),
    (lambda r: r["probe"].update(train_split="val"), "probe.train_split: set by the run itself"),
])
def test_a_run_config_error_names_the_yaml_key_path(tmp_path, monkeypatch, mutate, expected):
    assert _run_error(tmp_path, monkeypatch, mutate).startswith(expected)


def test_an_unknown_section_key_lists_only_the_keys_the_section_may_set(tmp_path, monkeypatch):
    message = _run_error(tmp_path, monkeypatch, lambda r: r["cluster"].update(stepz=3))
    assert message.startswith("cluster.stepz: unknown key; did you mean steps? (allowed: ")
    allowed = message.split("(allowed: ")[1].rstrip(")").split(", ")
    assert "steps" in allowed and "k" in allowed and not set(allowed) & SET_BY_RUN["cluster"]


@pytest.mark.parametrize("args,expected", [
    (["cluster", "--store", "s.zarr", "--model", "m", "--train-split", "train", "--k", "0"],
     "rep-pipeline cluster: --k: 0 is not allowed: every value must be >= 2"),
    (["cluster", "--store", "s.zarr", "--model", "m", "--train-split", "train", "--method", "online,lloyed"],
     "rep-pipeline cluster: --method: 'lloyed' is not one of online, lloyd; did you mean lloyd?"),
    (["explain", "--store", "s.zarr", "--model", "m", "--split", "val", "--threads", "0"],
     "rep-pipeline explain: --threads: 0 is not allowed: must be >= 1"),
    (["report", "--results", "r", "--out", "o", "--embedding", "keyz"],
     "rep-pipeline report: --embedding: 'keyz' is not one of"),
    (["extract", "--model", "tiny-vit", "--weights", "random", "--store", "{tmp}/s.zarr", "-o", "sizez={{train: 2}}"],
     "synthetic: unknown dataset option 'sizez'; it takes: geometry, sizes, native_size, seed, layout_bias; did you "
     "mean sizes?"),
    (["run", str(DEMO), "--set", "cluster.stepz=3"], "cluster.stepz: unknown key; did you mean steps?"),
])
def test_a_command_line_error_names_the_flag(tmp_path, args, expected):
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args], env={"COLUMNS": "400"})
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and expected in output, output
    assert not re.search(r"\b[a-z_]+\.\d", output) and "Traceback" not in output


# -- one declaration per shared option ----------------------------------------------------------
def test_shared_options_are_one_declaration_with_each_stages_help():
    stages = [STAGES[name].config for name in ("extract", "cluster", "evaluate", "probe", "correspond", "explain")]
    for field in ("store", "dataset"):
        assert len({str(s.model_fields[field].annotation) for s in stages if s is not ExtractConfig}) == 1
    store_helps = {s.model_fields["store"].description for s in stages}
    assert len(store_helps) == len(stages) and all(store_helps)  # the same field, told per stage
    assert ExtractConfig.parse({"model": "m", "store": "s"}).dataset == "synthetic"  # extract's own default
    assert ClusterConfig.parse({"model": "m", "store": "s", "train_split": "t"}).dataset is None
    assert ExplainConfig.parse({"model": "m", "store": "s", "split": "v"}).train_split is None
    with pytest.raises(ConfigError, match="train_split: required"):
        ClusterConfig.parse({"model": "m", "store": "s"})
    help_text = CliRunner().invoke(app, ["cluster", "--help"], env={"COLUMNS": "250"}).output
    assert "Feature store written by extract." in help_text


def test_the_keys_the_run_sets_are_the_fields_marked_from_run():
    assert SET_BY_RUN["cluster"] == {"store", "model", "train_split", "dataset", "results", "storage_options"}
    assert SET_BY_RUN["evaluate"] == {"store", "split", "results", "dataset", "storage_options"}
    assert SET_BY_RUN["extract"] == {"store", "dataset", "data_root", "dataset_options", "limit", "splits",
                                     "storage_options", "model", "weights", "model_key", "seed"}
    assert SET_BY_RUN["explain"] == {"store", "model", "split", "train_split", "dataset", "data_root", "weights", "seed",
                                     "results", "storage_options"}
    assert all(SET_BY_RUN[name] == STAGES[name].config.set_by_run() for name in SET_BY_RUN)
    assert "seed" not in SET_BY_RUN["cluster"]  # k-means' seed is the section's own, the weights' seed is not


def test_the_sensitivity_section_is_a_config_of_its_own():
    study = SensitivityConfig.parse({"model": "m", "layer": "4", "batch_images": [24, 32], "init_intervals": [1, 2]})
    assert study.layer == 4 and study.seeds == (0, 1, 2) and study.settings() == [
        {"batch_images": 24, "init_interval": 1}, {"batch_images": 32, "init_interval": 1},
        {"batch_images": 24, "init_interval": 2}]
    with pytest.raises(ConfigError) as err:
        SensitivityConfig.parse({"model": "m", "layer": "last", "batch_images": [4, 4]}, "f.yaml",
                                lambda key: f"sensitivity.{key}")
    assert str(err.value).splitlines()[1:] == ["  sensitivity.layer: must be 'best' or a block number, got 'last'",
                                               "  sensitivity.batch_images: distinct positive integers, got [4, 4]"]


def test_a_run_config_names_where_its_workers_run():
    assert RunConfig.from_yaml(DEMO).address == "inline"  # the demo fits one process
    raw = yaml.safe_load(DEMO.read_text())
    raw.pop("address")
    assert RunConfig.from_dict(raw, base=DEMO.parent).address is None  # default: a local Ray instance


def test_a_value_given_twice_in_a_list_option_counts_once():
    cfg = ClusterConfig(store="x.zarr", model="tiny-vit", train_split="train", k="5,5,7,5", methods="online,online")
    assert cfg.k == (5, 7) and cfg.methods == ("online",)  # one codebook per (method, K), not two
