"""ULTra explanation maps (PROTOCOL.md 10.2, 10.11) on tiny random models: the tapped forward is the
model's own, the batched backward equals one backward per token, a one-block map equals the hand
computation, and zero gradients give the identity."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.pipeline.registry import build_model
from rep_pipeline.stages.explain.rollout import (
    Explainer,
    contribution_rows,
    self_fill,
    tokens_per_chunk,
)

MODELS = ("tiny-vit", "tiny-dinov2-reg", "tiny-dinov3")  # plain ViT, registers (/14), Eva with RoPE
SIZE = 48


@pytest.fixture(scope="module")
def loaded():
    return {name: build_model(name, "random", image_size=SIZE) for name in (*MODELS, "tiny-dinov3-qkvb")}


def _image(lm, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((1, 3, lm.input_size, lm.input_size), generator=gen)


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", (*MODELS, "tiny-dinov3-qkvb"))
def test_tapped_forward_reproduces_the_model(loaded, name):
    lm = loaded[name]
    x = torch.cat([_image(lm, 0), _image(lm, 1)])
    last = lm.depth - 1
    with torch.no_grad():
        final, inter = lm.model.forward_intermediates(x, indices=[0, 2, last], return_prefix_tokens=True,
                                                      output_fmt="NLC")  # timm's own (fused) attention
    own = {l: torch.cat((prefix, patch), 1) for l, (patch, prefix) in zip((0, 2, last), inter)}
    after = Explainer(lm, (0, 2, last)).embed(x)
    before = Explainer(lm, (last,), last_norm="before").embed(x)
    for layer in (0, 2):
        torch.testing.assert_close(after[layer], own[layer], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[last], final, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(before[last], own[last], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before[last], after[last])


def test_mid_tokens_are_the_input_of_norm2(loaded):
    lm = loaded["tiny-dinov3"]
    x = _image(lm)
    seen = {}
    hook = lm.model.blocks[1].norm2.register_forward_hook(lambda m, i, o: seen.update(x1=i[0], xn=o))
    with torch.no_grad():
        lm.model(x)
    hook.remove()
    torch.testing.assert_close(Explainer(lm, (1,), "mid_tokens").embed(x)[1], seen["x1"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Explainer(lm, (1,), "mid_normed").embed(x)[1], seen["xn"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", ["before", "after"])
def test_qkv_targets_equal_the_captured_ones(loaded, rope):
    from rep_pipeline.stages.extract.capture import CaptureSpec, FeatureCapture

    lm = loaded["tiny-dinov3"]
    x = _image(lm)
    npt = lm.num_prefix_tokens
    captured = FeatureCapture(lm, CaptureSpec(layers=(2,), embeddings=("queries", "keys", "values"),
                                              class_embeddings=("queries",), rope=rope))(x)
    for emb in ("queries", "keys", "values"):
        z = Explainer(lm, (2,), emb, rope=rope).embed(x)[2][0]
        stored = captured[emb][0, 0].reshape(-1, lm.embed_dim).float()
        torch.testing.assert_close(z[npt:], stored, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(Explainer(lm, (2,), "queries", rope=rope).embed(x)[2][0, 0],
                               captured["class_queries"][0, 0].float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("f", ["sum", "energy"])
def test_batched_backward_equals_one_backward_per_token(loaded, name, f):
    lm = loaded[name]
    x = _image(lm)
    layers = (1, lm.depth - 1)
    # a budget of two targets per chunk: several chunks, the last one short
    budget = 2 * (lm.depth * lm.num_heads * (lm.grid**2 + lm.num_prefix_tokens) ** 2 * 4)
    explainer = Explainer(lm, layers, f=f, memory_budget=budget)
    batched, reference = explainer.explain(x), explainer.explain(x, batched=False)
    embedded = explainer.embed(x)
    P = lm.grid**2
    for layer in layers:
        b, r = batched[layer], reference[layer]
        assert b.maps.shape == (P, P) and b.class_map.shape == (P,) and b.maps.dtype == torch.float32
        assert _relative(b.maps, r.maps) < 1e-4 and _relative(b.class_map, r.class_map) < 1e-4
        assert float(b.maps.std()) > 0 and bool((b.maps >= 0).all())  # a map, not a constant
        torch.testing.assert_close(b.z, embedded[layer][0], atol=1e-5, rtol=1e-5)
    # both layers from one forward equal each layer explained alone
    alone = Explainer(lm, (1,), f=f).explain(x)[1]
    assert _relative(batched[1].maps, alone.maps) < 1e-5


@pytest.mark.parametrize("embedding", ["queries", "mid_tokens"])
def test_other_targets_and_learned_vectors_match_the_reference(loaded, embedding):
    lm = loaded["tiny-dinov2-reg"]
    x = _image(lm)
    N = lm.grid**2 + lm.num_prefix_tokens
    w = torch.randn((N, lm.embed_dim), generator=torch.Generator().manual_seed(3))
    w = w / w.norm(dim=-1, keepdim=True)
    explainer = Explainer(lm, (2,), embedding, f=w)
    b, r = explainer.explain(x)[2], explainer.explain(x, batched=False)[2]
    assert _relative(b.maps, r.maps) < 1e-4 and _relative(b.class_map, r.class_map) < 1e-4
    shared = Explainer(lm, (2,), embedding, f="learned").explain(x, w=w[0])[2]
    assert shared.maps.shape == b.maps.shape
    with pytest.raises(ConfigError, match="unit vectors"):
        Explainer(lm, (2,), embedding, f="learned").explain(x, w=2 * w)


def _one_block(lm):
    model = copy.deepcopy(lm.model)
    model.blocks = model.blocks[:1]
    return dataclasses.replace(lm, model=model, depth=1)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-dinov3"])
def test_one_block_map_is_the_hand_computed_row(loaded, name):
    lm = _one_block(loaded[name])
    npt, P = lm.num_prefix_tokens, lm.grid**2
    x = _image(lm).requires_grad_(True)
    maps = Explainer(lm, (0,)).explain(x.detach())[0]
    # the reference: timm's own unfused attention, A read by a hook on its attn_drop
    attn = lm.model.blocks[0].attn
    attn.fused_attn, seen = False, {}
    hook = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.update(A=o))
    try:
        with torch.enable_grad():
            z = lm.model.forward_features(x)[0]  # after the final norm
            for i in [0, npt, npt + P // 2, npt + P - 1]:
                G, = torch.autograd.grad(z[i].sum(), seen["A"], retain_graph=True)
                A = seen["A"].detach()[0]
                C = torch.eye(A.shape[-1]) + (G[0].clamp(min=0) * A).mean(0)
                row = C[i, npt:]
                if i == 0:
                    assert _relative(maps.class_map, row) < 1e-5
                else:
                    p = i - npt
                    row[p] = torch.cat((row[:p], row[p + 1:])).max()
                    assert _relative(maps.maps[p], row) < 1e-5
                assert float(row.max()) > 0
    finally:
        hook.remove()
        attn.fused_attn = True


def test_zero_gradients_give_the_identity():
    H, N, T = 3, 7, 4
    gen = torch.Generator().manual_seed(0)
    attentions = [torch.rand((H, N, N), generator=gen).softmax(-1) for _ in range(3)]
    index = torch.tensor([0, 2, 5, 6])
    rows = contribution_rows([torch.zeros((T, H, N, N)), None, torch.zeros((T, H, N, N))], attentions, index)
    torch.testing.assert_close(rows, torch.eye(N)[index])
    # one block: the row is that of I + mean_h relu(G) * A
    G = [torch.rand((T, H, N, N), generator=gen) - 0.5 for _ in range(3)]
    C = [torch.eye(N) + (g.clamp(min=0) * a).mean(1) for g, a in zip(G, attentions)]  # (T, N, N)
    rows = contribution_rows([G[0].clone(), None, None], attentions, index)
    torch.testing.assert_close(rows, C[0][torch.arange(T), index])
    # three blocks: row i of C^2 C^1 C^0, the latest block on the left (A15)
    rows = contribution_rows([g.clone() for g in G], attentions, index)
    torch.testing.assert_close(rows, (C[2] @ C[1] @ C[0])[torch.arange(T), index])
    assert not torch.allclose(rows, (C[0] @ C[1] @ C[2])[torch.arange(T), index])


def test_target_that_no_attention_reaches_gives_empty_maps(loaded):
    """q of block 0 comes from the patch embedding alone: every C is I, S_i is one-hot on the
    token's own patch, and the self-fill replaces it with the largest other entry, 0."""
    lm = loaded["tiny-vit"]
    maps = Explainer(lm, (0,), "queries").explain(_image(lm))[0]
    assert not maps.maps.any() and not maps.class_map.any()


