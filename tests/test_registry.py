import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from rep_pipeline.pipeline.checkpoints import load_weights_file, read_state_dict
from rep_pipeline.pipeline.errors import CheckpointError, UnknownModelError, WeightsUnavailableError
from rep_pipeline.pipeline.registry import build_model, check_weights, get_spec, input_size_for, list_models, state_dict_sha256



def test_every_registered_model_names_a_real_timm_model():
    specs = list_models()
    families = {s.family for s in specs}
    assert {"supervised", "openclip", "mae", "mocov3", "mugs", "ibot", "dino", "dinov2", "dinov2-reg",
            "dinov3", "tiny"} <= families
    for spec in specs:
        assert timm.is_model(spec.arch), spec
        if spec.hub:
            assert spec.timm_name in timm.list_pretrained(spec.timm_name), spec
    assert get_spec("dinov2-reg-l14").timm_name == "vit_large_patch14_reg4_dinov2.lvd142m"
    assert get_spec("vit_base_patch16_224.dino").alias == "dino-b16"


def test_any_timm_vit_resolves_and_other_architectures_are_refused():
    assert get_spec("vit_small_patch16_224").family == "timm"
    with pytest.raises(UnknownModelError, match="ViT and Eva"):
        get_spec("resnet18")
    with pytest.raises(UnknownModelError, match="registered"):
        get_spec("no-such-model")


@pytest.mark.parametrize("size,patch,expected", [(320, 16, 320), (320, 14, 322), (224, 14, 224), (100, 16, 96)])
def test_input_size_is_nearest_patch_multiple(size, patch, expected):
    assert input_size_for(size, patch) == expected


def test_tiny_models_build_with_seeded_weights(tiny_model):
    a, b = build_model(tiny_model, "random", seed=3), build_model(tiny_model, "random", seed=3)
    assert a.weights_sha256 == b.weights_sha256
    assert build_model(tiny_model, "random", seed=4).weights_sha256 != a.weights_sha256
    expected_patch = 14 if "dinov2" in tiny_model else 16
    assert (a.patch_size, a.input_size, a.grid) == (expected_patch, input_size_for(320, expected_patch),
                                                    input_size_for(320, expected_patch) // expected_patch)


def test_safetensors_round_trip_and_pos_embed_resampling(tmp_path):
    # weights saved from a model at 224 px load strictly into the 320 px model
    torch.manual_seed(0)
    src = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, embed_dim=64, depth=4, num_heads=4)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded = build_model("tiny-vit", str(path))
    assert loaded.weights_source == "file:w.safetensors"
    assert loaded.model.pos_embed.shape[1] == 1 + 20 * 20
    torch.testing.assert_close(loaded.model.blocks[2].attn.qkv.weight, src.blocks[2].attn.qkv.weight)


@pytest.mark.parametrize("name,arch", [("tiny-vit", "vit_base_patch16_224"),
                                       ("tiny-dinov3", "vit_base_patch16_dinov3")])
def test_checkpoint_with_classification_head_loads(tmp_path, name, arch):
    # a timm checkpoint saved with its classifier (as the hub's supervised ViT weights are):
    # the head is dropped, every other tensor must still fit
    headless = build_model(name, "random", seed=7)
    overrides = dict(get_spec(name).overrides, img_size=headless.input_size)
    src = timm.create_model(arch, pretrained=False, num_classes=10, **overrides)
    src.load_state_dict(headless.model.state_dict(), strict=False)
    state = src.state_dict()
    assert {"head.weight", "head.bias"} <= set(state)
    path = tmp_path / "with_head.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = build_model(name, str(path))
    assert loaded.weights_sha256 == headless.weights_sha256
    state["blocks.0.extra"] = torch.ones(1)  # anything else unknown is still refused
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.extra"):
        build_model(name, str(path))


@pytest.mark.parametrize("adapter,prefix,extra", [
    ("mocov3", "module.base_encoder.", {"module.base_encoder.head.0.weight": torch.ones(3),
                                       "module.momentum_encoder.cls_token": torch.ones(1)}),
    ("ibot", "backbone.", {"head.mlp.0.weight": torch.ones(2), "backbone.masked_embed": torch.ones(64)}),
    ("mugs", "backbone.", {"relation_blocks.0.norm.weight": torch.ones(2), "group_head.w": torch.ones(2)}),
])
def test_official_checkpoints_load_through_their_adapter(tmp_path, adapter, prefix, extra):
    tiny = build_model("tiny-vit", "random", seed=5)
    state = {prefix + k: v for k, v in tiny.model.state_dict().items()} | extra
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    target = build_model("tiny-vit", "random", seed=6).model
    load_weights_file(target, path, adapter)
    assert state_dict_sha256(target) == tiny.weights_sha256


def test_strict_loading_names_file_and_keys(tmp_path):
    state = build_model("tiny-vit", "random").model.state_dict()
    del state["blocks.1.mlp.fc1.weight"]
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"(?s)broken\.safetensors.*blocks\.1\.mlp\.fc1\.weight"):
        build_model("tiny-vit", str(path))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "obj": math.nan.__class__}, path)  # a class: not weights-only
    with pytest.raises(CheckpointError, match="evil.pth"):
        read_state_dict(path)


def test_pretrained_without_network_names_the_way_out(offline_hub):
    with pytest.raises(WeightsUnavailableError, match="--weights PATH"):
        check_weights("dino-b16", "pretrained")
    with pytest.raises(WeightsUnavailableError, match="--weights PATH"):
        build_model("dino-b16", "pretrained")
    with pytest.raises(WeightsUnavailableError, match="moco-v3"):
        check_weights("mocov3-b16", "pretrained")
    with pytest.raises(CheckpointError, match="does not exist"):
        check_weights("tiny-vit", "missing.safetensors")
