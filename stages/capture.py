"""One forward pass that yields every embedding PROTOCOL.md section 2 asks for.

For each chosen block the attention module's ``forward`` is swapped, for the duration of one
pass, for a tapped twin that computes exactly what timm's unfused path computes and records
q, k, v (heads concatenated along channels, patch tokens only) and the attention statistics
of section 5. Block outputs come from timm's own ``forward_intermediates``. Each attention
class names its q/k/v projection in ``ATTENTION_TAPS``; the rest is shared.
"""
from __future__ import annotations

import contextlib
import functools
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
    compile_statistics: bool = False  # fuse the attention statistics with torch.compile


def attention_statistics(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(I(K, Q) per head, head-averaged attention) of attention logits ``logits`` (heads, P, P).

    With A = softmax(logits), P(q, k) = A[q, k] / P, P(q) = 1/P and P(k) = mean_q A[q, k], the
    mutual information (natural log) is H(K) - mean_q H(A[q, :]): log P for identity attention,
    0 for uniform attention. Since log A[q, k] = logits[q, k] - lse_q, each row entropy is
    lse_q - sum_k A[q, k] logits[q, k], and lse_q = max_k logits[q, k] - log max_k A[q, k]: no
    logarithm of the (heads, P, P) matrix is taken (that alone was half the cost).
    """
    attn = logits.softmax(dim=-1)
    lse = logits.amax(dim=-1) - attn.amax(dim=-1).log()
    h_rows = lse - torch.linalg.vecdot(attn, logits)
    p_k = attn.mean(dim=-2)
    h_k = -torch.special.xlogy(p_k, p_k).sum(-1)
    return h_k - h_rows.mean(-1), attn.mean(dim=0)


def _image_attention_statistics(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(I(K,Q) per head, head-averaged attention) of one image's patch q, k (heads, P, d)."""
    return attention_statistics(((q * scale) @ k.transpose(-2, -1)).float())


@functools.cache
def _compiled() -> Callable:
    """The statistics as one fused kernel (torch.compile); built on first use, cached on disk."""
    return torch.compile(_image_attention_statistics, dynamic=False)


def patch_attention_statistics(q: torch.Tensor, k: torch.Tensor, scale: float, mi_out: torch.Tensor,
                               sum_out: torch.Tensor, compiled: bool = False) -> None:
    """Attention statistics of patch queries over patch keys, written into the outputs.

    ``q``, ``k``: (B, heads, P, d) patch tokens only (after RoPE where the model uses it).
    Softmax over the patch keys of the patch logits *is* the patch block of the model's
    attention with renormalised rows. ``mi_out`` (B, heads) gets I(K, Q) per image and head;
    ``sum_out`` (P, P) gets the head-averaged attention summed over the images. One image at a
    time, so the (heads, P, P) temporaries stay in cache: that halves the cost on a CPU.
    ``compiled`` fuses the per-image work into one kernel with torch.compile (about 1.2x faster
    statistics on a CPU, measured on ViT-B shapes, after a one-off compilation of some 20 s).
    """
    stats = _compiled() if compiled else _image_attention_statistics
    for b in range(q.shape[0]):
        mi, mean = stats(q[b], k[b], scale)
        mi_out[b] = mi
        sum_out += mean


class FeatureCapture:
    """Runs a loaded model on normalised pixels and returns the captured arrays.

    Returns, for a batch of B images and L chosen layers (G x G patches, D channels, H heads):
    one ``(L, B, G, G, D)`` float16 tensor per embedding, ``class_tokens`` ``(L, B, D)``,
    ``attention_mi`` ``(L, B, H)`` float32 and ``attention_sum`` ``(L, P, P)`` float32, the
    head-averaged patch-to-patch attention summed over the batch's images. Each output is
    allocated once per batch and filled in place, each value cast to float16 in one copy.
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
        self._qkv_wanted = tuple(e for e in ("queries", "keys", "values") if e in spec.embeddings)

    def _allocate(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        lm, L = self.loaded, len(self.spec.layers)
        G, D, H, P = lm.grid, lm.embed_dim, lm.num_heads, lm.grid * lm.grid
        half = dict(dtype=torch.float16, device=device)
        out = {e: torch.empty((L, batch, G, G, D), **half) for e in self.spec.embeddings}
        out["class_tokens"] = torch.empty((L, batch, D), **half)
        out["attention_mi"] = torch.empty((L, batch, H), dtype=torch.float32, device=device)
        out["attention_sum"] = torch.zeros((L, P, P), dtype=torch.float32, device=device)
        return out

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        spec, lm = self.spec, self.loaded
        B, npt, last = pixels.shape[0], lm.num_prefix_tokens, lm.depth - 1
        out = self._allocate(B, pixels.device)
        with self._tapped(out):
            final, inter = self.model.forward_intermediates(
                pixels, indices=list(spec.layers), return_prefix_tokens=True, norm=False,
                stop_early=True, output_fmt="NLC",
            )
        for slot, (layer, (patch, prefix)) in enumerate(zip(spec.layers, inter)):
            if layer == last and spec.last_norm == "after":
                patch, prefix = final[:, npt:], final[:, :npt]
            if "tokens" in out:
                out["tokens"][slot].view(B, -1, lm.embed_dim).copy_(patch)
            out["class_tokens"][slot].copy_(prefix[:, 0])
        return out

    @contextlib.contextmanager
    def _tapped(self, out: dict[str, torch.Tensor]) -> Iterator[None]:
        blocks = self.model.blocks
        for slot, i in enumerate(self.spec.layers):
            attn = blocks[i].attn
            attn.forward = self._make_forward(attn, out, slot)  # instance attribute shadows the method
        try:
            yield
        finally:
            for i in self.spec.layers:
                del blocks[i].attn.forward

    def _make_forward(self, attn: torch.nn.Module, out: dict[str, torch.Tensor], slot: int) -> Callable:
        project = ATTENTION_TAPS[type(attn)]
        npt, keep_rotated = self.loaded.num_prefix_tokens, self.spec.rope == "after"
        wanted, compiled = self._qkv_wanted, self.spec.compile_statistics

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
            for emb in wanted:  # (B, h, N, d) -> (B, P, h, d) patch rows, heads side by side
                t = kept[emb][:, :, npt:].transpose(1, 2)
                out[emb][slot].view(t.shape).copy_(t)
            patch_attention_statistics(q_rot[:, :, npt:], k_rot[:, :, npt:], attn.scale,
                                       out["attention_mi"][slot], out["attention_sum"][slot], compiled)
            y = F.scaled_dot_product_attention(q_rot, k_rot, v)  # timm's own (fused) path
            y = attn.norm(y.transpose(1, 2).reshape(B, N, -1))
            if gate is not None:
                y = y * gate
            return attn.proj_drop(attn.proj(y))

        return forward
