"""The attributes of the store's groups as frozen dataclasses, the way zarr-python keeps its own
metadata (``zarr/core/metadata/v3.py``): built by small ``parse_*`` functions that raise a
``StoreError`` naming the group and the key (``models/dino/coco/val: attribute 'grid'
missing``), and written back by ``to_dict``, which gives exactly the attributes it was read
from (the names are ``storage_schemas.feature_store``'s: ``DATASET_ATTRS``, ``MODEL_ATTRS``,
``CODEBOOK_ATTRS``, ``TEMPLATE_ATTRS``, ``EXPLANATION_ATTRS``). An attribute the class does
not name is kept as it is, in ``extra``; an optional one absent from the group stays absent.

No zarr here: the store package reads a group's attributes and hands them to ``from_dict``;
the stages read the fields.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, TypeVar

import numpy as np

from rep_pipeline.storage_schemas import feature_store as layout

from ..errors import StoreError

T = TypeVar("T", bound="_Meta")
Parser = Callable[[Any, str, str], Any]


# -- parse_*: (value, where, key) -> the field's value, or a StoreError naming where and key ------------
def _bad(where: str, key: str, value: Any, expected: str) -> StoreError:
    return StoreError(f"{where}: attribute {key!r} is {value!r}, expected {expected}; `rep-pipeline store check` "
                      f"lists every problem of the store")


def parse_int(value: Any, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise _bad(where, key, value, "an integer")
    return int(value)


def parse_str(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, key, value, "a string")
    return value


def parse_bool(value: Any, where: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(where, key, value, "true or false")
    return value


def parse_str_tuple(value: Any, where: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _bad(where, key, value, "a list of strings")
    return tuple(value)


def parse_int_tuple(value: Any, where: str, key: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise _bad(where, key, value, "a list of integers")
    return tuple(parse_int(v, where, key) for v in value)


def parse_mapping(value: Any, where: str, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(where, key, value, "a mapping")
    return dict(value)


def parse_palette(value: Any, where: str, key: str) -> tuple[tuple[int, int, int], ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, (list, tuple)) and len(c) == 3 for c in value):
        raise _bad(where, key, value, "a list of [r, g, b] colours")
    return tuple(tuple(parse_int(v, where, key) for v in c) for c in value)  # type: ignore[misc]


def parse_label_maps(value: Any, where: str, key: str) -> dict[str, tuple[str, ...]]:
    return {str(name): parse_str_tuple(classes, where, f"{key}.{name}")
            for name, classes in parse_mapping(value, where, key).items()}


def parse_any(value: Any, where: str, key: str) -> Any:
    return value


def nullable(parse: Parser) -> Parser:
    """``parse`` that also lets null through (e.g. ``weights_sha256`` of random weights)."""
    def parse_or_none(value: Any, where: str, key: str) -> Any:
        return None if value is None else parse(value, where, key)
    return parse_or_none


def attr(parse: Parser, *, key: str | None = None, optional: bool = False) -> Any:
    """A field read from the attribute ``key`` (default: the field's name) by ``parse``;
    ``optional``: the group may lack it (the field is None then, and ``to_dict`` leaves it out)."""
    meta = {"parse": parse, "key": key, "optional": optional}
    return field(default=None, metadata=meta) if optional else field(metadata=meta)


def _plain(value: Any) -> Any:
    """A field's value as JSON attributes hold it (tuples as lists)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, kw_only=True)
class _Meta:
    """A group's attributes: the fields declared with ``attr``, and ``extra``, every other
    attribute as stored. ``where`` is the group's path, for messages."""

    KIND: ClassVar[str] = "group"
    where: str = field(compare=False, default="")
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # the optional attributes stored as null (``to_dict`` writes them back; other None fields are absent)
    stored_null: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def _attr_fields(cls) -> list[tuple[dataclasses.Field, str]]:
        return [(f, f.metadata.get("key") or f.name) for f in dataclasses.fields(cls) if "parse" in f.metadata]

    @classmethod
    def from_dict(cls: type[T], attrs: Mapping[str, Any], where: str) -> T:
        """The metadata of the group at ``where`` from its attributes; a required attribute
        that is missing, or any of the wrong type, is a ``StoreError`` naming group and key."""
        values: dict[str, Any] = {}
        nulls = frozenset(key for f, key in cls._attr_fields() if f.metadata["optional"] and key in attrs
                          and attrs[key] is None)
        for f, key in cls._attr_fields():
            if key not in attrs:
                if f.metadata["optional"]:
                    continue
                raise StoreError(f"{where}: attribute {key!r} missing (a {cls.KIND} group records "
                                 f"{', '.join(k for g, k in cls._attr_fields() if not g.metadata['optional'])}); "
                                 f"`rep-pipeline store check` lists every problem of the store")
            values[f.name] = f.metadata["parse"](attrs[key], where, key)
        named = {key for _, key in cls._attr_fields()}
        return cls(**values, where=where, extra={k: v for k, v in attrs.items() if k not in named}, stored_null=nulls)

    def to_dict(self) -> dict[str, Any]:
        """The attributes, as they are stored (``from_dict``'s input, key for key)."""
        out = dict(self.extra)
        for f, key in self._attr_fields():
            value = getattr(self, f.name)
            if value is not None or not f.metadata["optional"] or key in self.stored_null:
                out[key] = _plain(value)
        return out

    def get(self, key: str, default: Any = None) -> Any:
        """The stored attribute ``key`` (for generic comparisons; stages read the fields)."""
        return self.to_dict().get(key, default)


@dataclass(frozen=True, kw_only=True)
class DatasetMeta(_Meta):
    """A dataset split's attributes (``layout.DATASET_ATTRS``, and ``category`` and
    ``label_maps`` where the dataset has them)."""

    KIND: ClassVar[str] = "dataset split"
    dataset: str = attr(parse_str)
    split: str = attr(parse_str)
    n_images: int = attr(parse_int)
    image_size: int = attr(parse_int)
    classes: tuple[str, ...] = attr(parse_str_tuple)
    palette: tuple[tuple[int, int, int], ...] = attr(parse_palette)
    ignore_index: int = attr(parse_int)
    image_ids_sha256: str = attr(parse_str)
    chunk_images: int = attr(parse_int)
    options: dict[str, Any] | None = attr(parse_mapping, optional=True)
    category: str | None = attr(parse_str, optional=True)
    label_maps: dict[str, tuple[str, ...]] | None = attr(parse_label_maps, optional=True)

    @property
    def palette_array(self) -> np.ndarray:
        """(class, 3) uint8."""
        return np.asarray(self.palette, dtype=np.uint8)

    @property
    def geometry_mode(self) -> str:
        """``crop`` or ``pad``: how the split's images lie on the grid (PROTOCOL.md section 8.2)."""
        return str(layout.dataset_options(self.to_dict())["geometry"])

    @property
    def placement_options(self) -> dict[str, Any]:
        """The dataset options, with the geometry a split written before that option was placed by."""
        return layout.dataset_options(self.to_dict())

    @property
    def primary_category(self) -> str:
        """The category of ``labels`` (the dataset's name where none is recorded)."""
        return self.category or self.dataset

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the labels: every attribute but the palette and the chunk size."""
        return {k: v for k, v in self.to_dict().items() if k not in ("palette", "chunk_images")}


@dataclass(frozen=True, kw_only=True)
class ModelMeta(_Meta):
    """A model group's attributes (``layout.MODEL_ATTRS``; the version-2 ``class_embeddings``,
    ``example_attention``, and once complete the ``request`` it answers). Attributes that
    groups written by early versions may lack are optional."""

    KIND: ClassVar[str] = "model"
    model: str | None = attr(parse_str, optional=True)
    timm_name: str | None = attr(parse_str, optional=True)
    family: str | None = attr(parse_str, optional=True)
    weights_source: Any = attr(parse_any, optional=True)
    weights_sha256: str | None = attr(nullable(parse_str), optional=True)
    image_size: int | None = attr(parse_int, optional=True)
    input_size: Any = attr(parse_any, optional=True)
    patch_size: int | None = attr(parse_int, optional=True)
    grid: int = attr(parse_int)
    num_prefix_tokens: int | None = attr(parse_int, optional=True)
    embed_dim: int = attr(parse_int)
    num_heads: int | None = attr(parse_int, optional=True)
    depth: int | None = attr(parse_int, optional=True)
    mean: Any = attr(parse_any, optional=True)
    std: Any = attr(parse_any, optional=True)
    layers: tuple[int, ...] = attr(parse_int_tuple)
    embeddings: tuple[str, ...] = attr(parse_str_tuple)
    rope: str | None = attr(parse_str, optional=True)
    last_norm: str | None = attr(parse_str, optional=True)
    chunk_images: int = attr(parse_int)
    dataset_fingerprint: str | None = attr(parse_str, optional=True)
    schema_version: int | None = attr(parse_int, optional=True)
    package_version: str | None = attr(parse_str, optional=True)
    finished: bool | None = attr(parse_bool, optional=True)
    class_embeddings_attr: tuple[str, ...] | None = attr(parse_str_tuple, key=layout.CLASS_EMBEDDINGS_ATTR,
                                                         optional=True)
    example_attention: bool | None = attr(parse_bool, key=layout.EXAMPLE_ATTENTION, optional=True)
    attention_final: bool | None = attr(parse_bool, key=layout.ATTENTION_FINAL, optional=True)
    request: dict[str, Any] | None = attr(parse_mapping, optional=True)
    request_sha256: str | None = attr(parse_str, optional=True)

    @property
    def class_embeddings(self) -> tuple[str, ...]:
        """The embeddings whose class token the group holds (version 1: tokens)."""
        return self.class_embeddings_attr or ("tokens",)

    @property
    def rope_mode(self) -> str:
        return self.rope or "before"

    @property
    def last_norm_mode(self) -> str:
        return self.last_norm or "after"

    @property
    def n_prefix(self) -> int:
        return int(self.num_prefix_tokens or 0)


@dataclass(frozen=True, kw_only=True)
class CodebookMeta(_Meta):
    """A codebook's attributes (``layout.CODEBOOK_ATTRS``, and ``variant`` for a codebook of
    the k-means sensitivity study)."""

    KIND: ClassVar[str] = "codebook"
    method: str = attr(parse_str)
    k: int = attr(parse_int)
    seed: int = attr(parse_int)
    hyperparameters: dict[str, Any] = attr(parse_mapping)
    features_fingerprint: str = attr(parse_str)
    schema_version: int | None = attr(parse_int, optional=True)
    package_version: str | None = attr(parse_str, optional=True)
    variant: str | None = attr(parse_str, optional=True)

    @property
    def fingerprint(self) -> dict[str, Any]:
        return {k: self.to_dict().get(k) for k in layout.CODEBOOK_FINGERPRINT_KEYS}


@dataclass(frozen=True, kw_only=True)
class TemplatesMeta(_Meta):
    """Hyperplane templates' attributes (``layout.TEMPLATE_ATTRS``)."""

    KIND: ClassVar[str] = "templates"
    concepts: tuple[dict[str, Any], ...] = attr(lambda v, w, k: tuple(parse_mapping(c, w, k) for c in
                                                                      _listed(v, w, k)))
    seed: int = attr(parse_int)
    hyperparameters: dict[str, Any] = attr(parse_mapping)
    features_fingerprint: str = attr(parse_str)
    schema_version: int | None = attr(parse_int, optional=True)
    package_version: str | None = attr(parse_str, optional=True)


