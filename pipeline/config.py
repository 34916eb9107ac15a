"""Every option of rep-pipeline, declared once, and the frozen config of each stage.

Each option is one pydantic field: its type (``Literal`` for allowed values), default and help
text. The CLI (``cli/app.py``) builds its flags from these fields, the ``run`` YAML loader
(``cli/run.py``) validates its sections against them, and a stage receives the validated
object: adding an option is one edit here. An option several stages take (the store, the
dataset, the model, its layers, the splits...) is declared once, in a base class they share; a
stage's own help or default for it is in its ``help_of`` / ``default_of``. pydantic does the
validation and type coercion (YAML's ``[0, 5]`` and the CLI's ``"0,5"`` pass the same
validators) and reports every bad key at once; errors become ``ConfigError`` lines in the
user's terms: where the values came from, the key as the user wrote it (``cluster.k`` in a run
file, ``--k`` on the command line), a value in a list by its value, never a class name or a
list position, and for an unknown key the allowed ones and the closest. Values follow
``../shared/PROTOCOL.md``.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, Mapping, Sequence, get_args

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError, create_model,
                      field_validator, model_validator)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ..storage_schemas import feature_store
from ..storage_schemas.results import default_results
from .errors import ConfigError, RepPipelineError
from .location import ObjectPath, as_location
from .yaml_files import load_value

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
READ_TIMEOUT_SECONDS = 60        # an image or label file that yields no data by then is named
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
        out[key.strip()] = load_value(raw, f"option {key.strip()}")
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
def _once_each(values: Any) -> Any:
    """A list option's values in order, each once (``--k 5,5`` trains one codebook, not two)."""
    return tuple(dict.fromkeys(values)) if isinstance(values, tuple) else values


Ks = Annotated[tuple[Annotated[int, Field(ge=2)], ...] | None, BeforeValidator(parse_csv), AfterValidator(_once_each)]
Methods = Annotated[tuple[KMeansMethod, ...], BeforeValidator(parse_csv), AfterValidator(_once_each)]
KeyValues = Annotated[dict[str, Any], BeforeValidator(parse_key_values)]


def option(default: Any = ..., help: str = "", *, flag: str | None = None, short: str | None = None,
           from_run: bool = False, **constraints: Any) -> Any:
    """One option: its default (``...`` = required), its help, and, where the command-line flag
    is not the field name in kebab case, the flag (and a one-letter alias). ``from_run``: in a
    run config the run fills it in from its top-level keys (the store, the dataset, each models
    entry...), so a stage section may not set it (``Options.set_by_run``)."""
    extra = {k: v for k, v in (("flag", flag), ("short", short), ("from_run", from_run)) if v}
    return Field(default, description=help, json_schema_extra=extra or None, **constraints)


def _extra(info: FieldInfo) -> dict[str, Any]:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


