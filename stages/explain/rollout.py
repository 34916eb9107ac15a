"""ULTra explanation maps of latent tokens (PROTOCOL.md 10.2): a relevance rollout of attention gradients.

For the target token i of embedding e at layer l and a scalar F_i = f(z_i), each block b <= l
contributes C_i^b = I + mean_h relu(dF_i/dA_h^b) * A_h^b, and the map S_i is row i of
R_i = C_i^l ... C_i^0 (latest block on the left, A15; blocks after z's producer are the identity,
A16) over the patch columns, its own patch filled with the largest other entry.

One forward per image: each block's attention ``forward`` is swapped for a twin that computes what
timm computes (q/k norms and RoPE included) but writes the attention out as softmax(q k^T scale),
so every A^b is a tensor of the graph (fused attention keeps none). Then, per explained layer,
chunks of T target tokens take one batched backward each (``is_grads_batched``: the cotangent of
token t is grad f(z_t) at row t and 0 elsewhere), and the gradients are reduced at once to rows
of R (vector-matrix products; the N x N products per token are never formed). The reference is
one plain backward per token (``batched=False``); the two agree to float rounding.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rep_pipeline.pipeline.attention import MID_BLOCKS, PROJECTIONS, attention_inputs, attention_output, rotate_qk
from rep_pipeline.pipeline.errors import ConfigError
from rep_pipeline.pipeline.registry import LoadedModel

Vector = torch.Tensor | np.ndarray

TARGETS = ("tokens", "queries", "keys", "values", "mid_tokens", "mid_normed")
SCALARS = ("sum", "energy", "learned")
BYTES_PER_VALUE = 4  # float32 gradients


@dataclass
class ExplanationMaps:
    """The maps of one image at one layer (float32, on the CPU).

    ``maps`` (P, P): row p is S_i of patch token i = n_pre + p over the P patch columns, after the
    self-fill, before min-max scaling. ``class_map`` (P,): the class token's S_0, no self-fill.
    ``z`` (N, D): the target embedding of every token, for the check against the store.
    """

    maps: torch.Tensor
    class_map: torch.Tensor
    z: torch.Tensor


def tokens_per_chunk(budget_bytes: int, layer: int, num_heads: int, n_tokens: int) -> int:
    """Target tokens per batched backward: T (l + 1) H N^2 x 4 bytes of gradients fit the budget
    (PROTOCOL.md 10.8), at least one."""
    per_token = (layer + 1) * num_heads * n_tokens**2 * BYTES_PER_VALUE
    return max(1, int(budget_bytes) // per_token)


def contribution_rows(grads: Sequence[torch.Tensor | None], attentions: Sequence[torch.Tensor],
                      token_index: torch.Tensor) -> torch.Tensor:
    """Row i of R_i = C_i^l ... C_i^0 for each target token i, from the gradients dF_i/dA^b.

    ``grads[b]`` (T, H, N, N) for blocks b = 0..l (row t belongs to target ``token_index[t]``;
    None: no gradient reached the block, C = I), ``attentions[b]`` (H, N, N). Starting from
    r = e_i, r <- r C_i^b = r + r (mean_h relu(G_h) * A_h) for b = l down to 0, one batched
    vector-matrix product per block. The gradients are overwritten (relu and product in place,
    so the chunk needs no memory beyond them). Returns (T, N) float32.
    """
    like = attentions[0]
    rows = F.one_hot(token_index.to(like.device, torch.long), like.shape[-1]).to(like.dtype)
    for grad, attn in zip(reversed(grads), reversed(attentions)):
        if grad is None:
            continue
        mixed = grad.relu_().mul_(attn).mean(1)  # (T, N, N): (1/H) sum_h relu(G_h) * A_h
        rows = rows + torch.bmm(rows.unsqueeze(1), mixed).squeeze(1)
    return rows


def self_fill(maps: torch.Tensor) -> torch.Tensor:
    """Each patch row's own entry (the diagonal of the (P, P) maps) set to its largest other entry."""
    others = maps.clone()
    others.diagonal().fill_(-torch.inf)
    filled = maps.clone()
    filled.diagonal().copy_(others.amax(1))
    return filled


