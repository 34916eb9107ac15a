"""The extract stage end to end on a real local Ray instance, real stores and tiny models."""
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rep_pipeline.pipeline.config import ExtractConfig
from rep_pipeline.pipeline.errors import FingerprintMismatchError, ImageReadError, NonFiniteFeaturesError
from rep_pipeline.pipeline.registry import build_model
from rep_pipeline.pipeline.store import FeatureStore
from rep_pipeline.pipeline.store import validate_store
from rep_pipeline.pipeline.finite import all_finite, non_finite_images
from rep_pipeline.stages.extract import Extractor, is_done, run_extract


SYNTH = {"sizes": {"train": 10, "val": 6}}


def _cfg(tmp_path, model="tiny-vit", store="s.zarr", **kw):
    kw.setdefault("dataset_options", SYNTH)
    return ExtractConfig(model=model, weights=kw.pop("weights", "random"), store=tmp_path / store,
                         chunk_images=kw.pop("chunk_images", 4), **kw)


def _arrays(store, model, split):
    group = FeatureStore(store).model_split(model, "synthetic", split).group
    return {name: arr[:] for name, arr in group.arrays() if name != "provenance"}  # who wrote a chunk differs by run


def test_store_holds_exactly_what_the_model_captures(ray_local, tmp_path, tiny_model):
    cfg = _cfg(tmp_path, tiny_model, layers=(0, 3), splits=("val",))
    result = run_extract(cfg, progress=False)
    assert result.images_computed == 6 and result.splits[0].chunks == 2
    assert validate_store(cfg.store) == []
    stored = FeatureStore(cfg.store).model_split(tiny_model, "synthetic", "val")
    assert stored.finished and stored.layers == (0, 3)
    extractor = Extractor(cfg)  # the same computation in this process, no Ray, no store
    items = extractor.items("val")
    images, labels, _, _ = extractor.load_batch(items)
    direct = extractor.features(images, [i.image_id for i in items])
    for emb in ("queries", "keys", "values", "tokens", "class_tokens", "attention_mi"):
        np.testing.assert_allclose(stored.group[emb][:].astype(np.float32), direct[emb].astype(np.float32),
                                   atol=2e-3, rtol=2e-3, err_msg=f"{tiny_model} {emb}")
    np.testing.assert_allclose(stored.attention_map(), direct["attention_sum"] / 6, atol=1e-5)
    data = FeatureStore(cfg.store).dataset_split("synthetic", "val")
    assert np.array_equal(data.labels[:], labels) and data.image_ids() == [i.image_id for i in items]


def test_interrupted_run_resumes_to_the_single_run_result(ray_local, tmp_path):
    reference = _cfg(tmp_path, store="ref.zarr")
    run_extract(reference, progress=False)
    cfg = _cfg(tmp_path)
    seen = []

    def interrupt(split, chunk, stats):
        seen.append((split, chunk))
        if len(seen) == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises in the driver

    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg, progress=False, on_chunk_done=interrupt)
    done_before = {s: FeatureStore(cfg.store).model_split("tiny-vit", "synthetic", s).done[:].copy()
                   for s in ("train", "val")}
    assert 2 <= sum(d.sum() for d in done_before.values()) < 5
    assert not FeatureStore(cfg.store).model_split("tiny-vit", "synthetic", "train").finished
    again = []
    result = run_extract(cfg, progress=False, on_chunk_done=lambda s, c, _: again.append((s, c)))
    assert set(again).isdisjoint({(s, c) for s, d in done_before.items() for c in np.flatnonzero(d)})
    assert sum(r.chunks_computed for r in result.splits) == 5 - sum(d.sum() for d in done_before.values())
    for split in ("train", "val"):
        got, want = _arrays(cfg.store, "tiny-vit", split), _arrays(reference.store, "tiny-vit", split)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{split} {name}")


