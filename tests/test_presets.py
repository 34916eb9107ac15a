"""Every preset of configs/paper/ (PROTOCOL.md 12.6) runs end to end with tiny random stand-ins
(``--stand-in tiny``) on the real COCO-Stuff sample, and each report shows what its figure needs."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from rep_pipeline.cli.run import Overrides, load_runs
from rep_pipeline.pipeline.results import Results
from rep_pipeline.pipeline.store import FeatureStore

pytestmark = pytest.mark.integration

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
PRESETS = sorted(p.stem for p in PAPER.glob("*.yaml"))
# PROTOCOL.md 12.6's rows, plus 12.1's and 12.2's analyses
TABLE_ROWS = {"paradigms-keys", "layers", "sizes", "ibot-animals", "large-keys", "block-artifacts", "sizes-rest",
              "overcluster", "other-datasets", "attention", "correlations", "best-layers", "correspondence",
              "directions"}
# the presets' own settings, on fewer and smaller images, with short k-means, the workers in
# this process (no Ray start-up per stage: what is under test is each preset's run)
SMALL = ["--address", "inline", "--set", "dataset.limit=8", "--set", "extract.image_size=64", "--set", "cluster.steps=20",
         "--set", "cluster.init_batches=2", "--set", "cluster.batch_images=4", "--set", "cluster.log_every=5",
         "--set", "evaluate.draws=0", "--set", "evaluate.n_examples=3"]  # intervals: tests/test_bootstrap.py


def test_every_row_of_the_preset_table_has_a_preset_naming_its_figure():
    assert TABLE_ROWS <= set(PRESETS)
    for name in PRESETS:
        docs = list(yaml.safe_load_all((PAPER / f"{name}.yaml").read_text()))
        for doc in docs:
            assert re.match(r"\[[UDX]\] (Figs?\.|Tables?) ", doc["figure"]), (name, doc.get("figure"))
        assert (PAPER / f"{name}.yaml").read_text().startswith("# ["), name


def test_stand_in_keeps_store_keys_and_replaces_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data/cocostuff").mkdir(parents=True)
    overrides = Overrides(stand_in="tiny", data_roots=(("cocostuff27", "data/cocostuff"),))
    # without the stand-in, the iBOT weights files the preset names are missing
    with pytest.raises(Exception, match="weights"):
        load_runs(PAPER / "paradigms-keys.yaml")
    (run,) = load_runs(PAPER / "paradigms-keys.yaml", overrides=overrides)
    assert [c.model for c in run.clusters] == ["dinov2-b14", "dinov2-reg-b14", "dinov3-b16", "ibot-b16", "mae-b16",
                                               "dino-b16"]
    assert {e.weights for e in run.extracts} == {"random"}
    assert [e.model for e in run.extracts][0] == "tiny:dinov2-b14"
    # --set changes an option, never turns a stage on; --data-root reaches the named dataset only
    with pytest.raises(Exception, match="no correspond"):
        load_runs(PAPER / "paradigms-keys.yaml", overrides=Overrides(stand_in="tiny", values=(
            ("correspond.examples", 1),), data_roots=overrides.data_roots))
    (run,) = load_runs(PAPER / "paradigms-keys.yaml", overrides=Overrides(
        stand_in="tiny", values=(("cluster.steps", 7), ("dataset.limit", 3)), data_roots=overrides.data_roots))
    assert {c.steps for c in run.clusters} == {7} and {e.limit for e in run.extracts} == {3}
    assert {str(e.data_root) for e in run.extracts} == {str(tmp_path / "data/cocostuff")}


def _cityscapes_from_coco(coco: Path, out: Path, n: int = 12) -> Path:
    """A Cityscapes-layout folder from real COCO-Stuff images: labelIds = 7 + the 27-class label
    (the sample has no Cityscapes; the preset's run, not the data, is under test)."""
    from rep_pipeline.pipeline.datasets import build_dataset

    coco27 = build_dataset("cocostuff27", coco)
    for split, source in (("train", "train2017"), ("val", "val2017")):
        for i, item in enumerate(coco27.items(source)[:n]):
            image, label = coco27.load(item, 128)
            city = out / "leftImg8bit" / split / "coco"
            gt = out / "gtFine" / split / "coco"
            city.mkdir(parents=True, exist_ok=True)
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(image)).save(city / f"coco_{i:06d}_000019_leftImg8bit.png")
            ids = np.where(label == 255, 0, label.astype(np.int64) + 7).astype(np.uint8)
            Image.fromarray(ids).save(gt / f"coco_{i:06d}_000019_gtFine_labelIds.png")
    return out


# the presets that add to the shared COCO store and results (run first, one after another), and
# those with stores of their own; the rest only read the shared store and draw their reports
WRITERS = ("attention", "correspondence", "overcluster", "kmeans-sensitivity")
OWN_STORES = ("ln-ablation", "other-datasets", "directions")


