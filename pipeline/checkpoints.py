"""Reading weight files safely and adapting their keys to timm's modules.

Files are read with safetensors or ``torch.load(weights_only=True)``; never with plain pickle.
Each family whose official checkpoints are not timm's own names an adapter here; the adapter
renames keys, and timm's own ``checkpoint_filter_fn`` of the architecture then resamples
position embeddings to the input size, so loading can stay strict. A classification head,
which the headless models here have no use for, is dropped as timm drops it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from .errors import CheckpointError

StateDict = dict[str, torch.Tensor]

# Containers that official training scripts wrap the weights in, tried in this order.
_CONTAINER_KEYS = ("state_dict", "model", "teacher", "module")


def read_state_dict(path: str | Path) -> StateDict:
    """The tensors of a ``.safetensors``, ``.pth``/``.pt``/``.bin`` file, unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(
                f"weights file {path}: unknown suffix {path.suffix!r}; use .safetensors or .pth"
            )
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors / torch raise many types for a damaged file
        raise CheckpointError(f"weights file {path} cannot be read safely: {exc}") from exc
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _CONTAINER_KEYS if k in obj), None)
        if inner is None:
            raise CheckpointError(
                f"weights file {path} holds no state dict (top-level keys: {sorted(obj)[:8]})"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_and_drop(prefixes: tuple[str, ...], drop: tuple[str, ...]) -> Callable[[StateDict], StateDict]:
    drop_re = re.compile("|".join(drop)) if drop else None

    def adapt(state: StateDict) -> StateDict:
        out: StateDict = {}
        for key, value in state.items():
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
            if drop_re is not None and drop_re.match(key):
                continue
            out[key] = value
        return out

    return adapt


# Key adapters by name; a registry entry names the one its checkpoints need.
CHECKPOINT_ADAPTERS: dict[str, Callable[[StateDict], StateDict]] = {
    "timm": _strip_and_drop(("module.",), ()),
    # MoCo v3 (facebookresearch/moco-v3): ``module.base_encoder.*``, projector in ``head``;
    # the momentum encoder is dropped with it.
    "mocov3": _strip_and_drop(
        ("module.", "base_encoder."), (r"momentum_encoder\.", r"predictor\.", r"head\.")
    ),
    # iBOT (bytedance/ibot): ``backbone.*`` (teacher), ``head.*`` projection, ``masked_embed``.
    "ibot": _strip_and_drop(("module.", "backbone."), (r"head\.", r"masked_embed")),
    # Mugs (sail-sg/mugs): ``backbone.*``, several heads and the ``relation_blocks``.
    "mugs": _strip_and_drop(
        ("module.", "backbone."),
        (r"head\.", r".*_head\.", r"relation_blocks\.", r"group_head", r"instance_head", r"masked_embed"),
    ),
}


def adapt_state_dict(state: StateDict, adapter: str, model: torch.nn.Module) -> StateDict:
    """Rename keys with the family's adapter, then let timm fit them to ``model``."""
    try:
        state = CHECKPOINT_ADAPTERS[adapter](state)
    except KeyError as exc:
        raise CheckpointError(
            f"no checkpoint adapter {adapter!r}; known: {', '.join(CHECKPOINT_ADAPTERS)}"
        ) from exc
    module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    return _without_unused_classifier(state, model)


def _without_unused_classifier(state: StateDict, model: torch.nn.Module) -> StateDict:
    """Drop the classification head's weight and bias when ``model`` is built without one.

    rep-pipeline builds every model with ``num_classes=0``; a checkpoint saved with its head
    (supervised ViT, OpenCLIP's projection) then carries keys the model has no place for.
    timm's own pretrained loading drops exactly these; every other key stays strict.
    """
    if getattr(model, "num_classes", None) != 0:
        return state
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    unused = {f"{name}.{param}" for name in names for param in ("weight", "bias")}
    return {key: value for key, value in state.items() if key not in unused}


def load_weights_file(model: torch.nn.Module, path: str | Path, adapter: str) -> None:
    """Load ``path`` into ``model`` strictly; on a mismatch, one message that names the file
    and counts the missing, unexpected and misshapen keys (a few of each as examples)."""
    try:
        state = adapt_state_dict(read_state_dict(path), adapter, model)
    except CheckpointError:
        raise
    except Exception as exc:  # timm's key filters fail in many ways on another architecture
        raise CheckpointError(f"weights file {path} does not fit {type(model).__name__} (adapter {adapter!r}): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    own = model.state_dict()
    problems = {
        "missing": [k for k in own if k not in state],
        "unexpected": [k for k in state if k not in own],
        "of another shape": [f"{k} {tuple(state[k].shape)} for {tuple(own[k].shape)}" for k in own
                             if k in state and tuple(state[k].shape) != tuple(own[k].shape)],
    }
    if any(problems.values()):
        counts = "; ".join(f"{len(keys)} keys {what} (e.g. {', '.join(keys[:3])})"
                           for what, keys in problems.items() if keys)
        raise CheckpointError(f"weights file {path} does not fit {type(model).__name__} with {len(own)} tensors "
                              f"(adapter {adapter!r}): {counts}. Is it a checkpoint of another architecture or size?")
    model.load_state_dict(state, strict=True)