class _Tape:
    """What the tapped forward records: each block's attention (graph tensors, when asked) and,
    for the target layers, q/k/v with heads side by side (before and after RoPE)."""

    def __init__(self, keep_attention: bool, qkv_blocks: Sequence[int]):
        self.keep_attention = keep_attention
        self.attentions: list[torch.Tensor] = []
        self.qkv_blocks = set(qkv_blocks)
        self.qkv: dict[tuple[int, str], torch.Tensor] = {}


class Explainer:
    """ULTra maps of every patch token and the class token of one image, at several layers.

    ``loaded``: a model of the registry (timm ``VisionTransformer`` or ``Eva``). ``layers``:
    block numbers. ``embedding``: the target e (``tokens``, the block output, the last block's
    after the final norm unless ``last_norm="before"``; ``queries``/``keys``/``values`` of the
    block, heads side by side, RoPE models before rotation unless ``rope="after"``; or
    ``mid_tokens``/``mid_normed``, x1 and norm2(x1)). ``f``: ``sum`` (f_s), ``energy`` (f_e),
    ``learned`` (f_w, the unit vectors given to ``explain``), or the unit-vector array w itself.
    ``memory_budget``: bytes of gradients per batched backward (sets the chunk of targets).
    """

    def __init__(self, loaded: LoadedModel, layers: tuple[int, ...], embedding: str = "tokens",
                 f: str | Vector = "sum", last_norm: str = "after", rope: str = "before",
                 memory_budget: int = 2**30):
        self.loaded, self.model = loaded, loaded.model
        self.layers = tuple(sorted(set(int(l) for l in layers)))
        depth = loaded.depth
        if not self.layers or not all(0 <= l < depth for l in self.layers):
            raise ConfigError(f"layers {list(layers)} must name blocks of {loaded.spec.alias} (0..{depth - 1})")
        if embedding not in TARGETS:
            raise ConfigError(f"embedding {embedding!r} cannot be explained; choose one of {', '.join(TARGETS)}")
        if last_norm not in ("after", "before") or rope not in ("before", "after"):
            raise ConfigError(f"last_norm must be after|before and rope before|after, not {last_norm!r}, {rope!r}")
        if loaded.num_prefix_tokens < 1:
            raise ConfigError(f"{loaded.spec.alias} has no class token; ULTra maps need one")
        self.w = None
        if isinstance(f, str):
            if f not in SCALARS:
                raise ConfigError(f"f {f!r} is unknown; choose one of {', '.join(SCALARS)} or pass the vectors w")
            self.f = f
        else:
            self.f, self.w = "learned", f
        for b, block in enumerate(self.model.blocks[: self.layers[-1] + 1]):
            if type(block.attn) not in PROJECTIONS:
                raise ConfigError(f"block {b} of {loaded.spec.alias} uses {type(block.attn).__name__}, which has no "
                                  f"tap (known: {', '.join(t.__name__ for t in PROJECTIONS)})")
            if embedding.startswith("mid_") and b in self.layers and not isinstance(block, MID_BLOCKS):
                raise ConfigError(f"block {b} of {loaded.spec.alias} is a {type(block).__name__}, whose norm2 does "
                                  f"not read x1; {embedding} is explained for "
                                  f"{', '.join(t.__name__ for t in MID_BLOCKS)} only")
        if any(p.dtype != torch.float32 for p in self.model.parameters()):
            raise ConfigError(f"{loaded.spec.alias} must be float32 to be explained")
        self.embedding, self.last_norm, self.rope = embedding, last_norm, rope
        self.memory_budget = int(memory_budget)
        self.model.eval().requires_grad_(False)

    # -- the forward ------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The target embedding (B, N, D) of a batch (B, 3, H, W) at every layer, without gradients
        (the same forward as ``explain``: the perturbation test compares the two)."""
        with torch.no_grad():
            z, _ = self._forward(x.to(torch.float32), keep_attention=False)
        return {l: t.detach() for l, t in z.items()}

    def _forward(self, x: torch.Tensor, keep_attention: bool) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
        """Targets z^(l) (B, N, D) per layer and the attentions A^0..A^max(l) (B, H, N, N)."""
        qkv_blocks = self.layers if self.embedding in ("queries", "keys", "values") else ()
        tape = _Tape(keep_attention, qkv_blocks)
        mids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with self._tapped(tape, mids), torch.autocast(x.device.type, enabled=False):
            final, inter = self.model.forward_intermediates(
                x, indices=list(self.layers), return_prefix_tokens=True, norm=False, stop_early=True,
                output_fmt="NLC")
        last, z = self.loaded.depth - 1, {}
        for layer, (patch, prefix) in zip(self.layers, inter):
            if self.embedding == "tokens":
                after = layer == last and self.last_norm == "after"
                z[layer] = final if after else torch.cat((prefix, patch), 1)
            elif self.embedding.startswith("mid_"):
                z[layer] = mids[layer][self.embedding == "mid_normed"]
            else:  # the rotated q/k exist for RoPE models only; v is never rotated
                key = (layer, f"{self.embedding}_rot")
                z[layer] = tape.qkv[key if self.rope == "after" and key in tape.qkv else (layer, self.embedding)]
        return z, tape.attentions

    @contextlib.contextmanager
    def _tapped(self, tape: _Tape, mids: dict) -> Iterator[None]:
        """Swap the attention forward of blocks 0..max(layers) (and hook norm2 for x1) for one pass."""
        blocks = self.model.blocks[: self.layers[-1] + 1]
        hooks = []
        for b, block in enumerate(blocks):
            block.attn.forward = self._attention_forward(block.attn, b, tape)  # shadows the method
        if self.embedding.startswith("mid_"):
            for layer in self.layers:
                def hook(module, inputs, output, layer=layer):
                    mids[layer] = (inputs[0], output)
                hooks.append(blocks[layer].norm2.register_forward_hook(hook))
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for block in blocks:
                del block.attn.forward

    def _attention_forward(self, attn: torch.nn.Module, block: int, tape: _Tape) -> Callable:
        """timm's attention math (both classes), with the softmax written out and recorded."""
        npt = getattr(attn, "num_prefix_tokens", self.loaded.num_prefix_tokens)

        def forward(x, rope=None, attn_mask=None, is_causal=False):
            B, N, _ = x.shape
            q, k, v, gate = attention_inputs(attn, x, attn_mask, is_causal, "explanations")
            if block in tape.qkv_blocks:
                for name, t in (("queries", q), ("keys", k), ("values", v)):
                    tape.qkv[(block, name)] = t.transpose(1, 2).reshape(B, N, -1)
            if rope is not None:  # as EvaAttention: the prefix tokens are not rotated
                q, k = rotate_qk(q, k, v, rope, attn, npt)
                if block in tape.qkv_blocks:
                    for name, t in (("queries_rot", q), ("keys_rot", k)):
                        tape.qkv[(block, name)] = t.transpose(1, 2).reshape(B, N, -1)
            a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
            if tape.keep_attention:
                tape.attentions.append(a)
            return attention_output(attn, a @ v, gate)

        return forward

    # -- the maps ---------------------------------------------------------------------------------
    def explain(self, x: torch.Tensor, w: Vector | Mapping[int, Vector] | None = None,
                batched: bool = True) -> dict[int, ExplanationMaps]:
        """The maps of one image ``x`` (1, 3, H, W), normalised model input, at every layer.

        ``w``: f_w's unit vectors, (N, D) one per token or (D,) shared (a mapping layer -> w for
        different ones per layer); only with f = learned. ``batched=False`` is the reference: one
        plain backward per token.
        """
        if x.ndim != 4 or x.shape[0] != 1:
            raise ConfigError(f"explain takes one image (1, 3, H, W), not {tuple(x.shape)}")
        if w is not None and self.f != "learned":
            raise ConfigError(f"w is given but f is {self.f!r}; it is used with f = learned only")
        w = self.w if w is None else w
        if self.f == "learned" and w is None:
            raise ConfigError("f = learned needs the unit vectors w")
        npt = self.loaded.num_prefix_tokens
        x = x.detach().to(torch.float32).requires_grad_(True)
        out = {}
        with torch.enable_grad():
            z_all, attentions = self._forward(x, keep_attention=True)
            attn_rows = [a.detach()[0] for a in attentions]  # (H, N, N) each
            for layer in self.layers:
                z = z_all[layer]
                N = z.shape[1]
                targets = torch.cat((torch.zeros(1, dtype=torch.long), torch.arange(npt, N))).to(z.device)
                w_layer = self._vectors(w[layer] if isinstance(w, Mapping) else w, z) if self.f == "learned" else None
                graph = (z, attentions[: layer + 1], attn_rows[: layer + 1])
                rows = (self._rows_batched(*graph, targets, w_layer) if batched
                        else self._rows_per_token(*graph, targets, w_layer))
                patch = rows[:, npt:]  # (1 + P, P): the class token first, then every patch token
                out[layer] = ExplanationMaps(maps=self_fill(patch[1:]).float().cpu(),
                                             class_map=patch[0].float().cpu(), z=z.detach()[0].float().cpu())
        return out

    def _vectors(self, w: Vector, z: torch.Tensor) -> torch.Tensor:
        """f_w's unit vectors as an (N, D) tensor, checked (used literally: never rescaled)."""
        N, D = z.shape[1:]
        w = torch.as_tensor(w, dtype=z.dtype, device=z.device)
        if w.shape == (D,):
            w = w.expand(N, D)
        if w.shape != (N, D):
            raise ConfigError(f"w must be (N, D) = ({N}, {D}) or ({D},), not {tuple(w.shape)}")
        norms = w.norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            raise ConfigError(f"w must hold unit vectors (PROTOCOL.md 10.2); norms range "
                              f"{norms.min().item():.4g}..{norms.max().item():.4g}")
        return w

    def _scalar(self, z_i: torch.Tensor, w_i: torch.Tensor | None) -> torch.Tensor:
        """F_i = f(z_i) as a graph scalar."""
        if self.f == "sum":
            return z_i.sum()
        if self.f == "energy":
            return (z_i * z_i).sum()
        return (z_i * w_i).sum()

    def _cotangents(self, z: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """grad f(z_i) for every token (N, D): 1, 2 z_i or w_i."""
        z = z.detach()[0]
        if self.f == "sum":
            return torch.ones_like(z)
        if self.f == "energy":
            return 2 * z
        return w

    def _rows_batched(self, z: torch.Tensor, attentions: list[torch.Tensor], attn_rows: list[torch.Tensor],
                      targets: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """Rows of R for every target, T targets per batched backward."""
        N = z.shape[1]
        layer = len(attentions) - 1
        T = tokens_per_chunk(self.memory_budget, layer, attn_rows[0].shape[0], N)
        cot = self._cotangents(z, w)
        rows = z.new_empty((len(targets), N))
        for start in range(0, len(targets), T):
            chunk = targets[start:start + T]
            seed = z.new_zeros((len(chunk), *z.shape))  # (T, 1, N, D): grad f(z_i) at row i
            seed[torch.arange(len(chunk), device=z.device), 0, chunk] = cot[chunk]
            grads = torch.autograd.grad(z, attentions, seed, retain_graph=True, is_grads_batched=True,
                                        allow_unused=True)
            grads = [None if g is None else g[:, 0] for g in grads]  # (T, H, N, N)
            rows[start:start + T] = contribution_rows(grads, attn_rows, chunk)
            del grads, seed
        return rows

    def _rows_per_token(self, z: torch.Tensor, attentions: list[torch.Tensor], attn_rows: list[torch.Tensor],
                        targets: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """Rows of R for every target, one plain backward of F_i = f(z_i) each (the reference)."""
        rows = z.new_empty((len(targets), z.shape[1]))
        for t, i in enumerate(targets.tolist()):
            F_i = self._scalar(z[0, i], None if w is None else w[i])
            grads = torch.autograd.grad(F_i, attentions, retain_graph=True, allow_unused=True)
            rows[t] = contribution_rows(list(grads), attn_rows,
                                        torch.tensor([i]))[0]
        return rows