@pytest.fixture(scope="module")
def paper_runs(tmp_path_factory, shared_datasets):
    """Every preset run as a user would, each a `rep-pipeline run` process in one folder (the
    COCO presets share their store: each model is extracted once). Two lanes on the two cores:
    the presets that write the shared COCO store in turn beside those with stores of their own,
    then the report-only presets split between both."""
    from rep_pipeline.pipeline.datasets.partpairs import build_partpairs

    root = tmp_path_factory.mktemp("paper")
    build_partpairs(shared_datasets / "pascalpart-sample", root / "partpairs")
    _cityscapes_from_coco(shared_datasets / "cocostuff-sample", root / "cityscapes")
    roots = {"cocostuff27": shared_datasets / "cocostuff-sample", "spair71k": root / "partpairs",
             "pascalpart": shared_datasets / "pascalpart-sample", "cityscapes27": root / "cityscapes",
             "ade150": shared_datasets / "ade20k-sample"}
    args = [a for name, path in roots.items() for a in ("--data-root", f"{name}={path}")]
    extra = {"directions": ["--set", "dataset.train_split=train", "--set", "dataset.test_split=val",
                            "--set", "probe.shots=[1]", "--set", "probe.trials=2", "--set", "probe.query_images=2",
                            "--set", "cluster.k=[6]"],
             "kmeans-sensitivity": ["--set", "sensitivity.batch_images=[4,6]", "--set", "sensitivity.seeds=[0,1]"],
             "correspondence": ["--set", "correspond.examples=1"]}

    def run(name: str) -> tuple[str, subprocess.CompletedProcess]:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "rep_pipeline.cli.app", "run", str(PAPER / f"{name}.yaml"),
                               "--stand-in", "tiny", "--no-progress", *args, *SMALL, *extra.get(name, [])],
                              cwd=root, capture_output=True, text=True, timeout=900)
        print(f"preset {name}: {time.perf_counter() - started:.0f} s")
        return name, done

    readers = [n for n in PRESETS if n not in WRITERS + OWN_STORES]
    with ThreadPoolExecutor(2) as lanes:
        first = [lanes.submit(lambda: [run(n) for n in WRITERS]), lanes.submit(lambda: [run(n) for n in OWN_STORES])]
        finished = [r for f in first for r in f.result()]
        finished += lanes.map(run, readers)
    outputs = {}
    for name, done in finished:
        assert done.returncode == 0, (name, done.stdout[-3000:], done.stderr[-3000:])
        outputs[name] = done.stdout
    return root, outputs


def _report(root: Path, name: str) -> str:
    return (root / "runs" / "paper" / name / "index.html").read_text()


def test_every_preset_runs_and_draws_its_report(paper_runs):
    root, outputs = paper_runs
    for name in PRESETS:
        assert "Report:" in outputs[name], name
    for name in TABLE_ROWS - {"other-datasets", "directions", "ln-ablation"}:
        page = _report(root, name)
        assert "<img" in page and "Traceback" not in page, name
    assert (root / "runs/paper/other-datasets/pascalpart/index.html").is_file()
    assert (root / "runs/paper/other-datasets/cityscapes/index.html").is_file()
    assert (root / "runs/paper/directions/report/index.html").is_file()


def test_shared_store_holds_each_model_once_with_the_stand_ins(paper_runs):
    root, _ = paper_runs
    store = FeatureStore(root / "runs/paper/coco/features.zarr")
    groups = {(m, s) for m, d, s in store.model_splits() if d == "cocostuff27"}
    assert {m for m, _ in groups} >= {"dinov2-b14", "dinov3-l16", "ibot-l16", "mugs-b16", "clip-l14", "mocov3-b16"}
    group = store.model_split("dinov3-l16", "cocostuff27", "val2017")
    assert group.attrs["weights_source"].startswith("random") and group.attrs["model"] == "tiny:dinov3-l16"
    # the stand-in keeps the architecture path (DINOv3-L's timm architecture: RoPE, 4 registers) at the tiny size
    assert group.attrs["timm_name"] == "vit_large_patch16_dinov3" and group.attrs["embed_dim"] == 64


def test_overcluster_trains_97_clusters_and_sensitivity_fills_its_table(paper_runs):
    root, _ = paper_runs
    results = Results(root / "runs/paper/coco/results")
    ks = {r["k"] for r in results.rows("SELECT DISTINCT k FROM segmentation WHERE model = 'ibot-l16'")}
    assert ks == {27, 97}
    rows = results.rows("SELECT * FROM kmeans_sensitivity ORDER BY batch_images, pca_interval, seed")
    settings = {(r["batch_images"], r["pca_interval"]) for r in rows}
    assert settings == {(4, 1), (6, 1), (4, 2), (4, 4)}
    assert {r["seed"] for r in rows} == {0, 1} and len(rows) == 8
    assert len({r["layer"] for r in rows}) == 1 and {r["model"] for r in rows} == {"dinov3-b16"}
    best = results.rows("SELECT best_layer FROM best_layers WHERE model = 'dinov3-b16' AND embedding = 'tokens' "
                        "AND k = 27 AND seed = 0")
    assert rows[0]["layer"] == best[0]["best_layer"]
    # the variants stay out of the section 5 tables: one row per (layer, K) of the main codebook
    seg = results.rows("SELECT layer, count(*) AS n FROM segmentation WHERE model = 'dinov3-b16' AND "
                       "embedding = 'tokens' AND k = 27 GROUP BY layer")
    assert {r["n"] for r in seg} == {1}


def test_reports_keep_the_run_config(paper_runs):
    root, _ = paper_runs
    kept = yaml.safe_load((root / "runs/paper/coco/results/run_config.yaml").read_text())
    assert kept["models"][0]["model"].startswith("tiny:")
