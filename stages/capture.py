"""One forward pass that yields every embedding PROTOCOL.md section 2 asks for.

For each chosen block the attention module's ``forward`` is swapped, for the duration of one
pass, for a tapped twin that computes exactly what timm's unfused path computes and records
q, k, v (heads concatenated along channels, patch tokens only) and the attention statistics
of section 5. Block outputs come from timm's own ``forward_intermediates``. Each attention
class names its q/k/v projection in ``ATTENTION_TAPS``; the rest is shared.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.layers.attention import Attention
from timm.models.eva import EvaAttention

from pipeline import config
from pipeline.errors import ConfigError
from pipeline.registry import LoadedModel

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # each (B, heads, N, head_dim)


def _project_vit(attn: Attention, x: torch.Tensor) -> QKV:
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def _project_eva(attn: EvaAttention, x: torch.Tensor) -> QKV:
    B, N, _ = x.shape
    if attn.qkv is not None:
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:  # the qkv module only holds the weight here, as in timm
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
        return qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    split = lambda t: t.reshape(B, N, attn.num_heads, -1).transpose(1, 2)  # noqa: E731
    return split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))


# attention class -> its q/k/v projection; a new ViT variant registers one line here
ATTENTION_TAPS: dict[type, Callable[[torch.nn.Module, torch.Tensor], QKV]] = {
    Attention: _project_vit,
    EvaAttention: _project_eva,
}


@dataclass(frozen=True)
class CaptureSpec:
    layers: tuple[int, ...]
    embeddings: tuple[str, ...] = config.EMBEDDINGS
    rope: str = "before"        # q/k before or after rotary embedding
    last_norm: str = "after"    # last block's tokens after or before the final norm


def attention_mutual_information(attn: torch.Tensor) -> torch.Tensor:
    """I(K, Q) of row-stochastic attention ``attn`` (..., P, P), natural log.

    With P(q, k) = A[q, k] / P, P(q) = 1/P and P(k) = mean_q A[q, k], the mutual information
    is H(K) - mean_q H(A[q, :]): log P for identity attention, 0 for uniform attention.
    """
    p_k = attn.mean(dim=-2)
    h_k = -torch.special.xlogy(p_k, p_k).sum(-1)
    h_rows = -torch.special.xlogy(attn, attn).sum(-1).mean(-1)
    return h_k - h_rows


class FeatureCapture:
    """Runs a loaded model on normalised pixels and returns the captured arrays.

    Returns, for a batch of B images and L chosen layers (G x G patches, D channels, H heads):
    one ``(L, B, G, G, D)`` float16 tensor per embedding, ``class_tokens`` ``(L, B, D)``,
    ``attention_mi`` ``(L, B, H)`` float32 and ``attention_sum`` ``(L, P, P)`` float32, the
    head-averaged patch-to-patch attention summed over the batch's images.
    """

    def __init__(self, loaded: LoadedModel, spec: CaptureSpec):
        self.loaded, self.spec = loaded, spec
        self.model = loaded.model
        depth = loaded.depth
        bad = [i for i in spec.layers if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"layers {bad} do not exist in {loaded.spec.alias} (blocks 0..{depth - 1})")
        if loaded.num_prefix_tokens < 1:
            raise ConfigError(f"{loaded.spec.alias} has no class token; rep-pipeline needs one")
        for i in spec.layers:
            if type(self.model.blocks[i].attn) not in ATTENTION_TAPS:
                raise ConfigError(
                    f"block {i} of {loaded.spec.alias} uses {type(self.model.blocks[i].attn).__name__}, "
                    f"which has no capture tap (known: {', '.join(t.__name__ for t in ATTENTION_TAPS)})"
                )
        self._qkv_wanted = [e for e in ("queries", "keys", "values") if e in spec.embeddings]

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        spec, lm = self.spec, self.loaded
        records: dict[int, dict[str, torch.Tensor]] = {i: {} for i in spec.layers}
        with self._tapped(records):
            final, inter = self.model.forward_intermediates(
                pixels, indices=list(spec.layers), return_prefix_tokens=True, norm=False,
                stop_early=True, output_fmt="NLC",
            )
        B, G, npt = pixels.shape[0], lm.grid, lm.num_prefix_tokens
        last = lm.depth - 1
        tokens, cls = [], []
        for layer, (patch, prefix) in zip(spec.layers, inter):
            if layer == last and spec.last_norm == "after":
                patch, prefix = final[:, npt:], final[:, :npt]
            tokens.append(patch)
            cls.append(prefix[:, 0])
        out: dict[str, torch.Tensor] = {}
        grid = lambda t: t.reshape(B, G, G, -1)  # noqa: E731
        for emb in self._qkv_wanted:
            out[emb] = torch.stack([grid(records[i][emb]) for i in spec.layers]).to(torch.float16)
        if "tokens" in spec.embeddings:
            out["tokens"] = torch.stack([grid(t) for t in tokens]).to(torch.float16)
        out["class_tokens"] = torch.stack(cls).to(torch.float16)
        out["attention_mi"] = torch.stack([records[i]["attention_mi"] for i in spec.layers])
        out["attention_sum"] = torch.stack([records[i]["attention_sum"] for i in spec.layers])
        return out

    @contextlib.contextmanager
    def _tapped(self, records: dict[int, dict[str, torch.Tensor]]) -> Iterator[None]:
        blocks = self.model.blocks
        for i, rec in records.items():
            attn = blocks[i].attn
            attn.forward = self._make_forward(attn, rec)  # instance attribute shadows the method
        try:
            yield
        finally:
            for i in records:
                del blocks[i].attn.forward

    def _make_forward(self, attn: torch.nn.Module, rec: dict[str, torch.Tensor]) -> Callable:
        project = ATTENTION_TAPS[type(attn)]
        npt, keep_rotated = self.loaded.num_prefix_tokens, self.spec.rope == "after"
        wanted = self._qkv_wanted

        def patches(t: torch.Tensor) -> torch.Tensor:  # (B, h, N, d) -> (B, P, h*d)
            B, h, _, d = t.shape
            return t[:, :, npt:].transpose(1, 2).reshape(B, -1, h * d)

        def forward(x, rope=None, attn_mask=None, is_causal=False):
            if attn_mask is not None or is_causal:
                raise NotImplementedError("capture runs full bidirectional attention only")
            B, N, _ = x.shape
            gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
            q, k, v = project(attn, x)
            q, k = attn.q_norm(q), attn.k_norm(k)
            if rope is not None:  # as EvaAttention: prefix tokens are not rotated
                half = getattr(attn, "rotate_half", False)
                q_rot = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], 2).type_as(v)
                k_rot = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], 2).type_as(v)
            else:
                q_rot, k_rot = q, k
            kept = {"queries": q_rot if keep_rotated else q, "keys": k_rot if keep_rotated else k, "values": v}
            for emb in wanted:
                rec[emb] = patches(kept[emb])
            weights = ((q_rot * attn.scale) @ k_rot.transpose(-2, -1)).softmax(dim=-1)
            patch_attn = weights[:, :, npt:, npt:].float()
            patch_attn = patch_attn / patch_attn.sum(dim=-1, keepdim=True)
            rec["attention_mi"] = attention_mutual_information(patch_attn)
            rec["attention_sum"] = patch_attn.mean(dim=1).sum(dim=0)
            y = (attn.attn_drop(weights) @ v).transpose(1, 2).reshape(B, N, -1)
            y = attn.norm(y)
            if gate is not None:
                y = y * gate
            return attn.proj_drop(attn.proj(y))

        return forward
