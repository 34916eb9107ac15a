"""Zarr I/O: the feature store and the results' ``maps.zarr``. The only module that talks to zarr.

The layouts themselves (paths, arrays, dimensions, codecs, attributes) are data in
``storage_schemas``; this module creates groups from them, validates stores against them,
refuses to mix outputs of different producers (fingerprints), and writes one image chunk at a
time so that several processes can fill one store: each chunk is its own set of files, and a
chunk's ``done`` flag is set only after everything else of it is written.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

import numpy as np
import zarr
from zarr.core.sync import sync

from rep_pipeline import __version__
from rep_pipeline.storage_schemas import feature_store as layout
from rep_pipeline.storage_schemas import results as results_layout

from .errors import ConfigError, FingerprintMismatchError, StoreError
from .location import ObjectPath, as_location, is_local, put_object_async, remove_tree

Location = Path | ObjectPath
# Some S3 servers (SeaweedFS) keep listing the prefix of a removed array as an empty "folder";
# zarr warns about it on every listing, while ``store check`` reports real orphans itself.
warnings.filterwarnings("ignore", message=r"Object at .* is not recognized as a component of a Zarr hierarchy")


class _ObjectStore(zarr.storage.ObjectStore):
    """zarr's store over an obstore client, remembering the URL it was opened at (for messages
    and for the few operations on whole folders)."""

    def __init__(self, store: Any, *, read_only: bool = False, location: ObjectPath | None = None):
        super().__init__(store, read_only=read_only)
        self.location = location

    def with_read_only(self, read_only: bool = False) -> "_ObjectStore":
        return type(self)(self.store, read_only=read_only, location=self.location)

    async def set(self, key: str, value: Any) -> None:
        """Each chunk in one PUT: aligned whole-chunk writes need no read-modify-write, and no
        multipart upload either."""
        self._check_writable()
        await put_object_async(self.store, key, value.as_buffer_like())


def _zarr_store(location: Location, mode: str) -> Any:
    """What ``zarr.open_group`` opens: the local path as it is, or zarr's ``ObjectStore``."""
    if is_local(location):
        return str(location)
    return _ObjectStore(location.obstore_store(), read_only=mode == "r", location=location)


def _location_of(store: Any) -> Location:
    """Where a zarr store lives (the inverse of ``_zarr_store``)."""
    return store.location if isinstance(store, _ObjectStore) else Path(store.root)


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def _codecs(spec: layout.ArraySpec) -> dict[str, Any]:
    # no codec in the layout means none, not zarr's default (Zstandard)
    return {"compressors": [spec.codec] if spec.codec else None}


def _create(group: zarr.Group, spec: layout.ArraySpec, shape: tuple[int, ...], chunk_images: int) -> zarr.Array:
    dtype = str if spec.dtype == "str" else spec.dtype
    return group.create_array(
        spec.name, shape=shape, dtype=dtype, chunks=spec.chunk_shape(shape, chunk_images),
        dimension_names=spec.dims, fill_value=None if spec.dtype == "str" else 0,
        attributes={"doc": spec.doc}, chunk_key_encoding=layout.CHUNK_KEY_ENCODING, overwrite=True,
        **_codecs(spec),
    )


