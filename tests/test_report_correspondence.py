"""The zero-shot correspondence in the report (PROTOCOL.md sections 11.6, 11.7 and 12.1, figures
c1-c4): the plot functions on hand-made inputs, and pages drawn from hand-written results
(correspondence alone, of two keypoint datasets; with the final-norm ablation of both tasks;
beside direction probes), opened in headless Chromium. No Ray."""
import html
import re
import shutil
import subprocess

import numpy as np
import pytest

from rep_pipeline.pipeline.config import ReportConfig
from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.pipeline.results import Results
from rep_pipeline.stages.report import ReportData, figures, run_report
from rep_pipeline.stages.report import stage as report_stage
from rep_pipeline.stages.report.panels import CORRESPONDENCE_PANELS, DIRECTION_PANELS
from rep_pipeline.storage_schemas import results as layout

pytestmark = pytest.mark.integration  # whole report pages, drawn and rendered: the full suite's tier

EMBEDDINGS = ("queries", "keys", "values", "tokens")
ALPHAS = (0.05, 0.10, 0.15)
S = 24  # the grid of the hand-made heatmaps
KP = ("synthetic-pairs", "test")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    figures.pyplot().close("all")


def _files(keys):
    return {f"{p.file}.{ext}" for p in CORRESPONDENCE_PANELS if p.key in keys for ext in ("png", "svg")}


def _section(page, dataset="synthetic-pairs", split="test"):
    found = re.search(rf"<section><h2>zero-shot correspondence: {dataset} / {split}</h2>.*?</section>", page, re.S)
    assert found, page[:2000]
    return found.group(0)


# -- the plot functions on hand-made inputs -----------------------------------------------------------
def test_pck_layers_draw_one_line_per_embedding_on_1_based_layers():
    rows = [{"embedding": e, "layer": b, "pck_point": 0.1 * (b + 1) + 0.01 * i}
            for i, e in enumerate(("tokens", "queries", "keys")) for b in (2, 0, 1)]
    with figures.style():
        ax = figures.plot_pck_layers(rows, title="dino-b16")
        lines = [line for line in ax.lines if line.get_label() and not line.get_label().startswith("_")]
        assert [line.get_label() for line in lines] == ["keys", "queries", "tokens"]  # K, Q, ..., T
        assert list(lines[0].get_xdata()) == [1, 2, 3]  # block + 1
        assert np.allclose(lines[0].get_ydata(), [12, 22, 32])  # in %
        assert ax.get_xlabel().startswith("layer (1-based")
        given = figures.pyplot().figure().subplots()
        assert figures.plot_pck_layers(rows, legend=False, ax=given) is given and given.get_legend() is None


