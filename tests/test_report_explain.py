"""The ULTra explanations in the report (PROTOCOL.md sections 10.3 to 10.6 and 10.9, figures
u1-u7): the helpers against the explain stage's own conventions, and pages drawn from
hand-written results (ULTra alone, two runs that differ only in zeta, one of them with the
'dataset' scoring; ULTra without the 'dataset' scoring; ULTra beside evaluate's segmentation).
No Ray."""
import html
import re

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage

from rep_pipeline.pipeline.arrays import minmax
from rep_pipeline.pipeline.config import Comparison, ReportConfig
from rep_pipeline.pipeline.results import Results
from rep_pipeline.stages.report import ReportData, figures, run_report
from rep_pipeline.stages.report import stage as report_stage
from rep_pipeline.stages.report.panels import ULTRA_PANELS
from rep_pipeline.storage_schemas import results as layout

pytestmark = pytest.mark.integration  # whole report pages, drawn and rendered: the full suite's tier

S, G, T, E = 32, 4, 2, 2  # image grid, patch grid, chosen tokens and example images per layer
P = G * G
DATASET, SPLIT, MODEL = "synthetic", "val", "tiny-vit"
LAYERS = (1, 3)
CLASSES = ["sky", "ground", "box"]
ZETAS = (0.2, 0.4, 0.6)
TAUS = tuple(np.round(np.linspace(0, 1, 11), 2))
RUN_A = "a" * 16 + "1" * 48  # zeta 0.4, with the 'dataset' scoring
RUN_B = "b" * 16 + "2" * 48  # zeta 0.6, without


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    figures.pyplot().close("all")


def _files(keys):
    return {f"{p.file}.{ext}" for p in ULTRA_PANELS if p.key in keys for ext in ("png", "svg")}


def _folder(run_id):
    return f"ultra-{MODEL}-{run_id[:12]}"


# -- the helpers -----------------------------------------------------------------------------------
def test_the_patch_centre():
    assert figures.patch_centre(G + 2, G, S) == (1.5 * S / G - 0.5, 2.5 * S / G - 0.5)  # (row, col)


def test_mask_and_relevance_panels_draw_what_they_say():
    image = np.full((S, S, 3), 200, np.uint8)
    patch_map = np.zeros(P)
    patch_map[0] = 1.0  # only the top-left patch is relevant
    with figures.style():
        ax = figures.plot_explanation_map(image, patch_map, G, token=5, tau=0.5)
        shown = ax.images[0].get_array()
        assert shown[0, 0, 0] == 200 and shown[-1, -1, 0] == 30  # the mask kept, the rest darkened
        dot = ax.lines[0]
        assert (dot.get_xdata()[0], dot.get_ydata()[0]) == (1.5 * S / G - 0.5, 1.5 * S / G - 0.5)
        ax = figures.plot_relevance_set(image, np.array([0, 1]), G, token=5, colour="red")
        shaded = ax.images[0].get_array()
        assert shaded[0, 0, 0] > shaded[0, 0, 1] and shaded[-1, -1, 0] == shaded[-1, -1, 1] == 70
        rows = [{"layer": b, "neg_mean": 1.0, "neg_std": 0.1, "pos_mean": 2.0 + b, "pos_std": None,
                 "diff_mean": 1.0 + b, "diff_ci_low": 0.5, "diff_ci_high": 1.5 + b} for b in (3, 1)]
        ax = figures.plot_perturbation_bars(rows)
        assert [round(p.get_height(), 3) for p in ax.patches] == [1.0, 1.0, 3.0, 5.0]  # negative, then positive
        assert [t.get_text() for t in ax.texts] == ["+2\n[+0.5, +2.5]", "+4\n[+0.5, +4.5]"]  # blocks in order