def _check_same(kind: str, where: str, stored: Mapping[str, Any], new: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    # JSON round trip so tuples and lists compare equal
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731
    diffs = [f"{k}: stored {norm(stored.get(k))!r}, now {norm(new.get(k))!r}"
             for k in keys if norm(stored.get(k)) != norm(new.get(k))]
    if diffs:
        raise FingerprintMismatchError(
            f"{where} was written by another {kind}; refusing to mix outputs.\n  " + "\n  ".join(diffs)
            + "\nUse a new --store, or --model-key to keep both models side by side."
        )


def _check_example_attention(where: str, stored: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Refuse, saying why and what to do, a model group extracted with(out) ``example_attention``
    asked to take chunks of a run without (with) it: the example rows come with the chunks
    they belong to, so they cannot be added to (or left out of) finished features."""
    had, wants = bool(stored.get(layout.EXAMPLE_ATTENTION)), bool(new.get(layout.EXAMPLE_ATTENTION))
    if had == wants:
        return
    what = "example_attention (the per-image attention rows of the split's example images, PROTOCOL.md 12.5)"
    if wants:
        raise FingerprintMismatchError(
            f"{where} was extracted without {what}, and this run asks for it; its written chunks cannot take the "
            f"rows afterwards, so outputs are not mixed. Extract with --example-attention into a new --store, or "
            f"under another --model-key (the group's features stay valid as they are)")
    raise FingerprintMismatchError(
        f"{where} was extracted with {what}, and this run asks without it; refusing to mix outputs. Extract with "
        f"--example-attention to complete or reuse the group, or use a new --store or another --model-key")


def _write_together(writes: list[tuple[zarr.Array, Any, np.ndarray]]) -> None:
    """``array[selection] = value`` for every triple, in one pass of zarr's event loop, so their
    chunks are encoded and stored concurrently rather than one array after another. Every
    write is let finish before the first error is raised (naming its array), so none is still
    running when the caller retries.
    """
    async def write_all() -> list[Any]:
        return await asyncio.gather(*(array.async_array.setitem(selection, value) for array, selection, value in writes),
                                    return_exceptions=True)

    for (array, _, value), result in zip(writes, sync(write_all())):
        if isinstance(result, BaseException):
            raise StoreError(f"writing {array.path} (shape {array.shape}) from an array of shape "
                             f"{np.shape(value)} failed: {result}") from result


def _read_together(reads: list[tuple[zarr.Array, Any]]) -> list[Any]:
    """``array[selection]`` for every pair, in one pass of zarr's event loop (on object storage
    their chunks are fetched concurrently rather than one round trip after another). Returns
    the values, or the exception of each read that failed."""
    async def read_all() -> list[Any]:
        return await asyncio.gather(*(array.async_array.getitem(selection) for array, selection in reads),
                                    return_exceptions=True)

    return sync(read_all())


def _bad_metadata(root: Location) -> str:
    """The first ``zarr.json`` under ``root`` that does not parse, for an error message."""
    for meta in sorted(root.rglob("zarr.json")):
        try:
            json.loads(meta.read_text())
        except (OSError, ValueError):
            return str(meta)
    return f"a zarr.json under {root}"


def _metadata_read(method: Callable) -> Callable:
    """Metadata that does not parse, met while listing or opening groups and arrays, is a
    ``StoreError`` naming the file (zarr's own error names none)."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            root = _location_of(self.group.store) if hasattr(self, "group") else self.path
            raise StoreError(f"{_bad_metadata(root)} cannot be read ({exc}); `rep-pipeline store check` lists "
                             f"every problem of the store") from exc
    return wrapper


def check_store_location(path: str | Location, *, writable: bool = False) -> None:
    """Fail before any work on a path that cannot hold a store: a regular file, a folder of
    other files (never adopted), or, with ``writable``, a place this process cannot write (on
    object storage: a bucket that cannot be listed)."""
    path = as_location(path)
    if isinstance(path, ObjectPath):
        path.check_reachable()
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} is a file, not a Zarr store; choose another path")
    if path.is_dir() and not (path / "zarr.json").is_file() and any(path.iterdir()):
        raise StoreError(f"{path} is a folder of other files, not a Zarr store; choose an empty or new path")
    if writable and is_local(path):
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StoreError(f"cannot write to {path}: {existing} is not writable by this user")


def _open_root(path: Location, mode: str, missing: str, fresh: dict[str, Any]) -> tuple[zarr.Group, dict[str, Any]]:
    """The root group at ``path`` and its ``rep_pipeline`` attribute ({} if none). In mode
    ``"a"`` a missing or empty store is created, with ``fresh`` as that attribute."""
    if mode == "r" and not path.exists():
        raise StoreError(missing)
    check_store_location(path)
    try:
        root = zarr.open_group(_zarr_store(path, mode), mode="r" if mode == "r" else "a")
    except Exception as exc:
        raise StoreError(f"{path} cannot be opened as a Zarr store: {exc}") from exc
    meta = dict(root.attrs).get("rep_pipeline")
    if meta is None and mode != "r" and not list(root.keys()):
        meta = root.attrs["rep_pipeline"] = dict(fresh)
    return root, meta or {}


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


def _sizes(group: zarr.Group) -> dict[str, int]:
    stored = raw = 0
    for _, arr in group.arrays():
        stored += int(arr.nbytes_stored())
        raw += int(arr.nbytes)
    return {"bytes_stored": stored, "bytes_raw": raw}


@dataclass
class _Group:
    """A store group and its arrays, each opened once (opening reads and parses the array's
    metadata from disk, which is not free per chunk written)."""

    group: zarr.Group
    path: str
    _arrays: dict[str, zarr.Array] = field(default_factory=dict, init=False, repr=False, compare=False)

    @_metadata_read
    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            # every chunk is written as it is: no scan for chunks that equal the fill value
            self._arrays[name] = self.group[name].with_config({"write_empty_chunks": True})
        return self._arrays[name]


@dataclass
class DatasetSplit(_Group):

    @property
    def fingerprint(self) -> dict[str, Any]:
        return {k: v for k, v in self.group.attrs.items() if k not in ("palette", "chunk_images")}

    dataset = property(lambda self: self.group.attrs["dataset"])
    split = property(lambda self: self.group.attrs["split"])
    n_images = property(lambda self: int(self.group.attrs["n_images"]))
    chunk_images = property(lambda self: int(self.group.attrs["chunk_images"]))
    n_chunks = property(lambda self: layout.n_chunks(self.n_images, self.chunk_images))
    labels = property(lambda self: self.array("labels"))
    done = property(lambda self: self.array("done"))

    def image_ids(self) -> list[str]:
        return [str(v) for v in self.array("image_ids")[:]]

    def bounds(self, chunk: int) -> tuple[int, int]:
        return layout.chunk_bounds(chunk, self.chunk_images, self.n_images)

    @property
    def label_maps(self) -> dict[str, list[str]]:
        """Further label maps beside ``labels``: name -> classes (none for most datasets)."""
        return dict(self.group.attrs.get("label_maps") or {})

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
        return str(layout.dataset_options(dict(self.group.attrs))["geometry"])

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
        from .results import write_parquet  # the one module that writes Parquet

        known = set(self.image_ids())
        unknown = sorted({r[side] for r in rows for side in ("src_image_id", "trg_image_id")} - known)
        if unknown:
            raise StoreError(f"{self.path}: keypoint pairs name images that are not in the split: {unknown[:5]}")
        stamp = fingerprint_hash(self.fingerprint)
        write_parquet(self._pairs_file, [dict(r, dataset_fingerprint=stamp) for r in rows], layout.KEYPOINT_PAIRS)

    def keypoint_pairs(self) -> Any:
        """The split's keypoint pairs as a pyarrow table (``layout.KEYPOINT_PAIRS``); a split
        without them is an error naming the file and what produces it."""
        from .results import read_parquet

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

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    n_images = property(lambda self: int(self.array("attention_mi").shape[1]))
    chunk_images = property(lambda self: int(self.group.attrs["chunk_images"]))
    n_chunks = property(lambda self: int(self.array("done").shape[0]))
    done = property(lambda self: self.array("done"))
    layers = property(lambda self: tuple(self.group.attrs["layers"]))
    embeddings = property(lambda self: tuple(self.group.attrs["embeddings"]))
    class_embeddings = property(lambda self: layout.class_embeddings(self.group.attrs))
    finished = property(lambda self: bool(self.group.attrs.get("finished")))

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
        P = int(self.attrs["grid"]) ** 2
        attrs = {"f": f, "embedding": embedding, "layers": list(layers), "order": "latest_left",
                 "self_fill": "max_other", "hyperparameters": dict(hyperparameters), "n_images": n_images,
                 "features_fingerprint": self.fingerprint_hash, "schema_version": layout.SCHEMA_VERSION,
                 "package_version": __version__}
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


@dataclass
class _Trained:
    """A group trained on a model group's features (a codebook, templates): its attributes and
    the hash of those that say what it was trained as (``FINGERPRINT_KEYS``)."""

    FINGERPRINT_KEYS: ClassVar[tuple[str, ...]] = ()
    group: zarr.Group
    path: str
    features: ModelSplit

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def fingerprint_hash(self) -> str:
        attrs = self.attrs
        return fingerprint_hash({k: attrs.get(k) for k in self.FINGERPRINT_KEYS})


@dataclass
class Codebook(_Trained):
    """Centroids of one (method, K, seed) for every captured layer of some embeddings."""

    FINGERPRINT_KEYS: ClassVar[tuple[str, ...]] = layout.CODEBOOK_FINGERPRINT_KEYS

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
            L, k, D = len(self.features.layers), int(self.group.attrs["k"]), int(self.features.attrs["embed_dim"])
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

    @property
    def concepts(self) -> list[dict[str, Any]]:
        return list(self.group.attrs["concepts"])

    def require(self, embedding: str) -> None:
        """Create the arrays of ``embedding`` (once, before workers write layers into them)."""
        if f"{embedding}_done" in self.group:
            return
        L, C, D = len(self.features.layers), len(self.concepts), int(self.features.attrs["embed_dim"])
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

    layers = property(lambda self: tuple(self.group.attrs["layers"]))
    n_images = property(lambda self: int(self.group.attrs["n_images"]))

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


class MapStore:
    """The Zarr store of evaluation maps beside the Parquet tables (``maps.zarr``): per setting,
    the position-by-class counts, the aggregate map and a few predicted example maps. Paths
    come from ``storage_schemas.results``; a store of another results version is refused."""

    def __init__(self, path: str | Location, mode: str = "r"):
        self.path = as_location(path)
        self.root, meta = _open_root(
            self.path, mode, f"results maps {self.path} do not exist; run `rep-pipeline evaluate` first",
            {"kind": results_layout.MAPS_KIND, "tables_version": results_layout.TABLES_VERSION})
        self.written: list[str] = []  # group paths written through this object, in order
        found = meta.get("tables_version", meta.get("schema_version"))  # the key's name before 0.2
        if found != results_layout.TABLES_VERSION:
            raise StoreError(f"results maps {self.path} have results version {found}; this rep-pipeline "
                             f"({__version__}) reads and writes version {results_layout.TABLES_VERSION}")

    def write(self, path: str, *, attrs: Mapping[str, Any], **arrays: np.ndarray) -> None:
        self.written.append(path)
        group = self.root.require_group(path)
        for name, data in arrays.items():
            arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape or (1,),
                                     dimension_names=results_layout.MAP_ARRAYS[name].dims, overwrite=True,
                                     compressors=[layout.LABEL_CODEC])
            arr[...] = data
        group.attrs.update(attrs)

    def adopt(self, staging: "MapStore") -> None:
        """Move every group written into ``staging`` here, replacing groups of the same path:
        maps computed aside join the results only once all of them are complete. A group
        written together with groups under it moves as a whole, with them."""
        written = list(dict.fromkeys(staging.written))
        for path in (p for p in written if not any(p.startswith(q + "/") for q in written)):
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            if parent:
                self.root.require_group(parent)
            target = self.path / path
            if isinstance(target, ObjectPath):
                (staging.path / path).mirror_to(target)
                continue
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging.path / path, target)

    def attrs(self, path: str) -> dict[str, Any]:
        if path not in self.root:
            raise StoreError(f"{self.path} has no {path}")
        return dict(self.root[path].attrs)

    def read(self, path: str, name: str) -> np.ndarray:
        if path not in self.root or name not in self.root[path]:
            raise StoreError(f"{self.path} has no {path}/{name}")
        return self.root[path][name][...]


