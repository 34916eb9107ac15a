"""One forward pass that yields every embedding PROTOCOL.md section 2 asks for.

For each chosen block the attention module's ``forward`` is swapped, for the duration of one
pass, for a tapped twin that computes what timm's attention computes (to float rounding) and
records q, k, v (heads concatenated along channels) and the attention statistics of
section 5, which share the patch softmax with the model's own attention output
(``patch_attention``). Block outputs come from timm's own ``forward_intermediates``; x1, the
residual stream between a block's attention and MLP branches, is the input of its ``norm2``
(a forward hook, which gives norm2(x1) as well; section 8.1). The attention classes' q/k/v
projections and the blocks whose ``norm2`` reads x1 are ``pipeline/attention.py``'s, shared
with the explain stage; the rest is shared between the classes. Every embedding is kept for the patch tokens and, on request,
for the class token (prefix token 0, never rotated by RoPE).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from rep_pipeline.pipeline import config
from rep_pipeline.pipeline.attention import MID_BLOCKS, PROJECTIONS, attention_inputs, attention_output, rotate_qk
from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.pipeline.registry import LoadedModel
from rep_pipeline.storage_schemas.feature_store import EXAMPLE_ATTENTION, class_array

MID_EMBEDDINGS = ("mid_tokens", "mid_normed")


@dataclass(frozen=True)
class CaptureSpec:
    layers: tuple[int, ...]
    embeddings: tuple[str, ...] = config.DEFAULT_EMBEDDINGS
    class_embeddings: tuple[str, ...] = ("tokens",)  # whose class token is kept too
    rope: str = "before"        # q/k before or after rotary embedding
    last_norm: str = "after"    # last block's tokens after or before the final norm
    compile_statistics: bool = False  # fuse the attention statistics with torch.compile


def log_normaliser(logits: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Each row's log-sum-exp of ``logits`` (..., P, P), given ``attn``, their softmax.

    log A[q, k] = logits[q, k] - lse_q for every key k, so one entry per row gives lse_q: key 0
    on the CPU, far cheaper than the row maxima, while A[q, 0] is a normal float; the rows where
    it is not take the maxima (A >= 1/P there, so its log is precise). On an accelerator and
    inside torch.compile the maxima throughout: a search for such rows would stall the device
    or break the graph.
    """
    by_maxima = lambda rows: logits[rows].amax(dim=-1) - attn[rows].amax(dim=-1).log()  # noqa: E731
    if attn.device.type != "cpu" or torch.compiler.is_compiling():
        return by_maxima(...)
    first = attn[..., 0]
    lse = logits[..., 0] - first.log()
    weak = first < torch.finfo(attn.dtype).tiny
    if weak.any():
        lse[weak] = by_maxima(weak)
    return lse


def _mutual_information(lse: torch.Tensor, weighted: torch.Tensor, p_k: torch.Tensor) -> torch.Tensor:
    """I(K, Q) per head from three reductions (..., heads, P) of the attention A = softmax(logits).

    With P(q, k) = A[q, k] / P, P(q) = 1/P and P(k) = mean_q A[q, k] (``p_k``), the mutual
    information (natural log) is H(K) - mean_q H(A[q, :]): log P for identity attention, 0 for
    uniform attention. Since log A[q, k] = logits[q, k] - lse_q, each row entropy is lse_q -
    sum_k A[q, k] logits[q, k] (``weighted`` the sum), so no logarithm of the (heads, P, P)
    matrix is taken.
    """
    return -torch.special.xlogy(p_k, p_k).sum(-1) - (lse - weighted).mean(-1)


class Scratch:
    """Scratch tensors kept by name and handed out again on the next call.

    The statistics' (heads, P, P) temporaries are megabytes per image and layer; allocated
    afresh each time they are returned to the OS and faulted in again page by page, which
    costs more than the arithmetic on them.
    """

    def __init__(self):
        self._tensors: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], like: torch.Tensor,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        t = self._tensors.get(name)
        if t is None or t.shape != shape or t.dtype != dtype or t.device != like.device:
            t = self._tensors[name] = torch.empty(shape, dtype=dtype, device=like.device)
        return t


