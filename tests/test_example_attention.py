"""Per-image attention rows of the example images (PROTOCOL.md 12.5, A37): captured, stored by a
real extract, carried into the evaluation maps, and checked against timm's own attention."""
import numpy as np
import pytest
import torch

from rep_pipeline.pipeline.config import EvaluateConfig, ExtractConfig
from rep_pipeline.pipeline.errors import FingerprintMismatchError, StoreError
from rep_pipeline.pipeline.registry import build_model
from rep_pipeline.pipeline.results import Results
from rep_pipeline.pipeline.store import FeatureStore, check_store, validate_store
from rep_pipeline.stages.evaluate import run_evaluate
from rep_pipeline.stages.extract import Extractor, is_done, run_extract
from rep_pipeline.stages.extract.capture import CaptureSpec, FeatureCapture
from rep_pipeline.storage_schemas import results as results_layout


EXAMPLES = 8  # feature_store.EXAMPLE_IMAGES, retyped: the split's first 8 images


def timm_patch_attention(model, pixels, npt):
    """(layer, image, P, P) float64: timm's own attention probabilities of a plain forward (its
    unfused path, read at ``attn_drop``), the patch block with its rows renormalised, averaged
    over the heads."""
    seen, hooks = {}, []
    for i, block in enumerate(model.blocks):
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)))
    try:
        with torch.inference_mode():
            model.forward_features(pixels)
    finally:
        for i, block in enumerate(model.blocks):
            block.attn.fused_attn = True
        for hook in hooks:
            hook.remove()
    rows = []
    for i in range(len(model.blocks)):
        a = seen[i][:, :, npt:, npt:].double()
        rows.append((a / a.sum(-1, keepdim=True)).mean(1))
    return torch.stack(rows)


def test_captured_rows_are_timms_attention_of_the_first_images(tiny_model):
    lm = build_model(tiny_model, "random", seed=1)
    cap = FeatureCapture(lm, CaptureSpec(layers=tuple(range(lm.depth))))
    torch.manual_seed(0)
    x = torch.randn(3, 3, lm.input_size, lm.input_size)
    out = cap(x, examples=2)
    assert out["example_attention"].shape == (lm.depth, 2, lm.grid ** 2, lm.grid ** 2)
    assert out["example_attention"].dtype == torch.float32
    want = timm_patch_attention(lm.model, x, lm.num_prefix_tokens)
    torch.testing.assert_close(out["example_attention"].double(), want[:, :2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["attention_sum"].double(), want.sum(1), atol=1e-5, rtol=1e-4)
    assert "example_attention" not in cap(x)  # only on request
    with pytest.raises(ValueError, match="examples=4"):
        cap(x, examples=4)


def _cfg(tmp_path, store="s.zarr", **kw):
    return ExtractConfig(model="tiny-dinov3", weights="random", store=tmp_path / store, chunk_images=3,
                         layers=(0, 3), splits=("train", "val"), embeddings=("keys",),
                         dataset_options={"sizes": {"train": 4, "val": 10}}, **kw)


def _evaluated_maps(cfg, results):
    """Evaluate the val split with a hand-written codebook on train (no clustering needed for
    the attention maps) and return the results' maps."""
    train = FeatureStore(cfg.store, mode="a").model_split(cfg.model, "synthetic", "train")
    book = train.require_codebook("lloyd", 2, 0, {"tol": 0.0})
    for layer in cfg.layers:
        book.write("keys", layer, np.eye(2, train.read_features("keys", layer, 0, 1).shape[-1], dtype=np.float32))
    run_evaluate(EvaluateConfig(store=cfg.store, split="val", results=results, models=(cfg.model,)), progress=False)
    return Results(results).maps()


def test_extract_stores_the_example_rows_and_evaluate_carries_them(ray_local, tmp_path):
    """10 images in chunks of 3: the 8 examples end inside the third chunk."""
    cfg = _cfg(tmp_path, example_attention=True)
    run_extract(cfg, progress=False)
    assert validate_store(cfg.store) == [] and check_store(cfg.store).problems == []
    assert is_done(cfg)
    group = FeatureStore(cfg.store).model_split("tiny-dinov3", "synthetic", "val")
    rows, ids = group.example_attention()
    data = FeatureStore(cfg.store).dataset_split("synthetic", "val")
    assert ids == data.image_ids()[:EXAMPLES]
    P = group.attrs["grid"] ** 2
    assert rows.shape == (2, EXAMPLES, P, P) and rows.dtype == np.float32
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)

    # the same images through the model as timm computes it, from the pipeline's input
    extractor = Extractor(cfg)
    items = extractor.items("val")[:EXAMPLES]
    images, _, _, geometry = extractor.load_batch(items)
    assert np.array_equal(images, data.example_images())
    model = build_model("tiny-dinov3", "random", seed=cfg.seed)
    want = timm_patch_attention(model.model, extractor.to_model_input(images, geometry), model.num_prefix_tokens)
    np.testing.assert_allclose(rows, want[[0, 3]].numpy(), atol=1e-5, rtol=1e-4)
    # the image mean of the same rows over all 10 images is the stored average matrix
    all_items = extractor.items("val")
    all_images, _, _, all_geometry = extractor.load_batch(all_items)
    mean = timm_patch_attention(model.model, extractor.to_model_input(all_images, all_geometry),
                                model.num_prefix_tokens)[[0, 3]].mean(1)
    np.testing.assert_allclose(group.attention_map(), mean.numpy(), atol=1e-5, rtol=1e-4)

    maps = _evaluated_maps(cfg, tmp_path / "results")
    path = results_layout.attention_maps("synthetic", "val", "tiny-dinov3")
    assert maps.attrs(path)["example_ids"] == ids
    np.testing.assert_array_equal(maps.read(path, "example_attention"), rows)
    np.testing.assert_array_equal(maps.read(path, "attention"), group.attention_map())


def test_a_store_without_the_rows_keeps_its_fingerprint_and_refuses_them_clearly(ray_local, tmp_path):
    plain = _cfg(tmp_path)
    run_extract(plain, progress=False)
    group = FeatureStore(plain.store).model_split("tiny-dinov3", "synthetic", "val")
    assert "example_attention" not in group.attrs and "example_attention" not in group.group
    assert not group.has_example_attention
    with pytest.raises(StoreError, match="example_attention.*--example-attention"):
        group.example_attention()
    maps = _evaluated_maps(plain, tmp_path / "results")
    path = results_layout.attention_maps("synthetic", "val", "tiny-dinov3")
    assert "example_ids" not in maps.attrs(path)
    np.testing.assert_array_equal(maps.read(path, "attention"), group.attention_map())

    wanted = _cfg(tmp_path, example_attention=True)
    assert not is_done(wanted)
    with pytest.raises(FingerprintMismatchError, match="without example_attention.*--example-attention"):
        run_extract(wanted, progress=False)
    assert "example_attention" not in FeatureStore(plain.store).model_split("tiny-dinov3", "synthetic", "val").group
    # the features of either run, side by side under another model key
    run_extract(_cfg(tmp_path, example_attention=True, model_key="tiny-dinov3-rows"), progress=False)
    other = FeatureStore(plain.store).model_split("tiny-dinov3-rows", "synthetic", "val")
    assert other.has_example_attention and other.fingerprint_hash != group.fingerprint_hash
    np.testing.assert_array_equal(other.array("keys")[:], group.array("keys")[:])
    with pytest.raises(FingerprintMismatchError, match="with example_attention.*asks without"):
        run_extract(_cfg(tmp_path, model_key="tiny-dinov3-rows"), progress=False)