def validate_store(path: str | Location) -> list[str]:
    """Every way the store at ``path`` departs from the layout, as readable sentences."""
    try:
        return _validate(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # a group's metadata: nothing below it is listed
        return [f"{_bad_metadata(as_location(path))} cannot be read ({exc})"]


def _validate(path: str | Location) -> list[str]:
    problems: list[str] = []
    try:
        root = zarr.open_group(_zarr_store(as_location(path), "r"), mode="r")
    except Exception as exc:  # not a zarr group at all
        return [f"{path} is not a Zarr group: {exc}"]
    meta = dict(root.attrs).get("rep_pipeline", {})
    if meta.get("kind") != layout.STORE_KIND:
        return [f"{path} is not a rep-pipeline feature store (no rep_pipeline.kind attribute)"]
    if meta.get("schema_version") not in layout.READABLE_SCHEMA_VERSIONS:
        return [f"{path} has schema version {meta.get('schema_version')}, this rep-pipeline reads "
                f"{', '.join(map(str, layout.READABLE_SCHEMA_VERSIONS))}"]

    def check_arrays(group: Any, where: str, specs: dict[str, layout.ArraySpec],
                     shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            spec = specs[name]
            try:
                if name not in group:
                    problems.append(f"{where}/{name} is missing")
                    continue
                arr = group[name]
            except Exception as exc:  # its zarr.json does not parse
                problems.append(f"{where}/{name}/zarr.json cannot be read: {type(exc).__name__}: {exc}")
                continue
            if tuple(arr.shape) != shape:
                problems.append(f"{where}/{name} has shape {tuple(arr.shape)}, expected {shape}")
            if tuple(arr.metadata.dimension_names or ()) != spec.dims:
                problems.append(f"{where}/{name} has dimensions {arr.metadata.dimension_names}, expected {spec.dims}")
            if spec.dtype != "str" and str(arr.dtype) != spec.dtype:
                problems.append(f"{where}/{name} has dtype {arr.dtype}, expected {spec.dtype}")

    n_by_split: dict[tuple[str, str], int] = {}
    for ds_name, ds_group in root["datasets"].groups() if "datasets" in root else []:
        for split, group in ds_group.groups():
            where = layout.dataset_path(ds_name, split)
            attrs = dict(group.attrs)
            if _lacks(attrs, layout.DATASET_ATTRS, where, problems):
                continue
            n, S, c = attrs["n_images"], attrs["image_size"], attrs["chunk_images"]
            n_by_split[(ds_name, split)] = n
            extra = {layout.extra_labels_array(m): layout.EXTRA_LABELS for m in attrs.get("label_maps") or {}}
            check_arrays(group, where, {**layout.DATASET_ARRAYS, **extra},
                         {"image_ids": (n,), "labels": (n, S, S), "done": (layout.n_chunks(n, c),),
                          "example_images": (min(n, layout.EXAMPLE_IMAGES), S, S, 3),
                          **{name: (n, S, S) for name in extra},
                          **({"geometry": (n, len(layout.GEOMETRY_FIELDS))} if "geometry" in group else {})})
    for model, m_group in root["models"].groups() if "models" in root else []:
        for ds_name, d_group in m_group.groups():
            for split, group in d_group.groups():
                where = layout.model_path(model, ds_name, split)
                attrs = dict(group.attrs)
                if _lacks(attrs, layout.MODEL_ATTRS, where, problems):
                    continue
                if (ds_name, split) not in n_by_split:
                    problems.append(f"{where} has no dataset group {layout.dataset_path(ds_name, split)}")
                    continue
                check_arrays(group, where, layout.MODEL_ARRAYS,
                             layout.model_array_shapes(attrs, n_by_split[(ds_name, split)]))
                if "codebooks" in group:
                    _check_codebooks(group["codebooks"], where, attrs, problems)
    return problems


def _lacks(attrs: Mapping[str, Any], keys: tuple[str, ...], where: str, problems: list[str]) -> bool:
    """Note (and say) whether ``attrs`` lacks any of ``keys``."""
    missing = [k for k in keys if k not in attrs]
    if missing:
        problems.append(f"{where} lacks attributes {missing}")
    return bool(missing)


def _check_codebooks(codebooks: Any, where: str, model_attrs: dict[str, Any], problems: list[str]) -> None:
    L, D = len(model_attrs["layers"]), model_attrs["embed_dim"]
    for name, book in codebooks.groups():
        here = layout.codebook_path(where, name)
        attrs = dict(book.attrs)
        if _lacks(attrs, layout.CODEBOOK_ATTRS, here, problems):
            continue
        for emb in model_attrs["embeddings"]:
            if emb not in book:
                continue
            expect = {emb: ((L, attrs["k"], D), layout.CODEBOOK_ARRAYS["centroids"]),
                      f"{emb}_done": ((L,), layout.CODEBOOK_ARRAYS["done"])}
            for arr_name, (shape, spec) in expect.items():
                if arr_name not in book:
                    problems.append(f"{here}/{arr_name} is missing")
                elif tuple(book[arr_name].shape) != shape or str(book[arr_name].dtype) != spec.dtype:
                    problems.append(f"{here}/{arr_name} is {book[arr_name].dtype}{tuple(book[arr_name].shape)}, "
                                    f"expected {spec.dtype}{shape}")


# -- reading every chunk: ``rep-pipeline store check`` ------------------------------------------
def _chunk_keys(arr: zarr.Array) -> Iterator[tuple[tuple[int, ...], str]]:
    """Every chunk of ``arr``: its grid coordinates and its key in the store."""
    grid = [-(-n // c) for n, c in zip(arr.shape, arr.chunks)]
    for coords in np.ndindex(*grid):
        yield coords, arr.metadata.encode_chunk_key(coords)


def _check_array(arr: zarr.Array, where: str, written: Callable[[tuple[int, ...]], bool],
                 finite: bool) -> list[tuple[tuple[int, ...], str]]:
    """(chunk coordinates, problem) for every chunk that should be written and does not
    decode to the expected shape and dtype, or (``finite``) holds NaN/inf."""
    bad = []
    store = arr.store_path.store
    for coords, key in _chunk_keys(arr):
        if not written(coords):
            continue
        selection = tuple(slice(c * n, min((c + 1) * n, size)) for c, n, size in zip(coords, arr.chunks, arr.shape))
        if not sync(store.exists(f"{arr.path}/{key}")):
            bad.append((coords, f"{where} chunk {key} is missing"))
            continue
        try:
            data = arr[selection]
        except Exception as exc:  # any codec or I/O failure: the chunk is unreadable
            bad.append((coords, f"{where} chunk {key} does not decode: {type(exc).__name__}: {exc}"))
            continue
        expected = tuple(sl.stop - sl.start for sl in selection)
        if data.shape != expected:
            bad.append((coords, f"{where} chunk {key} has shape {data.shape}, expected {expected}"))
        elif finite and data.dtype.kind == "f" and not np.isfinite(data).all():
            bad.append((coords, f"{where} chunk {key} holds NaN/inf"))
    return bad


@dataclass
class CheckReport:
    """What ``check_store`` found, and what it repaired."""

    problems: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)


def check_store(path: str | Location, *, group: str | None = None, repair: bool = False) -> CheckReport:
    """Read every chunk of the store (or of the groups under ``group``) and check it decodes to
    its shape and dtype, finite, with ``done`` flags consistent. With ``repair``, mark each bad
    chunk pending (and its codebook layer untrained), so the same extract (or cluster) command
    recomputes it; nothing else is touched."""
    path = as_location(path)
    report = CheckReport(validate_store(path))
    if report.problems and (not path.is_dir() or any(" is not " in p or "cannot be read" in p
                                                     for p in report.problems)):
        return report  # what does not parse cannot be read chunk by chunk
    store = FeatureStore(path, mode="a" if repair else "r")
    chosen = lambda p: group is None or p == group or p.startswith(group.rstrip("/") + "/")  # noqa: E731
    pending: dict[tuple[str, str], set[int]] = {}  # (dataset, split) -> label chunks to redo
    for d, s in store.dataset_splits():
        data = store.dataset_split(d, s)
        if not chosen(data.path):
            continue
        done = data.done[:]
        bad = _check_array(data.labels, f"{data.path}/labels", lambda c: bool(done[c[0]]), finite=False)
        report.problems += [p for _, p in bad]
        pending[(d, s)] = {c[0] for c, _ in bad}
    for m, d, s in store.model_splits():
        target = store.model_split(m, d, s)
        try:
            if chosen(target.path) or pending.get((d, s)):  # bad labels: their chunks are redone by every model
                _check_model_split(target, pending.get((d, s), set()), report, repair, features=chosen(target.path))
            for book in target.codebooks():
                if chosen(book.path):
                    _check_codebook(book, report, repair)
        except Exception as exc:  # metadata that does not parse: reported above by the layout check
            report.problems.append(f"{target.path} cannot be read whole: {type(exc).__name__}: {exc}")
    if repair:
        for (d, s), chunks in pending.items():
            if chunks:
                store.dataset_split(d, s).done[sorted(chunks)] = False
                report.repairs.append(f"{layout.dataset_path(d, s)}: label chunks {sorted(chunks)} marked pending")
    return report


def _check_model_split(target: ModelSplit, label_chunks: set[int], report: CheckReport, repair: bool,
                       features: bool = True) -> None:
    done = target.done[:]
    bad_chunks = set(label_chunks) & set(np.flatnonzero(done).tolist())
    per_image = lambda c: bool(done[c[1]])  # noqa: E731  (layer, image chunk, ...)
    per_image_arrays = (*target.embeddings, *map(layout.class_array, target.class_embeddings), "attention_mi",
                        *((layout.EXAMPLE_ATTENTION,) if layout.EXAMPLE_ATTENTION in target.group else ()))
    for name in per_image_arrays if features else ():
        bad = _check_array(target.array(name), f"{target.path}/{name}", per_image, finite=True)
        report.problems += [p for _, p in bad]
        bad_chunks |= {c[1] for c, _ in bad}
    attention_bad = False
    if not features:
        pass
    elif "attention_sum" in target.group:
        bad = _check_array(target.array("attention_sum"), f"{target.path}/attention_sum", lambda c: bool(done[c[0]]),
                           finite=True)
        report.problems += [p for _, p in bad]
        bad_chunks |= {c[0] for c, _ in bad}
    elif "attention_map" in target.group:
        bad = _check_array(target.array("attention_map"), f"{target.path}/attention_map", lambda c: True, finite=True)
        report.problems += [p for _, p in bad]
        attention_bad = bool(bad)
    folder = _location_of(target.group.store) / target.group.path
    orphans = sorted(p for p in folder.iterdir() if p.is_dir() and not (p / "zarr.json").is_file())
    report.problems += [f"{target.path}/{p.name} holds files of no array (left by an interrupted run)" for p in orphans]
    unflagged = target.finished and not done.all()
    if unflagged:
        report.problems.append(f"{target.path} is marked finished but chunks {np.flatnonzero(~done)[:10].tolist()} "
                               f"are not done")
    if repair:
        for p in orphans:
            remove_tree(p)
            report.repairs.append(f"{target.path}/{p.name}: removed")
        if unflagged:
            target.group.attrs.update({"finished": False, layout.ATTENTION_FINAL: True})
            report.repairs.append(f"{target.path}: marked unfinished; run the same extract command")
    if not repair or not (bad_chunks or attention_bad):
        return
    if attention_bad:  # the image mean of every chunk is lost: every chunk is computed again
        del target.group["attention_map"]
        _create(target.group, layout.MODEL_ARRAYS["attention_sum"],
                (target.n_chunks, len(target.layers), target.attrs["grid"] ** 2, target.attrs["grid"] ** 2),
                target.chunk_images)
        target.group.attrs.update({"finished": False, layout.ATTENTION_FINAL: False})
        target.done[:] = False
        report.repairs.append(f"{target.path}: attention_map unreadable; all {target.n_chunks} chunks marked pending")
        return
    chunks = sorted(bad_chunks)
    if target.finished:
        target.group.attrs.update({"finished": False, layout.ATTENTION_FINAL: True})
    target.done[chunks] = False
    report.repairs.append(f"{target.path}: chunks {chunks} marked pending; run the same extract command")


def _check_codebook(book: "Codebook", report: CheckReport, repair: bool) -> None:
    for emb in book.features.embeddings:
        if f"{emb}_done" not in book.group:
            continue
        done = book.group[f"{emb}_done"][:]
        bad = _check_array(book.group[emb], f"{book.path}/{emb}", lambda c: bool(done[c[0]]), finite=True)
        report.problems += [p for _, p in bad]
        layers = sorted({c[0] for c, _ in bad})
        if repair and layers:
            book.group[f"{emb}_done"][layers] = False
            report.repairs.append(f"{book.path}/{emb}: layers {[book.features.layers[i] for i in layers]} marked "
                                  f"untrained; run the same cluster command")
