"""The feature store: ``FeatureStore`` (the root, its listing, the groups created on first
use), ``DatasetSplit`` (``datasets/<dataset>/<split>``) and ``ModelSplit``
(``models/<model>/<dataset>/<split>``), written one image chunk at a time so that several
processes can fill one store: each chunk is its own set of files, and a chunk's ``done`` flag
is set only after everything else of it is written."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from rep_pipeline import __version__
from rep_pipeline.storage_schemas import feature_store as layout

from ..errors import ConfigError, FingerprintMismatchError, StoreError
from ..location import ObjectPath, as_location
from ..parquet import read_parquet, write_parquet
from .artefacts import Codebook, Explanations, Templates
from .fingerprints import _check_example_attention, _check_same, fingerprint_hash
from .metadata import CodebookMeta, DatasetMeta, ExplanationsMeta, ModelMeta, TemplatesMeta
from .zarr_io import (Location, _create, _Group, _location_of, _metadata_read, _open_root, _read_together, _sizes,
                      _write_together)

if TYPE_CHECKING:
    import zarr


class FeatureStore:
    """A feature store on disk. ``mode="r"`` reads an existing store; ``"a"`` creates if needed."""

    def __init__(self, path: str | Location, mode: str = "r"):
        self.path = as_location(path)
        self.root, meta = _open_root(self.path, mode, f"feature store {self.path} does not exist", {
            "kind": layout.STORE_KIND, "schema_version": layout.SCHEMA_VERSION, "package_version": __version__})
        if meta.get("kind") != layout.STORE_KIND:
            raise StoreError(f"{self.path} is not a rep-pipeline feature store")
        if meta.get("schema_version") not in layout.READABLE_SCHEMA_VERSIONS:
            raise StoreError(
                f"feature store {self.path} has schema version {meta.get('schema_version')}; this "
                f"rep-pipeline ({__version__}) reads versions {', '.join(map(str, layout.READABLE_SCHEMA_VERSIONS))}"
            )
        self.schema_version = int(meta["schema_version"])

    # -- listing ---------------------------------------------------------------------------
    @_metadata_read
    def dataset_splits(self) -> list[tuple[str, str]]:
        if "datasets" not in self.root:
            return []
        return sorted((d, s) for d, g in self.root["datasets"].groups() for s, _ in g.groups())

    @_metadata_read
    def model_splits(self) -> list[tuple[str, str, str]]:
        if "models" not in self.root:
            return []
        return sorted((m, d, s) for m, mg in self.root["models"].groups()
                      for d, dg in mg.groups() for s, _ in dg.groups())

    def dataset_of(self, model: str, split: str, dataset: str | None = None) -> str:
        """The one dataset in which ``model`` has features of ``split`` (``dataset`` if named);
        none, or several without a name, is an error that says what to do."""
        found = sorted({d for m, d, s in self.model_splits() if m == model and s == split
                        and (dataset is None or d == dataset)})
        if not found:
            raise StoreError(f"{self.path} has no features of {model} for split {split}; run extract")
        if len(found) > 1:
            raise ConfigError(f"{model} has {split} in several datasets ({', '.join(found)}); pass --dataset")
        return found[0]

    # -- groups ------------------------------------------------------------------------------
    @_metadata_read
    def dataset_split(self, dataset: str, split: str) -> "DatasetSplit":
        path = layout.dataset_path(dataset, split)
        if path not in self.root:
            have = ", ".join(f"{d}/{s}" for d, s in self.dataset_splits()) or "none"
            raise StoreError(f"feature store {self.path} has no dataset split {dataset}/{split} (has: {have})")
        return DatasetSplit(self.root[path], path)

    @_metadata_read
    def model_split(self, model: str, dataset: str, split: str) -> "ModelSplit":
        path = layout.model_path(model, dataset, split)
        if path not in self.root:
            have = ", ".join("/".join(t) for t in self.model_splits()) or "none"
            raise StoreError(f"feature store {self.path} has no model group {path} (has: {have})")
        return ModelSplit(self.root[path], path)

    def check_request(self, model: str, dataset_fingerprint: Mapping[str, Any], chunk_images: int,
                      fingerprint: Mapping[str, Any]) -> None:
        """Refuse, before anything is created, a dataset split or model group that exists with
        another fingerprint (so a run refused on its second split leaves nothing behind)."""
        attrs = dict(dataset_fingerprint, chunk_images=chunk_images)
        path = layout.dataset_path(attrs["dataset"], attrs["split"])
        if path in self.root:
            stored = _dataset_attrs(self.root[path])
            _check_same("dataset configuration", f"{self.path}/{path}", stored, attrs,
                        tuple(k for k in layout.DATASET_ATTRS if k != "palette"))
            # the model groups over it hash the split's fingerprint as it is stored
            dataset_fingerprint = {k: v for k, v in dict(self.root[path].attrs).items()
                                   if k not in ("palette", "chunk_images")}
        path = layout.model_path(model, attrs["dataset"], attrs["split"])
        if path in self.root and dict(self.root[path].attrs):
            wanted = dict(fingerprint, dataset_fingerprint=fingerprint_hash(dataset_fingerprint),
                          chunk_images=chunk_images, schema_version=layout.SCHEMA_VERSION)
            _check_example_attention(f"{self.path}/{path}", dict(self.root[path].attrs), wanted)
            _check_same("model, weights or capture configuration", f"{self.path}/{path}",
                        dict(self.root[path].attrs), wanted, layout.MODEL_FINGERPRINT_KEYS)

    def require_dataset_split(self, fingerprint: Mapping[str, Any], image_ids: list[str],
                              palette: np.ndarray, chunk_images: int) -> "DatasetSplit":
        """The dataset split group for ``fingerprint``, created on first use."""
        attrs = dict(fingerprint, palette=np.asarray(palette).tolist(), chunk_images=chunk_images)
        path = layout.dataset_path(attrs["dataset"], attrs["split"])
        DatasetMeta.from_dict(attrs, path)  # what is written reads back: refused before anything is created
        if path in self.root:
            group = self.root[path]
            _check_same("dataset configuration", f"{self.path}/{path}", _dataset_attrs(group), attrs,
                        tuple(k for k in layout.DATASET_ATTRS if k != "palette"))
            return DatasetSplit(group, path)
        group = self.root.require_group(path)
        n, S = attrs["n_images"], attrs["image_size"]
        specs = layout.DATASET_ARRAYS
        _create(group, specs["image_ids"], (n,), chunk_images)[:] = np.asarray(image_ids, dtype=object)
        _create(group, specs["labels"], (n, S, S), chunk_images)
        _create(group, specs["geometry"], (n, len(layout.GEOMETRY_FIELDS)), chunk_images)
        _create(group, specs["done"], (layout.n_chunks(n, chunk_images),), chunk_images)
        _create(group, specs["example_images"], (min(n, layout.EXAMPLE_IMAGES), S, S, 3), chunk_images)
        for name in attrs.get("label_maps") or {}:
            _create(group, dataclasses.replace(layout.EXTRA_LABELS, name=layout.extra_labels_array(name)), (n, S, S),
                    chunk_images)
        group.attrs.update(attrs)  # last: a group with attributes is a complete group
        return DatasetSplit(group, path)

    def require_model_split(self, model: str, data: "DatasetSplit", fingerprint: Mapping[str, Any]) -> "ModelSplit":
        """The model group for ``fingerprint`` over ``data``, created on first use."""
        attrs = dict(fingerprint, dataset_fingerprint=fingerprint_hash(data.fingerprint),
                     chunk_images=data.chunk_images, schema_version=layout.SCHEMA_VERSION,
                     package_version=__version__, finished=False)
        path = layout.model_path(model, data.dataset, data.split)
        ModelMeta.from_dict(attrs, path)  # what is written reads back: refused before anything is created
        if path in self.root and dict(self.root[path].attrs):
            group = self.root[path]
            _check_example_attention(f"{self.path}/{path}", dict(group.attrs), attrs)
            _check_same("model, weights or capture configuration", f"{self.path}/{path}",
                        dict(group.attrs), attrs, layout.MODEL_FINGERPRINT_KEYS)
            return ModelSplit(group, path)
        group = self.root.require_group(path)
        for name, shape in layout.model_array_shapes(attrs, data.n_images).items():
            _create(group, layout.MODEL_ARRAYS[name], shape, data.chunk_images)
        if layout.EXAMPLE_ATTENTION in group:  # which images its example axis holds
            group[layout.EXAMPLE_ATTENTION].attrs["image_ids"] = data.image_ids()[: layout.n_examples(data.n_images)]
        _create(group, layout.PROVENANCE, (layout.n_chunks(data.n_images, data.chunk_images),), data.chunk_images)
        group.attrs.update(attrs)
        return ModelSplit(group, path)

    # -- summary -------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What is inside, how complete, how big: the data behind ``rep-pipeline store info``."""
        out: dict[str, Any] = {"path": str(self.path), "schema_version": self.schema_version,
                               "datasets": [], "models": []}
        for d, s in self.dataset_splits():
            ds = self.dataset_split(d, s)
            out["datasets"].append({
                "dataset": d, "split": s, "n_images": ds.n_images, "classes": len(ds.fingerprint["classes"]),
                "image_size": ds.fingerprint["image_size"], "chunks_done": int(ds.done[:].sum()),
                "chunks": ds.n_chunks, **_sizes(ds.group)})
        for m, d, s in self.model_splits():
            ms = self.model_split(m, d, s)
            a = ms.attrs
            out["models"].append({
                "model": m, "dataset": d, "split": s, "timm_name": a.get("timm_name"),
                "weights": a.get("weights_source"), "layers": a.get("layers"),
                "embeddings": a.get("embeddings"), "grid": a.get("grid"), "embed_dim": a.get("embed_dim"),
                "chunks_done": int(ms.done[:].sum()), "chunks": ms.n_chunks, "finished": a.get("finished"),
                "codebooks": {name: {e: int(book.group[f"{e}_done"][:].sum())
                                     for e in ms.embeddings if f"{e}_done" in book.group}
                              for name in ms.codebook_names() for book in [ms.codebook(*layout.parse_codebook_name(name))]},
                **_sizes(ms.group)})
        return out


