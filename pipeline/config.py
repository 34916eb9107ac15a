"""Every option of rep-pipeline, declared once, and the frozen config of each stage.

Each option is one pydantic field: its type (``Literal`` for allowed values), default and help
text. The CLI (``cli/app.py``) builds its flags from these fields, the ``run`` YAML loader
(``cli/run.py``) validates its sections against them, and a stage receives the validated
object: adding an option is one edit here. pydantic does the validation and type coercion
(YAML's ``[0, 5]`` and the CLI's ``"0,5"`` pass the same validators) and reports every bad
key at once; errors become ``ConfigError`` naming where the value came from and the key.
Values follow ``../shared/PROTOCOL.md``.
"""
from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError, model_validator

from ..storage_schemas import feature_store
from ..storage_schemas.results import default_results
from .errors import ConfigError, RepPipelineError
from .location import ObjectPath, as_location

# -- constants that are not options ---------------------------------------------------------
IGNORE_INDEX = 255               # label value of unlabelled / void pixels
FEATURE_DTYPE = "float16"
TASKS_IN_FLIGHT_PER_ACTOR = 2    # keeps each actor busy while the driver schedules the next
ACTOR_MAX_RESTARTS = 3           # a crashed actor is restarted this many times...
ACTOR_MAX_TASK_RETRIES = 3       # ...and its in-flight chunk ranges are retried
SHUFFLE_WINDOW_CHUNKS = 8        # online k-means: images shuffled within windows of this many chunks
READ_AHEAD_BATCHES = 4           # feature streams read this many batches ahead
SYNTHETIC_SPLIT_SIZES = {"train": 64, "val": 32}
SYNTHETIC_SEED = 0

# -- defaults that other modules use as well (each still declared once, below) ---------------
IMAGE_SIZE = 320                 # S (PROTOCOL.md section 3)
MAX_IMAGE_PIXELS = 100_000_000   # larger images are refused before they are decoded
RANDOM_WEIGHTS_SEED = 0

# q, k, v, the block output x2 (tokens) and x1, the residual stream before the MLP (mid_tokens),
# and norm2(x1) (mid_normed): PROTOCOL.md sections 2 and 8.1
Embedding = Literal["queries", "keys", "values", "tokens", "mid_tokens", "mid_normed"]
EMBEDDINGS: tuple[str, ...] = get_args(Embedding)
DEFAULT_EMBEDDINGS = ("queries", "keys", "values", "tokens", "mid_tokens")  # mid_normed on request
KMeansMethod = Literal["online", "lloyd"]
BackendName = Literal["numpy", "cupy", "torch"]


