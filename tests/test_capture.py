"""The captured q/k/v/tokens/attention equal independent recomputations, for every path."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat

from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.pipeline.registry import build_model
from rep_pipeline.stages.extract.capture import CaptureSpec, FeatureCapture, Scratch, log_normaliser, patch_attention


B = 2


def _block_inputs(model, x):
    """Each block's input, from a plain forward pass with pre-hooks (no capture involved)."""
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, a[0]), with_kwargs=True)
             for i, blk in enumerate(model.blocks)]
    with torch.inference_mode():
        model.forward_features(x)
    for h in hooks:
        h.remove()
    return seen


def _manual_qkv(attn, x):
    """q, k, v (B, N, D) straight from the layer's weights; biases read off the module."""
    if getattr(attn, "qkv", None) is not None:
        weight = attn.qkv.weight
        bias = attn.qkv.bias if hasattr(attn.qkv, "bias") and attn.qkv.bias is not None else None
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        return F.linear(x, weight, bias).chunk(3, dim=-1)
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


def _setup(name, **spec):
    lm = build_model(name, "random", seed=1)
    cap = FeatureCapture(lm, CaptureSpec(layers=tuple(range(lm.depth)), **spec))
    torch.manual_seed(0)
    x = torch.randn(B, 3, lm.input_size, lm.input_size)
    return lm, cap, x


def test_qkv_equal_recomputation_from_weights(tiny_model):
    lm, cap, x = _setup(tiny_model)
    out = cap(x)
    inputs = _block_inputs(lm.model, x)
    npt, G = lm.num_prefix_tokens, lm.grid
    for layer, blk in enumerate(lm.model.blocks):
        with torch.inference_mode():
            q, k, v = _manual_qkv(blk.attn, blk.norm1(inputs[layer]))
        for emb, ref in (("queries", q), ("keys", k), ("values", v)):
            got = out[emb][layer].float()
            want = ref[:, npt:].reshape(B, G, G, -1)
            torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3, msg=f"{tiny_model} layer {layer} {emb}")


