"""The report's explorer: every segmentation setting of the page's (dataset, split), to choose
and compare in the page itself (issue 24 item 5).

Two panels, A and B, side by side; each chooses one setting by its model, embedding, layer,
K and method (and train split and seed where the results hold more than one; only
combinations that were evaluated can be chosen) and shows its segmentation grid (example
images, ground truth, prediction; PROTOCOL.md section 6 a1), its aggregate map beside the
ground truth's with the class legend (a2), its numbers with their intervals where the tables
hold them, and its layer curves (mIoU and NMI against the layer for the chosen model,
embedding, K and method), whose points select that layer. The state is in the address's
hash (``#a=<model>:<embedding>:<layer>:<k>:<method>&b=...``, each part URI-encoded), so a
view can be bookmarked and a test can open one.

One self-contained section: a JSON blob and vanilla JavaScript inline, pictures as data URIs
drawn onto ``<canvas>`` elements (no ``<img>``, no network, no server). The size is bounded
(docs/report.md): each example image and its ground truth are embedded once for all settings;
a setting adds its class-mapped example maps as small palette PNGs and its aggregate map as a
PNG or JPEG at most ``AGGREGATE_SIDE`` pixels a side; settings' maps are added, the best layer
of each curve first, while the blob stays within ``EXPLORER_BUDGET`` bytes, and the settings
beyond it keep their numbers only (the page says how many).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from rep_pipeline.pipeline.errors import StoreError
from rep_pipeline.pipeline.finite import finite_or

EXPLORER_BUDGET = 4_000_000  # bytes of the explorer's JSON blob (docs/report.md)
IMAGE_SIDE = 128  # example images and class maps: at most this many pixels a side
AGGREGATE_SIDE = 96  # aggregate maps: at most this many pixels a side
METRICS = ("miou", "pixel_accuracy", "nmi", "nmi_bias_aware")
METRIC_LABELS = {"miou": "mIoU", "pixel_accuracy": "pixel accuracy", "nmi": "NMI", "nmi_bias_aware": "NMI (bias-aware)"}
KEYS = ("model", "embedding", "layer", "k", "method")  # the controls, in this order
EXTRA_KEYS = ("train_split", "seed")  # controls too, where the results hold more than one value


def explorer_section(data: Any, out_dir: Path | None = None, written: list[Path] | None = None, *,
                     budget: int = EXPLORER_BUDGET) -> str:
    """The explorer as one HTML section ("" where the results hold no segmentation). It
    writes no files (``out_dir`` and ``written`` are taken for the sections' common signature)."""
    if not getattr(data, "segmented", False):
        return ""
    blob = explorer_data(data, budget=budget)
    n, kept = len(blob["settings"]), blob["budget"]["embedded"]
    intervals = any(f"{m}_lo" in blob["metrics"] for m in METRICS)
    said = (f"all {n} settings with their maps" if kept == n else
            f"the numbers of all {n} settings; the maps of {kept} of them (the best layer of each curve first) fit "
            f"the page's size budget of {budget / 1e6:.1f} MB, the other {n - kept} show their numbers only")
    extra = [k.replace("_", " ") for k in blob["keys"] if k in EXTRA_KEYS]
    head = ("<p>Choose a setting in each panel (model, embedding, layer, K, method"
            + "".join(f", {k}" for k in extra) + "; only evaluated combinations are offered) to see its segmentation "
            "grid (example test images, ground truth, prediction after matching), its aggregate map beside the "
            "ground truth's, and its numbers" + (" with their intervals" if intervals else "")
            + "; panel B gives B minus A. Each panel's layer curves show mIoU and NMI against the layer for its "
              "model, embedding, K and method; click a point to choose that layer. The view is kept in the "
              f"address (#a=...&amp;b=...). The page holds {html.escape(said)} "
              f"({blob['budget']['bytes'] / 1e6:.2f} MB); see docs/report.md.</p>")
    panels = "".join(f'<div class="explorer-panel" id="explorer-{p}" data-panel="{p}"><h3>{p.upper()}</h3>'
                     f'<div class="explorer-controls"></div><div class="explorer-grid"></div>'
                     f'<div class="explorer-aggregate"></div><div class="explorer-numbers"></div>'
                     f'<div class="explorer-curve"></div></div>' for p in ("a", "b"))
    return (f'<section id="explorer"><h2>explorer</h2>{head}<style>{_CSS}</style>'
            f'<div class="explorer-panels">{panels}</div>'
            f'<script type="application/json" id="explorer-data">{_json(blob)}</script>'
            f"<script>{_JS}</script></section>")


def explorer_data(data: Any, *, budget: int = EXPLORER_BUDGET) -> dict[str, Any]:
    """What the explorer embeds: ``images`` and ``truth`` (each example image and its ground
    truth once, as data URIs), ``classes``, ``palette``, ``gt`` (the ground truth's aggregate
    map and numbers), ``keys`` (the controls), ``metrics`` (the number columns present) and
    ``settings`` (every setting's keys and numbers, ``aggregate`` and ``examples`` data URIs
    where they fit the budget, else None), ``budget`` {limit, bytes, embedded}."""
    # the k-means rows (not ULTra's, not the codebook variants of 12.2), curve by curve, layer by layer
    rows = sorted((r for r in data.segmentation_rows() if not r.get("variant")),
                  key=lambda r: tuple(r[k] for k in ("model", "embedding", "k", "method", "train_split", "seed",
                                                     "layer")))
    columns = set(rows[0]) if rows else set()
    # the interval columns where some row has them (they are null where the evaluation drew none)
    metrics = [c for m in METRICS for c in (m, f"{m}_lo", f"{m}_hi") if c in columns
               and (c == m or any(_number(r[c]) is not None for r in rows))]
    keys = [*KEYS, *[k for k in EXTRA_KEYS if k in columns and len({r[k] for r in rows}) > 1]]
    palette = np.asarray(data.palette, np.uint8)
    truth = data.gt  # the ground-truth row, with its intervals where it has them
    out: dict[str, Any] = {
        "classes": [str(c) for c in data.classes], "palette": palette.tolist(),
        # the store keeps more example images than evaluate keeps maps of: the grid's columns are the latter
        "images": [_rgb_uri(im, IMAGE_SIDE) for im in data.gt_images[:len(data.gt_labels)]],
        "truth": [_class_uri(lb, palette) for lb in data.gt_labels],
        "gt": {"aggregate": _rgb_uri(data.gt_aggregate, AGGREGATE_SIDE),
               **{m: _number(truth[m]) for m in ("nmi", "nmi_lo", "nmi_hi", "nmi_bias_aware", "nmi_bias_aware_lo",
                                                 "nmi_bias_aware_hi") if m in truth}},
        "keys": keys, "metrics": metrics, "labels": METRIC_LABELS,
        "settings": [{**{k: _plain(r[k]) for k in (*KEYS, *EXTRA_KEYS) if k in r},
                      **{m: _number(r[m]) for m in metrics}, "n_images": _plain(r.get("n_images")),
                      "aggregate": None, "examples": None} for r in rows],
    }
    out["budget"] = {"limit": int(budget), "bytes": int(budget), "embedded": len(rows)}  # its largest digits
    used = len(_json(out))
    kept = 0
    for i in _priority(rows):
        s, r = out["settings"][i], rows[i]
        try:
            examples = data.setting_map(r, "examples")[:len(data.gt_labels)]
            maps = {"aggregate": _rgb_uri(data.setting_map(r, "aggregate"), AGGREGATE_SIDE),
                    "examples": [_class_uri(m, palette) for m in examples]}
        except StoreError:  # evaluated without maps: numbers only, said so in the panel
            s["missing"] = True
            continue
        size = len(_json(maps["aggregate"])) + len(_json(maps["examples"])) - 2 * len("null")
        if used + size > budget:
            break  # the rest keep their numbers only
        s.update(maps)
        used += size
        kept += 1
    out["budget"] = {"limit": int(budget), "bytes": 0, "embedded": kept}
    while out["budget"]["bytes"] != len(_json(out)):  # the blob's size, its own digits included
        out["budget"]["bytes"] = len(_json(out))
    return out


def _priority(rows: list[dict[str, Any]]) -> list[int]:
    """Row indices in the order their maps are embedded: the best-mIoU layer of each curve
    (model, embedding, K, method, train split, seed) first, in row order, then the rest."""
    best: dict[tuple, int] = {}
    for i, r in enumerate(rows):
        curve = tuple(r.get(k) for k in ("model", "embedding", "k", "method", "train_split", "seed"))
        if curve not in best or finite_or(r["miou"], -math.inf) > finite_or(rows[best[curve]]["miou"], -math.inf):
            best[curve] = i
    first = sorted(best.values())
    return first + sorted(set(range(len(rows))) - set(first))


def _number(value: Any) -> float | None:
    """A JSON number (NaN and missing: null), six significant digits."""
    if value is None or not math.isfinite(float(value)):
        return None
    return float(f"{float(value):.6g}")


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _json(value: Any) -> str:
    """JSON for inside a ``<script>``: no '</' (it could close the element) and no 'http'
    (the page has no address; a base64 run may spell it): both escaped inside their strings."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return text.replace("</", "<\\/").replace("http", "\\u0068ttp")


def _fit(image: Any, side: int, resample: int) -> Any:
    if max(image.size) <= side:
        return image
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)


def _rgb_uri(rgb: np.ndarray, side: int) -> str:
    """An RGB image as a data URI: PNG or JPEG (quality 90), whichever is smaller, at most
    ``side`` pixels a side."""
    from PIL import Image

    image = _fit(Image.fromarray(np.asarray(rgb, np.uint8)), side, Image.Resampling.BOX)
    encoded = {}
    for fmt, options in (("png", {"optimize": True}), ("jpeg", {"quality": 90})):
        buf = io.BytesIO()
        image.save(buf, format=fmt.upper(), **options)
        encoded[fmt] = buf.getvalue()
    fmt = min(encoded, key=lambda f: len(encoded[f]))
    return f"data:image/{fmt};base64,{base64.b64encode(encoded[fmt]).decode()}"


def _class_uri(classes: np.ndarray, palette: np.ndarray) -> str:
    """A class map as a palette PNG (the dataset's palette; ignore and unknown ids white), at
    most ``IMAGE_SIDE`` pixels a side (nearest neighbour)."""
    from PIL import Image

    n = len(palette)
    ids = np.asarray(classes)
    ids = np.where(ids < n, ids, n).astype(np.uint8)
    image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), np.ascontiguousarray(ids).tobytes())
    image.putpalette([*palette[:n].reshape(-1).tolist(), 255, 255, 255])
    image = _fit(image, IMAGE_SIDE, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_CSS = """
#explorer .explorer-panels { display: grid; grid-template-columns: 1fr 1fr; gap: 1.2rem; }
@media (max-width: 900px) { #explorer .explorer-panels { grid-template-columns: 1fr; } }
#explorer .explorer-panel { border: 1px solid #ddd; border-radius: 4px; padding: .5rem .8rem; min-width: 0; }
#explorer h3 { margin: .2rem 0 .4rem; font-size: 1rem; }
#explorer .explorer-controls { display: flex; flex-wrap: wrap; gap: .3rem .8rem; margin-bottom: .5rem; }
#explorer .explorer-controls label { font-size: 12px; color: #555; }
#explorer .explorer-controls select { display: block; font: inherit; font-size: 13px; max-width: 14rem; }
#explorer .explorer-rows { display: grid; gap: 2px; align-items: center; }
#explorer .explorer-rows span { font-size: 11px; color: #555; }
#explorer canvas { width: 100%; height: auto; display: block; background: #f4f4f4; }
#explorer canvas.classes { image-rendering: pixelated; }
#explorer .explorer-aggregate { display: flex; gap: .6rem; align-items: flex-start; margin: .6rem 0; }
#explorer .explorer-aggregate figure { margin: 0; width: 96px; flex: none; }
#explorer .explorer-aggregate figcaption { font-size: 11px; }
#explorer .explorer-legend { font-size: 10.5px; columns: 3; column-gap: .6rem; flex: 1; min-width: 0; }
#explorer .explorer-legend i { display: inline-block; width: .8em; height: .8em; margin-right: .3em;
  vertical-align: -.1em; border: 1px solid #999; }
#explorer .explorer-note { color: #a33; font-size: 12px; }
#explorer .explorer-numbers table { margin: .4rem 0; font-size: 13px; }
#explorer .explorer-curve svg { width: 100%; height: auto; }
#explorer .explorer-curve .pt { cursor: pointer; }
"""

# Vanilla JavaScript, no library. It must not spell an address nor the tag of an image
# element (the page is checked for both).
_JS = r"""
(function () {
  'use strict';
  const D = JSON.parse(document.getElementById('explorer-data').textContent);
  const KEYS = D.keys, S = D.settings, root = document.getElementById('explorer');
  const COL = {miou: '#1f77b4', nmi: '#ff7f0e'};
  const state = {};
  const pictures = new Map();
  const same = (s, sel, keys) => keys.every(k => String(s[k]) === String(sel[k]));
  const fmt = v => (v === null || v === undefined) ? '' : v.toFixed(3);
  const esc = t => String(t).replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
  const sortValues = vs => vs.sort((x, y) => (typeof x === 'number' && typeof y === 'number') ? x - y :
                                                String(x).localeCompare(String(y)));

  function picture(uri, ref, classes) {
    // a data URI drawn onto a canvas, the decoded picture shared by every canvas that shows it
    const c = document.createElement('canvas');
    c.dataset.ref = ref;
    if (classes) c.className = 'classes';
    if (!uri) return c;
    let entry = pictures.get(uri);
    if (!entry) {
      const im = new Image();
      entry = {im: im, ready: new Promise((ok, bad) => { im.onload = ok; im.onerror = bad; })};
      im.src = uri;
      pictures.set(uri, entry);
    }
    entry.ready.then(() => {
      c.width = entry.im.naturalWidth; c.height = entry.im.naturalHeight;
      const g = c.getContext('2d');
      g.imageSmoothingEnabled = !classes;
      g.drawImage(entry.im, 0, 0);
      c.dataset.drawn = '1';
    }, () => { c.dataset.drawn = 'failed'; console.error('explorer: a picture did not decode (' + ref + ')'); });
    return c;
  }

  function valid(panel, upto) {
    // settings agreeing with the panel's choice on the keys before index `upto`
    return S.filter(s => same(s, state[panel], KEYS.slice(0, upto)));
  }

  function settle(panel) {
    // keep each choice where it is still evaluated, else take the first that is
    const sel = state[panel];
    KEYS.forEach((k, i) => {
      const vs = sortValues([...new Set(valid(panel, i).map(s => s[k]))]);
      if (!vs.some(v => String(v) === String(sel[k]))) sel[k] = vs[0];
    });
  }

  function current(panel) {
    return S.findIndex(s => same(s, state[panel], KEYS));
  }

  function controls(panel, el) {
    el.textContent = '';
    KEYS.forEach((k, i) => {
      const vs = sortValues([...new Set(valid(panel, i).map(s => s[k]))]);
      const label = document.createElement('label');
      label.textContent = k === 'k' ? 'K' : k.replace('_', ' ');
      const select = document.createElement('select');
      select.dataset.key = k;
      vs.forEach(v => {
        const o = document.createElement('option');
        o.value = String(v); o.textContent = String(v);
        if (String(v) === String(state[panel][k])) o.selected = true;
        select.appendChild(o);
      });
      select.addEventListener('change', () => {
        const v = vs.find(x => String(x) === select.value);
        state[panel][k] = v;
        settle(panel);
        show();
      });
      label.appendChild(select);
      el.appendChild(label);
    });
  }

  function grid(panel, el, i) {
    const s = S[i];
    el.textContent = '';
    const n = D.images.length;
    const rows = document.createElement('div');
    rows.className = 'explorer-rows';
    rows.style.gridTemplateColumns = '4.5em repeat(' + n + ', minmax(0, 1fr))';
    const row = (name, cells) => {
      const t = document.createElement('span'); t.textContent = name; rows.appendChild(t);
      cells.forEach(c => rows.appendChild(c));
    };
    row('image', D.images.map((u, j) => picture(u, 'image/' + j, false)));
    row('ground truth', D.truth.map((u, j) => picture(u, 'truth/' + j, true)));
    if (s.examples) {
      row('prediction', s.examples.map((u, j) => picture(u, 'setting/' + i + '/example/' + j, true)));
      el.appendChild(rows);
    } else {
      el.appendChild(rows);
      const note = document.createElement('p');
      note.className = 'explorer-note';
      note.textContent = s.missing ? 'The results hold no maps of this setting; its numbers are below.' :
        'The maps of this setting are not on the page: they did not fit its size budget (docs/report.md). ' +
        'Its numbers are below.';
      el.appendChild(note);
    }
  }

  function aggregate(panel, el, i) {
    const s = S[i];
    el.textContent = '';
    const fig = (uri, ref, caption) => {
      const f = document.createElement('figure');
      f.appendChild(picture(uri, ref, false));
      const c = document.createElement('figcaption'); c.textContent = caption; f.appendChild(c);
      el.appendChild(f);
    };
    fig(D.gt.aggregate, 'gt/aggregate', 'ground truth');
    if (s.aggregate) fig(s.aggregate, 'setting/' + i + '/aggregate', 'aggregate map');
    const legend = document.createElement('div');
    legend.className = 'explorer-legend';
    legend.innerHTML = D.classes.map((c, j) => '<div><i style="background:rgb(' + D.palette[j].join(',') +
                                              ')"></i>' + esc(c) + '</div>').join('');
    el.appendChild(legend);
  }

  function numbers(panel, el, i) {
    const s = S[i], other = panel === 'b' ? S[current('a')] : null;
    const lo = D.metrics.some(m => m.endsWith('_lo'));
    let h = '<table><thead><tr><th>' + esc('n = ' + (s.n_images ?? '?') + ' test images') + '</th><th>value</th>' +
            (lo ? '<th>interval</th>' : '') + '<th>ground truth</th>' + (other ? '<th>B - A</th>' : '') +
            '</tr></thead><tbody>';
    ['miou', 'pixel_accuracy', 'nmi', 'nmi_bias_aware'].filter(m => D.metrics.includes(m)).forEach(m => {
      const iv = (s[m + '_lo'] !== undefined && s[m + '_lo'] !== null) ?
                 '[' + fmt(s[m + '_lo']) + ', ' + fmt(s[m + '_hi']) + ']' : '';
      const d = other && s[m] !== null && other[m] !== null ? (s[m] - other[m]) : null;
      h += '<tr><td>' + esc(D.labels[m]) + '</td><td data-metric="' + m + '">' + fmt(s[m]) + '</td>' +
           (lo ? '<td>' + iv + '</td>' : '') + '<td>' + fmt(D.gt[m]) + '</td>' +
           (other ? '<td>' + (d === null ? '' : (d >= 0 ? '+' : '') + d.toFixed(3)) + '</td>' : '') + '</tr>';
    });
    el.innerHTML = h + '</tbody></table>';
  }

  function curve(panel, el, i) {
    const s = S[i];
    const keys = KEYS.filter(k => k !== 'layer');
    const pts = S.filter(t => same(t, s, keys)).sort((x, y) => x.layer - y.layer);
    const W = 440, H = 180, L = 38, R = 12, T = 22, B = 30;
    const layers = pts.map(p => p.layer);
    const x0 = Math.min(...layers), x1 = Math.max(...layers);
    const x = l => L + (x1 === x0 ? (W - L - R) / 2 : (l - x0) / (x1 - x0) * (W - L - R));
    let top = 0;
    pts.forEach(p => ['miou', 'miou_hi', 'nmi', 'nmi_hi'].forEach(m => { if (p[m] > top) top = p[m]; }));
    top = top > 0 ? Math.min(1, Math.ceil(top * 11) / 10) : 1;
    const y = v => T + (1 - v / top) * (H - T - B);
    let g = '<svg viewBox="0 0 ' + W + ' ' + H + '" role="img" aria-label="layer curves">';
    g += '<text x="' + L + '" y="12" font-size="10">' + esc(keys.map(k => s[k]).join(' / ')) + '</text>';
    [0, top / 2, top].forEach(v => {
      g += '<line x1="' + L + '" x2="' + (W - R) + '" y1="' + y(v) + '" y2="' + y(v) + '" stroke="#eee"/>' +
           '<text x="' + (L - 4) + '" y="' + (y(v) + 3) + '" font-size="9" text-anchor="end">' + v.toFixed(2) +
           '</text>';
    });
    layers.forEach(l => {
      g += '<text x="' + x(l) + '" y="' + (H - B + 12) + '" font-size="9" text-anchor="middle">' + l + '</text>';
    });
    g += '<text x="' + ((L + W - R) / 2) + '" y="' + (H - 4) + '" font-size="10" text-anchor="middle">layer</text>';
    ['miou', 'nmi'].forEach((m, mi) => {
      const have = pts.filter(p => p[m] !== null && p[m] !== undefined);
      if (!have.length) return;
      g += '<polyline fill="none" stroke="' + COL[m] + '" stroke-width="1.5" points="' +
           have.map(p => x(p.layer) + ',' + y(p[m])).join(' ') + '"/>';
      have.forEach(p => {
        if (p[m + '_lo'] !== null && p[m + '_lo'] !== undefined)
          g += '<line x1="' + x(p.layer) + '" x2="' + x(p.layer) + '" y1="' + y(p[m + '_lo']) + '" y2="' +
               y(p[m + '_hi']) + '" stroke="' + COL[m] + '" stroke-opacity=".5"/>';
      });
      have.forEach(p => {
        const on = p.layer === s.layer;
        g += '<circle class="pt" data-layer="' + p.layer + '" data-metric="' + m + '" cx="' + x(p.layer) +
             '" cy="' + y(p[m]) + '" r="' + (on ? 5.5 : 3.5) + '" fill="' + (on ? COL[m] : '#fff') +
             '" stroke="' + COL[m] + '" stroke-width="1.5"><title>layer ' + p.layer + ': ' + esc(D.labels[m]) +
             ' ' + fmt(p[m]) + '</title></circle>';
      });
      g += '<text x="' + (W - R - 130 + mi * 45) + '" y="12" font-size="10" fill="' + COL[m] + '">' +
           esc(D.labels[m]) + '</text>';
    });
    el.innerHTML = g + '</svg>';
  }

  function encode(panel) {
    return KEYS.map(k => encodeURIComponent(String(state[panel][k]))).join(':');
  }

  function show() {
    ['a', 'b'].forEach(panel => {
      const el = document.getElementById('explorer-' + panel), i = current(panel);
      el.dataset.setting = String(i);
      controls(panel, el.querySelector('.explorer-controls'));
      grid(panel, el.querySelector('.explorer-grid'), i);
      aggregate(panel, el.querySelector('.explorer-aggregate'), i);
      numbers(panel, el.querySelector('.explorer-numbers'), i);
      curve(panel, el.querySelector('.explorer-curve'), i);
    });
    const hash = '#a=' + encode('a') + '&b=' + encode('b');
    if (location.hash !== hash) {
      try { history.replaceState(null, '', hash); } catch (e) { /* some viewers refuse: the view still works */ }
    }
  }

  function fromHash() {
    // the panels' settings named in the address, where they name an evaluated one
    const found = {};
    location.hash.replace(/^#/, '').split('&').forEach(part => {
      const m = /^([ab])=(.*)$/.exec(part);
      if (!m) return;
      const vals = m[2].split(':').map(decodeURIComponent);
      const i = S.findIndex(s => KEYS.every((k, j) => String(s[k]) === vals[j]));
      if (i >= 0) found[m[1]] = i;
    });
    return found;
  }

  function defaults() {
    // A: the best mIoU; B: the best of another model, else of another embedding, else another setting
    const order = S.map((s, i) => i).sort((p, q) => (S[q].miou ?? -1) - (S[p].miou ?? -1));
    const a = order[0];
    const b = order.find(i => S[i].model !== S[a].model) ?? order.find(i => S[i].embedding !== S[a].embedding) ??
              order.find(i => i !== a) ?? a;
    return {a: a, b: b};
  }

  function load() {
    const chosen = Object.assign(defaults(), fromHash());
    ['a', 'b'].forEach(p => { state[p] = Object.assign({}, S[chosen[p]]); });
    show();
  }

  root.addEventListener('click', e => {
    const pt = e.target.closest && e.target.closest('.pt');
    if (!pt) return;
    const panel = pt.closest('.explorer-panel').dataset.panel;
    state[panel].layer = Number(pt.dataset.layer);
    settle(panel);
    show();
  });
  window.addEventListener('hashchange', () => {
    const h = fromHash();
    if (Object.keys(h).length) {
      Object.keys(h).forEach(p => { state[p] = Object.assign({}, S[h[p]]); });
      show();
    }
  });
  if (S.length) load();
  else root.querySelector('.explorer-panels').textContent = 'No segmentation settings to explore.';
})();
"""
