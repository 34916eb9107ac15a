"""The explain stage (PROTOCOL.md section 10) end to end on a real tiny model: the maps in the
store against the explainer run directly, the ULTra tables against their per-image parts, the
dataset scoring in the section 5 tables, resume, and refusals before anything is written."""
from __future__ import annotations

import numpy as np
import pytest

from rep_pipeline.pipeline.config import ExplainConfig, ExtractConfig
from rep_pipeline.pipeline.errors import FingerprintMismatchError, StoreError
from rep_pipeline.pipeline.results import Results
from rep_pipeline.pipeline.store import FeatureStore
from rep_pipeline.stages.explain import is_done, run_explain
from rep_pipeline.stages.extract import run_extract
from rep_pipeline.storage_schemas import results as layout

SIZE, MODEL = 64, "tiny-vit"


@pytest.fixture(scope="module")
def explained(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("explain")
    store = root / "features.zarr"
    run_extract(ExtractConfig(model=MODEL, weights="random", store=store, image_size=SIZE, chunk_images=4,
                              embeddings="tokens", dataset_options={"sizes": {"train": 6, "val": 5}}), progress=False)
    cfg = ExplainConfig(store=store, model=MODEL, split="val", train_split="train", weights="random",
                        tokens_per_image=3, taus="0,0.2,0.5,1")
    return root, store, cfg, run_explain(cfg, progress=False)


def test_the_maps_in_the_store_are_the_explainers(explained):
    import torch

    from rep_pipeline.pipeline.datasets import build_dataset
    from rep_pipeline.pipeline.model_input import ModelInput
    from rep_pipeline.pipeline.registry import build_model
    from rep_pipeline.stages.explain.rollout import Explainer

    _, store, cfg, result = explained
    group = FeatureStore(store).model_split(MODEL, "synthetic", "val")
    book = group.explanations("sum", "tokens")
    assert book.layers == (1, 3) and book.n_images == 5 and not book.pending()
    assert result.images == 11 and result.images_explained == 11
    loaded = build_model(MODEL, "random", SIZE)
    dataset = build_dataset("synthetic", sizes={"train": 6, "val": 5})
    image, _, geometry = dataset.load_placed(dataset.items("val")[4], SIZE)
    x = ModelInput(loaded, torch.device("cpu"))(image[None], geometry[None])
    direct = Explainer(loaded, (1, 3)).explain(x)
    for layer in (1, 3):
        maps, class_maps = book.read(layer, 4, 5)
        np.testing.assert_allclose(maps[0], direct[layer].maps.numpy(), rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(class_maps[0], direct[layer].class_map.numpy(), rtol=2e-3, atol=1e-3)


def test_tables_hold_every_layer_tau_and_perturbation(explained):
    root, _, cfg, result = explained
    results = Results(root / "results")
    runs = results.rows("SELECT * FROM ultra_runs")
    assert len(runs) == 1 and runs[0]["run_id"] == result.run_id and list(runs[0]["layers"]) == [1, 3]
    oracle = results.rows("SELECT * FROM ultra_oracle ORDER BY layer")
    assert [r["layer"] for r in oracle] == [1, 3] and all(0 <= r["miou"] <= 1 for r in oracle)
    itiou = results.rows("SELECT * FROM ultra_itiou")
    assert len(itiou) == 2 * 4 and {r["tau"] for r in itiou} == {0.0, 0.2, 0.5, 1.0}
    pert = results.rows("SELECT * FROM ultra_perturbation")
    assert {(r["layer"], r["perturbation"]) for r in pert} == {(1, "mask"), (1, "noise"), (3, "mask"), (3, "noise")}
    assert all(r["tokens_per_image"] == 3 and r["n_images"] == 5 for r in pert)
    assert all(r["diff_ci_low"] <= r["diff_mean"] <= r["diff_ci_high"] for r in pert)
    seg = results.rows("SELECT * FROM segmentation WHERE method = 'ultra_s' ORDER BY layer")
    assert [r["layer"] for r in seg] == [1, 3] and {r["k"] for r in seg} == {6}
    assert {r["codebook_fingerprint"] for r in seg} == {result.run_id}
    confusion = results.rows("SELECT layer, sum(pixels) AS n FROM confusion WHERE method = 'ultra_s' GROUP BY layer")
    labelled = int((FeatureStore(cfg.store).dataset_split("synthetic", "val").labels[:] != 255).sum())
    assert {r["n"] for r in confusion} == {labelled}
    segments = results.maps().read(layout.ultra_maps("synthetic", "val", MODEL, result.run_id, 3), "segments")
    assert segments.shape == (5, SIZE, SIZE)
    concept = results.maps().read(layout.ultra_maps("synthetic", "val", MODEL, result.run_id, 3), "concepts")
    assert concept.shape[0] == 4 and concept.shape[2:] == (SIZE, SIZE)
    # each example's segments are the argmax of its concept maps (Eq. 8)
    for i in range(4):
        k = int(np.isfinite(concept[i, :, 0, 0]).sum())
        np.testing.assert_array_equal(concept[i, :k].argmax(0), segments[i])


def test_a_rerun_is_done_and_reuses_the_stored_maps(explained):
    root, _, cfg, result = explained
    assert is_done(cfg) and not is_done(cfg.replace(zeta=0.2))
    again = run_explain(cfg.replace(zeta=0.2), progress=False)
    assert again.images_explained == 0 and again.run_id != result.run_id
    assert len(Results(root / "results").rows("SELECT * FROM ultra_runs")) == 2


def test_other_weights_are_refused_before_anything_is_written(explained, tmp_path):
    _, store, cfg, _ = explained
    with pytest.raises(FingerprintMismatchError, match="weights"):
        run_explain(cfg.replace(seed=1, f="energy", results=tmp_path / "r"), progress=False)
    group = FeatureStore(store).model_split(MODEL, "synthetic", "val")
    with pytest.raises(StoreError, match="no explanations energy-tokens"):
        group.explanations("energy", "tokens")
    with pytest.raises(StoreError, match="no layer 7"):
        run_explain(cfg.replace(layers="7", results=tmp_path / "r"), progress=False)


def test_real_coco_stuff_images_are_read_again_and_checked(ray_local, shared_datasets, tmp_path):
    """On the real sample: the images are re-read from --data-root (the check of every image's
    tokens against the store passes), and a data root of other images is refused."""
    coco = shared_datasets / "cocostuff-sample"
    store = tmp_path / "coco.zarr"
    run_extract(ExtractConfig(model=MODEL, weights="random", store=store, dataset="cocostuff27", data_root=coco,
                              splits="val2017", limit=2, image_size=SIZE, embeddings="tokens"), progress=False)
    cfg = ExplainConfig(store=store, model=MODEL, split="val2017", weights="random", data_root=coco, layers="3",
                        tokens_per_image=2, perturbations="mask", taus="0.2")
    result = run_explain(cfg, progress=False)
    assert result.images_explained == 2
    rows = Results(tmp_path / "results").rows("SELECT * FROM ultra_itiou")
    assert len(rows) == 1 and rows[0]["n_tokens"] > 0
    other = tmp_path / "other"
    for sub in ("images/val2017", "annotations/val2017", "curated/val2017"):
        (other / sub).mkdir(parents=True)
    ids = (coco / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").read_text().split()
    (other / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(ids[2:4]) + "\n")
    for i in ids[2:4]:
        (other / f"images/val2017/{i}.jpg").write_bytes((coco / f"images/val2017/{i}.jpg").read_bytes())
        (other / f"annotations/val2017/{i}.png").write_bytes((coco / f"annotations/val2017/{i}.png").read_bytes())
    (other / "categories_stuffthingmaps.tsv").write_bytes((coco / "categories_stuffthingmaps.tsv").read_bytes()) \
        if (coco / "categories_stuffthingmaps.tsv").exists() else None
    with pytest.raises(FingerprintMismatchError, match="not the ones the store was extracted from"):
        run_explain(cfg.replace(data_root=other, results=tmp_path / "r2"), progress=False)
    assert not (tmp_path / "r2").exists()


def test_ultra_w_fits_its_projections_first_and_keeps_them(explained):
    """f = learned (section 10.7): unit vectors fitted on the train split's ULTra_S segments,
    stored beside the maps, used for every map; a rerun reuses them."""
    root, store, cfg, _ = explained
    learned = cfg.replace(f="learned", fit_images=2, k_img=3, layers="3", perturbations="noise", taus="0.2")
    run_explain(learned, progress=False)
    book = FeatureStore(store).model_split(MODEL, "synthetic", "train").explanations("learned", "tokens")
    w = book.projections()[3]
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)
    assert book.attrs["hyperparameters"]["fit"]["fit_images"] == 2 and book.attrs["fit"]["3"]["n_images"] == 2
    seg = Results(root / "results").rows("SELECT * FROM segmentation WHERE method = 'ultra_w'")
    assert [r["layer"] for r in seg] == [3]
    assert run_explain(learned.replace(taus="0.5"), progress=False).images_explained == 0
    with pytest.raises(Exception, match="learned fits its projections on --train-split"):
        ExplainConfig(store=store, model=MODEL, split="val", f="learned")


def test_a_segmentation_equal_to_the_labels_scores_one_under_both_scorings(tmp_path):
    """Section 10.11: segments that are the label maps give mIoU 1 per image (the oracle) and
    through section 5 (the dataset scoring's path: K-cluster maps, one confusion, Hungarian)."""
    from rep_pipeline.pipeline.backend import get_backend
    from rep_pipeline.pipeline.segscore import ClusterMapScores, finish_scores
    from rep_pipeline.pipeline.store import MapStore
    from rep_pipeline.stages.explain import concepts

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (3, 16, 16)).astype(np.uint8)
    labels[:, :2] = 255
    confusion = sum(concepts.per_image_confusion(lab, lab, 4, 255) for lab in labels)
    assert concepts.oracle_scores(confusion) == {"miou": 1.0, "pixel_accuracy": 1.0}
    permuted = np.array([2, 0, 3, 1, 255], np.int64)[np.where(labels == 255, 4, labels)]
    acc = ClusterMapScores(4, 4, 16, get_backend("numpy"))
    for i in range(3):
        clusters = np.where(labels[i] == 255, 0, permuted[i])[None].astype(np.int16)
        acc.add(clusters, labels[i:i + 1].astype(np.int64), (np.zeros(1, np.int64), np.zeros(1, np.int64)), 255)
    rows = {t: [] for t in ("segmentation", "per_class_iou", "classwise_mi", "confusion", "matching")}
    finish_scores(rows, MapStore(tmp_path / "maps.zarr", mode="a"), acc,
                  dict(model="m", dataset="d", split="s", train_split="t", embedding="tokens", layer=0, k=4,
                       method="ultra_s", seed=0), ["a", "b", "c", "e"], np.zeros((4, 3), np.uint8), 3,
                  {"store_fingerprint": "x", "codebook_fingerprint": "y"}, ["0", "1", "2"])
    assert rows["segmentation"][0]["miou"] == 1.0 and rows["segmentation"][0]["pixel_accuracy"] == 1.0