class Options(BaseModel):
    """A validated, frozen set of options; unknown keys are refused.

    An option shared by several stages is declared once, in a base class below; a stage whose
    help for it (or default) differs says so in ``help_of`` (``default_of``) instead of declaring
    the field again: its type and checks stay the base's."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    help_of: ClassVar[Mapping[str, str]] = {}
    default_of: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        helps, defaults = cls.__dict__.get("help_of", {}), cls.__dict__.get("default_of", {})
        for name in {*helps, *defaults}:
            if name not in cls.__pydantic_fields__:
                raise TypeError(f"{cls.__name__}: help_of/default_of name {name!r}, which is no option of it")
            info = copy.copy(cls.__pydantic_fields__[name])
            info.description = helps.get(name, info.description)
            if name in defaults:
                info.default = defaults[name]
                # a default other than None: None is no value of it here; None: the option may be left out
                info.annotation = (_without_none(info.annotation) if defaults[name] is not None
                                   else typing.Optional[info.annotation])
            cls.__pydantic_fields__[name] = info
        if defaults:
            cls.model_rebuild(force=True)

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise InvalidOptions(exc, type(self)) from None

    @classmethod
    def parse(cls, values: Mapping[str, Any], where: str = "", names: Callable[[str], str] | None = None) -> "Options":
        """``cls(**values)``, with every invalid key reported in one ``ConfigError`` that
        starts with ``where`` (the file or command the values came from) and names each key as
        the user wrote it: ``names(field)`` (e.g. ``cluster.k`` in a run file, ``--k`` on the
        command line; ``cls.flag``), the field's name without it."""
        try:
            return cls(**{str(k): v for k, v in values.items()})
        except InvalidOptions as exc:
            raise ConfigError(describe_errors(exc.validation, where, names, cls)) from None

    def replace(self, **changes: Any) -> "Options":
        """A copy with ``changes``, validated again."""
        return type(self).parse({**self.model_dump(), **changes})

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line flag of option ``name``: ``--k``, ``--method``..."""
        info = cls.model_fields.get(name)
        return "--" + str((_extra(info) if info else {}).get("flag") or name).replace("_", "-")

    @classmethod
    def set_by_run(cls) -> frozenset[str]:
        """The options a run config fills in itself (``from_run``), which its sections may not set."""
        return frozenset(name for name, info in cls.model_fields.items() if _extra(info).get("from_run"))


def _without_none(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return rest[0] if len(rest) == 1 else typing.Union[rest]
    return annotation


class InvalidOptions(ConfigError):
    """Values that fail validation; the message lists every key at fault."""

    def __init__(self, validation: ValidationError, model: type[Options] | None = None):
        super().__init__(describe_errors(validation, "", None, model))
        self.validation = validation
        self.model = model


def unknown_key(key: str, allowed: Sequence[str]) -> str:
    """``unknown key; did you mean steps? (allowed: ...)``: what an unknown ``key`` is told."""
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    return "unknown key" + (f"; did you mean {close[0]}?" if close else "") + f" (allowed: {', '.join(sorted(allowed))})"


_NUMBER_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
                  "less_than": ("lt", "<")}
_NOT_A = {"int_parsing": "is not a whole number", "int_type": "is not a whole number",
          "int_from_float": "is not a whole number", "float_parsing": "is not a number", "float_type": "is not a number",
          "bool_parsing": "is not true or false", "bool_type": "is not true or false", "string_type": "is not text",
          "tuple_type": "is not a list", "list_type": "is not a list", "dict_type": "is not a mapping",
          "model_type": "is not a mapping"}


def _problem(err: Mapping[str, Any], in_list: bool) -> str:
    """What is wrong with one value, in words (no pydantic class or type names)."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    shown = str(got) if isinstance(got, (int, float, str)) and kind in _NUMBER_BOUNDS else repr(got)
    if kind in _NUMBER_BOUNDS:
        key, op = _NUMBER_BOUNDS[kind]
        return f"{shown} is not allowed: {'every value ' if in_list else ''}must be {op} {ctx.get(key)}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", ""))) or [str(ctx.get("expected", ""))]
        close = difflib.get_close_matches(str(got), choices, n=1)
        return (f"{shown} is not one of {', '.join(choices)}" + (f"; did you mean {close[0]}?" if close else ""))
    if kind == "missing":
        return "required"
    if kind in ("too_short", "string_too_short"):
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 and kind == "string_too_short" else f"needs at least {n} value{'s' * (n != 1)}"
    if kind in ("too_long", "string_too_long"):
        return f"takes at most {ctx.get('max_length')} value(s)"
    if kind == "string_pattern_mismatch":
        return f"{shown} does not match {ctx.get('pattern')}"
    if kind in _NOT_A:
        return f"{shown} {_NOT_A[kind]}"
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ")
    return f"{shown}: " + err["msg"].replace("Input should be", "should be")


def _lines(exc: ValidationError, names: Callable[[str], str], model: type[Options] | None) -> list[str]:
    lines: list[str] = []
    errors = exc.errors()
    in_lists = {err["loc"][0] for err in errors if len(err["loc"]) > 1 and err["type"] != "too_short"}
    for err in errors:
        loc = err["loc"]
        if err["type"] == "too_short" and loc and loc[0] in in_lists:
            continue  # a list with a bad value: that value is the error, not the list's length
        field = str(loc[0]) if loc else ""
        key = names(field) if field else ""
        nested = (err.get("ctx") or {}).get("error")
        if isinstance(nested, InvalidOptions):  # a section of options inside options: its own keys
            at = key + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
            lines += _lines(nested.validation, lambda f, at=at: f"{at}.{f}" if at else f, nested.model)
            continue
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: " + unknown_key(field, list(model.model_fields) if model else []))
            continue
        problem = _problem(err, in_list=any(isinstance(p, int) for p in loc[1:]))
        lines.append(f"{key}: {problem}" if key else problem)
    return list(dict.fromkeys(lines))  # a union's branches may say the same twice


