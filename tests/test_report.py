"""The visual protocol: every figure on small real results, the run command end to end on the
demo config (reduced), resuming, and the report opened in headless Chromium."""
import html
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from rep_pipeline.pipeline.arrays import minmax
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
        ("evaluate", "skipped")] + [("probe", "skipped")] * 2 + [("correspond", "skipped")] * 2 + [("report", "skipped")]
    assert again.report == first.report  # the page drawn from these very results is reused
    # results that change (here: a table part rewritten) redraw the page, and an earlier page's
    # figure files that this one does not write are removed
    part = next((cfg.report.results / "segmentation").rglob("*.parquet"))
    part.write_bytes(part.read_bytes())
    stale = first.report.parent / "gone" / "old.png"
    stale.parent.mkdir()
    stale.write_bytes(b"x")
    third = run_all(cfg, progress=False, say=lambda _: None)
    assert third.stages[-1][::2] == ("report", "done") and not stale.parent.exists()


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


# -- what the page says: K and method, intervals, provenance; 12.2, 12.3 and 12.5 ----------------------
def test_default_k_is_the_smallest_and_the_method_online_where_evaluated():
    from rep_pipeline.stages.report.stage import default_k_method

    rows = [{"k": k, "method": m} for k, m in ((27, "online"), (97, "online"), (6, "lloyd"), (27, "lloyd"))]
    assert default_k_method(rows)[:2] == (27, "online")  # lloyd's smaller K does not make online's default
    assert default_k_method(rows, method="lloyd")[:2] == (6, "lloyd")
    assert default_k_method(rows, k=97)[:2] == (97, "online")
    assert default_k_method([r for r in rows if r["method"] == "lloyd"])[:2] == (6, "lloyd")
    assert "smallest K evaluated (27, 97)" in default_k_method(rows)[2]
    with pytest.raises(ConfigError):
        default_k_method(rows, k=5)


def _interval_rows(rows, columns):
    """``rows`` with a 95 % interval around each of ``columns`` (derived from the value), where
    the results do not hold one already."""
    out = []
    for r in rows:
        r = dict(r)
        for c in columns:
            if r.get(c) is not None and r.get(f"{c}_lo") is None:
                r[f"{c}_lo"], r[f"{c}_hi"] = 0.9 * r[c], r[c] + 0.1 * abs(r[c])
        out.append(r)
    return out


def _put_array(maps, path, name, data, attrs=None):
    """An array the layout of this checkout may not list yet, written straight into the maps store."""
    group = maps.root[path]
    group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape, overwrite=True)[...] = data
    if attrs:
        group.attrs.update(attrs)


def _split_class(labels, classes):
    """A class shown by some of the stored examples, not all."""
    for cid, name in enumerate(classes):
        shows = [i for i in range(len(labels)) if (labels[i] == cid).any()]
        if 0 < len(shows) < len(labels):
            return name, shows
    pytest.skip("every class of the stored examples shows in all of them")


