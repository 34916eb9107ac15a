"""The direction probes in the report (PROTOCOL.md section 9.7, figures d1-d5): the plot
functions on hand-made rows, a page drawn from hand-written direction tables alone, and the
page drawn from real results of the probe stage (with and without segmentation results)."""
import html
import re

import numpy as np
import pytest
from matplotlib.container import BarContainer

from rep_pipeline.pipeline.config import ClusterConfig, EvaluateConfig, ReportConfig
from rep_pipeline.stages.report import figures, run_report
from rep_pipeline.stages.report.panels import COMPARISON_PANELS, DIRECTION_PANELS, SUMMARY_PANELS

pytestmark = pytest.mark.integration  # whole report pages, drawn and rendered: the full suite's tier

D_FILES = {p.key: p.file for p in DIRECTION_PANELS}
SECTION = re.compile(r"\n<section><h2>direction probes</h2>.*?</section>", re.S)


def _files(keys, panels=DIRECTION_PANELS):
    return {f"{p.file}.{ext}" for p in panels if p.key in keys for ext in ("png", "svg")}


# -- the plot functions on hand-made rows -----------------------------------------------------------
def _bars_rows():
    return [{"model": m, "embedding": e, "category": c, "f1": f1, "f1_std": std}
            for m, std in (("dino", None), ("mae", 0.05))
            for e, c, f1 in (("tokens", "object", 0.8), ("queries", "object", 0.4), ("keys", "part", 0.6))]


def test_token_bars_follow_the_token_order_with_models_side_by_side():
    with figures.style():
        ax = figures.plot_token_bars(_bars_rows(), metric="f1", title="patch, hyperplane")
        assert [t.get_text() for t in ax.get_xticklabels()] == ["q", "k", "x2"]  # q, k, v, x1, x2 order
        assert [round(p.get_height(), 3) for p in ax.patches] == [0.4, 0.6, 0.8] * 2  # dino's, then mae's
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dino", "mae"]
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert bars[0].errorbar is None  # hyperplane-like rows: no std, no error bars
        assert len(bars[1].errorbar.lines[2][0].get_segments()) == 3  # one per bar of mae
        fig = figures.pyplot().figure()
        given = fig.subplots()
        same = figures.plot_token_bars(_bars_rows(), metric="f1", x="category", hue="embedding", legend=False, ax=given)
        assert same is given and [t.get_text() for t in given.get_xticklabels()] == ["object", "part"]
        assert given.get_legend() is None and len(given.patches) == 2 * 3  # a bar per (category, token type)


def test_metric_curves_draw_one_line_per_token_type_against_k_or_block():
    rows = [{"embedding": e, "k_shot": k, "accuracy": a, "accuracy_std": 0.01}
            for e, base in (("keys", 0.7), ("queries", 0.5))
            for k, a in ((1, base), (5, base + 0.1), (50, base + 0.15))]
    with figures.style():
        ax = figures.plot_metric_curves(rows, x="k_shot", metric="accuracy", log_x=True)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["q", "k"]
        assert list(ax.containers[1].lines[0].get_xdata()) == [1, 5, 50] and ax.get_xscale() == "log"
        given = figures.pyplot().figure().subplots()
        layers = [{"embedding": "tokens", "layer": b, "f1": 0.1 * b, "f1_std": None} for b in (3, 0, 1)]
        assert figures.plot_metric_curves(layers, x="layer", metric="f1", ax=given) is given
        assert list(given.containers[0].lines[0].get_xdata()) == [0, 1, 3] and given.get_ylabel() == "F1"
        assert given.containers[0].lines[2] == ()  # no std given: no error bars