def describe_errors(exc: ValidationError, where: str = "", names: Callable[[str], str] | None = None,
                    model: type[Options] | None = None) -> str:
    """``where: key: what is wrong``, one line per error, every key named as the user wrote it
    (``names``), a value in a list by its value (never by its position)."""
    lines = _lines(exc, names or (lambda f: f), model)
    prefix = f"{where}: " if where else ""
    return prefix + (lines[0] if len(lines) == 1 else "invalid options\n  " + "\n  ".join(lines))


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
                                                 "environment.", flag="storage-option", from_run=True)

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

    results: Location | None = option(None, help="Results folder; default <store>/../results.", from_run=True)

    @model_validator(mode="before")
    @classmethod
    def default_results(cls, data: Any) -> Any:
        return _default_results(data)


class OnBackend(Options):
    """A stage whose array code runs on NumPy or CuPy."""

    backend: BackendName | None = option(None, help="Array backend; default CuPy when a GPU is present.")


class OnWorkers(Options):
    """A stage whose work Ray workers (actors) share."""

    workers: int | None = option(None, help="Ray workers; default one per GPU, else one per node.", ge=1)


# -- the options every stage on a feature store shares, each declared once --------------------
class OfDataset(Options):
    """A stage that may be told which dataset, where the store (or results) hold several."""

    dataset: str | None = option(None, help="Dataset, if the model has the split in several.", from_run=True)


class OnStore(Storage, OfDataset):
    """A stage on a feature store, of one dataset's features."""

    store: Location = option(help="Feature store.", from_run=True)


class OnModel(OnStore):
    """A stage on one model's features, at some of its blocks."""

    model: str = option(help="Model key in the store (alias or timm name).", from_run=True)
    layers: Layers = option(None, help="Blocks, e.g. '6-11'; default every captured one.")


class OnSplit(Options):
    """A stage on one split (the test split) of the store."""

    split: str = option(help="Test split.", from_run=True)


class FromTrainSplit(Options):
    """A stage that fits something on a train split."""

    train_split: str = option(help="Split to fit on.", from_run=True)


class OfEmbeddings(Options):
    """A stage on some of the embeddings the store holds."""

    embeddings: Annotated[tuple[Embedding, ...] | None, BeforeValidator(parse_csv)] = option(
        None, help="Default every captured one.")


class RunsTheModel(OnWorkers):
    """A stage that runs the model itself on the dataset's images (extract, explain)."""

    weights: str = option("pretrained", help="pretrained | random | PATH (.safetensors or .pth).", min_length=1,
                          from_run=True)
    seed: int = option(RANDOM_WEIGHTS_SEED, help="Seed of --weights random.", from_run=True)
    data_root: Location | None = option(None, help="Dataset root folder (or object-storage URL).", from_run=True)
    device: Literal["auto", "cpu", "cuda"] = option("auto", help="Where the model runs; auto: a GPU if present.")
    threads_per_worker: int | None = option(None, help="Torch threads per CPU actor.", flag="threads", ge=1)
    max_image_pixels: int = option(MAX_IMAGE_PIXELS, help="Refuse images (and labels) of more pixels than "
                                                          "this, before decoding them.", ge=1)


# -- the stages ------------------------------------------------------------------------------
class ExtractConfig(OnModel, RunsTheModel):
    """What the extract stage captures, from which data, into which store."""

    help_of = {"model": "Alias (dino-b16, tiny-dinov3...) or any timm ViT/Eva name.",
               "store": "Feature store to create or complete (Zarr v3 folder or object-storage URL).",
               "dataset": "cocostuff27 | cityscapes27 | voc | folder | synthetic.",
               "layers": "Blocks to capture: '0,5,11', '6-11' or 'all' (default).",
               "workers": "Actors: default one per GPU, else one per node."}
    default_of = {"dataset": "synthetic"}

    splits: Csv | None = option(None, help="Comma-separated splits; default: the dataset's.", from_run=True)
    embeddings: Embeddings = option(DEFAULT_EMBEDDINGS, help="Any of queries,keys,values,tokens,mid_tokens (x1, "
                                    "before the MLP),mid_normed (norm2 of x1).", min_length=1)
    class_embeddings: Annotated[tuple[Embedding, ...] | None, BeforeValidator(parse_csv)] = option(
        None, help="Embeddings whose class token is kept too; default every captured one.")
    limit: int | None = option(None, help="Take the first N images of each split.", ge=1, from_run=True)
    image_size: int = option(IMAGE_SIZE, help="S: label grid and crop size.", ge=16)
    rope: Literal["before", "after"] = option("before", help="RoPE models: q and k before or after the rotation.")
    last_norm: Literal["after", "before"] = option("after", help="Last-layer tokens relative to the final norm.")
    chunk_images: int = option(16, help="Images per store chunk and per forward batch.", ge=1)
    model_key: str | None = option(None, help="Store group name for the model; default its alias.", from_run=True)
    compile_statistics: bool = option(False, help="Fuse the attention statistics with torch.compile "
                                                  "(a one-off compile of 10 to 20 s).")
    example_attention: bool = option(False, help="Also keep the head-averaged patch-to-patch attention rows of "
                                                 "each of the split's example images (PROTOCOL.md 12.5).")
    dataset_options: KeyValues = option({}, help="Dataset option KEY=VALUE (value read as YAML); repeatable.",
                                        flag="option", short="o", from_run=True)

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