@dataclass(frozen=True, kw_only=True)
class ExplanationsMeta(_Meta):
    """ULTra explanation maps' attributes (``layout.EXPLANATION_ATTRS``, and ``fit`` once
    ULTra_W's projections are stored)."""

    KIND: ClassVar[str] = "explanations"
    f: str = attr(parse_str)
    embedding: str = attr(parse_str)
    layers: tuple[int, ...] = attr(parse_int_tuple)
    order: str = attr(parse_str)
    self_fill: str = attr(parse_str)
    hyperparameters: dict[str, Any] = attr(parse_mapping)
    n_images: int = attr(parse_int)
    features_fingerprint: str = attr(parse_str)
    schema_version: int | None = attr(parse_int, optional=True)
    package_version: str | None = attr(parse_str, optional=True)
    fit: dict[str, Any] | None = attr(parse_mapping, optional=True)


# -- the results' maps.zarr (storage_schemas.results): what the stages recorded beside their maps --------
@dataclass(frozen=True, kw_only=True)
class GroundTruthMapsMeta(_Meta):
    """``<d>/<split>/ground_truth``: the split's classes and palette, the example images' ids and
    the evaluation options the maps were computed with."""

    KIND: ClassVar[str] = "ground-truth maps"
    classes: tuple[str, ...] = attr(parse_str_tuple)
    palette: tuple[tuple[int, int, int], ...] = attr(parse_palette)
    example_ids: list[Any] | None = attr(parse_any, optional=True)
    evaluation: dict[str, Any] | None = attr(parse_mapping, optional=True)

    @property
    def palette_array(self) -> np.ndarray:
        return np.asarray(self.palette, dtype=np.uint8)