def test_half_written_chunk_is_redone(ray_local, tmp_path):
    reference = _cfg(tmp_path, store="ref.zarr", splits=("train",), chunk_images=2)
    run_extract(reference, progress=False)
    cfg = _cfg(tmp_path, splits=("train",), chunk_images=2)

    def stop(split, chunk, stats):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg, progress=False, on_chunk_done=stop)
    target = FeatureStore(cfg.store, mode="a").model_split("tiny-vit", "synthetic", "train")
    torn = target.pending_chunks()[0]
    start, stop_ = target.chunk_images * torn, target.chunk_images * (torn + 1)
    target.group["keys"][:2, start:stop_] = 7.0          # a crash in the middle of writing the chunk
    target.group["attention_sum"][torn] = 1.0
    redone = []
    run_extract(cfg, progress=False, on_chunk_done=lambda s, c, _: redone.append(c))
    assert torn in redone
    got, want = _arrays(cfg.store, "tiny-vit", "train"), _arrays(reference.store, "tiny-vit", "train")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_killed_actor_is_restarted_and_its_range_retried(ray_local, tmp_path):
    reference = _cfg(tmp_path, store="ref.zarr", splits=("train",), chunk_images=2)
    run_extract(reference, progress=False)
    cfg = _cfg(tmp_path, splits=("train",), chunk_images=2)
    killed = []

    def kill_once(split, chunk, stats):
        if not killed:
            killed.append(stats["pid"])
            os.kill(int(stats["pid"]), signal.SIGKILL)

    result = run_extract(cfg, progress=False, on_chunk_done=kill_once)
    assert killed and result.splits[0].chunks_computed == 5
    got, want = _arrays(cfg.store, "tiny-vit", "train"), _arrays(reference.store, "tiny-vit", "train")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_killed_driver_resumes_to_the_single_run_result(ray_local, tmp_path, kill_a_driver_midway):
    reference = _cfg(tmp_path, store="ref.zarr", splits=("train",), chunk_images=2)
    run_extract(reference, progress=False)
    cfg = _cfg(tmp_path, splits=("train",), chunk_images=2)
    kill_a_driver_midway(cfg.store, tmp_path / "hanging")
    target = FeatureStore(cfg.store).model_split("tiny-vit", "synthetic", "train")
    done_before = set(np.flatnonzero(target.done[:]).tolist())
    assert 2 <= len(done_before) < 5 and not target.finished
    redone = []
    result = run_extract(cfg, progress=False, on_chunk_done=lambda s, c, _: redone.append(c))
    assert sorted(redone) == sorted(set(range(5)) - done_before)
    assert result.splits[0].chunks_computed == 5 - len(done_before)
    got, want = _arrays(cfg.store, "tiny-vit", "train"), _arrays(reference.store, "tiny-vit", "train")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_store_of_another_model_is_refused_and_model_key_separates(ray_local, tmp_path):
    run_extract(_cfg(tmp_path, splits=("val",)), progress=False)
    with pytest.raises(FingerprintMismatchError, match="weights_sha256"):
        run_extract(_cfg(tmp_path, splits=("val",), seed=1), progress=False)
    run_extract(_cfg(tmp_path, splits=("val",), seed=1, model_key="tiny-vit-seed1"), progress=False)
    assert {m for m, _, _ in FeatureStore(tmp_path / "s.zarr").model_splits()} == {"tiny-vit", "tiny-vit-seed1"}


def test_corrupt_image_stops_the_run_and_keeps_finished_chunks(ray_local, tmp_path):
    root = tmp_path / "imgs"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "images" / f"{i:02d}.png")
    (root / "images" / "07.png").write_bytes(b"\x89PNG truncated")
    cfg = _cfg(tmp_path, dataset="folder", data_root=root, chunk_images=2, dataset_options={})
    with pytest.raises(ImageReadError, match="07.png"):
        run_extract(cfg, progress=False)
    target = FeatureStore(cfg.store).model_split("tiny-vit", "folder", "all")
    done = target.done[:]
    assert done[:2].all() and not done[3] and not target.finished
    assert np.abs(target.group["tokens"][:, :4].astype(np.float32)).sum() > 0