class ClusterConfig(OnModel, FromTrainSplit, OfEmbeddings, ResultsBeside, OnWorkers, OnBackend):
    """Which codebooks to fit, on which features, and how (PROTOCOL.md section 4)."""

    help_of = {"store": "Feature store written by extract.", "train_split": "Split to fit the codebooks on."}

    k: Ks = option(None, help="Cluster counts, e.g. '27,97'; default: the number of classes.")
    methods: Methods = option(("online",), help="online | lloyd | online,lloyd.", flag="method", min_length=1)
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


class EvaluateConfig(OnStore, OnSplit, ResultsBeside, OnBackend):
    """Which features to evaluate on which test split, and where results go (section 5)."""

    help_of = {"store": "Feature store with features and codebooks.", "split": "Test split to segment and score.",
               "dataset": "Only this dataset."}

    models: Csv | None = option(None, help="Comma-separated models; default all with the split.", flag="model")
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


class ProbeConfig(OnModel, FromTrainSplit, OnSplit, OfEmbeddings, ResultsBeside, OnWorkers, OnBackend):
    """Direction probes: hyperplane and cosine templates per token type (PROTOCOL.md section 9)."""

    help_of = {"store": "Feature store with the train and test splits' features.",
               "train_split": "Split the templates are fitted on (cosine: supports drawn from).",
               "split": "Test split the templates are evaluated on.",
               "dataset": "Dataset, if the model has the splits in several.",
               "layers": "Blocks, e.g. '11' or '6-11'; default the last captured one.",
               "embeddings": "Token types; default those of q, k, v, mid_tokens (x1), tokens (x2) the store holds."}

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


class CorrespondConfig(OnModel, OnSplit, OfEmbeddings, ResultsBeside, OnWorkers, OnBackend):
    """Zero-shot keypoint transfer and PCK per layer and embedding (PROTOCOL.md section 11)."""

    help_of = {"store": "Feature store with a keypoint split's features (extract --dataset spair71k...).",
               "split": "Split whose keypoint pairs are transferred.",
               "embeddings": "Default those of queries, keys, values, tokens the store holds."}

    alphas: Annotated[tuple[Annotated[float, Field(gt=0)], ...], BeforeValidator(parse_csv)] = option(
        PCK_ALPHAS, help="PCK thresholds, fractions of the target box's longer side.", flag="alpha", min_length=1)
    keep_matches: bool = option(False, help="Also write every prediction (table correspondence_matches).")
    examples: int = option(3, help="Keypoints whose cosine heatmaps are kept for figure c3.", ge=0)


ExplainScalar = Literal["sum", "energy", "learned"]  # f_s (ULTra_S), f_e (ULTra_E), f_w (ULTra_W, s. 10.7)
Perturbation = Literal["mask", "noise"]
ITIOU_TAUS = tuple(round(0.05 * i, 2) for i in range(21))  # section 10.5's sweep, 0.00..1.00


class ExplainConfig(OnModel, OnSplit, FromTrainSplit, RunsTheModel, ResultsBeside, OnBackend):
    """ULTra explanation maps of latent tokens, per-image concepts and their scores (PROTOCOL.md s. 10)."""

    help_of = {"store": "Feature store with the split's features (the maps go into its model group).",
               "split": "Split to explain and score.",
               "train_split": "Split whose segments fit the K = C codebook of the 'dataset' scoring (explained too); "
                              "without it only the per-image scores.",
               "weights": "pretrained | random | PATH: the weights the store's features came from (checked against "
                          "its fingerprint).",
               "data_root": "Dataset root: the images are read again (same adapter, geometry and fingerprint as the "
                            "store's).",
               "layers": "Blocks to explain; default the middle and the last captured one.",
               "max_image_pixels": "Refuse images of more pixels than this."}
    default_of = {"train_split": None}

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