@dataclass(frozen=True, kw_only=True)
class AttentionMapsMeta(_Meta):
    """``<d>/<split>/<model>/attention``: the blocks of the mean attention maps, the patch grid's
    side, and the example images (and blocks) of the per-image rows where stored."""

    KIND: ClassVar[str] = "attention maps"
    layers: tuple[int, ...] = attr(parse_int_tuple)
    grid: Any = attr(parse_any, optional=True)
    example_ids: list[Any] | None = attr(parse_any, optional=True)
    example_layers: tuple[int, ...] | None = attr(nullable(parse_int_tuple), optional=True)

    @property
    def grid_side(self) -> int | None:
        """G, where recorded (a number, or a one-element list)."""
        grid = self.grid
        if not grid:
            return None
        return int(grid[0] if isinstance(grid, (list, tuple)) else grid)


@dataclass(frozen=True, kw_only=True)
class RunRecord(_Meta):
    """What a probe or correspondence run recorded beside its maps: the options and features it
    depends on (``record``, under the stage's key) and the settings it completed."""

    KIND: ClassVar[str] = "run record"
    settings: tuple[tuple[Any, ...], ...] = attr(lambda v, w, k: tuple(tuple(s) for s in _listed(v, w, k)),
                                                 optional=True)

    def record(self, key: str) -> dict[str, Any] | None:
        """The run's record under ``key`` (``probe``, ``correspond``), None where there is none."""
        value = self.extra.get(key)
        return dict(value) if isinstance(value, Mapping) else None

    def done(self) -> set[tuple[Any, ...]]:
        return set(self.settings or ())


def _listed(value: Any, where: str, key: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise _bad(where, key, value, "a list")
    return list(value)


def same_json(a: Any, b: Any) -> bool:
    """Whether two attribute values are equal as JSON (tuples and lists alike)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