def test_tokens_and_class_tokens_equal_forward_intermediates(tiny_model):
    lm, cap, x = _setup(tiny_model)
    out = cap(x)
    npt, G, last = lm.num_prefix_tokens, lm.grid, lm.depth - 1
    with torch.inference_mode():
        final, inter = lm.model.forward_intermediates(x, indices=list(range(lm.depth)), return_prefix_tokens=True,
                                                      output_fmt="NLC")
        features = lm.model.forward_features(x)
    torch.testing.assert_close(final, features)
    for layer, (patch, prefix) in enumerate(inter):
        if layer == last:  # default: after the final norm
            patch, prefix = features[:, npt:], features[:, :npt]
        torch.testing.assert_close(out["tokens"][layer].float(), patch.reshape(B, G, G, -1), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(out["class_tokens"][layer].float(), prefix[:, 0], atol=2e-3, rtol=2e-3)
    before = FeatureCapture(lm, CaptureSpec(layers=(last,), last_norm="before"))(x)
    torch.testing.assert_close(before["tokens"][0].float(), inter[last][0].reshape(B, G, G, -1), atol=2e-3, rtol=2e-3)


def test_attention_mi_equals_the_definition(tiny_model):
    """I(K,Q) from q, k recomputed by hand, with RoPE where the model uses it."""
    lm, cap, x = _setup(tiny_model)
    out = cap(x)
    model, npt, H = lm.model, lm.num_prefix_tokens, lm.num_heads
    inputs = _block_inputs(model, x)
    rope = model._pos_embed(model.patch_embed(x))[1] if hasattr(model, "rope") and model.rope is not None else None
    for layer in (0, lm.depth - 1):
        attn = model.blocks[layer].attn
        with torch.inference_mode():
            q, k, _ = _manual_qkv(attn, model.blocks[layer].norm1(inputs[layer]))
        heads = lambda t: t.reshape(B, t.shape[1], H, -1).transpose(1, 2)  # noqa: E731
        q, k = heads(q), heads(k)
        if rope is not None:
            half = attn.rotate_half
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], 2)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)[:, :, npt:, npt:].double()
        a = a / a.sum(-1, keepdim=True)
        P = a.shape[-1]
        joint = a / P
        p_q, p_k = joint.sum(-1, keepdim=True), joint.sum(-2, keepdim=True)
        mi = (joint * torch.log(joint / (p_q * p_k))).sum((-1, -2))
        torch.testing.assert_close(out["attention_mi"][layer].double(), mi, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(out["attention_sum"][layer].double(), a.mean(1).sum(0), atol=1e-5, rtol=1e-4)


def test_rope_after_option_rotates_queries_and_keys():
    lm, _, x = _setup("tiny-dinov3")
    before = FeatureCapture(lm, CaptureSpec(layers=(1,)))(x)
    after = FeatureCapture(lm, CaptureSpec(layers=(1,), rope="after"))(x)
    rope = lm.model._pos_embed(lm.model.patch_embed(x))[1]
    H = lm.num_heads
    for emb in ("queries", "keys"):
        q = before[emb][0].float().reshape(B, -1, H, lm.embed_dim // H).transpose(1, 2)
        rotated = apply_rot_embed_cat(q, rope, half=True).transpose(1, 2).reshape(after[emb][0].shape)
        torch.testing.assert_close(after[emb][0].float(), rotated, atol=3e-3, rtol=3e-3)
        assert not torch.allclose(after[emb][0].float(), before[emb][0].float(), atol=1e-2)
    torch.testing.assert_close(after["values"], before["values"])


def _statistics(logits):
    """(I(K, Q) per head, head-averaged attention) of patch logits (heads, P, P), as the capture
    computes them: through ``patch_attention``, with q = the logits' rows and k = the identity
    (scale 1), behind one prefix token."""
    H, P, _ = logits.shape
    q = torch.zeros(1, H, P + 1, P, dtype=logits.dtype)
    k = torch.zeros_like(q)
    q[0, :, 1:], k[0, :, 1:] = logits, torch.eye(P, dtype=logits.dtype)
    sum_out = torch.zeros(P, P, dtype=logits.dtype)
    _, mi = patch_attention(q, k, torch.randn_like(q), 1.0, 1, sum_out)
    return mi[0], sum_out


def _mi_definition(logits):
    """I(K, Q) = sum P(q, k) log(P(q, k) / (P(q) P(k))) with P(q, k) = A[q, k] / P, in float64."""
    a = logits.double().softmax(-1)
    joint = a / a.shape[-1]
    p_q, p_k = joint.sum(-1, keepdim=True), joint.sum(-2, keepdim=True)
    return (joint * torch.log(joint / (p_q * p_k))).nan_to_num().sum((-1, -2))


def test_mutual_information_closed_forms():
    """A gap of 1e4 in the logits makes softmax exact zeros."""
    P, far = 50, -1e4
    eye = torch.eye(P, dtype=torch.float64)
    identity = ((1 - eye) * far)[None]
    uniform = torch.zeros((1, P, P), dtype=torch.float64)
    # attending to the left neighbour or itself with equal weight: H(K) = log P, rows log 2
    shift = ((1 - eye - torch.roll(eye, 1, 1)) * far)[None]
    for logits, expected in ((identity, math.log(P)), (uniform, 0.0), (shift, math.log(P) - math.log(2))):
        mi, mean = _statistics(logits)
        assert mi.item() == pytest.approx(expected, abs=1e-12)
        torch.testing.assert_close(mean, logits[0].softmax(-1))


def test_mutual_information_equals_its_definition_on_random_logits():
    logits = torch.randn(3, 40, 40, dtype=torch.float64) * 4
    mi, mean = _statistics(logits)
    torch.testing.assert_close(mi, _mi_definition(logits), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(mean, logits.softmax(-1).mean(0))


def test_log_normaliser_holds_where_the_first_key_underflows():
    """lse read off key 0, and off the row maxima where A[q, 0] is zero or subnormal in float32."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 40, 40) * 4
    logits[0, :, ::3, 0] = -300.0  # A[q, 0] = 0
    logits[1, :, 1::3, 0] = logits[1, :, 1::3].amax(-1) - 95.0  # A[q, 0] ~ 5e-42, subnormal
    attn = logits.softmax(-1)
    lse = log_normaliser(logits, attn)
    torch.testing.assert_close(lse, logits.double().logsumexp(-1).float(), atol=2e-5, rtol=1e-6)
    for image in range(2):
        torch.testing.assert_close(_statistics(logits[image])[0].double(), _mi_definition(logits[image]),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("npt", [1, 5])
@pytest.mark.parametrize("sink", [0.0, 80.0])
@pytest.mark.parametrize("images_per_step", [None, 2])
def test_patch_attention_equals_the_models_attention(npt, sink, images_per_step):
    """The merged patch/prefix softmax is the model's attention, even when the prefix keys take
    nearly all of it (registers as attention sinks: logits 80 above the patch keys'), for the
    batch at once and in steps of 2 images (the last step 1)."""
    torch.manual_seed(0)
    h, n, d = 3, npt + 36, 8
    q, k, v = (torch.randn(3, h, n, d, dtype=torch.float64) for _ in range(3))
    k[:, :, :npt] = q[:, :, npt:].mean(2, keepdim=True) * sink / d  # prefix logits ~ +sink
    scale = d ** -0.5
    want = F.scaled_dot_product_attention(q, k, v, scale=scale)[:, :, npt:]
    logits = (q[:, :, npt:] * scale) @ k[:, :, npt:].transpose(-1, -2)
    want_mi, want_mean = _mi_definition(logits), logits.softmax(-1).mean(1)
    scratch = Scratch()
    # fresh temporaries, then the same memory twice, then a smaller batch (new shapes)
    for kept, b in ((None, 3), (scratch, 3), (scratch, 3), (scratch, 1)):
        sum_out = torch.zeros(36, 36, dtype=torch.float64)
        y, mi = patch_attention(q[:b], k[:b], v[:b], scale, npt, sum_out, kept, images_per_step)
        torch.testing.assert_close(y, want[:b], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(mi, want_mi[:b], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(sum_out, want_mean[:b].sum(0))


def test_only_requested_layers_and_embeddings_are_captured():
    lm = build_model("tiny-dinov2-reg", "random")
    out = FeatureCapture(lm, CaptureSpec(layers=(0, 2), embeddings=("keys", "tokens")))(torch.randn(1, 3, 322, 322))
    assert set(out) == {"keys", "tokens", "class_tokens", "attention_mi", "attention_sum"}
    assert out["keys"].shape == (2, 1, 23, 23, 64) and out["keys"].dtype == torch.float16
    assert out["attention_sum"].shape == (2, 529, 529)
    with pytest.raises(ConfigError, match="blocks 0..3"):
        FeatureCapture(lm, CaptureSpec(layers=(7,)))


@pytest.mark.integration  # a torch.compile of 10 to 20 s
def test_compiled_statistics_equal_the_eager_ones():
    lm, _, x = _setup("tiny-dinov3")
    eager = FeatureCapture(lm, CaptureSpec(layers=(0, 3)))(x)
    fused = FeatureCapture(lm, CaptureSpec(layers=(0, 3), compile_statistics=True))(x)
    torch.testing.assert_close(fused["attention_mi"], eager["attention_mi"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused["attention_sum"], eager["attention_sum"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused["keys"], eager["keys"])


def _mlp_branch(blk, x):
    """What the block adds after its attention branch: ls2(mlp(norm2(x))) (EvaBlock: gamma_2)."""
    y = blk.mlp(blk.norm2(x))
    if getattr(blk, "gamma_2", None) is not None:
        return blk.gamma_2 * y
    return blk.ls2(y) if hasattr(blk, "ls2") else y


def test_mid_tokens_are_the_residual_stream_before_the_mlp(tiny_model):
    """PROTOCOL.md 8.1: tokens - mid_tokens = ls2(mlp(norm2(mid_tokens))), mid_normed =
    norm2(mid_tokens), and every class_<embedding> is the class token's (token 0) value."""
    everything = ("queries", "keys", "values", "tokens", "mid_tokens", "mid_normed")
    lm, cap, x = _setup(tiny_model, embeddings=everything, class_embeddings=everything, last_norm="before")
    out = cap(x)
    inputs = _block_inputs(lm.model, x)
    D = lm.embed_dim
    for layer, blk in enumerate(lm.model.blocks):
        mid = out["mid_tokens"][layer].float().reshape(B, -1, D)
        tokens = out["tokens"][layer].float().reshape(B, -1, D)
        with torch.inference_mode():
            branch = _mlp_branch(blk, mid)
            normed = blk.norm2(mid)
            _, k, v = _manual_qkv(blk.attn, blk.norm1(inputs[layer]))
        torch.testing.assert_close(tokens - mid, branch, atol=2e-2, rtol=1e-2, msg=f"{tiny_model} layer {layer}")
        torch.testing.assert_close(out["mid_normed"][layer].float().reshape(B, -1, D), normed, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(out["class_keys"][layer].float(), k[:, 0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(out["class_values"][layer].float(), v[:, 0], atol=2e-3, rtol=2e-3)
        class_mid, class_tokens = out["class_mid_tokens"][layer].float(), out["class_tokens"][layer].float()
        with torch.inference_mode():
            torch.testing.assert_close(class_tokens - class_mid, _mlp_branch(blk, class_mid), atol=2e-2, rtol=1e-2)


def test_a_block_whose_norm2_is_not_before_the_mlp_is_refused_by_name():
    from timm.models.vision_transformer import ResPostBlock

    lm = build_model("tiny-vit", "random", seed=1)
    lm.model.blocks[1] = ResPostBlock(lm.embed_dim, lm.num_heads)
    FeatureCapture(lm, CaptureSpec(layers=(1,), embeddings=("keys",), class_embeddings=()))  # fine without x1
    with pytest.raises(ConfigError, match="block 1 of tiny-vit is a ResPostBlock"):
        FeatureCapture(lm, CaptureSpec(layers=(1,), embeddings=("keys", "mid_tokens")))
