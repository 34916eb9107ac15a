"""What a model group keeps beside its features, trained on them: k-means ``Codebook``s,
the direction probes' hyperplane ``Templates`` and ULTra's ``Explanations``."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol

import numpy as np

from rep_pipeline.storage_schemas import feature_store as layout

from ..errors import StoreError
from .fingerprints import fingerprint_hash
from .metadata import CodebookMeta, ExplanationsMeta, TemplatesMeta, _Meta
from .zarr_io import _create, _read_together, _write_together

if TYPE_CHECKING:
    import zarr


class ModelGroup(Protocol):
    """What an artefact knows of the model group it is trained on (``features.ModelSplit``,
    which owns its artefacts: this module never imports it)."""

    layers: tuple[int, ...]
    embeddings: tuple[str, ...]
    chunk_images: int

    @property
    def meta(self) -> Any: ...

    def layer_slot(self, layer: int) -> int: ...


@dataclass
class _Trained:
    """A group trained on a model group's features (a codebook, templates): its attributes and
    the hash of those that say what it was trained as (``FINGERPRINT_KEYS``)."""

    FINGERPRINT_KEYS: ClassVar[tuple[str, ...]] = ()
    META: ClassVar[type[_Meta]] = _Meta
    group: zarr.Group
    path: str
    features: ModelGroup

    @property
    def attrs(self) -> dict[str, Any]:
        """The raw attributes (the store's own comparisons; stages read ``meta``)."""
        return dict(self.group.attrs)

    @property
    def meta(self) -> Any:
        """The group's attributes, typed (``META``; a missing or malformed one: a ``StoreError`` naming it)."""
        return self.META.from_dict(self.group.attrs.asdict(), self.path)

    @property
    def fingerprint_hash(self) -> str:
        attrs = self.attrs
        return fingerprint_hash({k: attrs.get(k) for k in self.FINGERPRINT_KEYS})


@dataclass
class Codebook(_Trained):
    """Centroids of one (method, K, seed) for every captured layer of some embeddings."""

    FINGERPRINT_KEYS: ClassVar[tuple[str, ...]] = layout.CODEBOOK_FINGERPRINT_KEYS
    META: ClassVar[type[_Meta]] = CodebookMeta

    @property
    def meta(self) -> CodebookMeta:
        return CodebookMeta.from_dict(self.group.attrs.asdict(), self.path)

    @property
    def name(self) -> str:
        """Its name in the store, e.g. ``online-k27-s0`` (``layout.codebook_name``)."""
        return self.path.rsplit("/", 1)[-1].removesuffix(layout.REPLACEMENT_SUFFIX)

    @property
    def variant(self) -> str | None:
        """None for a main codebook; the short hash of its other hyperparameters for a
        variant trained beside it (the k-means sensitivity study, PROTOCOL.md 12.2)."""
        return layout.parse_codebook_name(self.name)[3]

    def require(self, embedding: str) -> tuple[zarr.Array, zarr.Array]:
        """The centroid and done arrays of ``embedding``, created if absent (by the driver,
        before workers write layers into them: two creating one array would race)."""
        if f"{embedding}_done" not in self.group:
            L, k, D = len(self.features.layers), int(self.group.attrs["k"]), self.features.meta.embed_dim
            spec = layout.CODEBOOK_ARRAYS
            _create(self.group, layout.ArraySpec(embedding, spec["centroids"].dims, "float32",
                                                 spec["centroids"].chunks, spec["centroids"].doc), (L, k, D), 1)
            _create(self.group, layout.ArraySpec(f"{embedding}_done", spec["done"].dims, "bool",
                                                 spec["done"].chunks, spec["done"].doc), (L,), 1)
        return self.group[embedding], self.group[f"{embedding}_done"]

    def is_done(self, embedding: str, layer: int) -> bool:
        if f"{embedding}_done" not in self.group:
            return False
        return bool(self.group[f"{embedding}_done"][self.features.layer_slot(layer)])

    def write(self, embedding: str, layer: int, centroids: np.ndarray) -> None:
        """Store a finished layer's centroids, then mark it done."""
        arr, done = self.require(embedding)
        slot = self.features.layer_slot(layer)
        arr[slot] = centroids
        done[slot] = True

    def keep_finished(self, other: "Codebook") -> None:
        """Copy in every finished (embedding, layer) of ``other`` that this codebook lacks."""
        for emb in self.features.embeddings:
            for layer in self.features.layers:
                if other.is_done(emb, layer) and not self.is_done(emb, layer):
                    self.write(emb, layer, other.centroids(emb, layer))

    def centroids(self, embedding: str, layer: int) -> np.ndarray:
        if not self.is_done(embedding, layer):
            raise StoreError(f"{self.path} has no finished {embedding} codebook for layer {layer}")
        return self.group[embedding][self.features.layer_slot(layer)]


@dataclass
class Templates(_Trained):
    """Hyperplane templates (w, b) of one seed for every captured layer of some embeddings."""

    FINGERPRINT_KEYS: ClassVar[tuple[str, ...]] = layout.TEMPLATE_FINGERPRINT_KEYS
    META: ClassVar[type[_Meta]] = TemplatesMeta

    @property
    def meta(self) -> TemplatesMeta:
        return TemplatesMeta.from_dict(self.group.attrs.asdict(), self.path)

    @property
    def concepts(self) -> list[dict[str, Any]]:
        return list(self.meta.concepts)

    def require(self, embedding: str) -> None:
        """Create the arrays of ``embedding`` (once, before workers write layers into them)."""
        if f"{embedding}_done" in self.group:
            return
        L, C, D = len(self.features.layers), len(self.concepts), self.features.meta.embed_dim
        for spec, name, shape in ((layout.TEMPLATE_ARRAYS["weights"], embedding, (L, C, D)),
                                  (layout.TEMPLATE_ARRAYS["bias"], f"{embedding}_bias", (L, C)),
                                  (layout.TEMPLATE_ARRAYS["done"], f"{embedding}_done", (L,))):
            _create(self.group, dataclasses.replace(spec, name=name), shape, 1)

    def is_done(self, embedding: str, layer: int) -> bool:
        if f"{embedding}_done" not in self.group:
            return False
        return bool(self.group[f"{embedding}_done"][self.features.layer_slot(layer)])

    def write(self, embedding: str, layer: int, weights: np.ndarray, bias: np.ndarray) -> None:
        """Store a layer's templates (every concept), then mark it done."""
        slot = self.features.layer_slot(layer)
        _write_together([(self.group[embedding], slot, weights), (self.group[f"{embedding}_bias"], slot, bias)])
        self.group[f"{embedding}_done"][slot] = True

    def read(self, embedding: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.is_done(embedding, layer):
            raise StoreError(f"{self.path} has no finished {embedding} templates for layer {layer}")
        slot = self.features.layer_slot(layer)
        return self.group[embedding][slot], self.group[f"{embedding}_bias"][slot]


@dataclass
class Explanations(_Trained):
    """ULTra explanation maps of one (f, embedding) for some layers over the first ``n_images``
    images of a model group (PROTOCOL.md section 8.4), written a (layer, image chunk) at a time."""

    FINGERPRINT_KEYS: ClassVar[tuple[str, ...]] = layout.EXPLANATION_FINGERPRINT_KEYS
    META: ClassVar[type[_Meta]] = ExplanationsMeta

    @property
    def meta(self) -> ExplanationsMeta:
        return ExplanationsMeta.from_dict(self.group.attrs.asdict(), self.path)

    layers = property(lambda self: self.meta.layers)
    n_images = property(lambda self: self.meta.n_images)

    def slot(self, layer: int) -> int:
        if layer not in self.layers:
            raise StoreError(f"{self.path} has no layer {layer}; explained layers: {list(self.layers)}")
        return self.layers.index(layer)

    def bounds(self, chunk: int) -> tuple[int, int]:
        return layout.chunk_bounds(chunk, self.features.chunk_images, self.n_images)

    @property
    def n_chunks(self) -> int:
        return layout.n_chunks(self.n_images, self.features.chunk_images)

    def is_done(self, layer: int, chunk: int) -> bool:
        return bool(self.group["done"][self.slot(layer), chunk])

    def pending(self) -> list[int]:
        """Image chunks with any layer not written yet."""
        return [int(c) for c in np.flatnonzero(~self.group["done"][:].all(axis=0))]

    def write(self, layer: int, chunk: int, maps: np.ndarray, class_maps: np.ndarray) -> None:
        """One (layer, image chunk) of maps and class maps, then its done flag."""
        start, stop = self.bounds(chunk)
        slot = self.slot(layer)
        _write_together([(self.group["maps"], (slot, slice(start, stop)), maps.astype(np.float16)),
                         (self.group["class_maps"], (slot, slice(start, stop)), class_maps.astype(np.float16))])
        self.group["done"][slot, chunk] = True

    def write_projections(self, projections: Mapping[int, np.ndarray], fit: Mapping[str, Any]) -> None:
        """ULTra_W's fitted unit vectors (layer -> (N, D)), written once before any map, and what
        the fit reported (``fit`` attribute: losses, pairs, steps)."""
        w = np.stack([np.asarray(projections[layer], np.float32) for layer in self.layers])
        _create(self.group, layout.EXPLANATION_ARRAYS["projections"], w.shape, 1)[:] = w
        self.group.attrs["fit"] = json.loads(json.dumps(dict(fit), default=float))

    def projections(self) -> dict[int, np.ndarray] | None:
        """The fitted vectors by layer, or None before the fit is stored."""
        if "projections" not in self.group or "fit" not in self.group.attrs:
            return None
        w = self.group["projections"][:]
        return {layer: w[i] for i, layer in enumerate(self.layers)}

    def read(self, layer: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(maps (n, P, P), class maps (n, P)) of images [start, stop) at ``layer``, as float32."""
        slot = self.slot(layer)
        maps, class_maps = _read_together([(self.group["maps"], (slot, slice(start, stop))),
                                           (self.group["class_maps"], (slot, slice(start, stop)))])
        for value in (maps, class_maps):
            if isinstance(value, BaseException):
                raise StoreError(f"{self.path} (layer {layer}, images {start}..{stop - 1}) cannot be read: "
                                 f"{value}") from value
        return np.asarray(maps, np.float32), np.asarray(class_maps, np.float32)

