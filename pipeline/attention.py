"""timm's attention math, for the stages that re-run it with taps (extract's capture, explain's
rollout): each attention class's q/k/v projection, the blocks whose ``norm2`` reads x1, the
rotary embedding as ``EvaAttention`` applies it, and the two ends of the forward both taps
share (``attention_inputs``: q, k, v and the output gate; ``attention_output``: heads to the
block's residual branch). A new ViT attention class registers one line in ``PROJECTIONS``."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.layers.attention import Attention
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.vision_transformer import Block

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # each (B, heads, N, head_dim)


def _project_vit(attn: Attention, x: torch.Tensor) -> QKV:
    """timm ``Attention``: one fused qkv linear."""
    B, N, _ = x.shape
    return attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def _project_eva(attn: EvaAttention, x: torch.Tensor) -> QKV:
    """timm ``EvaAttention``: fused qkv (with q/v biases outside the linear, or none) or three linears."""
    B, N, _ = x.shape
    if attn.qkv is None:
        heads = lambda t: t.reshape(B, N, attn.num_heads, -1).transpose(1, 2)  # noqa: E731
        return heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    if attn.q_bias is None:
        qkv = attn.qkv(x)
    else:  # the qkv module only holds the weight here, as in timm
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
    return qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


# attention class -> its q/k/v projection
PROJECTIONS: dict[type, Callable[[torch.nn.Module, torch.Tensor], QKV]] = {
    Attention: _project_vit,
    EvaAttention: _project_eva,
}

# block classes whose norm2 takes x1 = x + ls1(attn(norm1(x))) (ResPostBlock and parallel
# blocks do not: mid_tokens and mid_normed are refused for them by name)
MID_BLOCKS: tuple[type, ...] = (Block, EvaBlock)


def rotate(t: torch.Tensor, rope: torch.Tensor, attn: torch.nn.Module, n_prefix: int) -> torch.Tensor:
    """q or k (B, heads, N, head_dim) with the rotary embedding applied to the patch tokens only,
    as ``EvaAttention`` does (prefix tokens are not rotated)."""
    half = getattr(attn, "rotate_half", False)
    return torch.cat([t[:, :, :n_prefix], apply_rot_embed_cat(t[:, :, n_prefix:], rope, half=half)], 2)


def attention_inputs(attn: torch.nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     is_causal: bool = False, who: str = "a tapped forward"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The start of timm's attention forward on ``x`` (B, N, C): (q, k, v, gate), q and k after
    ``q_norm``/``k_norm`` and before any rotary embedding, each (B, heads, N, head_dim); gate the
    sigmoid output gate where the class has one, else None. Masks are refused, naming ``who``."""
    if attn_mask is not None or is_causal:
        raise NotImplementedError(f"{who} runs full bidirectional attention only")
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = PROJECTIONS[type(attn)](attn, x)
    return attn.q_norm(q), attn.k_norm(k), v, gate


def rotate_qk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor, attn: torch.nn.Module,
              n_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k with the rotary embedding (``rotate``), in v's dtype, as ``EvaAttention``."""
    return rotate(q, rope, attn, n_prefix).type_as(v), rotate(k, rope, attn, n_prefix).type_as(v)


def attention_output(attn: torch.nn.Module, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The end of the forward: the attended values ``y`` (B, heads, N, head_dim), heads side by
    side, through ``attn.norm``, the gate and the output projection."""
    B, _, N, _ = y.shape
    y = attn.norm(y.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        y = y * gate
    return attn.proj_drop(attn.proj(y))