# -- hand-written results ----------------------------------------------------------------------------
def _labels(n, rng):
    labels = np.zeros((n, S, S), np.uint8)
    labels[:, S // 3:] = 1
    for i in range(n):
        y, x = rng.integers(S // 2, S - 8, size=2)
        labels[i, y:y + 6, x:x + 6] = 2
    labels[:, :, :2] = 255  # an ignored border
    return labels


def _run_maps(maps, run_id, rng, images, labels):
    """Figures u1-u3's maps of one run at every layer: random token maps, the linkage of random
    patch-token maps (as the stage clusters them) and its cuts."""
    for layer in LAYERS:
        patch_maps = minmax(rng.random((E, P, P)).astype(np.float32), axis=-1)
        links = np.stack([linkage(m, method="average", metric="cosine") for m in patch_maps])
        cuts = np.stack([[figures.upsample_nearest(fcluster(z, zeta, criterion="distance").reshape(G, G) - 1, S)
                          for zeta in ZETAS] for z in links]).astype(np.uint16)
        tokens = [5, 10]
        maps.write(layout.ultra_maps(DATASET, SPLIT, MODEL, run_id, layer),
                   attrs={"run_id": run_id, "layer": layer, "tokens": tokens, "zetas": list(ZETAS), "grid": G,
                          "n_prefix": 1, "rho": 0.5, "tau": 0.2},
                   segments=cuts[:, 1].astype(np.uint8), images=images, labels=labels,
                   token_maps=patch_maps[:, tokens].astype(np.float32),
                   class_maps=rng.random((E, P)).astype(np.float32), linkage=links, cuts=cuts)


def _run_rows(run_id, zeta, layers=LAYERS):
    base = {"run_id": run_id, "model": MODEL, "dataset": DATASET, "split": SPLIT}
    run = {**base, "embedding": "tokens", "f": "sum", "layers": list(layers), "zeta": zeta, "k_img": None,
           "linkage": "average", "metric": "cosine", "aggregate": "sum", "self_fill": "max_other",
           "order": "latest_left", "n_images": 4, "store_fingerprint": "store"}
    oracle = [{**base, "layer": b, "miou": 0.3 + 0.1 * b - zeta / 4, "pixel_accuracy": 0.6 + 0.05 * b,
               "mean_segments_per_image": 3.0, "n_images": 4} for b in layers]
    itiou = [{**base, "layer": b, "tau": float(tau), "itiou": None if tau == 1 else 0.2 + 0.05 * b - (tau - 0.3) ** 2,
              "n_images": 4, "n_tokens": 60} for b in layers for tau in TAUS]
    perturbation = [{**base, "layer": b, "perturbation": mode, "fraction": 0.5, "tokens_per_image": 10,
                     "neg_mean": 1.0, "neg_std": 0.2, "pos_mean": 1.2 + 0.1 * b, "pos_std": 0.3,
                     "diff_mean": 0.2 + 0.1 * b, "diff_ci_low": 0.1, "diff_ci_high": 0.3 + 0.1 * b, "n_images": 4,
                     "seed": 0} for b in layers for mode in ("mask", "noise")]
    return {"ultra_runs": [run], "ultra_oracle": oracle, "ultra_itiou": itiou, "ultra_perturbation": perturbation}


def _scoring(maps, run_id, labels, layer, method="ultra_s", miou=None):
    """One layer's section 5 row and maps (the 'dataset' scoring: K = C, codebook_fingerprint =
    the run's id), as ``finish_scores`` writes them."""
    setting = {"model": MODEL, "dataset": DATASET, "split": SPLIT, "train_split": "train", "embedding": "tokens",
               "layer": layer, "k": len(CLASSES), "method": method, "seed": 0}
    fps = {"store_fingerprint": "store", "codebook_fingerprint": run_id}
    examples = np.where(labels == 255, 1, labels).astype(np.uint8)
    maps.write(layout.setting_maps(DATASET, SPLIT, MODEL, "train", method, len(CLASSES), 0, "tokens", layer),
               attrs={"example_ids": [f"img{i}" for i in range(E)], **fps},
               counts=np.zeros((S, S, len(CLASSES)), np.int64), aggregate=np.zeros((S, S, 3), np.uint8),
               examples=examples)
    row = {**setting, "miou": miou if miou is not None else 0.2 + 0.05 * layer, "pixel_accuracy": 0.5, "mi": 0.1,
           "nmi": 0.1, "mi_null": 0.0, "nmi_bias_aware": 0.1, "n_images": 4, **fps}
    per_class = [{**setting, "class_id": c, "class_name": name, "iou": 0.3, **fps} for c, name in enumerate(CLASSES)]
    return row, per_class


def _ultra_results(path, *, scored=(RUN_A,), runs=((RUN_A, 0.4), (RUN_B, 0.6))):
    results = Results(path, mode="a")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, size=(E, S, S, 3), dtype=np.uint8)
    labels = _labels(E, rng)
    seg, per_class = [], []
    with results.staged_maps() as maps:
        for run_id, zeta in runs:
            _run_maps(maps, run_id, rng, images, labels)
            for table, rows in _run_rows(run_id, zeta).items():
                results.write_table(table, rows, dataset=DATASET, model=MODEL, part=f"{SPLIT}-ultra-{run_id[:16]}")
            if run_id in scored:
                for layer in LAYERS:
                    row, classes = _scoring(maps, run_id, labels, layer)
                    seg.append(row)
                    per_class += classes
    if seg:
        results.write_table("segmentation", seg, dataset=DATASET, model=MODEL, part=f"{SPLIT}-ultra")
        results.write_table("per_class_iou", per_class, dataset=DATASET, model=MODEL, part=f"{SPLIT}-ultra")
    return path


@pytest.fixture(scope="module")
def ultra_report(tmp_path_factory):
    path = _ultra_results(tmp_path_factory.mktemp("ultra") / "results")
    cfg = ReportConfig(results=path, out=tmp_path_factory.mktemp("report"))
    return cfg, run_report(cfg)


def test_an_ultra_page_with_two_runs_one_scored(ultra_report):
    cfg, result = ultra_report
    page = result.index.read_text()
    drawn = {(p.parent.name, p.name) for p in result.figures}
    every = {"u1", "u2", "u3", "u4", "u5", "u6", "u7"}
    assert drawn == {(_folder(RUN_A), f) for f in _files(every)} | {
        (_folder(RUN_B), f) for f in _files(every - {"u4"})}  # RUN_B has no 'dataset' scoring: no u4
    assert all(p.stat().st_size > 0 for p in result.figures)
    assert "only the ULTra explanations are shown" in page and "<title>rep-pipeline report: synthetic / val</title>" \
        in page
    outer = re.search(r"<section><h2>ULTra explanations</h2>.*</section>", page, re.S)
    # the section and a subsection per run (the footer below them holds the provenance)
    assert outer and page.count("<section>") == 3 and page.split("<footer>")[0].count("<h2>") == 1
    subsections = re.findall(r"<section><h3>([^<]*)</h3>(.*?)</section>", page, re.S)
    assert [title for title, _ in subsections] == [
        f"{MODEL}: ULTra_S of tokens, zeta 0.4 (run {RUN_A[:12]})", f"{MODEL}: ULTra_S of tokens, zeta 0.6 "
                                                                    f"(run {RUN_B[:12]})"]
    body_a, body_b = (body for _, body in subsections)
    assert body_a.count("<img") == 7 and body_b.count("<img") == 6
    for p in ULTRA_PANELS:
        assert html.escape(p.caption) in body_a and html.escape(p.reading) in body_a
    # the run's table: block, segments, oracle, dataset scoring (blank without), ITIoU at 0.2, pos - neg per mode
    rows_a = re.findall(r"<tr><td>(\d)</td>" + r"<td>([^<]*)</td>" * 8 + "</tr>", body_a)
    assert rows_a[0] == ("1", "3.000", "0.300", "0.650", "0.250", "0.500", "0.240", "+0.300 [+0.100, +0.400]",
                         "+0.300 [+0.100, +0.400]")
    rows_b = re.findall(r"<tr><td>(\d)</td>" + r"<td>([^<]*)</td>" * 8 + "</tr>", body_b)
    assert [r[4:6] for r in rows_b] == [("", ""), ("", "")] and rows_b[1][2] == f"{0.6 - 0.15:.3f}"
    listing = re.findall(r"<tr><td>(\w{12})</td><td>[^<]*</td><td>(ULTra_S)</td>.*?<td>(yes|no)</td></tr>", page)
    assert listing == [(RUN_A[:12], "ULTra_S", "yes"), (RUN_B[:12], "ULTra_S", "no")]


def test_the_report_data_of_ultra_runs(ultra_report):
    cfg, _ = ultra_report
    data = ReportData(cfg)
    assert (data.dataset, data.split, data.ultra, data.segmented, data.directions) == (DATASET, SPLIT, True, False,
                                                                                      False)
    assert [r["run_id"] for r in data.ultra_runs()] == [RUN_A, RUN_B]
    assert [r["zeta"] for r in data.ultra_zeta_runs(RUN_B)] == [0.4, 0.6]  # they differ only in zeta
    assert [r["layer"] for r in data.ultra_rows("segmentation", RUN_A)] == list(LAYERS)
    assert data.ultra_rows("segmentation", RUN_B) == []
    stored = data.ultra_maps(RUN_A)
    assert [s["layer"] for s in stored] == list(LAYERS) and stored[0]["tokens"] == [5, 10]
    assert stored[0]["token_maps"].shape == (E, T, P) and stored[0]["linkage"].shape == (E, P - 1, 4)
    assert "segments" not in stored[0]
    gt = data.ultra_ground_truth(RUN_A)  # no evaluate here: the run's images, class names of per_class_iou
    assert gt["classes"] == CLASSES and gt["images"].shape == (E, S, S, 3) and len(gt["palette"]) >= len(CLASSES)


def test_without_a_dataset_scoring_there_is_no_u4(tmp_path, monkeypatch):
    monkeypatch.setattr(report_stage, "ULTRA_PANELS", tuple(p for p in ULTRA_PANELS if p.key in ("u4", "u5")))
    path = _ultra_results(tmp_path / "results", scored=(), runs=((RUN_A, 0.4),))
    result = run_report(ReportConfig(results=path, out=tmp_path / "report"))
    assert {(p.parent.name, p.name) for p in result.figures} == {(_folder(RUN_A), f) for f in _files({"u5"})}
    page = result.index.read_text()
    assert "<h2>ULTra explanations</h2>" in page and page.count("<img") == 1 and "only the ULTra explanations" in page
    assert ReportData(ReportConfig(results=path, out=tmp_path / "x")).ultra_zeta_runs(RUN_A) == []


def test_ultra_beside_evaluate_keeps_the_comparisons_on_evaluate_rows(tmp_path, monkeypatch):
    """ULTra's section 5 rows (ultra_s at block 1, sorting before evaluate's online block 3) do not
    become the comparisons' default, and u4 takes evaluate's ground truth."""
    for name in ("COMPARISON_PANELS", "SUMMARY_PANELS"):
        monkeypatch.setattr(report_stage, name, ())
    monkeypatch.setattr(report_stage, "ULTRA_PANELS", tuple(p for p in ULTRA_PANELS if p.key == "u4"))
    path = _ultra_results(tmp_path / "results", runs=((RUN_A, 0.4),))
    results = Results(path, mode="a")
    rng = np.random.default_rng(2)
    n = 3  # evaluate keeps its own example images
    labels = _labels(n, rng)
    with results.staged_maps() as maps:
        maps.write(layout.ground_truth_maps(DATASET, SPLIT), attrs={"classes": ["Sky", "Ground", "Box"],
                                                                    "palette": [[0, 0, 0], [9, 9, 9], [99, 99, 99]]},
                   counts=np.zeros((S, S, 3), np.int64), aggregate=np.zeros((S, S, 3), np.uint8),
                   images=rng.integers(0, 255, size=(n, S, S, 3), dtype=np.uint8), labels=labels)
        row, _ = _scoring(maps, "kmeans", labels, 3, method="online", miou=0.5)
    results.write_table("segmentation", [row], dataset=DATASET, model=MODEL, part=SPLIT)
    results.write_table("ground_truth", [{"dataset": DATASET, "split": SPLIT, "mi": 0.1, "nmi": 0.2, "mi_null": 0.0,
                                          "nmi_bias_aware": 0.2, "n_images": n, "dataset_fingerprint": "d"}],
                        dataset=DATASET, model=None, part=SPLIT)
    results.write_table("classwise_mi", [{"model": layout.GROUND_TRUTH_MODEL, "dataset": DATASET, "split": SPLIT,
                                          "train_split": None, "embedding": None, "layer": None, "k": None,
                                          "method": None, "seed": None,
                                          "source": "ground_truth", "class_id": c, "class_name": name, "mi": 0.1,
                                          "store_fingerprint": "store", "codebook_fingerprint": None}
                                         for c, name in enumerate(CLASSES)],
                        dataset=DATASET, model=layout.GROUND_TRUTH_MODEL, part=SPLIT)
    cfg = ReportConfig(results=path, out=tmp_path / "report", comparisons=(Comparison(embedding="tokens"),))
    data = ReportData(cfg)
    assert data.segmented and data.ultra
    assert [r.setting["method"] for r in report_stage.select_rows(data, cfg.comparisons[0])] == ["online"]
    assert data.ultra_ground_truth(RUN_A)["classes"] == ["Sky", "Ground", "Box"]
    result = run_report(cfg)
    page = result.index.read_text()
    assert [h for h in re.findall(r"<h2>([^<]*)</h2>", page) if h != "explorer"] == [
        "models: tokens, layer best (K = 3, online)", "correlations (K = 3, online)", "ULTra explanations",
        "provenance"]
    assert "Ground truth: NMI 0.200" in page and "only the" not in page
    assert {p.name for p in result.figures} == _files({"u4"})