# -- parsers shared by the CLI's strings and YAML's lists ------------------------------------
def parse_csv(value: Any) -> Any:
    """``"a,b"`` or ``["a", "b"]`` -> ``("a", "b")``; ``None`` stays ``None``."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, Sequence):
        return value  # let the field's type report it
    return tuple(s for s in (str(v).strip() for v in items) if s)


LAST_BLOCK = -1  # "last" among the layers: the model's last block, whatever its depth


def parse_layers(value: Any) -> Any:
    """``"0,5,11"``, ``"6-11"``, ``"last"``, ``"all"`` or ``[0, 5]`` -> sorted unique block
    numbers (``LAST_BLOCK`` for "last", resolved by ``resolve_layers`` once the model is known);
    ``"all"`` and ``None`` -> ``None`` (every block). A reversed range is an error, not an empty one."""
    if value is None or value == "all":
        return None
    if isinstance(value, int):
        return (value,)
    out: set[int] = set()
    for part in parse_csv(value) or ():
        if str(part).strip() == "last":
            out.add(LAST_BLOCK)
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", str(part))
        if not m:
            raise ValueError(f"cannot read {part!r}; use e.g. '0,5,11', '6-11', 'last' or 'all'")
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise ValueError(f"the range {part!r} runs backwards; write '{hi}-{lo}'")
        out.update(range(lo, hi + 1))
    if not out:
        raise ValueError("names no layer; use e.g. '0,5,11', '6-11' or 'all'")
    return tuple(sorted(out))


def resolve_layers(layers: Sequence[int], available: Sequence[int]) -> tuple[int, ...]:
    """``layers`` with ``LAST_BLOCK`` replaced by the last of ``available`` (a model's blocks)."""
    last = max(available) if len(available) else LAST_BLOCK
    return tuple(sorted({last if layer == LAST_BLOCK else layer for layer in layers}))


def parse_key_values(value: Any) -> Any:
    """``["a=1", "b=[2, 3]"]`` (values read as YAML) or a mapping -> a dict."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    out = {}
    for item in parse_csv([value] if isinstance(value, str) else value) or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def parse_location(value: Any) -> Path | ObjectPath:
    """A local path, or an object-storage URL (``s3://bucket/prefix``, ``gs://``, ``az://``;
    ``file://`` is a local path)."""
    if not isinstance(value, (str, os.PathLike, ObjectPath)):
        raise ValueError(f"expected a path or URL, got {type(value).__name__}")
    try:
        return as_location(value)
    except RepPipelineError as exc:
        raise ValueError(str(exc)) from None


Csv = Annotated[tuple[str, ...], BeforeValidator(parse_csv)]
Location = Annotated[Path | ObjectPath, PlainValidator(parse_location)]
Embeddings = Annotated[tuple[Embedding, ...], BeforeValidator(parse_csv)]
Layers = Annotated[tuple[int, ...] | None, BeforeValidator(parse_layers)]
Ks = Annotated[tuple[Annotated[int, Field(ge=2)], ...] | None, BeforeValidator(parse_csv)]
Methods = Annotated[tuple[KMeansMethod, ...], BeforeValidator(parse_csv)]
KeyValues = Annotated[dict[str, Any], BeforeValidator(parse_key_values)]


def option(default: Any = ..., help: str = "", *, flag: str | None = None, short: str | None = None,
           **constraints: Any) -> Any:
    """One option: its default (``...`` = required), its help, and, where the command-line flag
    is not the field name in kebab case, the flag (and a one-letter alias)."""
    extra = {k: v for k, v in (("flag", flag), ("short", short)) if v}
    return Field(default, description=help, json_schema_extra=extra or None, **constraints)


class Options(BaseModel):
    """A validated, frozen set of options; unknown keys are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise InvalidOptions(exc, type(self).__name__) from None

    @classmethod
    def parse(cls, values: Mapping[str, Any], where: str = "") -> "Options":
        """``cls(**values)``, with every invalid key reported in one ``ConfigError`` that
        starts with ``where`` (the file or command the values came from)."""
        try:
            return cls(**{str(k): v for k, v in values.items()})
        except InvalidOptions as exc:
            raise ConfigError(describe_errors(exc.validation, where)) from None

    def replace(self, **changes: Any) -> "Options":
        """A copy with ``changes``, validated again."""
        return type(self).parse({**self.model_dump(), **changes})


class InvalidOptions(ConfigError):
    """Values that fail validation; the message lists every key at fault."""

    def __init__(self, validation: ValidationError, where: str):
        super().__init__(describe_errors(validation, where))
        self.validation = validation


def describe_errors(exc: ValidationError, where: str = "") -> str:
    """``where: key: what is wrong (got value)``, one line per error."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "tuple[")))
        got = err.get("input")
        shown = "" if isinstance(got, Mapping) or err["type"] == "missing" else f" (got {got!r})"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key or 'value'}: {msg}{shown}")
    prefix = f"{where}: " if where else ""
    return prefix + ("\n  ".join(lines) if len(lines) == 1 else "invalid options\n  " + "\n  ".join(lines))


def _default_results(data: Any) -> Any:
    """``results`` left out: ``<store parent>/results``."""
    if isinstance(data, dict) and data.get("results") is None and data.get("store") is not None:
        store = data["store"]
        results = default_results(str(store))
        data = {**data, "results": store.with_options(None).__class__(str(results), dict(store.options))
                if isinstance(store, ObjectPath) else results}
    return data


class Storage(Options):
    """Where a stage reads and writes: its paths may be object-storage URLs, configured from the
    provider's environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...) and these options."""

    storage_options: KeyValues = option({}, help="Object-storage option KEY=VALUE for every URL (endpoint, region, "
                                                 "allow_http...); repeatable. Credentials come from the "
                                                 "environment.", flag="storage-option")

    @model_validator(mode="before")
    @classmethod
    def _locations_with_options(cls, data: Any) -> Any:
        """Give every URL among the paths the storage options (workers open them elsewhere)."""
        if not isinstance(data, dict) or not data.get("storage_options"):
            return data
        try:
            options = parse_key_values(data["storage_options"])
        except ValueError:
            return data  # reported by the field's own validation
        located = {name for name, info in cls.model_fields.items() if _is_location(info)}
        return {k: (as_location(v, options) if k in located and isinstance(v, str) and "://" in v
                    else v.with_options(options) if k in located and isinstance(v, ObjectPath) else v)
                for k, v in data.items()}


def _is_location(info: Any) -> bool:
    """Whether a field is a ``Location`` (or an optional one)."""
    def found(ann: Any) -> bool:
        metadata = getattr(ann, "__metadata__", ())
        return any(isinstance(m, PlainValidator) and m.func is parse_location for m in metadata) or any(
            found(a) for a in typing.get_args(ann))
    return any(isinstance(m, PlainValidator) and m.func is parse_location for m in info.metadata) or found(
        info.annotation)


class ResultsBeside(Storage):
    """A stage that writes a results folder, by default beside its feature store."""

    results: Location | None = option(None, help="Results folder; default <store>/../results.")

    @model_validator(mode="before")
    @classmethod
    def default_results(cls, data: Any) -> Any:
        return _default_results(data)


class OnBackend(Options):
    """A stage whose array code runs on NumPy or CuPy."""

    backend: BackendName | None = option(None, help="Array backend; default CuPy when a GPU is present.")


class OnWorkers(OnBackend):
    """A stage whose work Ray workers share."""

    workers: int | None = option(None, help="Ray workers; default one per GPU, else one per node.", ge=1)


# -- the stages ------------------------------------------------------------------------------
class ExtractConfig(Storage):
    """What the extract stage captures, from which data, into which store."""

    model: str = option(help="Alias (dino-b16, tiny-dinov3...) or any timm ViT/Eva name.")
    store: Location = option(help="Feature store to create or complete (Zarr v3 folder or object-storage URL).")
    weights: str = option("pretrained", help="pretrained | random | PATH (.safetensors or .pth).", min_length=1)
    dataset: str = option("synthetic", help="cocostuff27 | cityscapes27 | voc | folder | synthetic.")
    data_root: Location | None = option(None, help="Dataset root folder (or object-storage URL).")
    splits: Csv | None = option(None, help="Comma-separated splits; default: the dataset's.")
    layers: Layers = option(None, help="Blocks to capture: '0,5,11', '6-11' or 'all' (default).")
    embeddings: Embeddings = option(DEFAULT_EMBEDDINGS, help="Any of queries,keys,values,tokens,mid_tokens (x1, "
                                    "before the MLP),mid_normed (norm2 of x1).", min_length=1)
    class_embeddings: Annotated[tuple[Embedding, ...] | None, BeforeValidator(parse_csv)] = option(
        None, help="Embeddings whose class token is kept too; default every captured one.")
    limit: int | None = option(None, help="Take the first N images of each split.", ge=1)
    image_size: int = option(IMAGE_SIZE, help="S: label grid and crop size.", ge=16)
    max_image_pixels: int = option(MAX_IMAGE_PIXELS, help="Refuse images (and labels) of more pixels than "
                                                          "this, before decoding them.", ge=1)
    rope: Literal["before", "after"] = option("before", help="RoPE models: q and k before or after the rotation.")
    last_norm: Literal["after", "before"] = option("after", help="Last-layer tokens relative to the final norm.")
    chunk_images: int = option(16, help="Images per store chunk and per forward batch.", ge=1)
    model_key: str | None = option(None, help="Store group name for the model; default its alias.")
    seed: int = option(RANDOM_WEIGHTS_SEED, help="Seed of --weights random.")
    device: Literal["auto", "cpu", "cuda"] = option("auto", help="Where the model runs; auto: a GPU if present.")
    workers: int | None = option(None, help="Actors: default one per GPU, else one per node.", ge=1)
    threads_per_worker: int | None = option(None, help="Torch threads per CPU actor.", flag="threads", ge=1)
    compile_statistics: bool = option(False, help="Fuse the attention statistics with torch.compile "
                                                  "(a one-off compile of 10 to 20 s).")
    example_attention: bool = option(False, help="Also keep the head-averaged patch-to-patch attention rows of "
                                                 "each of the split's example images (PROTOCOL.md 12.5).")
    dataset_options: KeyValues = option({}, help="Dataset option KEY=VALUE (value read as YAML); repeatable.",
                                        flag="option", short="o")

    @model_validator(mode="after")
    def _class_embeddings_are_captured(self) -> "ExtractConfig":
        extra = [e for e in self.class_embeddings or () if e not in self.embeddings]
        if extra:
            raise ValueError(f"class_embeddings: {', '.join(extra)} not among the captured embeddings "
                             f"({', '.join(self.embeddings)})")
        return self

    @property
    def kept_class_embeddings(self) -> tuple[str, ...]:
        """The embeddings whose class token is stored: ``class_embeddings``, or every captured one."""
        return tuple(self.class_embeddings or self.embeddings)


class ClusterConfig(ResultsBeside, OnWorkers):
    """Which codebooks to fit, on which features, and how (PROTOCOL.md section 4)."""

    store: Location = option(help="Feature store written by extract.")
    model: str = option(help="Model key in the store (alias or timm name).")
    train_split: str = option(help="Split to fit the codebooks on.")
    dataset: str | None = option(None, help="Dataset, if the model has the split in several.")
    k: Ks = option(None, help="Cluster counts, e.g. '27,97'; default: the number of classes.")
    methods: Methods = option(("online",), help="online | lloyd | online,lloyd.", flag="method", min_length=1)
    layers: Layers = option(None, help="Blocks, e.g. '6-11'; default every captured one.")
    embeddings: Annotated[tuple[Embedding, ...] | None, BeforeValidator(parse_csv)] = option(
        None, help="Default every captured one.")
    seed: int = option(0, help="k-means seed.")
    lr: float = option(5e-3, help="online: Adam learning rate.", gt=0)
    batch_images: int = option(24, help="Images per batch (all their patches).", ge=1)
    steps: int = option(5000, help="online: Adam steps.", ge=1)
    init_batches: int = option(96, help="Batches for the PCA initialisation.", ge=1)
    init_interval: int = option(1, help="PCA initialisation from every n-th of the first init_batches x n batches "
                                        "(same patch count; PROTOCOL.md 12.2).", ge=1)
    variant: str | None = option(None, help="Train beside the main codebooks as this variant (a short hash of the "
                                            "changed hyperparameters; the run's sensitivity section sets it).",
                                 pattern=r"^[0-9a-z]{1,16}$")
    tol: float = option(1e-3, help="lloyd: stop below this fraction of changed assignments.", ge=0, lt=1)
    max_iter: int = option(100, help="lloyd: passes at most.", ge=1)
    log_every: int = option(25, help="online: steps between training-curve rows.", ge=1)
    host_cache_bytes: int = option(4 * 2**30, help="Keep the features in host memory when they fit in this.",
                                   ge=0)
    force: bool = option(False, help="Retrain codebooks that are already finished.")

    def hyperparameters(self, method: str) -> dict[str, Any]:
        """What, besides K, seed and the features, determines a codebook of ``method``."""
        interval = {"init_interval": self.init_interval} if self.init_interval != 1 else {}  # old fingerprints hold
        if method == "online":
            return {"lr": self.lr, "batch_images": self.batch_images, "steps": self.steps,
                    "init_batches": self.init_batches, "shuffle_window_chunks": SHUFFLE_WINDOW_CHUNKS, **interval}
        return {"tol": self.tol, "max_iter": self.max_iter, "init_batches": self.init_batches,
                "batch_images": self.batch_images, **interval}


class EvaluateConfig(ResultsBeside, OnBackend):
    """Which features to evaluate on which test split, and where results go (section 5)."""

    store: Location = option(help="Feature store with features and codebooks.")
    split: str = option(help="Test split to segment and score.")
    models: Csv | None = option(None, help="Comma-separated models; default all with the split.", flag="model")
    dataset: str | None = option(None, help="Only this dataset.")
    n_examples: int = option(feature_store.EXAMPLE_IMAGES, help="Predicted maps kept per setting.",
                             flag="examples", ge=0, le=feature_store.EXAMPLE_IMAGES)
    images_per_step: int = option(4, help="Images upsampled at once (bounds the n x S x S x sum K scores).", ge=1)
    seed: int = option(0, help="Seed of the random shifts of the bias-aware MI and of the bootstrap draws.")
    draws: int = option(1000, help="Bootstrap draws of the 95 % intervals over test images (0: no intervals).",
                        ge=0)


ProbeObject = Literal["patch", "class_token"]
ProbeRule = Literal["hyperplane", "cosine"]
PROBE_TOKEN_TYPES = ("queries", "keys", "values", "mid_tokens", "tokens")  # q, k, v, x1, x2 (section 9.1)
COSINE_SHOTS = (1, 5, 10, 50, 100, 500)


class ProbeConfig(ResultsBeside, OnWorkers):
    """Direction probes: hyperplane and cosine templates per token type (PROTOCOL.md section 9)."""

    store: Location = option(help="Feature store with the train and test splits' features.")
    model: str = option(help="Model key in the store (alias or timm name).")
    train_split: str = option(help="Split the templates are fitted on (cosine: supports drawn from).")
    split: str = option(help="Test split the templates are evaluated on.")
    dataset: str | None = option(None, help="Dataset, if the model has the splits in several.")
    layers: Layers = option(None, help="Blocks, e.g. '11' or '6-11'; default the last captured one.")
    embeddings: Annotated[tuple[Embedding, ...] | None, BeforeValidator(parse_csv)] = option(
        None, help="Token types; default those of q, k, v, mid_tokens (x1), tokens (x2) the store holds.")
    objects: Annotated[tuple[ProbeObject, ...], BeforeValidator(parse_csv)] = option(
        ("patch", "class_token"), help="patch (segmentation) and/or class_token (classification).", min_length=1)
    rules: Annotated[tuple[ProbeRule, ...], BeforeValidator(parse_csv)] = option(
        ("hyperplane", "cosine"), help="hyperplane and/or cosine templates.", flag="rule", min_length=1)
    shots: Annotated[tuple[Annotated[int, Field(ge=1)], ...], BeforeValidator(parse_csv)] = option(
        COSINE_SHOTS, help="cosine: support images k.", min_length=1)
    trials: int = option(10, help="cosine: trials per (concept, k).", ge=1)
    query_images: int = option(50, help="cosine: query images with and without the concept, each.", ge=1)
    seed: int = option(0, help="Seed of every sampling and of the hyperplane training.")
    force: bool = option(False, help="Retrain hyperplane templates that are already stored.")

    def hyperparameters(self) -> dict[str, Any]:
        """What, besides the seed and the features, determines the hyperplane templates (A9)."""
        return {"optimizer": "adam", "lr": 1e-3, "batch": 256, "rounds": 5, "epochs": 3, "negative_cap": 20,
                "negatives_per_positive": 2}


CORRESPONDENCE_EMBEDDINGS = ("queries", "keys", "values", "tokens")  # section 11.2
PCK_ALPHAS = (0.05, 0.10, 0.15)  # section 11.4; the headline is 0.10


class CorrespondConfig(ResultsBeside, OnWorkers):
    """Zero-shot keypoint transfer and PCK per layer and embedding (PROTOCOL.md section 11)."""

    store: Location = option(help="Feature store with a keypoint split's features (extract --dataset spair71k...).")
    model: str = option(help="Model key in the store (alias or timm name).")
    split: str = option(help="Split whose keypoint pairs are transferred.")
    dataset: str | None = option(None, help="Dataset, if the model has the split in several.")
    layers: Layers = option(None, help="Blocks, e.g. '6-11'; default every captured one.")
    embeddings: Annotated[tuple[Embedding, ...] | None, BeforeValidator(parse_csv)] = option(
        None, help="Default those of queries, keys, values, tokens the store holds.")
    alphas: Annotated[tuple[Annotated[float, Field(gt=0)], ...], BeforeValidator(parse_csv)] = option(
        PCK_ALPHAS, help="PCK thresholds, fractions of the target box's longer side.", flag="alpha", min_length=1)
    keep_matches: bool = option(False, help="Also write every prediction (table correspondence_matches).")
    examples: int = option(3, help="Keypoints whose cosine heatmaps are kept for figure c3.", ge=0)


ExplainScalar = Literal["sum", "energy", "learned"]  # f_s (ULTra_S), f_e (ULTra_E), f_w (ULTra_W, s. 10.7)
Perturbation = Literal["mask", "noise"]
ITIOU_TAUS = tuple(round(0.05 * i, 2) for i in range(21))  # section 10.5's sweep, 0.00..1.00


class ExplainConfig(ResultsBeside, OnWorkers):
    """ULTra explanation maps of latent tokens, per-image concepts and their scores (PROTOCOL.md s. 10)."""

    store: Location = option(help="Feature store with the split's features (the maps go into its model group).")
    model: str = option(help="Model key in the store (alias or timm name).")
    split: str = option(help="Split to explain and score.")
    train_split: str | None = option(None, help="Split whose segments fit the K = C codebook of the 'dataset' "
                                                "scoring (explained too); without it only the per-image scores.")
    dataset: str | None = option(None, help="Dataset, if the model has the split in several.")
    weights: str = option("pretrained", help="pretrained | random | PATH: the weights the store's features came "
                                             "from (checked against its fingerprint).", min_length=1)
    seed: int = option(RANDOM_WEIGHTS_SEED, help="Seed of --weights random.")
    data_root: Location | None = option(None, help="Dataset root: the images are read again (same adapter, "
                                                   "geometry and fingerprint as the store's).")
    layers: Layers = option(None, help="Blocks to explain; default the middle and the last captured one.")
    embedding: Embedding = option("tokens", help="The explained embedding (A14: tokens).")
    f: ExplainScalar = option("sum", help="sum (ULTra_S, f = sum_d z_d), energy (ULTra_E, f = <z, z>) or learned "
                                          "(ULTra_W: unit vectors fitted on the train split first, s. 10.7).")
    fit_images: int = option(256, help="learned: train images the projections are fitted on.", ge=1)
    limit: int = option(200, help="Explain the first N images of each split.", ge=1)
    zeta: float = option(0.4, help="Cut distance of the per-image clustering (cosine, average linkage).", ge=0)
    k_img: int | None = option(None, help="Cut each image into this many clusters instead of at zeta.", ge=1)
    aggregate: Literal["sum", "mean"] = option("sum", help="Concept maps: sum (Eq. 7) or mean of their tokens' maps.")
    taus: Annotated[tuple[Annotated[float, Field(ge=0, le=1)], ...], BeforeValidator(parse_csv)] = option(
        ITIOU_TAUS, help="ITIoU thresholds of the min-max scaled maps (headline 0.2).", min_length=1)
    perturbations: Annotated[tuple[Perturbation, ...], BeforeValidator(parse_csv)] = option(
        ("mask", "noise"), help="Perturbation tests: mask and/or noise.", flag="perturbation")
    rho: float = option(0.5, help="Fraction of the other patches each perturbation set covers.", ge=0, le=0.5)
    tokens_per_image: int = option(10, help="Tokens of each image put to the perturbation test.", ge=0)
    draw_seed: int = option(0, help="Seed of the perturbation test's token draws, noise and bootstrap.")
    memory_budget: int = option(2 * 2**30, help="Bytes of attention gradients held at once (sets the chunk of "
                                               "target tokens, s. 10.8).", ge=1)
    device: Literal["auto", "cpu", "cuda"] = option("auto", help="Where the model runs; auto: a GPU if present.")
    threads_per_worker: int | None = option(None, help="Torch threads per CPU actor.", flag="threads", ge=1)
    max_image_pixels: int = option(MAX_IMAGE_PIXELS, help="Refuse images of more pixels than this.", ge=1)

    def hyperparameters(self) -> dict[str, Any]:
        """What, besides the weights and the features, the stored maps depend on (learned: the
        fitting choices of section 10.7 as well)."""
        fit = {"fit": {"train_split": self.train_split, "fit_images": self.fit_images, "perturbation": "noise",
                       "delta": 0.3, "init": "ones", "optimizer": "adam", "lr": 1e-3, "epochs": 1, "batch": 8,
                       "zeta": self.zeta, "k_img": self.k_img, "aggregate": self.aggregate,
                       "seed": self.draw_seed}} if self.f == "learned" else {}
        return {"f": self.f, "embedding": self.embedding, **fit}

    @model_validator(mode="after")
    def _learned_needs_a_train_split(self) -> "ExplainConfig":
        if self.f == "learned" and not self.train_split:
            raise ValueError("f: learned fits its projections on --train-split; name one")
        return self

    def choices(self) -> dict[str, Any]:
        """What the run's scores depend on besides the maps (part of its run id)."""
        return {"zeta": None if self.k_img else self.zeta, "k_img": self.k_img, "linkage": "average",
                "metric": "cosine", "aggregate": self.aggregate, "taus": list(self.taus),
                "perturbations": list(self.perturbations), "rho": self.rho,
                "tokens_per_image": self.tokens_per_image, "draw_seed": self.draw_seed, "train_split": self.train_split}


def _compare_alias(value: Any) -> Any:
    return {"paradigms": "models", "sizes": "models"}.get(value, value)


def _layer_choice(value: Any) -> Any:
    if value in ("best", "last") or isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ValueError(f"must be 'best', 'last' or a block number, got {value!r}")


class Comparison(Options):
    """One comparison of the visual protocol: rows are models (at their best or a fixed layer)
    or the layers of one model, for one embedding type, K and method."""

    compare: Annotated[Literal["models", "layers"], BeforeValidator(_compare_alias)] = option(
        "models", help="Rows: models (also 'paradigms', 'sizes') or the layers of one model.")
    embedding: Embedding = option("keys", help="Embedding type to compare.")
    layer: Annotated[Literal["best", "last"] | int, BeforeValidator(_layer_choice)] = option(
        "best", help="'best', 'last' (each model's last evaluated block) or a block number (compare=models).")
    models: Csv | None = option(None, help="Comma-separated models; default all evaluated.")
    k: int | None = option(None, help="Codebook size; default the smallest evaluated (the page says which).", ge=2)
    method: KMeansMethod | None = option(None, help="k-means method; default online if evaluated (the page says "
                                                    "which).")
    layer_k: int | None = option(None, help="Select the best layer at this K instead (12.3: K = 97 at the best "
                                            "K = 27 layer).", ge=2)
    colour: Literal["classes", "clusters"] = option(
        "classes", help="Colour the maps by matched class, or by cluster (overclustering, PROTOCOL.md 12.3).")
    images_with_class: str | None = option(None, help="Only test images showing this class, e.g. 'animal' "
                                                      "(12.6 ibot-animals).")
    title: str | None = option(None, help="Section title; default from the comparison.")


class ReportConfig(Storage):
    """Which results to draw, how, and where the page goes."""

    results: Location = option(help="Results folder written by evaluate.")
    out: Location = option(help="Report folder: index.html and figures (a folder or object-storage URL).")
    comparisons: tuple[Comparison, ...] = Field((Comparison(),), min_length=1,
                                                description="The report's sections, one per comparison.")
    dataset: str | None = option(None, help="Dataset, if the results hold several.")
    split: str | None = option(None, help="Test split, if the results hold several.")
    models: Csv | None = option(None, help="Only these models on the page; default every model in the results.",
                                flag="model")
    title: str | None = option(None, help="Page title; default dataset / split.")
