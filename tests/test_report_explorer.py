"""The report's explorer (issue 24 item 5): the data it embeds (each example image once, a
size budget), and the page in headless Chromium on real results: the controls change what is
shown, only evaluated combinations are offered, a layer curve's point selects its layer, the
address's hash opens a view, no console errors, no address in the page."""
import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from rep_pipeline.pipeline.config import ClusterConfig, EvaluateConfig, ExtractConfig, ReportConfig
from rep_pipeline.stages.cluster import run_cluster
from rep_pipeline.stages.evaluate import run_evaluate
from rep_pipeline.stages.extract import run_extract
from rep_pipeline.stages.report import ReportData, run_report
from rep_pipeline.stages.report import explorer
from rep_pipeline.stages.report.stage import PAGE

CHROMIUM = pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")


# -- the data builder, without a browser or Ray -------------------------------------------------
class _Fake:
    """What ``explorer_data`` reads of ``ReportData``: two models' layer curves, 4 examples."""
    segmented = True

    def __init__(self, n=4, size=40, layers=(0, 1, 2)):
        rng = np.random.default_rng(0)
        self.classes = ["sky", "ground", "water"]
        self.palette = np.array([[0, 0, 255], [128, 64, 0], [0, 128, 0]], np.uint8)
        self.gt_images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        self.gt_labels = rng.integers(0, 3, (n, size, size)).astype(np.uint8)
        self.gt_labels[:, 0, 0] = 255
        self.gt_aggregate = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        self.gt = {"mi": 0.2, "nmi": 0.3, "nmi_bias_aware": 0.25}
        self.settings = [{"model": m, "embedding": "keys", "layer": layer, "k": 3, "method": "lloyd",
                          "train_split": "train", "seed": 0, "miou": 0.1 + 0.1 * layer + (m == "b") * (layer == 0),
                          "miou_lo": None, "miou_hi": None, "pixel_accuracy": 0.5, "nmi": float("nan"),
                          "nmi_bias_aware": 0.1, "n_images": n} for m in ("a", "b") for layer in layers]
        self.maps = {(s["model"], s["layer"]): {"examples": rng.integers(0, 3, (n, size, size)).astype(np.uint8),
                                                "aggregate": rng.integers(0, 256, (size, size, 3), dtype=np.uint8)}
                     for s in self.settings}

    def segmentation_rows(self):
        return [dict(s) for s in self.settings[::-1]] + [dict(self.settings[0], variant="pca", miou=0.9)]

    def setting_map(self, s, name):
        return self.maps[s["model"], s["layer"]][name]


def _decode(uri):
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def _section_parts(section):
    """The explorer section's embedded JSON text (as the page holds it), its style and its script."""
    found = re.fullmatch(r'<section id="explorer">.*?<style>(.*?)</style>.*?'
                         r'<script type="application/json" id="explorer-data">(.*?)</script>'
                         r'<script>(.*)</script></section>', section, re.S)
    assert found, section[:200]
    return found.group(2), found.group(1), found.group(3)


def test_each_example_image_is_embedded_once_and_settings_add_small_maps():
    fake = _Fake()
    blob = explorer.explorer_data(fake)
    text, _, _ = _section_parts(explorer.explorer_section(fake))
    assert len(blob["images"]) == len(blob["truth"]) == 4
    for uri in blob["images"] + blob["truth"]:
        assert text.count(uri.split(",", 1)[1]) == 1  # shared by every setting, embedded once
    assert [s["layer"] for s in blob["settings"]] == [0, 1, 2, 0, 1, 2]
    assert blob["keys"] == list(explorer.KEYS)  # one train split and seed: no control for them
    assert blob["metrics"] == list(explorer.METRICS)  # the interval columns are all null: left out
    assert blob["budget"] == {"limit": explorer.EXPLORER_BUDGET, "bytes": len(text), "embedded": 6}
    s = blob["settings"][0]
    assert s["nmi"] is None and s["miou"] == pytest.approx(0.1)  # NaN as null: JSON has no NaN
    examples = [_decode(u) for u in s["examples"]]
    assert all(im.mode == "P" and im.size == (40, 40) for im in examples)  # palette PNGs of the class ids
    assert np.array_equal(np.asarray(examples[0]), fake.maps["a", 0]["examples"][0])
    truth = np.asarray(_decode(blob["truth"][0]))
    assert truth[0, 0] == 3 and np.array_equal(truth[1:, 1:], fake.gt_labels[0, 1:, 1:])  # ignore: white, last
    assert _decode(blob["truth"][0]).getpalette()[9:12] == [255, 255, 255]
    big = _Fake(n=2, size=300)
    blob = explorer.explorer_data(big)
    assert max(_decode(blob["images"][0]).size) == explorer.IMAGE_SIDE
    assert max(_decode(blob["settings"][0]["aggregate"]).size) == explorer.AGGREGATE_SIDE


