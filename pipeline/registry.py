"""The model registry: every family of PROTOCOL.md section 2 by timm name and short alias.

Entries are registered one line each over a private builder, as timm does with its own
models. Any other timm ViT/Eva name resolves too, as an unregistered "timm" entry. Tiny,
randomly initialised members of each architecture path serve the tests and the demo.
"""
from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Mapping

from . import config
from .errors import CheckpointError, ConfigError, UnknownModelError, WeightsUnavailableError

if TYPE_CHECKING:
    import torch


def _timm() -> ModuleType:
    """timm (and torch with it), imported on first need: the registry's own entries and the
    errors about them come without that cost."""
    import timm

    return timm


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model: a timm architecture, its hub tag, and how its weights load."""

    alias: str
    timm_name: str                       # "arch" or "arch.tag"
    family: str
    size: str                            # "tiny" | "base" | "large" | "?"
    adapter: str = "timm"                # checkpoint key adapter (pipeline.checkpoints)
    hub: bool = True                     # pretrained weights reachable through timm's hub
    weights_hint: str = ""               # where official weights come from, for error messages
    overrides: Mapping[str, Any] = field(default_factory=dict)  # create_model kwargs

    @property
    def arch(self) -> str:
        return self.timm_name.split(".")[0]


_REGISTRY: dict[str, ModelSpec] = {}
_BY_TIMM_NAME: dict[str, ModelSpec] = {}


def register(alias: str, timm_name: str, family: str, size: str, **kwargs: Any) -> ModelSpec:
    spec = ModelSpec(alias, timm_name, family, size, **kwargs)
    if alias in _REGISTRY:
        raise ValueError(f"model alias {alias!r} registered twice")
    _REGISTRY[alias] = spec
    _BY_TIMM_NAME.setdefault(timm_name, spec)
    return spec


# -- PROTOCOL.md section 2: Base and Large of every family -----------------------------------
register("vit-b16", "vit_base_patch16_224.augreg_in21k", "supervised", "base")
register("vit-l16", "vit_large_patch16_224.augreg_in21k", "supervised", "large")
register("clip-b16", "vit_base_patch16_clip_224.laion2b", "openclip", "base")
register("clip-l14", "vit_large_patch14_clip_224.laion2b", "openclip", "large")
register("mae-b16", "vit_base_patch16_224.mae", "mae", "base")
register("mae-l16", "vit_large_patch16_224.mae", "mae", "large")
register("dino-b16", "vit_base_patch16_224.dino", "dino", "base")
register("dino-b8", "vit_base_patch8_224.dino", "dino", "base")
register("dinov2-b14", "vit_base_patch14_dinov2.lvd142m", "dinov2", "base")
register("dinov2-l14", "vit_large_patch14_dinov2.lvd142m", "dinov2", "large")
register("dinov2-reg-b14", "vit_base_patch14_reg4_dinov2.lvd142m", "dinov2-reg", "base")
register("dinov2-reg-l14", "vit_large_patch14_reg4_dinov2.lvd142m", "dinov2-reg", "large")
register("dinov3-b16", "vit_base_patch16_dinov3.lvd1689m", "dinov3", "base")
register("dinov3-l16", "vit_large_patch16_dinov3.lvd1689m", "dinov3", "large")
# Not in timm's hub: official checkpoint files, loaded into timm's VisionTransformer.
_MOCO = "facebookresearch/moco-v3 (vit-b-300ep.pth.tar), then --weights PATH"
_IBOT = "bytedance/ibot (checkpoint_teacher.pth), then --weights PATH"
_MUGS = "sail-sg/mugs (vit_*_backbone.pth), then --weights PATH"
register("mocov3-b16", "vit_base_patch16_224", "mocov3", "base", adapter="mocov3", hub=False, weights_hint=_MOCO)
register("ibot-b16", "vit_base_patch16_224", "ibot", "base", adapter="ibot", hub=False, weights_hint=_IBOT)
register("ibot-l16", "vit_large_patch16_224", "ibot", "large", adapter="ibot", hub=False, weights_hint=_IBOT)
register("mugs-b16", "vit_base_patch16_224", "mugs", "base", adapter="mugs", hub=False, weights_hint=_MUGS)
register("mugs-l16", "vit_large_patch16_224", "mugs", "large", adapter="mugs", hub=False, weights_hint=_MUGS)

# -- tiny members, one per architecture path, for tests and the demo -------------------------
_TINY = dict(embed_dim=64, depth=4, num_heads=4)
_TINY_LS = dict(_TINY, init_values=0.5)  # layer scale large enough that every branch matters
register("tiny-vit", "vit_base_patch16_224", "tiny", "tiny", hub=False, overrides=_TINY)
register("tiny-dinov2-reg", "vit_base_patch14_reg4_dinov2", "tiny", "tiny", hub=False, overrides=_TINY_LS)
register("tiny-clip", "vit_base_patch16_clip_224", "tiny", "tiny", hub=False, overrides=_TINY)
register("tiny-dinov3", "vit_base_patch16_dinov3", "tiny", "tiny", hub=False, overrides=_TINY_LS)
# The Eva form with q/v biases, where ``qkv`` is only a weight holder and never called.
register("tiny-dinov3-qkvb", "vit_base_patch16_dinov3", "tiny", "tiny", hub=False,
         overrides=dict(_TINY_LS, qkv_bias=True))


STAND_IN_PREFIX = "tiny:"  # ``tiny:<alias>``: the stand-in of a registered model (``stand_in``)
_LAYER_SCALE_FAMILIES = ("dinov2", "dinov2-reg", "dinov3")  # their architectures scale every residual branch


def stand_in(name: str) -> str:
    """The name of ``name``'s tiny stand-in: its timm architecture (so its architecture path:
    registers, patch size, RoPE, CLIP's pre-norm...) at the tiny members' width and depth,
    for random weights. ``rep-pipeline run --stand-in tiny`` runs every preset with these."""
    return STAND_IN_PREFIX + get_spec(name).alias


def _stand_in_spec(name: str) -> ModelSpec:
    real = get_spec(name.removeprefix(STAND_IN_PREFIX))
    overrides = _TINY_LS if real.family in _LAYER_SCALE_FAMILIES else _TINY
    return ModelSpec(name, real.arch, real.family, "tiny", hub=False, overrides=overrides,
                     weights_hint=f"a tiny random stand-in of {real.alias}; use weights: random")


def list_models(pattern: str = "*") -> list[ModelSpec]:
    """Registered models whose alias or timm name matches the glob ``pattern``."""
    from fnmatch import fnmatch

    return [s for s in _REGISTRY.values() if fnmatch(s.alias, pattern) or fnmatch(s.timm_name, pattern)]


def get_spec(name: str) -> ModelSpec:
    """Resolve an alias, a registered timm name, or any timm ViT/Eva architecture."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(STAND_IN_PREFIX):
        return _stand_in_spec(name)
    if name in _BY_TIMM_NAME:
        return _BY_TIMM_NAME[name]
    arch = name.split(".")[0]
    if "-" not in arch and (timm := _timm()).is_model(arch):  # no timm name has one: a mistyped alias fails at once
        if "." in name and not timm.is_model_pretrained(name):  # before building anything, even on meta
            tags = sorted(n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*"))
            raise UnknownModelError(f"timm has no pretrained tag {name.split('.', 1)[1]!r} for {arch}; its tags: "
                                    f"{', '.join(tags) or 'none'} (or name the architecture alone: {arch})")
        cls_name = _model_class_name(arch)
        if cls_name not in ("VisionTransformer", "Eva"):
            raise UnknownModelError(
                f"model {name!r} is a timm {cls_name}; rep-pipeline probes ViT and Eva models only"
            )
        return ModelSpec(alias=name, timm_name=name, family="timm", size="?", hub="." in name or
                         bool(timm.list_pretrained(f"{arch}.*")))
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UnknownModelError(f"unknown model {name!r}; {hint}`rep-pipeline models` lists the registered ones, "
                            f"and any timm ViT/Eva name works too")


def store_key(name: str, model_key: str | None = None) -> str:
    """The store group name of a model: ``model_key`` if given, else its alias or timm name."""
    return model_key or get_spec(name).alias.replace("/", "_")


def file_sha256(path: str | Path, block: int = 2**22) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def weights_identity(spec: ModelSpec, weights: str, seed: int) -> str:
    """Which weights ``--weights`` names, without loading them: the hub tag, the random seed, or
    a file's content hash (two files with the same bytes are the same weights)."""
    if weights == "pretrained":
        return f"pretrained:{spec.timm_name}"
    if weights == "random":
        return f"random:seed={seed}"
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"weights file {weights} does not exist")
    return f"file:sha256={file_sha256(path)}"


