"""The correspond stage (PROTOCOL.md section 11) end to end on real tiny models: synthetic pairs
with exactly known keypoints through extract (pad geometry, keypoint_pairs.parquet) and
correspond, the tables against the kept matches, the fast path against brute force in the
stage, a pair onto itself, the ln_ablation view, reruns and refusals."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from rep_pipeline.pipeline.config import CorrespondConfig, ExtractConfig
from rep_pipeline.pipeline.datasets import build_dataset
from rep_pipeline.pipeline.datasets.geometry import inside, placement, to_original
from rep_pipeline.pipeline.errors import StoreError
from rep_pipeline.pipeline.results import Results
from rep_pipeline.pipeline.store import FeatureStore
from rep_pipeline.stages.correspond import is_done, run_correspond
from rep_pipeline.stages.correspond import pck as pck_scores
from rep_pipeline.stages.correspond import transfer
from rep_pipeline.stages.extract import run_extract
from rep_pipeline.storage_schemas import results as results_layout
from rep_pipeline.storage_schemas.feature_store import KEYPOINT_PAIRS

SIZE, PAIRS, MODEL = 64, 3, "tiny-vit"
EMBEDDINGS = ("queries", "keys", "values", "tokens")


def _extract(store, **extra):
    cfg = ExtractConfig(model=MODEL, weights="random", store=store, dataset="synthetic-pairs",
                        dataset_options={"pairs": PAIRS}, image_size=SIZE, chunk_images=4,
                        embeddings=",".join(EMBEDDINGS), **extra)
    run_extract(cfg, progress=False)
    return cfg


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("correspond")
    store = root / "features.zarr"
    _extract(store)
    cfg = CorrespondConfig(store=store, model=MODEL, split="test", keep_matches=True, examples=2)
    result = run_correspond(cfg, progress=False)
    return root, store, cfg, result


def test_extract_writes_the_pad_geometry_and_the_keypoint_pairs(pairs_run):
    _, store, _, _ = pairs_run
    data = FeatureStore(store).dataset_split("synthetic-pairs", "test")
    dataset = build_dataset("synthetic-pairs", pairs=PAIRS)
    items = dataset.items("test")
    assert data.geometry_mode == "pad" and data.fingerprint["options"]["geometry"] == "pad"
    native = [dataset.read_pair(it)[0].size for it in items]
    np.testing.assert_array_equal(data.geometry(), [placement(w, h, SIZE, "pad") for w, h in native])
    table = data.keypoint_pairs()
    assert table.schema.equals(KEYPOINT_PAIRS, check_metadata=False)
    expected = dataset.keypoint_pairs("test", items)
    got = table.to_pylist()
    assert len(got) == len(expected) and len({r["dataset_fingerprint"] for r in got}) == 1
    for row, want in zip(got, expected):
        assert {k: row[k] for k in want} == want


def test_tables_count_every_setting_and_agree_with_the_kept_matches(pairs_run):
    root, store, cfg, result = pairs_run
    results = Results(root / "results")
    group = FeatureStore(store).model_split(MODEL, "synthetic-pairs", "test")
    n_kp = FeatureStore(store).dataset_split("synthetic-pairs", "test").keypoint_pairs().num_rows
    rows = results.rows("SELECT * FROM correspondence")
    assert len(rows) == len(EMBEDDINGS) * len(group.layers) * 3
    assert {r["n_keypoints"] for r in rows} == {n_kp} and {r["n_pairs"] for r in rows} == {PAIRS}
    assert {(r["geometry"], r["image_size"], r["last_norm"]) for r in rows} == {("pad", SIZE, "after")}
    # PCK recomputed from the matches, per point, per pair and per category
    again = results.rows("""
        WITH m AS (SELECT embedding, layer, pair_id, category, a.alpha, (error <= a.alpha * threshold)::INT AS ok
                   FROM correspondence_matches, (SELECT unnest([0.05, 0.10, 0.15]::DOUBLE[]) AS alpha) a),
             per_pair AS (SELECT embedding, layer, alpha, pair_id, avg(ok) AS f FROM m GROUP BY ALL)
        SELECT m.embedding, m.layer, m.alpha, avg(ok) AS point,
               (SELECT avg(f) FROM per_pair p WHERE p.embedding = m.embedding AND p.layer = m.layer
                AND p.alpha = m.alpha) AS image
        FROM m GROUP BY ALL""")
    table = {(r["embedding"], r["layer"], round(r["alpha"], 2)): r for r in rows}
    assert len(again) == len(rows)
    for r in again:
        t = table[(r["embedding"], r["layer"], round(r["alpha"], 2))]
        assert t["pck_point"] == pytest.approx(r["point"]) and t["pck_image"] == pytest.approx(r["image"])
    by_cat = results.rows("SELECT * FROM correspondence_by_category")
    assert {r["category"] for r in by_cat} == {"synthetic"}
    assert all(table[(r["embedding"], r["layer"], round(r["alpha"], 2))]["pck_point"] == r["pck_point"] for r in by_cat)
    # best layers: the argmax over layers, one model-best per alpha
    best = results.rows("SELECT * FROM correspondence_best")
    assert len(best) == len(EMBEDDINGS) * 3 and sum(b["model_best"] for b in best) == 3
    for b in best:
        mine = [r for r in rows if r["embedding"] == b["embedding"] and abs(r["alpha"] - b["alpha"]) < 1e-9]
        assert b["pck_point"] == max(r["pck_point"] for r in mine)
        assert b["best_layer"] == min(r["layer"] for r in mine if r["pck_point"] == b["pck_point"])
        chosen = next(r for r in mine if r["layer"] == b["best_layer"])
        assert (b["pck_point_lo"], b["pck_point_hi"]) == (chosen["pck_point_lo"], chosen["pck_point_hi"])
    # 95 % bootstrap intervals over pairs (docs/uncertainty.md): around the estimate, and what
    # pck.pck gives on the kept matches (pairs resampled with their keypoints, seed pck.SEED)
    first = group.layers[0]
    for r in rows + by_cat:
        for m in ("pck_point", "pck_image"):
            assert r[f"{m}_lo"] <= r[m] <= r[f"{m}_hi"], (m, r)
    matches = results.rows("SELECT pair_id, error, threshold FROM correspondence_matches WHERE embedding = 'keys' "
                           f"AND layer = {first} ORDER BY pair_id, kp_id")
    want = pck_scores.pck(np.array([m["error"] for m in matches]), np.array([m["threshold"] for m in matches]),
                   np.array([m["pair_id"] for m in matches]), 0.10)
    got = table[("keys", first, 0.1)]
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert is_done(cfg) and not is_done(cfg.replace(alphas=(0.1,)))
    assert "keypoints of 3 pairs" in result.summary()[0]


def test_the_stage_matches_brute_force_upsampling_exactly(pairs_run):
    """The predictions of one setting, recomputed by upsampling the whole target map."""
    root, store, _, _ = pairs_run
    fs = FeatureStore(store)
    data, group = fs.dataset_split("synthetic-pairs", "test"), fs.model_split(MODEL, "synthetic-pairs", "test")
    table = data.keypoint_pairs().to_pylist()
    index = {i: n for n, i in enumerate(data.image_ids())}
    geometry = data.geometry()
    layer = group.layers[-1]
    features = group.read_features("values", layer, 0, group.n_images)
    matches = Results(root / "results").rows(
        f"SELECT pair_id, kp_id, pred_x, pred_y FROM correspondence_matches WHERE embedding = 'values' "
        f"AND layer = {layer}")
    got = {(m["pair_id"], m["kp_id"]): (m["pred_x"], m["pred_y"]) for m in matches}
    from rep_pipeline.pipeline.datasets.geometry import to_grid

    for row in table:
        s, t = index[row["src_image_id"]], index[row["trg_image_id"]]
        u, v = to_grid(row["src_x"], row["src_y"], geometry[s])
        f = transfer.sample(features[s], np.array([int(np.floor(v + 0.5))]), np.array([int(np.floor(u + 0.5))]),
                            SIZE, np)
        idx, _ = transfer.brute_force_match(features[t], f, SIZE, inside(geometry[t], SIZE))
        x, y = to_original(idx[0] % SIZE, idx[0] // SIZE, geometry[t])
        assert got[(row["pair_id"], row["kp_id"])] == (pytest.approx(x, abs=1e-9), pytest.approx(y, abs=1e-9))


def test_heatmaps_of_figure_c3_are_kept(pairs_run):
    root, store, _, _ = pairs_run
    maps = Results(root / "results").maps()
    path = results_layout.correspondence_example("synthetic-pairs", "test", MODEL, "tokens", 0)
    attrs = maps.attrs(path)
    cosine = maps.read(path, "cosine")
    n_layers = len(FeatureStore(store).model_split(MODEL, "synthetic-pairs", "test").layers)
    assert cosine.shape == (n_layers, SIZE, SIZE) and len(attrs["predictions"]) == n_layers
    finite = np.isfinite(cosine[0])
    geometry = FeatureStore(store).dataset_split("synthetic-pairs", "test").geometry()
    index = {i: n for n, i in enumerate(FeatureStore(store).dataset_split("synthetic-pairs", "test").image_ids())}
    trg = Results(root / "results").rows(f"SELECT * FROM correspondence_matches WHERE pair_id = '{attrs['pair_id']}' "
                                         f"LIMIT 1")
    assert trg and finite.any() and not finite.all()  # padding is NaN
    assert np.array_equal(finite, inside(geometry[index[f"pair-0-trg"]], SIZE))
    r, c = attrs["predictions"][0]
    assert cosine[0][r, c] == np.nanmax(cosine[0])
    assert attrs["radius"] > 0 and attrs["best_layer"] in attrs["layers"]


def test_a_pair_onto_itself_maps_every_keypoint_to_itself(pairs_run, tmp_path):
    _, store, _, _ = pairs_run
    copy = tmp_path / "self.zarr"
    shutil.copytree(store, copy)
    data = FeatureStore(copy, mode="a").dataset_split("synthetic-pairs", "test")
    geometry, ids = data.geometry(), data.image_ids()
    rng = np.random.default_rng(0)
    half = SIZE // FeatureStore(copy).model_split(MODEL, "synthetic-pairs", "test").attrs["grid"] // 2
    rows = []
    for n, image_id in enumerate(ids):
        w, h, nw, nh, ox, oy = geometry[n]
        for k in range(5):
            # inside the bands where the upsampling is clamped to the border patches: there a whole
            # band of pixels has one feature, and the first of them (row-major) is the match
            u, v = rng.uniform(ox + half, ox + nw - 1 - half), rng.uniform(oy + half, oy + nh - 1 - half)
            x, y = (float(c) for c in to_original(u, v, geometry[n]))
            rows.append({"pair_id": f"self-{n}", "category": "self", "src_image_id": image_id,
                         "trg_image_id": image_id, "kp_id": k, "kp_name": None, "src_x": x, "src_y": y, "trg_x": x,
                         "trg_y": y, "src_bbox_x1": 0.0, "src_bbox_y1": 0.0, "src_bbox_x2": float(w),
                         "src_bbox_y2": float(h), "trg_bbox_x1": 0.0, "trg_bbox_y1": 0.0, "trg_bbox_x2": float(w),
                         "trg_bbox_y2": float(h), "viewpoint_variation": None, "scale_variation": None,
                         "truncation": None, "occlusion": None})
    data.write_keypoint_pairs(rows)
    run_correspond(CorrespondConfig(store=copy, model=MODEL, split="test", examples=0), progress=False)
    pck = Results(tmp_path / "results").rows("SELECT min(pck_point) AS lo, min(pck_image) AS lo_image, "
                                             "count(*) AS n FROM correspondence")[0]
    assert pck["lo"] == 1.0 and pck["lo_image"] == 1.0 and pck["n"] > 0


def test_ln_ablation_view_pairs_the_groups_before_and_after_the_final_norm(pairs_run):
    root, store, _, _ = pairs_run
    depth = FeatureStore(store).model_split(MODEL, "synthetic-pairs", "test").attrs["depth"]
    _extract(store, model_key=f"{MODEL}-before", last_norm="before", layers=str(depth - 1))
    run_correspond(CorrespondConfig(store=store, model=f"{MODEL}-before", split="test", embeddings="tokens",
                                    alphas="0.1"), progress=False)
    results = Results(root / "results")
    view = results.rows("SELECT * FROM ln_ablation")
    pck = {r["model"]: r["pck_point"] for r in results.rows(
        f"SELECT model, pck_point FROM correspondence WHERE embedding = 'tokens' AND layer = {depth - 1} "
        f"AND abs(alpha - 0.1) < 1e-9")}
    assert len(view) == 1
    row = view[0]
    assert (row["model"], row["task"]) == (MODEL, "correspondence")
    assert row["before"] == pytest.approx(pck[f"{MODEL}-before"]) and row["after"] == pytest.approx(pck[MODEL])
    assert row["diff"] == pytest.approx(row["after"] - row["before"])


def test_refusals_name_what_is_missing(pairs_run, tmp_path):
    _, store, _, _ = pairs_run
    with pytest.raises(StoreError, match="no array 'mid_tokens'"):
        run_correspond(CorrespondConfig(store=store, model=MODEL, split="test", embeddings="mid_tokens",
                                        results=tmp_path / "r"), progress=False)
    scenes = tmp_path / "scenes.zarr"
    run_extract(ExtractConfig(model=MODEL, weights="random", store=scenes, dataset_options={"sizes": {"val": 2}},
                              image_size=SIZE, embeddings="tokens"), progress=False)
    with pytest.raises(StoreError, match="keypoint_pairs.parquet"):
        run_correspond(CorrespondConfig(store=scenes, model=MODEL, split="val", results=tmp_path / "r"),
                       progress=False)
    assert not (tmp_path / "r").exists()