def test_non_finite_features_name_the_images(ray_local, tmp_path):
    state = build_model("tiny-vit", "random").model.state_dict()
    state["blocks.1.mlp.fc1.bias"][0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(NonFiniteFeaturesError, match="val-00000"):
        run_extract(_cfg(tmp_path, weights=str(path), splits=("val",)), progress=False)
    assert not FeatureStore(tmp_path / "s.zarr").model_split("tiny-vit", "synthetic", "val").done[:].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_finite_check_finds_one_bad_value_and_its_image(dtype, bad):
    features = torch.randn(3, 4, 5, 5, 8).to(dtype)  # (layer, image, y, x, channel)
    assert all_finite(features) and non_finite_images(features, list("abcd")) == []
    for where in [(0, 0, 0, 0, 0), (2, 1, 4, 4, 7), (1, 3, 2, 0, 5)]:
        broken = features.clone()
        broken[where] = bad
        assert not all_finite(broken)
        assert non_finite_images(broken, list("abcd")) == ["abcd"[where[1]]]


def test_cli_extract_and_store_info(ray_local, tmp_path):
    from typer.testing import CliRunner

    from rep_pipeline.cli.app import app

    runner = CliRunner()
    store = tmp_path / "cli.zarr"
    res = runner.invoke(app, ["extract", "--model", "tiny-dinov3", "--weights", "random", "--dataset", "synthetic",
                              "--store", str(store), "--limit", "3", "--layers", "1-2", "--embeddings", "keys,tokens",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "3 of 1 chunks" not in res.output and "wrote 6 images" in res.output
    info = runner.invoke(app, ["store", "info", str(store)])
    assert info.exit_code == 0 and "tiny-dinov3" in info.output and "layout valid" in info.output
    assert "2 (1..2)" in info.output, info.output  # the chosen layers, as a range when they are one
    bad = runner.invoke(app, ["extract", "--model", "tiny-vit", "--weights", "random", "--dataset", "voc",
                              "--data-root", str(tmp_path / "nowhere"), "--store", str(store)])
    assert bad.exit_code == 2 and "nowhere" in bad.output


def test_is_done_answers_from_the_request_it_recorded(ray_local, tmp_path):
    """Done means: the same model, weights (a file by its content, not its name), capture
    options, limit and chunk size; answered without building the model."""
    weights = tmp_path / "w.safetensors"
    save_file(build_model("tiny-vit", "random", seed=3).model.state_dict(), weights)
    cfg = _cfg(tmp_path, weights=str(weights), splits=("val",), layers=(0, 1))
    assert not is_done(cfg)
    run_extract(cfg, progress=False)
    assert is_done(cfg)
    for other in (cfg.replace(layers=(0,)), cfg.replace(limit=3), cfg.replace(embeddings=("keys",)),
                  cfg.replace(rope="after"), cfg.replace(weights="random"), cfg.replace(splits=("val", "train"))):
        assert not is_done(other), other
    save_file(build_model("tiny-vit", "random", seed=4).model.state_dict(), weights)  # same name, other weights
    assert not is_done(cfg)
    with pytest.raises(FingerprintMismatchError, match="weights_sha256"):
        run_extract(cfg, progress=False)


def test_a_repaired_store_is_completed_by_the_same_extract_command(ray_local, tmp_path):
    """Truncated chunks found by `store check --repair` are recomputed by the same command; the
    store then equals a clean run, attention map included."""
    from rep_pipeline.pipeline.store import check_store

    reference = _cfg(tmp_path, store="ref.zarr", splits=("val",))
    run_extract(reference, progress=False)
    cfg = _cfg(tmp_path, splits=("val",))
    run_extract(cfg, progress=False)
    for name in ("keys/c.2.1.0.0.0", "attention_map/c.1.0.0"):
        path = cfg.store / "models/tiny-vit/synthetic/val" / name
        path.write_bytes(path.read_bytes()[:40])
    report = check_store(cfg.store, repair=True)
    assert len(report.problems) == 2 and report.repairs
    assert not is_done(cfg) and check_store(cfg.store).problems == []
    result = run_extract(cfg, progress=False)
    assert result.splits[0].chunks_computed == 2  # the attention map lost: every chunk again
    assert is_done(cfg) and validate_store(cfg.store) == []
    got, want = _arrays(cfg.store, "tiny-vit", "val"), _arrays(reference.store, "tiny-vit", "val")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_repaired_feature_chunk_keeps_the_attention_map(ray_local, tmp_path):
    from rep_pipeline.pipeline.store import check_store

    cfg = _cfg(tmp_path, splits=("train",))
    run_extract(cfg, progress=False)
    want = _arrays(cfg.store, "tiny-vit", "train")
    path = cfg.store / "models/tiny-vit/synthetic/train/tokens/c.0.1.0.0.0"
    path.write_bytes(b"\x00" * 9)
    assert check_store(cfg.store, repair=True).repairs
    redone = []
    run_extract(cfg, progress=False, on_chunk_done=lambda s, c, _: redone.append(c))
    assert redone == [1] and is_done(cfg)
    got = _arrays(cfg.store, "tiny-vit", "train")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_run_refused_on_its_second_split_creates_nothing(ray_local, tmp_path):
    """The first split's groups are not created when a later split's are of another producer."""
    run_extract(_cfg(tmp_path, splits=("val",), seed=1), progress=False)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(FingerprintMismatchError, match="weights_sha256"):
        run_extract(_cfg(tmp_path, splits=("train", "val"), seed=2), progress=False)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert ("tiny-vit", "synthetic", "train") not in FeatureStore(tmp_path / "s.zarr").model_splits()
