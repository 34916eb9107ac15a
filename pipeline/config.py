"""Every default of rep-pipeline, in one place, and the frozen config of each stage.

The CLI and YAML configs only override these; stages never hard-code a default of their own.
Values follow ``../shared/PROTOCOL.md``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from storage_schemas import zarr_layout

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

# -- cluster stage (PROTOCOL.md section 4) ---------------------------------------------------
KMEANS_METHODS = ("online", "lloyd")
KMEANS_METHOD = "online"
KMEANS_SEED = 0
ONLINE_LR = 5e-3
ONLINE_BATCH_IMAGES = 24
ONLINE_STEPS = 5000
PCA_INIT_BATCHES = 96
LLOYD_TOL = 1e-3                 # stop when under 0.1 % of assignments change in a pass
LLOYD_MAX_ITER = 100
LOSS_LOG_EVERY = 25              # online: steps between training-curve rows
SHUFFLE_WINDOW_CHUNKS = 8        # online: images are shuffled within windows of this many chunks
READ_AHEAD_BATCHES = 4
HOST_CACHE_BYTES = 4 * 2**30     # keep a (layer, embedding) slice in host memory when all fit

# -- evaluate stage (PROTOCOL.md section 5) ---------------------------------------------------
EXAMPLE_IMAGES = zarr_layout.EXAMPLE_IMAGES  # example maps per setting = crops kept per split
EVAL_IMAGES_PER_STEP = 4         # images upsampled at once (bounds n x S x S x sum K scores)
EVAL_SEED = 0                    # seeds the random shifts of the bias-aware MI

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
    compile_statistics: bool = False                # fuse the attention statistics (torch.compile)
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


def parse_ks(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = parse_csv(value) if isinstance(value, str) else value
    try:
        ks = tuple(sorted({int(k) for k in items or ()}))
    except ValueError as exc:
        raise ConfigError(f"--k: expected integers like '27,97', got {value!r}") from exc
    if not ks or min(ks) < 2:
        raise ConfigError(f"--k: every K must be at least 2, got {value!r}")
    return ks


@dataclass(frozen=True)
class ClusterConfig:
    """Which codebooks to fit, on which features, and how."""

    store: Path
    model: str
    train_split: str
    dataset: str | None = None                      # None: the only dataset the model has
    ks: tuple[int, ...] | None = None               # None: the number of classes
    methods: tuple[str, ...] = (KMEANS_METHOD,)
    layers: tuple[int, ...] | None = None           # block numbers; None: every captured one
    embeddings: tuple[str, ...] | None = None       # None: every captured one
    seed: int = KMEANS_SEED
    lr: float = ONLINE_LR
    batch_images: int = ONLINE_BATCH_IMAGES
    steps: int = ONLINE_STEPS
    init_batches: int = PCA_INIT_BATCHES
    tol: float = LLOYD_TOL
    max_iter: int = LLOYD_MAX_ITER
    log_every: int = LOSS_LOG_EVERY
    host_cache_bytes: int = HOST_CACHE_BYTES
    results: Path | None = None                     # None: <store parent>/results
    force: bool = False
    workers: int | None = None
    backend: str | None = None                      # None: CuPy if a GPU is present, else NumPy

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        if self.results is None:
            object.__setattr__(self, "results", self.store.parent / "results")
        object.__setattr__(self, "results", Path(self.results))
        if not self.methods:
            raise ConfigError("--method: choose online, lloyd or both")
        for m in self.methods:
            _check_choice("method", m, KMEANS_METHODS)
        for e in self.embeddings or ():
            _check_choice("embedding", e, EMBEDDINGS)
        for name in ("batch_images", "steps", "init_batches", "max_iter", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.tol < 1):
            raise ConfigError(f"lr must be > 0 and tol in [0, 1), got lr={self.lr}, tol={self.tol}")

    def hyperparameters(self, method: str) -> dict[str, Any]:
        """What, besides K, seed and the features, determines a codebook of ``method``."""
        if method == "online":
            return {"lr": self.lr, "batch_images": self.batch_images, "steps": self.steps,
                    "init_batches": self.init_batches, "shuffle_window_chunks": SHUFFLE_WINDOW_CHUNKS}
        return {"tol": self.tol, "max_iter": self.max_iter, "init_batches": self.init_batches,
                "batch_images": self.batch_images}


@dataclass(frozen=True)
class EvaluateConfig:
    """Which features to evaluate on which test split, and where results go."""

    store: Path
    split: str
    results: Path | None = None                     # None: <store parent>/results
    models: tuple[str, ...] | None = None           # None: every model with the split
    dataset: str | None = None
    n_examples: int = EXAMPLE_IMAGES
    images_per_step: int = EVAL_IMAGES_PER_STEP
    seed: int = EVAL_SEED
    backend: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        object.__setattr__(self, "results", Path(self.results) if self.results else self.store.parent / "results")
        if self.n_examples < 0 or self.images_per_step < 1:
            raise ConfigError("n_examples must be >= 0 and images_per_step >= 1")


COMPARE_CHOICES = ("models", "layers")


@dataclass(frozen=True)
class Comparison:
    """One comparison of the visual protocol: rows are models (at their best or a fixed layer)
    or the layers of one model, for one embedding type, K and method."""

    compare: str = "models"
    embedding: str = "keys"
    layer: str | int = "best"
    models: tuple[str, ...] | None = None
    k: int | None = None
    method: str | None = None
    title: str | None = None

    def __post_init__(self) -> None:
        _check_choice("compare", self.compare, COMPARE_CHOICES)
        _check_choice("embedding", self.embedding, EMBEDDINGS)
        if self.layer != "best" and not str(self.layer).lstrip("-").isdigit():
            raise ConfigError(f"layer must be 'best' or a block number, got {self.layer!r}")


@dataclass(frozen=True)
class ReportConfig:
    results: Path
    out: Path
    comparisons: tuple[Comparison, ...] = (Comparison(),)
    dataset: str | None = None
    split: str | None = None
    title: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "results", Path(self.results))
        object.__setattr__(self, "out", Path(self.out))
        if not self.comparisons:
            raise ConfigError("a report needs at least one comparison")