def _layer_choice(*words: str) -> Callable[[Any], Any]:
    """A validator of a layer named by one of ``words`` or by its block number."""
    def choice(value: Any) -> Any:
        if value in words or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        raise ValueError(f"must be {' or '.join(repr(w) for w in words)} or a block number, got {value!r}")
    return choice


class Comparison(Options):
    """One comparison of the visual protocol: rows are models (at their best or a fixed layer)
    or the layers of one model, for one embedding type, K and method."""

    compare: Annotated[Literal["models", "layers"], BeforeValidator(_compare_alias)] = option(
        "models", help="Rows: models (also 'paradigms', 'sizes') or the layers of one model.")
    embedding: Embedding = option("keys", help="Embedding type to compare.")
    layer: Annotated[Literal["best", "last"] | int, BeforeValidator(_layer_choice("best", "last"))] = option(
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


class ReportConfig(Storage, OfDataset, OnSplit):
    """Which results to draw, how, and where the page goes."""

    help_of = {"dataset": "Dataset, if the results hold several.", "split": "Test split, if the results hold several."}
    default_of = {"split": None}

    results: Location = option(help="Results folder written by evaluate.")
    out: Location = option(help="Report folder: index.html and figures (a folder or object-storage URL).")
    comparisons: tuple[Comparison, ...] = Field((Comparison(),), min_length=1,
                                                description="The report's sections, one per comparison.")
    models: Csv | None = option(None, help="Only these models on the page; default every model in the results.",
                                flag="model")
    title: str | None = option(None, help="Page title; default dataset / split.")


# -- the sections of a run config that are not a stage's options ------------------------------
DATASET_KEYS = {"name": "dataset", "root": "data_root", "options": "dataset_options", "limit": "limit"}


def dataset_section(name: str, **splits: str) -> type[Options]:
    """A run config's dataset section: the extract options of ``DATASET_KEYS`` under their
    shorter names (same type, checks and help; ``name`` required), and its splits by role, each
    a required split name with the help given (``train_split=...``, ``split=...``)."""
    fields: dict[str, Any] = {}
    for key, option_name in DATASET_KEYS.items():
        info = copy.copy(ExtractConfig.model_fields[option_name])
        info.default, info.json_schema_extra = PydanticUndefined if key == "name" else None, None
        fields[key] = (info.annotation, info)
    fields.update({role: (str, option(help=help)) for role, help in splits.items()})
    return create_model(name, __base__=Options, __module__=__name__, __doc__=dataset_section.__doc__, **fields)


RunDataset = dataset_section("RunDataset", train_split="Split the codebooks are fitted on.",
                             test_split="Split they are evaluated on.")  # the run's own
KeypointDataset = dataset_section("KeypointDataset", split="Split whose keypoint pairs are transferred.")  # the correspond section's


class SensitivityConfig(Options):
    """The k-means sensitivity study (PROTOCOL.md 12.2): one model's codebooks at one (embedding,
    layer, K) retrained with other PCA initialisations and batch sizes, several seeds each.
    The first value of each list is the baseline (the run's own cluster settings where they
    agree); every other value is varied one at a time."""

    model: str = option(help="A model of the run (its store key).")
    embedding: Embedding = option("tokens", help="Embedding (A33: tokens).")
    layer: Annotated[Literal["best"] | int, BeforeValidator(_layer_choice("best"))] = option(
        "best", help="'best' (highest mIoU at this K, online) or a block number.")
    k: int | None = option(None, help="K; default the run's first.", ge=2)
    seeds: tuple[int, ...] = option((0, 1, 2), help="k-means seeds of every setting.", min_length=1)
    batch_images: tuple[int, ...] = option((24, 32, 48), help="Images per batch.", min_length=1)
    init_intervals: tuple[int, ...] = option((1, 2, 4), help="PCA from every n-th of the first init_batches x n "
                                                              "batches.", min_length=1)

    @field_validator("batch_images", "init_intervals")
    @classmethod
    def _distinct_positive(cls, values: tuple[int, ...]) -> tuple[int, ...]:
        if min(values) < 1 or len(set(values)) != len(values):
            raise ValueError(f"distinct positive integers, got {list(values)}")
        return values

    def settings(self) -> list[dict[str, int]]:
        """The baseline, then each other batch size, then each other PCA interval."""
        b0, n0 = self.batch_images[0], self.init_intervals[0]
        return ([{"batch_images": b0, "init_interval": n0}] + [{"batch_images": b, "init_interval": n0}
                                                               for b in self.batch_images[1:]]
                + [{"batch_images": b0, "init_interval": n} for n in self.init_intervals[1:]])