def _model_class_name(arch: str) -> str:
    import torch

    with torch.device("meta"):
        return type(_timm().create_model(arch, pretrained=False)).__name__


@dataclass
class LoadedModel:
    """A model ready for capture, with everything that fingerprints it."""

    spec: ModelSpec
    model: torch.nn.Module
    weights_source: str        # "pretrained:<timm name>" | "random:seed=<n>" | "file:<name>"
    weights_sha256: str
    image_size: int            # S, the label grid
    input_size: int            # the crop resized to a multiple of the patch size
    patch_size: int
    grid: int                  # patches per side
    num_prefix_tokens: int     # class + register tokens
    embed_dim: int
    num_heads: int
    depth: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def describe(self) -> dict[str, Any]:
        """The JSON-able facts the store records about this model."""
        return {
            "model": self.spec.alias,
            "timm_name": self.spec.timm_name,
            "family": self.spec.family,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "image_size": self.image_size,
            "input_size": self.input_size,
            "patch_size": self.patch_size,
            "grid": self.grid,
            "num_prefix_tokens": self.num_prefix_tokens,
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            "depth": self.depth,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def input_size_for(image_size: int, patch_size: int) -> int:
    """The nearest multiple of the patch size to S (320 -> 320 for /16, 322 for /14)."""
    return max(1, round(image_size / patch_size)) * patch_size


def _patch_size(arch: str, overrides: Mapping[str, Any]) -> int:
    if "patch_size" in overrides:
        return int(overrides["patch_size"])
    import torch

    with torch.device("meta"):
        probe = _timm().create_model(arch, pretrained=False, **overrides)
    ps = probe.patch_embed.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


def check_weights(name: str, weights: str) -> ModelSpec:
    """Fail fast, before any worker starts, on an unknown model or unavailable weights."""
    spec = get_spec(name)
    if weights == "pretrained":
        if not spec.hub:
            _raise_no_hub(spec)
        if not _hub_weights_reachable(spec.timm_name):
            _raise_offline(spec)
    elif weights != "random" and not Path(weights).is_file():
        raise CheckpointError(f"weights file {weights} does not exist")
    return spec


def _raise_no_hub(spec: ModelSpec) -> None:
    raise WeightsUnavailableError(
        f"model {spec.alias!r} has no hub weights in timm; download {spec.weights_hint}"
        if spec.weights_hint
        else f"model {spec.alias!r} has no pretrained weights; use --weights random or --weights PATH"
    )


def _raise_offline(spec: ModelSpec) -> None:
    raise WeightsUnavailableError(
        f"pretrained weights for {spec.alias!r} ({spec.timm_name}) are not in the local hub "
        f"cache and the hub cannot be reached (offline). Download them on a machine with "
        f"network access and pass --weights PATH (.safetensors or .pth)."
    )


def build_model(
    name: str,
    weights: str = "pretrained",
    image_size: int = config.IMAGE_SIZE,
    seed: int = config.RANDOM_WEIGHTS_SEED,
) -> LoadedModel:
    """Create ``name`` at the input size for S = ``image_size`` with the requested weights.

    ``weights`` is ``pretrained`` (timm's hub or its cache), ``random`` (seeded init) or the
    path of a ``.safetensors``/``.pth`` file read with the family's key adapter.
    """
    import torch

    from .checkpoints import load_weights_file

    if not weights:
        raise ConfigError("--weights must be 'pretrained', 'random' or a file path")
    spec = get_spec(name)
    overrides = dict(spec.overrides)
    patch = _patch_size(spec.arch, overrides)
    input_size = input_size_for(image_size, patch)
    kwargs = dict(overrides, img_size=input_size, num_classes=0)

    if weights == "pretrained":
        if not spec.hub:
            _raise_no_hub(spec)
        if not _hub_weights_reachable(spec.timm_name):
            _raise_offline(spec)
        try:
            model = _timm().create_model(spec.timm_name, pretrained=True, **kwargs)
        except Exception as exc:  # hub clients raise OSError, HTTP and offline errors alike
            raise WeightsUnavailableError(
                f"pretrained weights for {spec.alias!r} ({spec.timm_name}) could not be loaded from "
                f"timm's hub or its local cache ({type(exc).__name__}: {str(exc)[:200]}). Without "
                f"network access, download the weights elsewhere and pass --weights PATH "
                f"(.safetensors or .pth)."
            ) from exc
        source = f"pretrained:{spec.timm_name}"
    elif weights == "random":
        torch.manual_seed(seed)
        model = _timm().create_model(spec.arch, pretrained=False, **kwargs)
        if spec.size == "tiny":
            _jitter_constant_parameters(model, seed)
        source = f"random:seed={seed}"
    else:
        path = Path(weights)
        model = _timm().create_model(spec.arch, pretrained=False, **kwargs)
        load_weights_file(model, path, spec.adapter)
        source = f"file:{path.name}"
    model.eval().requires_grad_(False)
    data_cfg = _timm().data.resolve_data_config({}, model=model)
    grid = input_size // patch
    first_attn = model.blocks[0].attn
    return LoadedModel(
        spec=spec,
        model=model,
        weights_source=source,
        weights_sha256=state_dict_sha256(model),
        image_size=image_size,
        input_size=input_size,
        patch_size=patch,
        grid=grid,
        num_prefix_tokens=int(model.num_prefix_tokens),
        embed_dim=int(model.embed_dim),
        num_heads=int(first_attn.num_heads),
        depth=len(model.blocks),
        mean=tuple(float(v) for v in data_cfg["mean"]),
        std=tuple(float(v) for v in data_cfg["std"]),
    )


def _hub_weights_reachable(timm_name: str, timeout: float = 3.0) -> bool:
    """True if timm's hub weights of ``timm_name`` are cached or the hub answers at all.

    Checked up front because the hub client retries a dead network for about a minute.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    cfg = _timm().models.get_pretrained_cfg(timm_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if repo:
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, filename), str):
                return True
    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _jitter_constant_parameters(model: torch.nn.Module, seed: int) -> None:
    """Tiny models only: perturb parameters that timm initialises to a constant (biases,
    norm scales, layer scale), so that every term of the architecture path leaves a trace that
    the capture tests can see."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A hash of the model's weights, identical wherever the same weights are loaded."""
    import torch

    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