def test_heatmap_columns_are_limited_and_the_best_layer_framed():
    assert figures.shown_layers(5, 2) == [0, 1, 2, 3, 4]
    picked = figures.shown_layers(24, 20)
    assert 20 in picked and picked[0] == 0 and picked[-1] == 23 and len(picked) == 13
    assert figures.shown_layers(24, 0) == sorted(set(np.linspace(0, 23, 12).round().astype(int).tolist()))
    cosine = np.linspace(-1, 1, S * S).reshape(S, S)
    cosine[:, :4] = np.nan  # padding
    with figures.style():
        ax = figures.plot_cosine_map(np.zeros((S, S, 3), np.uint8), cosine, truth=(5.5, 7.0), prediction=(6, 8),
                                     radius=3.0, best=True, title="layer 3")
        overlay = ax.images[1].get_array()
        assert overlay.mask[:, :4].all() and not overlay.mask[:, 4:].any()  # NaN shown transparent
        circle = ax.patches[0]
        assert circle.center == (7.0, 5.5) and circle.radius == 3.0  # (x, y) = (col, row)
        markers = {line.get_marker(): (line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines}
        assert markers == {"o": (7.0, 5.5), "x": (8, 6)}
        assert all(side.get_visible() for side in ax.spines.values())
        assert not any(side.get_visible() for side in figures.plot_cosine_map(
            np.zeros((S, S, 3), np.uint8), cosine).spines.values())
        small = figures.plot_cosine_map(np.zeros((S, S, 3), np.uint8), cosine, max_pixels=8)  # shown 8 x 8
        assert [im.get_array().shape[:2] for im in small.images] == [(8, 8)] * 2
        assert all(im.get_extent() == [-0.5, S - 0.5, S - 0.5, -0.5] for im in small.images)  # on grid pixels
    assert figures.shrink(np.arange(16.0).reshape(4, 4), 2).tolist() == [[2.5, 4.5], [10.5, 12.5]]


def test_ln_ablation_bars_before_and_after_with_the_difference():
    rows = [{"model": "dino-b16", "before": 0.10, "after": 0.25}, {"model": "dinov3-b16", "before": 0.02,
                                                                   "after": 0.17}]
    with figures.style():
        ax = figures.plot_ln_ablation(rows, title="segmentation")
        assert [round(p.get_height(), 3) for p in ax.patches] == [10.0, 2.0, 25.0, 17.0]
        assert [t.get_text() for t in ax.texts] == ["+15.00", "+15.00"]


def test_pck_table_rows_and_differences():
    rows = [{"label": "dino-b16", "pck": {"keys": 0.3, "tokens": 0.35}, "best": "3/4 (T)"},
            {"label": "dino-l16", "pck": {"keys": 0.4, "tokens": 0.38}, "best": "5/6 (K)"}]
    with figures.style():
        ax = figures.plot_pck_table(rows, ["keys", "tokens"],
                                    differences=[{"label": "dino: Large - Base", "pck": {"keys": 0.1, "tokens": 0.03}}])
        cells = ax.tables[0].get_celld()
        assert [cells[0, j].get_text().get_text() for j in range(4)] == ["model", "K", "T", "best layer"]
        assert [cells[2, j].get_text().get_text() for j in range(4)] == ["dino-l16", "40.00", "38.00", "5/6 (K)"]
        assert cells[3, 1].get_text().get_text() == "+10.00"


# -- hand-written results -----------------------------------------------------------------------------
def _pck(model, emb, layer, depth):
    """Large better than Base everywhere; tokens best, peaking one block before the last."""
    bonus = {"keys": 0.02, "queries": 0.0, "values": 0.01, "tokens": 0.05}[emb] + (0.1 if "-l" in model else 0.0)
    return 0.2 + bonus + 0.04 * layer - (0.06 if layer == depth - 1 else 0.0)


def _corr_rows(model, dataset, split, embeddings, layers, depth, alphas=ALPHAS, last_norm="after"):
    return [{"model": model, "dataset": dataset, "split": split, "embedding": e, "layer": b, "alpha": a,
             "pck_point": _pck(model, e, b, depth) * a / 0.10, "pck_image": _pck(model, e, b, depth) * a / 0.10,
             "n_pairs": 12, "n_keypoints": 40, "image_size": S, "geometry": "pad", "last_norm": last_norm,
             "rope": "before", "store_fingerprint": f"fp-{model}", "pairs_fingerprint": "pairs"}
            for e in embeddings for b in layers for a in alphas]


def _group(model, dataset, split, alias, depth, last_norm="after"):
    return {"model": model, "dataset": dataset, "split": split, "alias": alias, "timm_name": "vit",
            "weights_sha256": f"w-{alias}", "last_norm": last_norm, "rope": "before", "depth": depth,
            "image_size": S, "store_fingerprint": f"fp-{model}"}


def _heatmaps(results, dataset, split, model, layers, examples=2):
    rows, cols = np.mgrid[:S, :S]
    with results.staged_maps() as maps:
        for emb in EMBEDDINGS:
            for j in range(examples):  # a bump per layer, nearer the ground truth (10.5, 9.25) deeper
                cosine = np.stack([np.exp(-((rows - 10 - b % 3) ** 2 + (cols - 9 - j) ** 2) / (8.0 + b))
                                   for b in layers]).astype(np.float16)
                cosine[:, :, S - 3:] = np.nan  # padding on the right
                maps.write(layout.correspondence_example(dataset, split, model, emb, j),
                           attrs={"pair_id": f"p{j}", "kp_id": j, "category": "shape", "embedding": emb,
                                  "layers": list(layers), "source_point": [4 + j, 5],
                                  "target_point": [10.5, 9.25], "predictions": [[10 + b % 3, 9] for b in layers],
                                  "alpha": 0.1, "radius": 2.5, "best_layer": layers[-2]},
                           source=np.broadcast_to(np.arange(S, dtype=np.uint8)[:, None, None] * 9, (S, S, 3)),
                           target=np.broadcast_to(np.arange(S, dtype=np.uint8)[None, :, None] * 9, (S, S, 3)),
                           cosine=cosine)
        maps.write(layout.correspondence_maps(dataset, split, model), attrs={
            "correspond": {"examples": examples}, "settings": [[e, b] for e in EMBEDDINGS for b in layers]})


def _write_models(results, dataset, split, heatmaps=1):
    """dino-b16 (4 blocks) and dino-l16 (6 blocks) on one keypoint split, with ``heatmaps``
    example keypoints per embedding."""
    for model, depth in (("dino-b16", 4), ("dino-l16", 6)):
        layers = list(range(depth))
        results.write_table("correspondence", _corr_rows(model, dataset, split, EMBEDDINGS, layers, depth),
                            dataset=dataset, model=model, part=split)
        results.write_table("feature_groups", [_group(model, dataset, split, model, depth)], dataset=dataset,
                            model=model, part=split)
        if heatmaps:
            _heatmaps(results, dataset, split, model, layers, heatmaps)


def _seg_row(model, miou):
    return {"model": model, "dataset": "synthetic", "split": "val", "train_split": "train", "embedding": "tokens",
            "layer": 3, "k": 27, "method": "online", "seed": 0, "miou": miou, "pixel_accuracy": 0.5, "mi": 0.1,
            "nmi": 0.1, "mi_null": 0.0, "nmi_bias_aware": 0.1, "n_images": 5, "store_fingerprint": "s",
            "codebook_fingerprint": "c"}


@pytest.fixture(scope="module")
def results_with_ablation(tmp_path_factory):
    """Both models on synthetic-pairs, and dino-b16's last tokens before the final norm
    (``dino-b16-before``) scored on correspondence and on segmentation (synthetic/val)."""
    path = tmp_path_factory.mktemp("ablation") / "results"
    results = Results(path, mode="a")
    _write_models(results, *KP, heatmaps=2)
    results.write_table("correspondence", _corr_rows("dino-b16-before", *KP, ["tokens"], [3], 4, last_norm="before"),
                        dataset=KP[0], model="dino-b16-before", part=KP[1])
    results.write_table("feature_groups", [_group("dino-b16-before", *KP, "dino-b16", 4, "before")], dataset=KP[0],
                        model="dino-b16-before", part=KP[1])
    for model, miou, norm in (("dino-b16", 0.25, "after"), ("dino-b16-before", 0.10, "before")):
        results.write_table("segmentation", [_seg_row(model, miou)], dataset="synthetic", model=model, part="val")
        results.write_table("feature_groups", [_group(model, "synthetic", "val", "dino-b16", 4, norm)],
                            dataset="synthetic", model=model, part="val")
    return path


@pytest.fixture(scope="module")
def ablation_report(results_with_ablation, tmp_path_factory):
    # the segmentation rows are of synthetic/val: the request names the keypoint split instead
    cfg = ReportConfig(results=results_with_ablation, out=tmp_path_factory.mktemp("report"), dataset=KP[0],
                       split=KP[1])
    return cfg, run_report(cfg)


def test_a_correspondence_page_with_the_final_norm_ablation(ablation_report):
    cfg, result = ablation_report
    page = result.index.read_text()
    assert {p.name for p in result.figures} == _files({"c1", "c2", "c3", "c4"})
    assert all(p.parent.name == "correspondence-synthetic-pairs-test" and p.stat().st_size > 0 for p in result.figures)
    section = _section(page)
    assert page.count("<section>") == 1 and section.count("<img") == 4 and "only the correspondence" in page
    for p in CORRESPONDENCE_PANELS:
        assert html.escape(p.caption) in section and html.escape(p.reading) in section
    cells = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td>" + r"<td>([^<]*)</td>" * 6 + "</tr>", section)
    # Table 3: K / Q / V / T at each embedding's best layer (block depth - 2), the model's best layer 1-based
    assert cells == [
        ("dino-b16", "dino-b16", "30.00", "28.00", "29.00", "33.00", "3/4", "tokens"),
        ("dino-l16", "dino-l16", "48.00", "46.00", "47.00", "51.00", "5/6", "tokens"),
        ("dino: Large minus Base", "dino-l16 - dino-b16", "+18.00", "+18.00", "+18.00", "+18.00", "", "")]
    assert "dino-b16-before" not in section.split("<figure>")[0]  # the before group is c4's only

    data = ReportData(cfg)
    assert data.dataset is None and data.correspondence_sets == [KP]
    assert [m["model"] for m in data.correspondence_models(*KP)] == ["dino-b16", "dino-l16"]
    assert data.correspondence_pairs(*KP) == [("dino-b16", "dino-l16")]
    assert data.correspondence_alpha(*KP) == pytest.approx(0.10)
    examples = data.correspondence_examples(*KP)
    assert len(examples) == 2 * 4 * 2  # models x embeddings x stored examples, K / Q / V / T order
    assert [e["embedding"] for e in examples[:8:2]] == ["keys", "queries", "values", "tokens"]
    assert examples[0]["cosine"].dtype == np.float32 and np.isnan(examples[0]["cosine"][:, :, -1]).all()
    ablation = data.ln_ablation(*KP)
    assert {(r["task"], r["model"], round(r["before"], 3), round(r["after"], 3)) for r in ablation} == {
        ("segmentation", "dino-b16", 0.10, 0.25), ("correspondence", "dino-b16", 0.31, 0.31)}


def test_correspondence_alone_of_two_keypoint_datasets_without_an_ablation(tmp_path):
    path = tmp_path / "results"
    results = Results(path, mode="a")
    _write_models(results, *KP)
    _write_models(results, "spair71k", "test", heatmaps=0)  # no heatmaps kept there: no c3
    result = run_report(ReportConfig(results=path, out=tmp_path / "report"))
    page = result.index.read_text()
    drawn = {(p.parent.name, p.name) for p in result.figures}
    assert drawn == {("correspondence-synthetic-pairs-test", f) for f in _files({"c1", "c2", "c3"})} | {
        ("correspondence-spair71k-test", f) for f in _files({"c1", "c2"})}
    assert page.count("<section>") == 2 and "<title>rep-pipeline report: zero-shot correspondence: " in page
    assert _section(page, "spair71k").count("<img") == 2 and _section(page).count("<img") == 3
    assert "c4_final_norm" not in page and "before and after the final norm" not in page  # no before/after pair
    # the request picks one keypoint split when it names no segmentation; a request of nothing there fails
    one = run_report(ReportConfig(results=path, out=tmp_path / "one", dataset="spair71k"))
    assert one.index.read_text().count("<section>") == 1 and {p.parent.name for p in one.figures} == {
        "correspondence-spair71k-test"}
    assert ReportData(ReportConfig(results=path, out=tmp_path / "x", dataset="coco", split="val")).correspondence_sets \
        == [("spair71k", "test"), KP]  # a run's report names the segmentation dataset: all correspondence shown


def test_results_of_other_data_and_a_request_of_nothing_there_fail(results_with_ablation, tmp_path):
    with pytest.raises(ConfigError, match="choose one with --dataset"):
        ReportData(ReportConfig(results=results_with_ablation, out=tmp_path / "x", dataset="coco"))


def test_correspondence_beside_direction_probes_adds_its_section_only(tmp_path, monkeypatch,
                                                                      hand_made_direction_results):
    monkeypatch.setattr(report_stage, "DIRECTION_PANELS", DIRECTION_PANELS[:1])  # d1 stands for them (time)
    path = hand_made_direction_results(tmp_path / "results", (1,))
    before = run_report(ReportConfig(results=path, out=tmp_path / "before")).index.read_text()
    _write_models(Results(path, mode="a"), *KP)
    after = run_report(ReportConfig(results=path, out=tmp_path / "after"))
    page = after.index.read_text()
    assert after.index.parent.joinpath("correspondence-synthetic-pairs-test", "c3_heatmaps.png").is_file()
    assert "<h2>direction probes</h2>" in page and page.count("<section>") == 2
    stripped = re.sub(r"\n<section><h2>zero-shot correspondence: .*?</section>", "", page, flags=re.S)
    assert stripped.replace(" (and the zero-shot correspondence)", "").replace(
        " Zero-shot correspondence on synthetic-pairs / test.", "") == before


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_correspondence_page_opens_in_headless_chromium(ablation_report, tmp_path):
    _, result = ablation_report
    probe = ("<script>window.addEventListener('load', () => { const bad = [...document.images]"
             ".filter(i => !(i.complete && i.naturalWidth > 0)).length; document.title = "
             "'images:' + document.images.length + ':broken:' + bad; });</script>")
    page = tmp_path / "probe.html"
    page.write_text(result.index.read_text().replace("</body>", probe + "</body>"))
    run = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.stdout.split("<title>")[1].split("</title>")[0] == "images:4:broken:0"