def test_the_budget_keeps_each_curves_best_layer_first_and_the_rest_as_numbers():
    fake = _Fake()
    full = explorer.explorer_data(fake)
    numbers_only = explorer.explorer_data(fake, budget=0)
    per_setting = (full["budget"]["bytes"] - numbers_only["budget"]["bytes"]) / 6
    budget = int(numbers_only["budget"]["bytes"] + 2.5 * per_setting)
    blob = explorer.explorer_data(fake, budget=budget)
    assert blob["budget"]["embedded"] == 2 and blob["budget"]["bytes"] <= budget
    kept = [(s["model"], s["layer"]) for s in blob["settings"] if s["examples"]]
    assert kept == [("a", 2), ("b", 0)]  # each curve's best-mIoU layer
    assert all(s["aggregate"] is None for s in blob["settings"] if not s["examples"])
    assert all(s["miou"] is not None for s in blob["settings"])  # every setting keeps its numbers
    section = explorer.explorer_section(fake, budget=budget)
    assert "the maps of 2 of them" in section and "the other 4 show their numbers only" in section


def test_the_section_is_inert_text_without_an_address():
    assert explorer.explorer_section(type("NoSegmentation", (), {"segmented": False})()) == ""
    odd = _Fake()  # a model whose name could close the script element or spell an address
    for s in odd.settings:
        if s["model"] == "a":
            s["model"] = "</script>http://x"
    odd.maps = {("</script>http://x" if m == "a" else m, layer): v for (m, layer), v in odd.maps.items()}
    escaped, css, js = _section_parts(explorer.explorer_section(odd))
    assert "</" not in escaped and "http" not in escaped
    assert "</script>http://x" in {s["model"] for s in json.loads(escaped)["settings"]}
    for code in (js, css):
        assert "http" not in code and "<img" not in code.lower() and "</script" not in code.lower()
    section = explorer.explorer_section(_Fake())
    assert "http" not in section and "<img" not in section  # the page's own checks count <img> and 'http'


# -- real results in headless Chromium ----------------------------------------------------------
@pytest.fixture(scope="module")
def explored(ray_local, tmp_path_factory):
    """Two tiny models, keys and tokens: tiny-dinov2-reg at every block with K = 6, tiny-dinov3 at
    blocks 1 and 3 with K = 6 and 9 (so the controls have combinations to refuse)."""
    root = tmp_path_factory.mktemp("explorer")
    store = root / "s.zarr"
    for model, layers, ks in (("tiny-dinov2-reg", "all", (6,)), ("tiny-dinov3", (1, 3), (6, 9))):
        run_extract(ExtractConfig(model=model, weights="random", store=store, layers=layers,
                                  embeddings=("keys", "tokens"), chunk_images=4,
                                  dataset_options={"sizes": {"train": 12, "val": 6}}), progress=False)
        run_cluster(ClusterConfig(store=store, model=model, train_split="train", k=ks, methods=("lloyd",),
                                  init_batches=2, batch_images=4), progress=False)
    run_evaluate(EvaluateConfig(store=store, split="val", results=root / "results", n_examples=3), progress=False)
    result = run_report(ReportConfig(results=root / "results", out=root / "report"))
    return root / "results", result.index


def _blob(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page, re.S)
    return json.loads(found.group(1))


def _key(s: dict, keys: list[str]) -> str:
    return ":".join(quote(str(s[k]), safe="") for k in keys)