def _dataset_attrs(group: zarr.Group) -> dict[str, Any]:
    """A dataset split's stored attributes, its options completed with the geometry a split
    written before the option existed was placed by (``crop``), for comparisons."""
    attrs = dict(group.attrs)
    return {**attrs, "options": layout.dataset_options(attrs)}



@dataclass
class DatasetSplit(_Group):
    """A dataset split's group: its metadata (``meta``), labels, example crops, geometry and
    keypoint pairs, read as NumPy arrays."""

    @property
    def meta(self) -> DatasetMeta:
        """The split's attributes, typed (a missing or malformed one: a ``StoreError`` naming it)."""
        return self._parsed(DatasetMeta)

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.meta.fingerprint

    dataset = property(lambda self: self.meta.dataset)
    split = property(lambda self: self.meta.split)
    n_images = property(lambda self: self.meta.n_images)
    chunk_images = property(lambda self: self.meta.chunk_images)
    n_chunks = property(lambda self: layout.n_chunks(self.n_images, self.chunk_images))
    labels = property(lambda self: self.array("labels"))
    done = property(lambda self: self.array("done"))

    def read_labels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(image, S, S) uint8 class ids of images [start, stop) (all by default)."""
        return self.labels[start:stop]

    def read_extra_labels(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The further label map ``name`` of images [start, stop), like ``read_labels``."""
        return self.extra_labels(name)[start:stop]

    def pending_chunks(self) -> list[int]:
        """Image chunks whose labels are not written yet."""
        return [int(i) for i in np.flatnonzero(~self.done[:])]

    def chunk_done(self, chunk: int) -> bool:
        return bool(self.done[chunk])

    def image_ids(self) -> list[str]:
        return [str(v) for v in self.array("image_ids")[:]]

    def bounds(self, chunk: int) -> tuple[int, int]:
        return layout.chunk_bounds(chunk, self.chunk_images, self.n_images)

    @property
    def label_maps(self) -> dict[str, list[str]]:
        """Further label maps beside ``labels``: name -> classes (none for most datasets)."""
        return dict(self.meta.label_maps or {})

    def extra_labels(self, name: str) -> zarr.Array:
        if name not in self.label_maps:
            raise StoreError(f"{self.path} has no label map {name!r} (has: {', '.join(self.label_maps) or 'none'})")
        return self.array(layout.extra_labels_array(name))

    def write_labels(self, chunk: int, labels: np.ndarray, images: np.ndarray | None = None,
                     extra: Mapping[str, np.ndarray] | None = None, geometry: np.ndarray | None = None) -> None:
        """Labels of one chunk (and, for the first images of the split, their RGB crops, the
        chunk's further label maps and the geometry rows of its images)."""
        start, stop = self.bounds(chunk)
        writes = [(self.labels, slice(start, stop), labels)]
        if geometry is not None and "geometry" in self.group:
            writes.append((self.array("geometry"), slice(start, stop), np.asarray(geometry, dtype=np.int32)))
        writes += [(self.extra_labels(name), slice(start, stop), value) for name, value in (extra or {}).items()]
        examples = self.array("example_images")
        if images is not None and start < examples.shape[0]:
            writes.append((examples, slice(start, min(stop, examples.shape[0])), images[: examples.shape[0] - start]))
        _write_together(writes)
        self.done[chunk] = True

    def example_images(self) -> np.ndarray:
        return self.array("example_images")[:]

    @property
    def geometry_mode(self) -> str:
        """``crop`` or ``pad``: how the split's images lie on the grid (PROTOCOL.md section 8.2)."""
        return self.meta.geometry_mode

    def geometry(self) -> np.ndarray:
        """(image, 6) int32 rows [W, H, W', H', ox, oy]; a split written before the array
        existed is an error naming it and what produces it."""
        if "geometry" not in self.group:
            raise StoreError(f"{self.path} has no array 'geometry' (written by extract since schema 2's keypoint "
                             f"support); extract the split into a new store to produce it")
        return self.array("geometry")[:]

    # -- keypoint pairs (PROTOCOL.md section 8.3) ------------------------------------------------------
    @property
    def _pairs_file(self) -> Location:
        return _location_of(self.group.store) / self.path / layout.KEYPOINT_PAIRS_FILE

    def has_keypoint_pairs(self) -> bool:
        return self._pairs_file.is_file()

    def write_keypoint_pairs(self, rows: list[dict[str, Any]]) -> None:
        """The split's keypoint pairs, stamped with its fingerprint's hash, in one write (a
        reader sees no file or the whole one). Every image id must be one of the split's."""
        known = set(self.image_ids())
        unknown = sorted({r[side] for r in rows for side in ("src_image_id", "trg_image_id")} - known)
        if unknown:
            raise StoreError(f"{self.path}: keypoint pairs name images that are not in the split: {unknown[:5]}")
        stamp = fingerprint_hash(self.fingerprint)
        write_parquet(self._pairs_file, [dict(r, dataset_fingerprint=stamp) for r in rows], layout.KEYPOINT_PAIRS)

    def keypoint_pairs(self) -> Any:
        """The split's keypoint pairs as a pyarrow table (``layout.KEYPOINT_PAIRS``); a split
        without them is an error naming the file and what produces it."""
        if not self.has_keypoint_pairs():
            raise StoreError(f"{self.path} has no {layout.KEYPOINT_PAIRS_FILE}: extract a keypoint dataset "
                             f"(spair71k, or synthetic-pairs) to produce it")
        table = read_parquet(self._pairs_file, layout.KEYPOINT_PAIRS)
        stamps = set(table.column("dataset_fingerprint").to_pylist())
        if stamps - {fingerprint_hash(self.fingerprint)}:
            raise FingerprintMismatchError(f"{self._pairs_file} was written for another version of {self.path}; "
                                           f"extract the split into a new store")
        return table


