"""Every default of rep-pipeline, in one place, and the frozen config of each stage.

The CLI and YAML configs only override these; stages never hard-code a default of their own.
Values follow ``../shared/PROTOCOL.md``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ConfigError

# -- geometry (PROTOCOL.md section 3) -------------------------------------------------------
IMAGE_SIZE = 320                 # S: shorter side resized to S, then centre crop S x S
IGNORE_INDEX = 255               # label value of unlabelled / void pixels

# -- capture (PROTOCOL.md section 2) ---------------------------------------------------------
EMBEDDINGS: tuple[str, ...] = ("queries", "keys", "values", "tokens")
ROPE_CHOICES = ("before", "after")          # q/k of RoPE models: before rotation by default
LAST_NORM_CHOICES = ("after", "before")     # last-layer tokens: after the final LayerNorm
FEATURE_DTYPE = "float16"

# -- store and execution ---------------------------------------------------------------------
CHUNK_IMAGES = 16                # images per Zarr chunk == images per forward batch
RANDOM_WEIGHTS_SEED = 0
TASKS_IN_FLIGHT_PER_ACTOR = 2    # keeps each actor busy while the driver schedules the next
ACTOR_MAX_RESTARTS = 3           # a crashed actor is restarted this many times...
ACTOR_MAX_TASK_RETRIES = 3       # ...and its in-flight chunk ranges are retried

# -- datasets --------------------------------------------------------------------------------
SYNTHETIC_SPLIT_SIZES = {"train": 64, "val": 32}
SYNTHETIC_SEED = 0


def parse_csv(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"a,b"`` or ``["a", "b"]`` -> ``("a", "b")``; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    else:
        items = [str(v).strip() for v in value]
    items = [v for v in items if v]
    return tuple(items) or None


def parse_layers(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"0,5,11"``, ``"6-11"``, ``"all"`` or ``[0, 5]`` -> sorted unique layer indices."""
    if value is None or value == "all":
        return None
    if isinstance(value, str):
        out: set[int] = set()
        for part in parse_csv(value) or ():
            m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
            if not m:
                raise ConfigError(f"--layers: cannot read {part!r}; use e.g. '0,5,11', '6-11' or 'all'")
            lo, hi = int(m.group(1)), m.group(2)
            out.update(range(lo, int(hi) + 1) if hi is not None else [lo])
        return tuple(sorted(out))
    return tuple(sorted({int(v) for v in value}))


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


@dataclass(frozen=True)
class ExtractConfig:
    """What the extract stage captures, from which data, into which store."""

    model: str
    store: Path
    dataset: str = "synthetic"
    data_root: Path | None = None
    splits: tuple[str, ...] | None = None          # None: the dataset's default splits
    weights: str = "pretrained"                     # pretrained | random | PATH
    layers: tuple[int, ...] | None = None           # None: every block
    embeddings: tuple[str, ...] = EMBEDDINGS
    limit: int | None = None                        # first N images of each split
    image_size: int = IMAGE_SIZE
    rope: str = "before"
    last_norm: str = "after"
    chunk_images: int = CHUNK_IMAGES
    model_key: str | None = None                    # store group name; default: alias or timm name
    seed: int = RANDOM_WEIGHTS_SEED                 # for --weights random
    device: str = "auto"                            # auto | cpu | cuda
    workers: int | None = None                      # actors; default: one per GPU, else 1
    threads_per_worker: int | None = None           # CPU actors: torch threads (= Ray CPUs)
    dataset_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        if self.data_root is not None:
            object.__setattr__(self, "data_root", Path(self.data_root))
        for emb in self.embeddings:
            _check_choice("embedding", emb, EMBEDDINGS)
        if not self.embeddings:
            raise ConfigError("--embeddings: choose at least one of " + ", ".join(EMBEDDINGS))
        _check_choice("rope", self.rope, ROPE_CHOICES)
        _check_choice("last_norm", self.last_norm, LAST_NORM_CHOICES)
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.image_size < 16:
            raise ConfigError(f"image_size must be at least 16 pixels, got {self.image_size}")
        if self.chunk_images < 1:
            raise ConfigError(f"chunk_images must be at least 1, got {self.chunk_images}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")

    def replace(self, **changes: Any) -> "ExtractConfig":
        return dataclasses.replace(self, **changes)
