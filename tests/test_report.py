"""The visual protocol: every figure on small real results, the run command end to end on the
demo config (reduced), resuming, and the report opened in headless Chromium."""
import html
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from rep_pipeline.pipeline.config import Comparison, ReportConfig
from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.cli.run import RunConfig, run_all
from rep_pipeline.stages.report import figures, run_report
from rep_pipeline.stages.report.panels import COMPARISON_PANELS, SUMMARY_PANELS

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _reduced_demo(tmp: Path) -> RunConfig:
    raw = yaml.safe_load(DEMO.read_text())
    raw["dataset"]["options"] = {"sizes": {"train": 12, "val": 5}}
    raw["extract"]["embeddings"] = ["keys", "tokens"]
    raw["cluster"].update(steps=20, init_batches=2)
    return RunConfig.from_dict(raw, base=tmp)


@pytest.fixture(scope="module")
def demo_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    cfg = _reduced_demo(tmp)
    return cfg, run_all(cfg, progress=False, say=lambda _: None)


def test_run_performs_every_stage_then_skips_them(demo_run, tmp_path):
    cfg, first = demo_run
    assert [s[2] for s in first.stages] == ["done"] * 12
    assert first.report.is_file()
    again = run_all(cfg, progress=False, say=lambda _: None)
    assert [(s[0], s[2]) for s in again.stages] == [("extract", "skipped")] * 4 + [("cluster", "skipped")] * 2 + [
        ("evaluate", "skipped")] + [("probe", "skipped")] * 2 + [("correspond", "skipped")] * 2 + [("report", "done")]


def test_every_shipped_config_parses(tmp_path):
    for path in sorted(DEMO.parent.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        for section in (raw["dataset"], (raw.get("correspond") or {}).get("dataset") or {}):
            if section.get("root"):  # the data of the paper's configs is not on this machine
                section["root"] = str(tmp_path)
        raw["models"] = [dict(m, weights="random") if isinstance(m, dict) else m for m in raw["models"]]
        cfg = RunConfig.from_dict(raw, base=tmp_path, where=str(path))
        assert cfg.extracts and cfg.report.comparisons, path


def test_report_files_and_a_fixed_layer_comparison(demo_run, tmp_path):
    cfg, _ = demo_run
    result = run_report(ReportConfig(results=cfg.report.results, out=tmp_path / "r",
                                     comparisons=(Comparison(compare="models", embedding="tokens", layer=2),)))
    names = {p.name for p in result.figures if p.parent.name != "directions"  # probes, correspondence: own tests
             and not p.parent.name.startswith("correspondence-")}
    panels = (*COMPARISON_PANELS, *SUMMARY_PANELS)
    assert names == {f"{p.file}.{ext}" for p in panels for ext in ("png", "svg")}  # every panel, both formats
    assert all(p.stat().st_size > 0 for p in result.figures)
    page = result.index.read_text()
    directions = sum(p.parent.name == "directions" for p in result.figures) // 2
    correspondence = sum(p.parent.name.startswith("correspondence-") for p in result.figures) // 2
    assert directions and correspondence and page.count("<img") == len(panels) + directions + correspondence
    assert "http" not in page.split("<body>")[1]  # self-contained
    for p in panels:
        assert html.escape(p.caption) in page and html.escape(p.reading) in page
    with pytest.raises(ConfigError, match="no evaluated layer 7"):
        run_report(ReportConfig(results=cfg.report.results, out=tmp_path / "x",
                                comparisons=(Comparison(layer=7),)))


def test_figure_functions_on_real_results(demo_run):
    from rep_pipeline.pipeline.results import Results

    cfg, _ = demo_run
    results = Results(cfg.report.results)
    maps = results.maps()
    gt = "synthetic/val/ground_truth"
    attrs = maps.attrs(gt)
    palette, classes = np.asarray(attrs["palette"], np.uint8), attrs["classes"]
    images, labels = maps.read(gt, "images"), maps.read(gt, "labels")
    setting = "synthetic/val/tiny-dinov3/train/online-k6-s0/keys/layer_1"
    preds = maps.read(setting, "examples")
    with figures.style():
        fig = figures.plot_example_grid(images, labels, [("a", preds), ("b", preds)], palette, classes)
        assert len(fig.axes) == 4 * len(images)
        shown = fig.axes[len(images)].images[0].get_array()  # first ground-truth cell, coloured
        assert np.array_equal(np.asarray(shown), figures.colourise(labels[0], palette))
        fig = figures.plot_aggregate_maps([("x", maps.read(setting, "aggregate"))], maps.read(gt, "aggregate"))
        assert [a.get_title() for a in fig.axes] == ["ground truth", "x"]
        ax = figures.plot_bars(["m1", "m2"], [0.2, 0.4], ylabel="NMI", reference=0.3)
        assert [round(p.get_height(), 3) for p in ax.patches] == [0.3, 0.2, 0.4]
        ax = figures.plot_layer_curves({"keys": ([0, 1, 2], [0.1, 0.3, 0.2]), "tokens": ([0, 1], [0.2, 0.1])})
        assert [len(line.get_xdata()) for line in ax.lines] == [3, 2]
        gt_mi = np.array([r["mi"] for r in results.rows("SELECT mi FROM classwise_mi WHERE source = 'ground_truth' "
                                                        "ORDER BY class_id")])
        ax = figures.plot_classwise_mi(classes, gt_mi, [("p", gt_mi * 0.5)], top=3)
        assert len(ax.patches) == 6 and ax.get_xticklabels()[0].get_text() == classes[int(np.argmax(gt_mi))]
        att = maps.read("synthetic/val/tiny-dinov3/attention", "attention")[0]
        ax = figures.plot_attention(att)
        assert abs(np.asarray(ax.images[0].get_array()).mean() - 0.05) < 0.01  # 95th percentile
        ax = figures.plot_scatter([1, 2, 3], [3, 2, 1], xlabel="x", ylabel="y", rho=-1.0)
        assert ax.get_title() == "Spearman rho = -1.00"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_opens_in_headless_chromium(demo_run, tmp_path):
    cfg, result = demo_run
    # a copy of the page with a probe appended: counts images that failed to decode
    probe = ("<script>window.addEventListener('load', () => { const bad = [...document.images]"
             ".filter(i => !(i.complete && i.naturalWidth > 0)).length; document.title = "
             "'images:' + document.images.length + ':broken:' + bad; });</script>")
    page = tmp_path / "probe.html"
    page.write_text(result.report.read_text().replace("</body>", probe + "</body>"))
    run = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    title = run.stdout.split("<title>")[1].split("</title>")[0]
    n_images = result.report.read_text().count("<img")
    assert title == f"images:{n_images}:broken:0", title
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