@pytest.fixture(scope="module")
def augmented(demo_run, tmp_path_factory):
    """A copy of the demo's results with what newer stages add: 95 % intervals and p-values, a
    second K (2K, the first K's tables and maps copied, its mIoU reversed over the layers) and
    lloyd rows at a smaller K, raw cluster maps for one model's 2K settings, the example images'
    own attention for one model, a k-means sensitivity table and the run's config."""
    from scipy import stats

    from rep_pipeline.pipeline.results import Results
    from rep_pipeline.storage_schemas import results as layout
    from rep_pipeline.storage_schemas.tables import SCHEMAS

    cfg, _ = demo_run
    path = tmp_path_factory.mktemp("augmented") / "results"
    shutil.copytree(cfg.report.results, path)
    results = Results(path, mode="a")
    seg = results.rows("SELECT * FROM segmentation WHERE method = 'online'")
    k = min(r["k"] for r in seg)
    models = sorted({r["model"] for r in seg})
    for model in models:
        mine = [r for r in seg if r["model"] == model and r["k"] == k]
        results.write_table("segmentation", _interval_rows(mine, ("miou", "pixel_accuracy", "nmi", "nmi_bias_aware")),
                            dataset="synthetic", model=model, part="val")
        results.write_table("segmentation", _interval_rows(
            [dict(r, k=2 * k, miou=1 - r["miou"], miou_lo=None, miou_hi=None) for r in mine],
            ("miou", "pixel_accuracy", "nmi", "nmi_bias_aware")),
            dataset="synthetic", model=model, part="val-k2")
        results.write_table("segmentation", [dict(r, k=k - 1, method="lloyd") for r in mine], dataset="synthetic",
                            model=model, part="val-lloyd")
        for table in ("per_class_iou", "confusion", "matching", "classwise_mi", "training_curves"):
            rows = results.rows(f"SELECT * FROM {table} WHERE model = '{model}' AND k = {k}")
            results.write_table(table, [dict(r, k=2 * k) for r in rows], dataset="synthetic", model=model,
                                part="k2")
        folder = path / layout.MAPS / "synthetic" / "val" / model / "train"
        shutil.copytree(folder / f"online-k{k}-s0", folder / f"online-k{2 * k}-s0")
        att = results.rows(f"SELECT * FROM attention_mi WHERE model = '{model}'")
        results.write_table("attention_mi", _interval_rows(att, ("mean",)), dataset="synthetic", model=model,
                            part="val")
    truth = results.rows("SELECT * FROM ground_truth")
    results.write_table("ground_truth", _interval_rows(truth, ("nmi", "nmi_bias_aware")), dataset="synthetic",
                        model=None, part="val")
    corr = results.rows("SELECT * FROM correlations")
    for r in corr:
        if r["rho"] is not None and r["n_pairs"] > 2 and abs(r["rho"]) < 1:
            t = r["rho"] * np.sqrt((r["n_pairs"] - 2) / (1 - r["rho"] ** 2))
            r["p_value"] = float(2 * stats.t.sf(abs(t), r["n_pairs"] - 2))
    results.write_table("correlations", corr, dataset="synthetic", model=None, part="val")
    maps = results.maps()
    clustered = models[-1]
    for other in models[:-1]:  # the other models' maps keep no raw clusters: their rows fall back to classes
        for found in (path / layout.MAPS / "synthetic" / "val" / other / "train" / f"online-k{2 * k}-s0").glob(
                "*/layer_*/clusters"):
            shutil.rmtree(found)
    for r in (r for r in seg if r["model"] == clustered and r["k"] == k):
        at = layout.setting_maps("synthetic", "val", clustered, "train", "online", 2 * k, 0, r["embedding"], r["layer"])
        examples = maps.read(at, "examples")
        clusters = (examples + k * (np.arange(examples.shape[-1]) >= examples.shape[-1] // 2)).astype(examples.dtype)
        _put_array(maps, at, "clusters", clusters)
    attention = layout.attention_maps("synthetic", "val", models[0])
    mean = maps.read(attention, "attention")
    ids = list(maps.attrs(layout.ground_truth_maps("synthetic", "val"))["example_ids"])
    per_image = np.repeat(mean[:, None], len(ids), axis=1).astype(np.float32)
    _put_array(maps, attention, "example_attention", per_image, {"example_ids": ids})
    if "kmeans_sensitivity" in SCHEMAS:
        best = max((r for r in seg if r["model"] == clustered and r["k"] == k and r["embedding"] == "tokens"),
                   key=lambda r: r["miou"])
        rows = [dict({c: best[c] for c in ("model", "dataset", "split", "train_split", "embedding", "layer", "k",
                                           "miou", "pixel_accuracy", "nmi", "n_images", "store_fingerprint",
                                           "codebook_fingerprint")},
                     seed=seed, batch_images=bs, pca_batches=8, pca_interval=every,
                     codebook=f"online-k{k}-s{seed}-v{j}",
                     miou=best["miou"] - 0.01 * j + 0.002 * seed)
                for j, (bs, every) in enumerate(((24, 1), (32, 1), (24, 2))) for seed in range(3)]
        results.write_table("kmeans_sensitivity", _interval_rows(rows, ("miou",)), dataset="synthetic",
                            model=clustered, part="val")
    run_config = path / "run_config.yaml"
    if not run_config.is_file():
        run_config.write_text(DEMO.read_text())
    name, shows = _split_class(maps.read(layout.ground_truth_maps("synthetic", "val"), "labels"),
                               list(maps.attrs(layout.ground_truth_maps("synthetic", "val"))["classes"]))
    return {"path": path, "k": k, "models": models, "clustered": clustered, "attended": models[0], "class": name,
            "shows": shows, "ids": ids}


@pytest.fixture(scope="module")
def augmented_report(augmented, tmp_path_factory):
    a = augmented
    comparisons = (Comparison(compare="models", embedding="keys", title="keys"),
                   Comparison(compare="layers", embedding="tokens", models=(a["clustered"],), title="layers"),
                   Comparison(compare="models", embedding="tokens", k=2 * a["k"], layer_k=a["k"], colour="clusters",
                              images_with_class=a["class"], title="overclustering"))
    cfg = ReportConfig(results=a["path"], out=tmp_path_factory.mktemp("augmented-report"), comparisons=comparisons)
    return cfg, run_report(cfg)


def _page_section(page, title):
    return re.search(rf"<section[^>]*><h2>{re.escape(html.escape(title))}.*?</section>", page, re.S).group(0)


def test_every_section_states_its_k_method_and_test_images(augmented, augmented_report):
    from rep_pipeline.pipeline.results import Results

    a, (_, result) = augmented, augmented_report
    page = result.index.read_text()
    k = a["k"]
    seg = Results(a["path"]).rows("SELECT * FROM segmentation")
    n = {r["n_images"] for r in seg}.pop()
    keys = _page_section(page, "keys")
    assert f"<h2>keys (K = {k}, online)</h2>" in keys  # the smallest online K, not lloyd's smaller one
    assert f"the smallest K evaluated ({k}, {2 * k})" in keys and "online where evaluated" in keys
    assert f"Scores over {n} test images" in keys and "selected on this evaluated split" in keys
    assert f"<h2>layers (K = {k}, online)</h2>" in page
    assert f"<h2>correlations (K = {k}, online)</h2>" in page
    over = _page_section(page, "overclustering")
    assert f"(K = {2 * k}, online)</h2>" in over and f"best-mIoU layer at K = {k}" in over
    assert f"{n} test images" in page.split("<section")[0]  # the intro


def test_intervals_p_values_and_the_new_figures_are_shown(augmented, augmented_report):
    from rep_pipeline.pipeline.results import Results
    from rep_pipeline.stages.report.panels import SENSITIVITY_PANELS
    from rep_pipeline.stages.report.stage import value_text

    a, (_, result) = augmented, augmented_report
    page = result.index.read_text()
    results = Results(a["path"])
    keys = _page_section(page, "keys")
    best = max(results.rows(f"SELECT * FROM segmentation WHERE k = {a['k']} AND method = 'online' AND embedding = "
                            f"'keys' AND model = '{a['models'][0]}' ORDER BY layer"), key=lambda r: r["miou"])
    cell = f"{best['miou']:.3f} [{best['miou_lo']:.3f}, {best['miou_hi']:.3f}]"
    assert value_text(best, "miou") == cell and f"<td>{cell}</td>" in keys
    assert "95 % bootstrap intervals over test images" in keys
    for r in results.rows(f"SELECT * FROM correlations WHERE k = {a['k']} AND method = 'online'"):
        assert f"<td>{r['n_pairs']}</td>" in page and (r["p_value"] is None or f"<td>{r['p_value']:.2g}</td>" in page)
    for section in ("keys", "layers", "overclustering"):
        for name in ("training_curves", "per_class_iou", "confusion", "attention_queries"):
            assert (result.index.parent / section / f"{name}.png").is_file()
    assert _page_section(page, "keys").count("<img") == len(COMPARISON_PANELS)
    if SENSITIVITY_PANELS and "kmeans_sensitivity" in Results(a["path"]).tables():
        rows = results.rows("SELECT miou FROM kmeans_sensitivity")
        spread = max(r["miou"] for r in rows) - min(r["miou"] for r in rows)
        section = _page_section(page, "k-means sensitivity")
        assert f"<b>{spread:.4f}</b>" in section and "bs 32, PCA every 1" in section and section.count("<img") == 1
        assert (result.index.parent / "kmeans-sensitivity" / "kmeans_sensitivity.png").is_file()


def test_the_page_states_provenance_versions_and_the_run_config(augmented, augmented_report):
    from importlib import metadata

    from rep_pipeline import __version__
    from rep_pipeline.pipeline.results import Results

    a, (_, result) = augmented, augmented_report
    footer = result.index.read_text().split("<footer>")[1]
    for g in Results(a["path"]).rows("SELECT * FROM feature_groups WHERE dataset = 'synthetic'"):
        assert f"<td>{g['model']}</td>" in footer and g["store_fingerprint"][:12] in footer
        assert (g["weights_sha256"] or "none (no file)")[:12] in footer
    assert f"rep-pipeline {__version__}" in footer
    for name in ("torch", "timm", "zarr", "numpy", "duckdb"):
        assert f"{name} {metadata.version(name)}" in footer
    config = (a["path"] / "run_config.yaml").read_text()
    assert "<details>" in footer and html.escape(config) in footer and "without a run config" not in footer


def test_overclustering_colours_clusters_and_picks_the_images_with_the_class(augmented, augmented_report):
    from rep_pipeline.stages.report import ReportData, panels, select_rows

    a, (cfg, result) = augmented, augmented_report
    data = ReportData(cfg)
    rows = select_rows(data, cfg.comparisons[2])
    k = a["k"]
    best = {m: max((r for r in data.segmentation_rows() if (r["model"], r["k"], r["method"], r["embedding"]) ==
                    (m, k, "online", "tokens")), key=lambda r: r["miou"])["layer"] for m in a["models"]}
    assert [(r.setting["model"], r.setting["layer"], r.setting["k"]) for r in rows] == [
        (m, best[m], 2 * k) for m in a["models"]]  # the best layer at K, shown with the 2K codebooks
    assert rows.examples == a["shows"]
    section = _page_section(result.index.read_text(), "overclustering")
    assert "Shown: the stored example test images " + ", ".join(a["ids"][i] for i in a["shows"]) + \
        f" (those of the {len(a['ids'])} stored examples whose ground truth shows &#x27;{a['class']}&#x27;)" in section
    assert f"for {a['models'][0]} L{rows[0].setting['layer']}: that row is coloured by matched class instead" in section
    with figures.style():
        fig = panels.examples(data, rows)
    n = len(a["shows"])
    assert len(fig.axes) == (2 + len(rows)) * n
    row = rows.index(next(r for r in rows if r.setting["model"] == a["clustered"]))
    clusters = data.setting_map(rows[row].setting, "clusters")[a["shows"][0]]
    shown = np.asarray(fig.axes[(2 + row) * n].images[0].get_array())
    assert np.array_equal(shown, figures.colourise(clusters, figures.cluster_palette(2 * k)))
    assert len(np.unique(figures.cluster_palette(97), axis=0)) == 97


def test_single_query_attention_maps_with_and_without_the_example_images(augmented, augmented_report):
    from rep_pipeline.stages.report import ReportData, panels, select_rows

    a, (cfg, _) = augmented, augmented_report
    data = ReportData(cfg)
    rows = select_rows(data, cfg.comparisons[0])
    assert data.has_example_attention(a["attended"]) and not data.has_example_attention(a["clustered"])
    text = next(p for p in COMPARISON_PANELS if p.key == "attention_queries").notes(data, rows)
    for model in a["models"]:
        grid = data.attention_grid(model)
        centre, corner = figures.query_positions(grid)
        assert f"{model}: {grid} x {grid} patch grid, centre: patch (row {centre[1][0]}, col {centre[1][1]})" in text
    assert "and per example image" in text and "not stored" in text
    with figures.style():
        fig = panels.attention_queries(data, rows)
    images = [ax for ax in fig.axes if ax.get_visible() and len(ax.images) == 2]  # a map over an example image
    assert images and len(images) % (2 * min(panels.MAX_QUERY_IMAGES, len(a["ids"]))) == 0  # 2 queries per block
    grid = data.attention_grid(a["attended"])
    q = figures.query_positions(grid)[0][1]
    layer = rows[0].setting["layer"] if rows[0].setting["model"] == a["attended"] else None
    if layer is not None:  # the top-left map is the image-averaged row of the centre query, min-max scaled
        row = np.asarray(data.attention(a["attended"], layer)[q[0] * grid + q[1]], np.float32)
        expected = minmax(row.reshape(grid, grid))
        assert np.allclose(np.asarray(fig.axes[0].images[0].get_array()), expected)


def test_results_without_intervals_say_so(augmented, tmp_path, monkeypatch):
    from rep_pipeline.pipeline.results import Results
    from rep_pipeline.stages.report import stage as report_stage

    path = tmp_path / "results"
    shutil.copytree(augmented["path"], path, ignore=shutil.ignore_patterns("maps.zarr"))
    (path / "maps.zarr").symlink_to(augmented["path"] / "maps.zarr")
    results = Results(path, mode="a")
    for model in augmented["models"]:
        rows = results.rows(f"SELECT * FROM segmentation WHERE model = '{model}' AND k = {augmented['k']} AND "
                            f"method = 'online'")
        results.write_table("segmentation", [{c: v for c, v in r.items() if not c.endswith(("_lo", "_hi"))}
                                             for r in rows], dataset="synthetic", model=model, part="val")
    (path / "run_config.yaml").unlink()
    cfg = ReportConfig(results=path, out=tmp_path / "r", comparisons=(Comparison(title="keys"),))
    monkeypatch.setattr(report_stage, "COMPARISON_PANELS", ())  # the section's text alone, no figures
    page = run_report(cfg).index.read_text()
    section = page.split("<section>")[1].split("</section>")[0]  # the comparison comes first
    assert "hold no intervals" in section and " [" not in section.split("<table>")[1].split("ground truth")[0]
    assert "drawn without a run config" in page.split("<footer><h2>provenance</h2>")[1]