def _chromium(page: Path, profile: Path, fragment: str = "") -> tuple[dict, list[str]]:
    """Open ``page`` (a copy with a driver script appended that writes what it saw into
    ``<pre id="probe">``); return that and the console's lines."""
    run = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=8000", "--dump-dom", page.as_uri() + fragment],
        capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert found, run.stderr[-3000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")), console


_SNAP = """
const panel = p => document.getElementById('explorer-' + p);
const snap = p => ({
  setting: Number(panel(p).dataset.setting),
  selects: Object.fromEntries([...panel(p).querySelectorAll('select')].map(
    s => [s.dataset.key, {value: s.value, options: [...s.options].map(o => o.value)}])),
  numbers: Object.fromEntries([...panel(p).querySelectorAll('td[data-metric]')].map(
    td => [td.dataset.metric, td.textContent])),
  refs: [...panel(p).querySelectorAll('canvas')].map(c => c.dataset.ref),
  drawn: [...panel(p).querySelectorAll('canvas')].filter(c => c.dataset.drawn === '1').length,
  points: [...panel(p).querySelectorAll('.pt')].map(c => c.dataset.layer + ':' + c.dataset.metric),
  note: (panel(p).querySelector('.explorer-note') || {}).textContent || ''});
const done = out => { const pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre); };
"""


def _drive(page: Path, dest: Path, body: str) -> Path:
    dest.write_text(page.read_text().replace(
        "</body>", f"<script>{_SNAP}window.addEventListener('load', () => setTimeout(() => {{{body}}}, 300));"
                   f"</script></body>"))
    return dest


@pytest.mark.integration
def test_the_page_embeds_the_explorer_within_its_budget(explored):
    results, index = explored
    page = index.read_text()
    assert not re.search(r"https?://", page) and "http" not in page.split("<body>")[1]
    section = page.split('<section id="explorer">')[1].split("</section>")[0]
    assert "<img" not in section  # pictures are canvases: the page's <img> stay its figures
    blob = _blob(page)
    settings = ReportData(ReportConfig(results=results, out=index.parent)).rows(
        "SELECT model, layer, k FROM segmentation ORDER BY model, embedding, k, method, train_split, seed, layer")
    assert [(s["model"], s["layer"], s["k"]) for s in blob["settings"]] == [
        (s["model"], s["layer"], s["k"]) for s in settings] and len(settings) == 16
    assert blob["budget"]["embedded"] == 16 and blob["budget"]["bytes"] <= explorer.EXPLORER_BUDGET
    assert len(blob["images"]) == 3 and all(len(s["examples"]) == 3 for s in blob["settings"])
    for uri in blob["images"]:
        assert page.count(uri.split(",", 1)[1]) == 1  # once for the 16 settings


@CHROMIUM
@pytest.mark.integration
def test_the_controls_change_what_is_shown_and_a_curve_point_selects_its_layer(explored, tmp_path):
    _, index = explored
    blob = _blob(index.read_text())
    S, keys = blob["settings"], blob["keys"]
    a = max(range(len(S)), key=lambda i: S[i]["miou"])
    other = "tiny-dinov3" if S[a]["model"] == "tiny-dinov2-reg" else "tiny-dinov2-reg"
    body = f"""
      const out = {{initial: {{a: snap('a'), b: snap('b'), hash: location.hash}}}};
      const sel = panel('a').querySelector('select[data-key=model]');
      sel.value = '{other}'; sel.dispatchEvent(new Event('change', {{bubbles: true}}));
      out.changed = {{a: snap('a'), hash: location.hash}};
      const layer = out.changed.a.selects.layer.options.find(l => l !== out.changed.a.selects.layer.value);
      out.target = layer;
      const pt = [...panel('a').querySelectorAll('.pt')].find(c => c.dataset.layer === layer);
      pt.dispatchEvent(new MouseEvent('click', {{bubbles: true}}));
      out.clicked = {{a: snap('a'), hash: location.hash}};
      setTimeout(() => {{ out.final = {{a: snap('a'), b: snap('b')}}; done(out); }}, 1500);"""
    seen, console = _chromium(_drive(index, tmp_path / "drive.html", body), tmp_path / "profile")
    assert not console, console

    def shows(snap, i):  # the panel shows setting i: its controls, numbers and pictures
        s = S[i]
        assert snap["setting"] == i
        assert {k: v["value"] for k, v in snap["selects"].items()} == {k: str(s[k]) for k in keys}
        assert snap["numbers"]["miou"] == f"{s['miou']:.3f}" and snap["numbers"]["nmi"] == f"{s['nmi']:.3f}"
        assert f"setting/{i}/aggregate" in snap["refs"]
        assert [r for r in snap["refs"] if r.startswith("setting/")] == [
            *(f"setting/{i}/example/{j}" for j in range(3)), f"setting/{i}/aggregate"]
        curve = [t for t in S if all(t[k] == s[k] for k in keys if k != "layer")]
        assert sorted(snap["points"]) == sorted(f"{t['layer']}:{m}" for t in curve for m in ("miou", "nmi"))

    init = seen["initial"]
    shows(init["a"], a)  # A: the best mIoU; B: the best of the other model
    b = max((i for i in range(len(S)) if S[i]["model"] == other), key=lambda i: S[i]["miou"])
    shows(init["b"], b)
    assert init["hash"] == f"#a={_key(S[a], keys)}&b={_key(S[b], keys)}"
    # the model select: A now shows the other model, at the first evaluated combination kept or nearest
    changed = seen["changed"]["a"]
    i = changed["setting"]
    assert S[i]["model"] == other and i != a
    shows(changed, i)
    assert changed["numbers"] != init["a"]["numbers"] or S[i]["miou"] == S[a]["miou"]
    offered = {k: changed["selects"][k]["options"] for k in ("layer", "k")}
    mine = [t for t in S if t["model"] == other and t["embedding"] == S[i]["embedding"]]
    assert offered["layer"] == [str(v) for v in sorted({t["layer"] for t in mine})]
    assert offered["k"] == [str(v) for v in sorted({t["k"] for t in mine if t["layer"] == S[i]["layer"]})]
    assert offered == ({"layer": ["1", "3"], "k": ["6", "9"]} if other == "tiny-dinov3"
                       else {"layer": ["0", "1", "2", "3"], "k": ["6"]})  # only evaluated combinations
    assert seen["changed"]["hash"] == f"#a={_key(S[i], keys)}&b={_key(S[b], keys)}"
    # a point of the layer curve selects its layer, the other choices kept
    clicked = seen["clicked"]["a"]
    j = clicked["setting"]
    assert str(S[j]["layer"]) == seen["target"] and all(S[j][k] == S[i][k] for k in keys if k != "layer")
    shows(clicked, j)
    assert seen["clicked"]["hash"].startswith(f"#a={_key(S[j], keys)}&")
    for snap in seen["final"].values():  # every picture decoded and drawn
        assert snap["drawn"] == len(snap["refs"]) > 0 and not snap["note"]


@CHROMIUM
@pytest.mark.integration
def test_the_address_opens_a_view_and_settings_beyond_the_budget_show_numbers(explored, tmp_path):
    results, _ = explored
    data = ReportData(ReportConfig(results=results, out=tmp_path))
    full = explorer.explorer_data(data)
    per_setting = full["budget"]["bytes"] / len(full["settings"])
    budget = int(explorer.explorer_data(data, budget=0)["budget"]["bytes"] + 4.5 * per_setting)
    page = tmp_path / "small.html"
    page.write_text(PAGE.format(title="budget", intro="", sections=explorer.explorer_section(data, budget=budget)))
    blob = _blob(page.read_text())
    S, keys = blob["settings"], blob["keys"]
    assert 0 < blob["budget"]["embedded"] < len(S) and blob["budget"]["bytes"] <= budget
    assert f"the other {len(S) - blob['budget']['embedded']} show their numbers only" in page.read_text()
    kept = next(i for i, s in enumerate(S) if s["examples"])
    left = next(i for i, s in enumerate(S) if not s["examples"])
    body = "done({a: snap('a'), b: snap('b'), hash: location.hash});"
    seen, console = _chromium(_drive(page, tmp_path / "drive.html", body), tmp_path / "profile",
                              f"#a={_key(S[left], keys)}&b={_key(S[kept], keys)}")
    assert not console, console
    assert seen["a"]["setting"] == left and seen["b"]["setting"] == kept
    assert "did not fit its size budget" in seen["a"]["note"] and not seen["b"]["note"]
    assert not [r for r in seen["a"]["refs"] if r.startswith("setting/")]  # numbers only
    assert seen["a"]["numbers"]["miou"] == f"{S[left]['miou']:.3f}"
    assert f"setting/{kept}/aggregate" in seen["b"]["refs"]