@dataclass
class ModelSplit(_Group):
    """A model group: its metadata (``meta``), features and attention read as NumPy arrays,
    written one image chunk at a time, and what is trained on its features."""

    @property
    def attrs(self) -> dict[str, Any]:
        """The raw attributes (the store's own comparisons; stages read ``meta``)."""
        return dict(self.group.attrs)

    @property
    def meta(self) -> ModelMeta:
        """The group's attributes, typed (a missing or malformed one: a ``StoreError`` naming it)."""
        return self._parsed(ModelMeta)

    n_images = property(lambda self: int(self.array("attention_mi").shape[1]))
    chunk_images = property(lambda self: self.meta.chunk_images)
    n_chunks = property(lambda self: int(self.array("done").shape[0]))
    done = property(lambda self: self.array("done"))
    layers = property(lambda self: self.meta.layers)
    embeddings = property(lambda self: self.meta.embeddings)
    class_embeddings = property(lambda self: self.meta.class_embeddings)
    finished = property(lambda self: bool(self.meta.finished))

    def check_embedding(self, embedding: str) -> None:
        """Fail, naming the captured embeddings and what produces it, unless the group holds ``embedding``."""
        self.features(embedding)

    def check_class_embedding(self, embedding: str) -> None:
        """Fail, like ``check_embedding``, unless the group holds the class token's ``embedding``."""
        self.class_features(embedding)

    def read_class_features(self, embedding: str, layer: int) -> np.ndarray:
        """(image, channel) float16: the class token's ``embedding`` at block ``layer``, every image."""
        return self.class_features(embedding)[self.layer_slot(layer)]

    def attention_mi(self) -> np.ndarray:
        """(layer, image, head) float32: I(K,Q) of every image, layer and head."""
        return self.array("attention_mi")[:]

    def features(self, embedding: str) -> zarr.Array:
        if embedding not in self.embeddings:
            raise StoreError(f"{self.path} has no array {embedding!r} (captured: {', '.join(self.embeddings)}); "
                             f"`extract --embeddings ...,{embedding}` into a new store (or with --model-key) "
                             f"produces it")
        return self.array(embedding)

    def class_features(self, embedding: str) -> zarr.Array:
        """The class token's ``embedding`` (layer, image, channel)."""
        if embedding not in self.class_embeddings:
            raise StoreError(f"{self.path} has no array {layout.class_array(embedding)!r} (class tokens of: "
                             f"{', '.join(self.class_embeddings)}); `extract --embeddings ...,{embedding} "
                             f"--class-embeddings ...,{embedding}` into a new store (or with --model-key) produces it")
        return self.array(layout.class_array(embedding))

    def read_features(self, embedding: str, layer: int, start: int, stop: int) -> np.ndarray:
        """Images [start, stop) of block ``layer``'s ``embedding``; a chunk that cannot be read
        is an error naming the array and the images, and how to find and repair it."""
        return self.read_many([(embedding, layer, start, stop)])[0]

    def read_many(self, requests: list[tuple[str, int, int, int]]) -> list[np.ndarray]:
        """``read_features(*request)`` for every request, fetched together."""
        reads = [(self.features(e), (self.layer_slot(layer), slice(a, b))) for e, layer, a, b in requests]
        out = _read_together(reads)
        for (embedding, layer, start, stop), value in zip(requests, out):
            if isinstance(value, BaseException):
                raise StoreError(f"{self.path}/{embedding} (layer {layer}, images {start}..{stop - 1}) cannot be "
                                 f"read: {type(value).__name__}: {value}; `rep-pipeline store check --repair` marks "
                                 f"bad chunks for recomputation") from value
        return out

    def pending_chunks(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done[:])]

    def write_chunk(self, chunk: int, arrays: Mapping[str, np.ndarray],
                    provenance: Mapping[str, Any] | None = None) -> None:
        """Write one image chunk of every array (and who wrote it), then mark it done. (In a
        repaired group whose ``attention_map`` stands, the chunk's attention sum is not needed
        and not written.) ``example_attention``, where the group holds it, holds the rows of the
        chunk's images among the split's examples (none past them)."""
        start, stop = layout.chunk_bounds(chunk, self.chunk_images, self.n_images)
        per_image = (slice(None), slice(start, stop))
        names = (*self.embeddings, *map(layout.class_array, self.class_embeddings), "attention_mi")
        writes = [(self.array(name), per_image, arrays[name]) for name in names]
        if "attention_sum" in self.group:
            writes.append((self.array("attention_sum"), chunk, arrays["attention_sum"]))
        examples = layout.n_examples(self.n_images)
        if layout.EXAMPLE_ATTENTION in self.group and start < examples:  # the chunk's example images' rows
            writes.append((self.array(layout.EXAMPLE_ATTENTION), (slice(None), slice(start, min(stop, examples))),
                           arrays[layout.EXAMPLE_ATTENTION]))
        if provenance is not None and "provenance" in self.group:
            writes.append((self.array("provenance"), slice(chunk, chunk + 1),
                           np.asarray([json.dumps(dict(provenance))], dtype=object)))
        _write_together(writes)
        self.done[chunk] = True

    def provenance(self) -> list[dict[str, Any] | None]:
        """Per image chunk, who wrote it (None where unknown: not done, or written before
        provenance was recorded)."""
        if "provenance" not in self.group:
            return [None] * self.n_chunks
        done = self.done[:]
        return [json.loads(v) if v and done[i] else None for i, v in enumerate(self.array("provenance")[:])]

    def finalize(self) -> None:
        """Once every chunk is done: the mean attention map replaces the per-chunk sums."""
        if self.finished:
            return
        if not self.done[:].all():
            raise StoreError(f"{self.path}: cannot finalise, chunks {self.pending_chunks()[:10]} are not done")
        if "attention_sum" in self.group:
            total = self.array("attention_sum")[:].sum(axis=0) / self.n_images
            _create(self.group, layout.MODEL_ARRAYS["attention_map"], total.shape, self.chunk_images)[:] = total
        self.group.attrs["finished"] = True
        if self.group.attrs.get(layout.ATTENTION_FINAL):
            self.group.attrs[layout.ATTENTION_FINAL] = False
        if "attention_sum" in self.group:
            del self.group["attention_sum"]
        self._arrays.pop("attention_sum", None)

    @property
    def fingerprint_hash(self) -> str:
        """What the features are: every fingerprint key, not the package version (an optional
        key that a group lacks, e.g. a version-1 group's class_embeddings, is left out, so its
        hash is the one it had)."""
        attrs = self.attrs
        return fingerprint_hash({k: attrs.get(k) for k in layout.MODEL_FINGERPRINT_KEYS
                                 if k in attrs or k not in layout.OPTIONAL_FINGERPRINT_KEYS})

    @property
    def request_sha256(self) -> str | None:
        """The hash of the extract request this group was completed for (None before that)."""
        return self.group.attrs.get("request_sha256")

    def record_request(self, request: Mapping[str, Any]) -> None:
        """Note, on a finished group, the request it answers (see ``REQUEST_ATTRS``)."""
        if not self.finished:
            raise StoreError(f"{self.path} is not finished; only a finished group answers a request")
        self.group.attrs.update({"request": dict(request), "request_sha256": fingerprint_hash(request)})

    def layer_slot(self, layer: int) -> int:
        """The index along ``layer`` of block ``layer``."""
        if layer not in self.layers:
            raise StoreError(f"{self.path} has no layer {layer}; captured layers: {list(self.layers)}")
        return self.layers.index(layer)

    @_metadata_read
    def codebooks(self) -> list["Codebook"]:
        return [self.codebook(*layout.parse_codebook_name(n)) for n in self.codebook_names()]

    @_metadata_read
    def codebook_names(self) -> list[str]:
        """The codebooks, not counting replacements still in training."""
        if "codebooks" not in self.group:
            return []
        return sorted(n for n, _ in self.group["codebooks"].groups()
                      if not n.endswith(layout.REPLACEMENT_SUFFIX) and not n.startswith("."))

    def codebook(self, method: str, k: int, seed: int, variant: str | None = None,
                 replacement: bool = False) -> "Codebook":
        """The codebook of (method, k, seed[, variant]), or with ``replacement`` the one training
        to replace it."""
        name = layout.codebook_name(method, k, seed, variant) + (layout.REPLACEMENT_SUFFIX if replacement else "")
        if "codebooks" not in self.group or name not in self.group["codebooks"]:
            raise StoreError(f"{self.path} has no codebook {name} (has: {', '.join(self.codebook_names()) or 'none'})")
        return Codebook(self.group["codebooks"][name], layout.codebook_path(self.path, name), self)

    def _codebook_attrs(self, method: str, k: int, seed: int, hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
        return {"method": method, "k": k, "seed": seed, "hyperparameters": dict(hyperparameters),
                "features_fingerprint": self.fingerprint_hash, "schema_version": layout.SCHEMA_VERSION,
                "package_version": __version__}

    def trained_codebook(self, method: str, k: int, seed: int, hyperparameters: Mapping[str, Any],
                         variant: str | None = None) -> "Codebook | None":
        """The codebook of (method, k, seed[, variant]) if one exists that was trained with these
        hyperparameters on these features, else None. Reads only."""
        name = layout.codebook_name(method, k, seed, variant)
        if name not in self.codebook_names():
            return None
        book = self.codebook(method, k, seed, variant)
        wanted = self._codebook_attrs(method, k, seed, hyperparameters)
        same = fingerprint_hash({k: wanted[k] for k in layout.CODEBOOK_FINGERPRINT_KEYS}) == book.fingerprint_hash
        return book if same else None

    def check_codebook(self, method: str, k: int, seed: int, hyperparameters: Mapping[str, Any],
                       variant: str | None = None) -> None:
        """Refuse, before anything is created, a codebook of (method, k, seed[, variant]) that
        exists with other hyperparameters or on other features."""
        name = layout.codebook_name(method, k, seed, variant)
        if name in self.codebook_names() and dict(self.codebook(method, k, seed, variant).attrs):
            _check_same("training configuration", layout.codebook_path(self.path, name),
                        self.codebook(method, k, seed, variant).attrs,
                        self._codebook_attrs(method, k, seed, hyperparameters),
                        layout.CODEBOOK_FINGERPRINT_KEYS)

    def require_codebook(self, method: str, k: int, seed: int, hyperparameters: Mapping[str, Any],
                         force: bool = False, variant: str | None = None) -> "Codebook":
        """The codebook group of (method, k, seed), created on first use. A group trained with
        other hyperparameters or on other features is refused unless ``force``: then an empty
        replacement is created beside it (``replace_codebook`` swaps it in), and the finished
        codebook stays readable until then."""
        attrs = self._codebook_attrs(method, k, seed, hyperparameters)
        if variant:
            attrs["variant"] = variant
        name = layout.codebook_name(method, k, seed, variant)
        CodebookMeta.from_dict(attrs, layout.codebook_path(self.path, name))
        books = self.group.require_group("codebooks")
        if force:
            name += layout.REPLACEMENT_SUFFIX
        elif name in books and dict(books[name].attrs):
            _check_same("training configuration", layout.codebook_path(self.path, name), dict(books[name].attrs), attrs,
                        layout.CODEBOOK_FINGERPRINT_KEYS)
            return Codebook(books[name], layout.codebook_path(self.path, name), self)
        group = books.create_group(name, overwrite=True)
        group.attrs.update(attrs)
        return Codebook(group, layout.codebook_path(self.path, name), self)

    def replace_codebook(self, method: str, k: int, seed: int, variant: str | None = None) -> None:
        """Swap the finished replacement of (method, k, seed) in for the codebook: two renames,
        the old one removed only after the new one is in place. Layers and embeddings the
        replacement did not retrain are carried over when both were trained alike (same
        hyperparameters, same features); otherwise the codebook is replaced whole.

        Object storage has no rename: there the old codebook is first marked untrained with
        the replacement's attributes, then the replacement's objects are copied over it (done
        flags last) and the replacement removed, so an interruption leaves layers to retrain,
        never a codebook that mixes two trainings."""
        name = layout.codebook_name(method, k, seed, variant)
        if name in self.codebook_names():
            old_book = self.codebook(method, k, seed, variant)
            new_book = self.codebook(method, k, seed, variant, replacement=True)
            if old_book.fingerprint_hash == new_book.fingerprint_hash:
                new_book.keep_finished(old_book)
        self._swap_in("codebooks", name)

    def _swap_in(self, parent: str, name: str) -> None:
        """``<parent>/<name>.replacing`` becomes ``<parent>/<name>`` (see ``replace_codebook``)."""
        folder = _location_of(self.group.store) / self.group.path / parent
        new, old = folder / (name + layout.REPLACEMENT_SUFFIX), folder / name
        if not new.is_dir():
            raise StoreError(f"{self.path}/{parent} has no replacement of {name} to swap in")
        if isinstance(folder, ObjectPath):
            self._copy_group(parent, name, new, old)
            return
        retired = folder / f".{name}.retired"
        if old.exists():
            os.replace(old, retired)
        os.replace(new, old)
        shutil.rmtree(retired, ignore_errors=True)

    def _copy_group(self, parent: str, name: str, new: ObjectPath, old: ObjectPath) -> None:
        books = self.group[parent]
        if name in books:
            for key in books[name].array_keys():
                if key.endswith("_done"):
                    books[name][key][:] = False
            books[name].attrs.update(dict(books[name + layout.REPLACEMENT_SUFFIX].attrs))
        new.mirror_to(old, last=lambda rel: "_done/" in rel)  # done flags last
        new.remove_tree()

    # -- hyperplane templates (direction probes) ---------------------------------------------------
    @_metadata_read
    def templates_names(self) -> list[str]:
        if "templates" not in self.group:
            return []
        return sorted(n for n, _ in self.group["templates"].groups()
                      if not n.endswith(layout.REPLACEMENT_SUFFIX) and not n.startswith("."))

    def _templates_attrs(self, seed: int, concepts: list[dict[str, Any]], hyperparameters: Mapping[str, Any]
                         ) -> dict[str, Any]:
        return {"concepts": [dict(c) for c in concepts], "seed": seed, "hyperparameters": dict(hyperparameters),
                "features_fingerprint": self.fingerprint_hash, "schema_version": layout.SCHEMA_VERSION,
                "package_version": __version__}

    def trained_templates(self, seed: int, concepts: list[dict[str, Any]], hyperparameters: Mapping[str, Any]
                          ) -> "Templates | None":
        """The stored templates of ``seed`` if trained for these concepts, hyperparameters and
        features, else None. Reads only."""
        name = layout.templates_name(seed)
        if name not in self.templates_names():
            return None
        found = Templates(self.group["templates"][name], f"{self.path}/templates/{name}", self)
        wanted = self._templates_attrs(seed, concepts, hyperparameters)
        same = fingerprint_hash({k: wanted[k] for k in layout.TEMPLATE_FINGERPRINT_KEYS}) == found.fingerprint_hash
        return found if same else None

    def require_templates(self, seed: int, concepts: list[dict[str, Any]], hyperparameters: Mapping[str, Any],
                          embeddings: tuple[str, ...], force: bool = False) -> "Templates":
        """The templates group of ``seed`` with arrays for ``embeddings``, created on first use;
        one trained otherwise (other concepts, hyperparameters or features) is refused unless
        ``force``: then a replacement is created beside it (``replace_templates`` swaps it in)."""
        attrs = self._templates_attrs(seed, concepts, hyperparameters)
        name = layout.templates_name(seed)
        TemplatesMeta.from_dict(attrs, f"{self.path}/templates/{name}")
        parent = self.group.require_group("templates")
        if force:
            name += layout.REPLACEMENT_SUFFIX
        elif name in parent and dict(parent[name].attrs):
            _check_same("template training", f"{self.path}/templates/{name}", dict(parent[name].attrs), attrs,
                        layout.TEMPLATE_FINGERPRINT_KEYS)
        if force or name not in parent or not dict(parent[name].attrs):
            group = parent.create_group(name, overwrite=True)
            group.attrs.update(attrs)
        found = Templates(parent[name], f"{self.path}/templates/{name}", self)
        for emb in embeddings:
            found.require(emb)
        return found

    def templates(self, seed: int, replacement: bool = False) -> "Templates":
        """The templates of ``seed`` (or, with ``replacement``, the ones training to replace them)."""
        name = layout.templates_name(seed) + (layout.REPLACEMENT_SUFFIX if replacement else "")
        if "templates" not in self.group or name not in self.group["templates"]:
            raise StoreError(f"{self.path} has no templates {name} (has: {', '.join(self.templates_names()) or 'none'})")
        return Templates(self.group["templates"][name], f"{self.path}/templates/{name}", self)

    def replace_templates(self, seed: int) -> None:
        self._swap_in("templates", layout.templates_name(seed))

    # -- ULTra explanation maps (PROTOCOL.md section 8.4) -------------------------------------------
    def require_explanations(self, f: str, embedding: str, layers: tuple[int, ...], n_images: int,
                             hyperparameters: Mapping[str, Any]) -> "Explanations":
        """The explanation group of (f, embedding), created with its arrays on first use (by the
        driver, before workers write chunks into it); one made with other choices is refused."""
        name = layout.explanations_name(f, embedding)
        P = self.meta.grid ** 2
        attrs = {"f": f, "embedding": embedding, "layers": list(layers), "order": "latest_left",
                 "self_fill": "max_other", "hyperparameters": dict(hyperparameters), "n_images": n_images,
                 "features_fingerprint": self.fingerprint_hash, "schema_version": layout.SCHEMA_VERSION,
                 "package_version": __version__}
        ExplanationsMeta.from_dict(attrs, f"{self.path}/explanations/{name}")
        parent = self.group.require_group("explanations")
        if name in parent and dict(parent[name].attrs):
            _check_same("explanation", f"{self.path}/explanations/{name}", dict(parent[name].attrs), attrs,
                        layout.EXPLANATION_FINGERPRINT_KEYS)
            return Explanations(parent[name], f"{self.path}/explanations/{name}", self)
        group = parent.create_group(name, overwrite=True)
        specs, L, c = layout.EXPLANATION_ARRAYS, len(layers), self.chunk_images
        _create(group, specs["maps"], (L, n_images, P, P), c)
        _create(group, specs["class_maps"], (L, n_images, P), c)
        _create(group, specs["done"], (L, layout.n_chunks(n_images, c)), c)
        group.attrs.update(attrs)  # last: a group with attributes is complete
        return Explanations(group, f"{self.path}/explanations/{name}", self)

    def explanations(self, f: str, embedding: str) -> "Explanations":
        name = layout.explanations_name(f, embedding)
        if "explanations" not in self.group or name not in self.group["explanations"]:
            have = sorted(n for n, _ in self.group["explanations"].groups()) if "explanations" in self.group else []
            raise StoreError(f"{self.path} has no explanations {name} (has: {', '.join(have) or 'none'}); run "
                             f"`rep-pipeline explain`")
        return Explanations(self.group["explanations"][name], f"{self.path}/explanations/{name}", self)

    def attention_map(self) -> np.ndarray:
        if not self.finished:
            raise StoreError(f"{self.path} is not finished; run the same extract command to complete it")
        return self.array("attention_map")[:]

    @property
    def has_example_attention(self) -> bool:
        """Whether the group holds ``example_attention`` (extract option ``example_attention``)."""
        return bool(self.group.attrs.get(layout.EXAMPLE_ATTENTION)) and layout.EXAMPLE_ATTENTION in self.group

    def example_attention(self) -> tuple[np.ndarray, list[str]]:
        """(rows (layer, example, query, key) float32, the example images' ids): the head-averaged
        patch-to-patch attention of each example image (PROTOCOL.md 12.5); a group extracted
        without them is an error naming the array and the option that produces it."""
        if not self.has_example_attention:
            raise StoreError(f"{self.path} has no array {layout.EXAMPLE_ATTENTION!r}; `extract --example-attention` "
                             f"into a new store (or with --model-key) produces it")
        if not self.finished:
            raise StoreError(f"{self.path} is not finished; run the same extract command to complete it")
        array = self.array(layout.EXAMPLE_ATTENTION)
        return array[:], [str(i) for i in array.attrs.get("image_ids", [])]