def test_concept_masks_show_decisions_nearest_upsampled():
    decisions = np.array([[[1, 0], [0, 1]]], np.uint8)
    assert np.array_equal(figures.upsample_nearest(decisions[0], 4),
                          [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    images, truth = np.zeros((1, 4, 4, 3), np.uint8), np.eye(4, dtype=np.uint8)[None]
    with figures.style():
        fig = figures.plot_concept_masks(images, truth, decisions, ["sky\nF1 0.50"], title="m: stuff")
        assert len(fig.axes) == 3 and fig.axes[0].get_ylabel() == "sky\nF1 0.50"
        assert np.array_equal(np.asarray(fig.axes[2].images[0].get_array()),
                              figures.upsample_nearest(decisions[0], 4))
        outer = figures.pyplot().figure()
        sub = outer.subfigures(1, 2)[1]
        assert figures.plot_concept_masks(images, truth, decisions, ["sky"], fig=sub) is sub
        assert len(outer.axes) == 3


# -- a page from hand-written direction tables alone (no Ray) ---------------------------------------
@pytest.mark.parametrize("layers", [(0, 1), (1,)])
def test_a_page_of_direction_probes_alone(tmp_path, layers, hand_made_direction_results):
    results = hand_made_direction_results(tmp_path / "results", layers)
    result = run_report(ReportConfig(results=results, out=tmp_path / "report"))
    page = result.index.read_text()
    expected = {"d1", "d2", "d3", "d4", "d5"} if len(layers) > 1 else {"d1", "d2", "d3", "d4"}
    assert {p.name for p in result.figures} == _files(expected)
    assert all(p.parent.name == "directions" and p.stat().st_size > 0 for p in result.figures)
    assert page.count("<section>") == 1 and "<h2>direction probes</h2>" in page and "only the direction probes" in page
    assert page.count("<img") == len(expected)
    for p in DIRECTION_PANELS:
        assert (html.escape(p.caption) in page) == (p.key in expected)
    cells = r"<tr>" + r"<td>(\w+)</td>" * 3 + r"<td>(\d*)</td><td>(\d+)</td><td>([^<]+)</td>"
    best = re.findall(cells, page)  # model, object, rule, k, block, best token type
    assert len(best) == 2 * 2 * 2  # model x object x rule
    assert {(m, rule, k, block, tok) for m, _, rule, k, block, tok in best} == {
        (m, rule, k, str(max(layers)), tok) for m, tok in (("dino", "k (keys)"), ("mae", "q (queries)"))
        for rule, k in (("hyperplane", ""), ("cosine", "5"))}


# -- pages from the probe stage's results ---------------------------------------------------------
@pytest.fixture(scope="module")
def reports(ray_local, tmp_path_factory, planted_store, probe_config):
    """Segmentation results of the planted store, reported before and after probing two blocks;
    and the probes of one block alone, in another results folder."""
    from rep_pipeline.stages.cluster import run_cluster
    from rep_pipeline.stages.evaluate import run_evaluate
    from rep_pipeline.stages.probe import run_probe

    both = tmp_path_factory.mktemp("both")
    planted_store(both / "s.zarr")
    run_cluster(ClusterConfig(store=both / "s.zarr", model="m", train_split="train", results=both / "results", k=(3,),
                              embeddings=("keys",), steps=30, init_batches=3, batch_images=4, log_every=10,
                              max_iter=20), progress=False)
    run_evaluate(EvaluateConfig(store=both / "s.zarr", split="val", results=both / "results", n_examples=3),
                 progress=False)
    before = run_report(ReportConfig(results=both / "results", out=both / "before"))
    run_probe(probe_config(both, layers=(0, 1), shots=(1, 5)), progress=False)
    after = run_report(ReportConfig(results=both / "results", out=both / "after"))
    alone = tmp_path_factory.mktemp("alone")
    planted_store(alone / "s.zarr")
    run_probe(probe_config(alone, layers=(1,), shots=(1, 5), objects=("patch",)), progress=False)
    return before, after, run_report(ReportConfig(results=alone / "results", out=alone / "report"))


def test_results_without_probes_draw_the_page_as_before(reports):
    before, after, _ = reports
    page = before.index.read_text()
    assert "direction probes" not in page and not (before.index.parent / "directions").exists()
    assert {p.name for p in before.figures} == {f"{p.file}.{ext}" for p in (*COMPARISON_PANELS, *SUMMARY_PANELS)
                                                for ext in ("png", "svg")}
    assert SECTION.sub("", after.index.read_text()) == page  # the probes add their section and nothing else


def test_probed_results_add_the_directions_section_with_d5_for_two_blocks(reports):
    _, after, _ = reports
    page = after.index.read_text()
    section = SECTION.search(page).group(0)
    drawn = {p.name for p in after.figures if p.parent.name == "directions"}
    assert _files({"d1", "d2", "d3", "d5"}) <= drawn
    assert all((after.index.parent / "directions" / name).stat().st_size > 0 for name in drawn)
    assert section.count("<img") == len(drawn) // 2
    assert "<td>m</td><td>patch</td><td>hyperplane</td><td></td><td>1</td><td>k (keys)</td>" in section  # planted


def test_probes_alone_of_one_block_make_a_page_without_d5(reports):
    _, _, alone = reports
    page = alone.index.read_text()
    drawn = {p.name for p in alone.figures}
    assert _files({"d1", "d2", "d3"}) <= drawn and not drawn & _files({"d5"})
    assert page.count("<section>") == 1 and "<h2>direction probes</h2>" in page
    assert "class_token" not in page  # only patches were probed



def test_the_probe_stage_s_masks_are_drawn_as_d4(reports):
    _, after, alone = reports
    for report in (after, alone):
        assert _files({"d4"}) <= {p.name for p in report.figures}