def test_self_fill_takes_the_largest_other_entry():
    maps = torch.tensor([[5.0, 1.0, 2.0], [0.5, 9.0, 0.25], [3.0, 1.0, 7.0]])
    assert self_fill(maps).tolist() == [[2.0, 1.0, 2.0], [0.5, 0.5, 0.25], [3.0, 1.0, 3.0]]


def test_tokens_per_chunk_follows_the_memory_formula():
    per_token = (11 + 1) * 12 * 401**2 * 4  # ViT-B at S = 320, last layer (PROTOCOL.md 10.8)
    assert tokens_per_chunk(16 * per_token, 11, 12, 401) == 16
    assert tokens_per_chunk(16 * per_token + per_token - 1, 11, 12, 401) == 16
    assert tokens_per_chunk(1.5e9, 11, 12, 401) == 16  # "1.5 GB for T = 16"
    assert tokens_per_chunk(0, 11, 12, 401) == tokens_per_chunk(per_token - 1, 11, 12, 401) == 1
    assert tokens_per_chunk(2**30, 0, 4, 10) == 2**30 // (4 * 100 * 4)


def test_bad_options_are_refused(loaded):
    lm = loaded["tiny-vit"]
    with pytest.raises(ConfigError, match="layers"):
        Explainer(lm, (lm.depth,))
    with pytest.raises(ConfigError, match="embedding"):
        Explainer(lm, (0,), "attention")
    with pytest.raises(ConfigError, match="f 'max'"):
        Explainer(lm, (0,), f="max")
    with pytest.raises(ConfigError, match="needs the unit vectors"):
        Explainer(lm, (0,), f="learned").explain(_image(lm))
    with pytest.raises(ConfigError, match="one image"):
        Explainer(lm, (0,)).explain(torch.cat([_image(lm)] * 2))
    with pytest.raises(ConfigError, match=r"\(N, D\)"):
        Explainer(lm, (0,), f=np.ones(3) / np.sqrt(3)).explain(_image(lm))