def _fresh(*_args, **_kwargs) -> None:
    """No scratch: each op allocates its output (what torch.compile wants)."""
    return None


def patch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, npt: int,
                    sum_out: torch.Tensor, scratch: Scratch | None = None,
                    images_per_step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's attention output for the patch queries, and the statistics on the way.

    ``q``, ``k``, ``v``: (B, heads, N, d), the first ``npt`` tokens the prefix. The softmax
    of the patch queries over the patch keys *is* the patch block of the model's attention
    with renormalised rows (PROTOCOL.md s. 5), so it is computed once and serves both: the
    statistics read it, and the model's output merges it with the prefix keys' part by their
    log-sum-exps, as flash attention merges key blocks. Returns (y (B, heads, P, d), I(K, Q)
    (B, heads)) and adds the head-averaged attention, summed over the images, to ``sum_out``
    (P, P).

    Only the steps that read the (heads, P, P) attention run ``images_per_step`` images at a
    time (default all; one image on a CPU keeps it in cache); the reductions to I(K, Q) and
    the prefix merge run once on the whole batch. ``scratch`` keeps the temporaries from one
    call to the next.
    """
    scratch = scratch or _fresh
    q_patch = q[..., npt:, :] * scale
    keys_t, values = k[..., npt:, :].transpose(-2, -1), v[..., npt:, :]
    B, H, P, _ = q_patch.shape
    step = images_per_step or B
    wide = torch.promote_types(q.dtype, torch.float32)  # statistics in float32 at least
    lse, weighted, p_k = q.new_empty((3, B, H, P), dtype=wide).unbind(0)
    y = torch.empty_like(values)
    head_mean = q.new_full((1, step * H), 1.0 / H, dtype=wide)
    for b in range(0, B, step):
        images = slice(b, b + step)
        shape = (min(step, B - b), H, P, P)
        logits = torch.matmul(q_patch[images], keys_t[images], out=scratch("logits", shape, q)).to(wide)
        attn = torch.softmax(logits, -1, out=scratch("attn", shape, q, wide))
        lse[images] = log_normaliser(logits, attn)
        torch.sum(logits.mul_(attn), -1, out=weighted[images])  # the logits are not read again
        torch.mean(attn, -2, out=p_k[images])
        sum_out.view(1, -1).addmm_(head_mean[:, :shape[0] * H], attn.view(-1, P * P))
        torch.matmul(attn.to(v.dtype), values[images], out=y[images])
    mi = _mutual_information(lse, weighted, p_k)
    # To the model's softmax the patch keys are one key with logit lse (their log-sum-exp): a
    # softmax over [prefix logits; lse] weighs each prefix key and the patch block as a whole.
    # Laid out (npt + 1, P), as a softmax over a short last axis is ten times slower.
    prefix_logits = (k[..., :npt, :] @ q_patch.transpose(-2, -1)).to(wide)  # (B, heads, npt, P)
    share = torch.cat((prefix_logits, lse.unsqueeze(-2)), -2).softmax(-2).to(v.dtype)
    y.mul_(share[..., npt, :].unsqueeze(-1))
    y += share[..., :npt, :].transpose(-2, -1) @ v[..., :npt, :]
    return y, mi


def head_mean_attention(q: torch.Tensor, k: torch.Tensor, scale: float, npt: int, out: torch.Tensor) -> None:
    """``out`` (n, P, P) = each image's head-averaged patch-to-patch attention, for the first n
    images of ``q``, ``k`` (B, heads, N, d): the softmax of the patch queries over the patch keys
    (the patch block of the model's attention with renormalised rows, PROTOCOL.md s. 5), as
    ``patch_attention`` forms it, averaged over the heads in float32 at least. One image at a
    time: the (heads, P, P) temporary stays small. Kept for the split's example images only
    (``example_attention``, section 12.5)."""
    wide = torch.promote_types(q.dtype, torch.float32)
    for i in range(out.shape[0]):
        logits = (q[i, :, npt:] * scale) @ k[i, :, npt:].transpose(-2, -1)
        out[i] = logits.to(wide).softmax(-1).mean(0)


@functools.cache
def _compiled() -> Callable:
    """``patch_attention`` as fused kernels (torch.compile); built on first use, cached on disk."""
    return torch.compile(patch_attention, dynamic=False)


def attention_with_statistics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, npt: int,
                              mi_out: torch.Tensor, sum_out: torch.Tensor, compiled: bool = False,
                              scratch: Scratch | None = None) -> torch.Tensor:
    """The model's attention (B, heads, N, d) of q, k, v, with the statistics written on the way.

    ``mi_out`` (B, heads) gets I(K, Q) per image and head, ``sum_out`` (P, P) the head-averaged
    patch attention summed over the images. On a CPU the attention is formed one image at a
    time (the temporaries stay in cache), on a GPU for the batch; compiled, each step is one
    call of the fused kernels. The prefix queries' rows are the model's own fused attention.
    """
    B = q.shape[0]
    y = torch.empty_like(v)
    y[:, :, :npt] = F.scaled_dot_product_attention(q[:, :, :npt], k, v, scale=scale)
    step = 1 if q.device.type == "cpu" else B
    if not compiled:
        y[:, :, npt:], mi_out[:] = patch_attention(q, k, v, scale, npt, sum_out, scratch, images_per_step=step)
        return y
    for b in range(0, B, step):
        images = slice(b, b + step)
        y[images, :, npt:], mi_out[images] = _compiled()(q[images], k[images], v[images], scale, npt, sum_out)
    return y


class FeatureCapture:
    """Runs a loaded model on normalised pixels and returns the captured arrays.

    Returns, for a batch of B images and L chosen layers (G x G patches, D channels, H heads):
    one ``(L, B, G, G, D)`` float16 tensor per embedding, ``class_tokens`` ``(L, B, D)``,
    ``attention_mi`` ``(L, B, H)`` float32 and ``attention_sum`` ``(L, P, P)`` float32, the
    head-averaged patch-to-patch attention summed over the batch's images; called with
    ``examples=n`` > 0, also ``example_attention`` ``(L, n, P, P)`` float32, that attention of
    each of the batch's first n images (``head_mean_attention``). Each output is allocated once
    per batch and filled in place, each value cast to float16 in one copy.
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
            block = self.model.blocks[i]
            if set(MID_EMBEDDINGS) & set(spec.embeddings) and not isinstance(block, MID_BLOCKS):
                raise ConfigError(f"block {i} of {loaded.spec.alias} is a {type(block).__name__}, whose norm2 does not "
                                  f"take the residual stream x1; mid_tokens and mid_normed are captured from "
                                  f"{', '.join(t.__name__ for t in MID_BLOCKS)} only")
            if type(self.model.blocks[i].attn) not in PROJECTIONS:
                raise ConfigError(
                    f"block {i} of {loaded.spec.alias} uses {type(self.model.blocks[i].attn).__name__}, "
                    f"which has no capture tap (known: {', '.join(t.__name__ for t in PROJECTIONS)})"
                )
        self._qkv_wanted = tuple(e for e in ("queries", "keys", "values") if e in spec.embeddings)
        self._mid_wanted = tuple(e for e in MID_EMBEDDINGS if e in spec.embeddings)
        self._scratch = Scratch()  # the statistics' temporaries, reused by every layer and batch

    def _allocate(self, batch: int, device: torch.device, examples: int = 0) -> dict[str, torch.Tensor]:
        lm, L = self.loaded, len(self.spec.layers)
        G, D, H, P = lm.grid, lm.embed_dim, lm.num_heads, lm.grid * lm.grid
        half = dict(dtype=torch.float16, device=device)
        out = {e: torch.empty((L, batch, G, G, D), **half) for e in self.spec.embeddings}
        out.update({class_array(e): torch.empty((L, batch, D), **half) for e in self.spec.class_embeddings})
        out["attention_mi"] = torch.empty((L, batch, H), dtype=torch.float32, device=device)
        out["attention_sum"] = torch.zeros((L, P, P), dtype=torch.float32, device=device)
        if examples:
            out[EXAMPLE_ATTENTION] = torch.empty((L, examples, P, P), dtype=torch.float32, device=device)
        return out

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor, examples: int = 0) -> dict[str, torch.Tensor]:
        """The captured arrays of a batch (see the class); ``examples``: how many of its first
        images are example images whose attention rows are kept too (``example_attention``)."""
        spec, lm = self.spec, self.loaded
        B, npt, last = pixels.shape[0], lm.num_prefix_tokens, lm.depth - 1
        if not 0 <= examples <= B:
            raise ValueError(f"examples={examples}: the batch has {B} images")
        out = self._allocate(B, pixels.device, examples)
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
            if class_array("tokens") in out:
                out[class_array("tokens")][slot].copy_(prefix[:, 0])
        return out

    @contextlib.contextmanager
    def _tapped(self, out: dict[str, torch.Tensor]) -> Iterator[None]:
        blocks = self.model.blocks
        hooks = []
        for slot, i in enumerate(self.spec.layers):
            attn = blocks[i].attn
            attn.forward = self._make_forward(attn, out, slot)  # instance attribute shadows the method
            if self._mid_wanted:
                hooks.append(blocks[i].norm2.register_forward_hook(self._make_mid_hook(out, slot)))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for i in self.spec.layers:
                del blocks[i].attn.forward

    def _make_mid_hook(self, out: dict[str, torch.Tensor], slot: int) -> Callable:
        """norm2's hook: its input is x1 (mid_tokens), its output norm2(x1) (mid_normed)."""
        npt = self.loaded.num_prefix_tokens

        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            for emb, x in (("mid_tokens", inputs[0]), ("mid_normed", output)):
                if emb in out:
                    out[emb][slot].view(x.shape[0], -1, x.shape[-1]).copy_(x[:, npt:])
                if class_array(emb) in out:
                    out[class_array(emb)][slot].copy_(x[:, 0])

        return hook

    def _make_forward(self, attn: torch.nn.Module, out: dict[str, torch.Tensor], slot: int) -> Callable:
        npt, keep_rotated = self.loaded.num_prefix_tokens, self.spec.rope == "after"
        wanted, compiled = self._qkv_wanted, self.spec.compile_statistics

        def forward(x, rope=None, attn_mask=None, is_causal=False):
            B = x.shape[0]
            q, k, v, gate = attention_inputs(attn, x, attn_mask, is_causal, "capture")
            if rope is not None:  # as EvaAttention: prefix tokens are not rotated
                q_rot, k_rot = rotate_qk(q, k, v, rope, attn, npt)
            else:
                q_rot, k_rot = q, k
            kept = {"queries": q_rot if keep_rotated else q, "keys": k_rot if keep_rotated else k, "values": v}
            for emb in wanted:  # (B, h, N, d) -> (B, P, h, d) patch rows, heads side by side
                t = kept[emb][:, :, npt:].transpose(1, 2)
                out[emb][slot].view(t.shape).copy_(t)
                if class_array(emb) in out:  # the class token (never rotated), heads side by side
                    out[class_array(emb)][slot].copy_(kept[emb][:, :, 0].reshape(B, -1))
            y = attention_with_statistics(q_rot, k_rot, v, attn.scale, npt, out["attention_mi"][slot],
                                          out["attention_sum"][slot], compiled, self._scratch)
            if EXAMPLE_ATTENTION in out:
                head_mean_attention(q_rot, k_rot, attn.scale, npt, out[EXAMPLE_ATTENTION][slot])
            return attention_output(attn, y, gate)

        return forward
