"""The zarr helpers of the store package: opening stores (local or object storage), creating
arrays from the layout's ``ArraySpec``s, reading and writing several arrays in one pass of
zarr's event loop, and metadata errors that name their file. Every other module of the
package reaches zarr through these, or through the groups and arrays they return."""
from __future__ import annotations

import asyncio
import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr
from zarr.core.sync import sync

from rep_pipeline.storage_schemas import feature_store as layout

from ..errors import StoreError
from ..location import ObjectPath, as_location, is_local, put_object_async

Location = Path | ObjectPath
LIBRARY = zarr.__name__  # the distribution whose version a report records for the stores
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
    _meta_cache: Any = field(default=None, init=False, repr=False, compare=False)

    def _parsed(self, meta_class: Any) -> Any:
        """``meta_class.from_dict`` of the group's attributes, parsed again only once they change."""
        attrs = self.group.attrs.asdict()
        cached = self._meta_cache
        if cached is None or cached[0] is not meta_class or cached[1] != attrs:
            cached = self._meta_cache = (meta_class, dict(attrs), meta_class.from_dict(attrs, self.path))
        return cached[2]

    def sizes(self) -> dict[str, int]:
        """``bytes_stored`` (compressed, as on disk) and ``bytes_raw`` of the group's arrays."""
        return _sizes(self.group)

    @_metadata_read
    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            # every chunk is written as it is: no scan for chunks that equal the fill value
            self._arrays[name] = self.group[name].with_config({"write_empty_chunks": True})
        return self._arrays[name]



def bare_array(kind: str, source: Any, *, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str,
               codec: dict[str, Any], storage_options: dict[str, Any] | None = None) -> Any:
    """One array outside any store layout, through zarr's ``ObjectStore`` (``kind="obstore"``,
    ``source`` an obstore store) or ``FsspecStore`` (``"fsspec"``, ``source`` a URL and
    ``storage_options``): what ``bench/storage.py`` times, zarr's store layer alone."""
    if kind == "obstore":
        store = zarr.storage.ObjectStore(source)
    elif kind == "fsspec":
        store = zarr.storage.FsspecStore.from_url(source, storage_options=storage_options)
    else:
        raise ValueError(f"no store kind {kind!r} (obstore, fsspec)")
    return zarr.create_array(store, shape=shape, chunks=chunks, dtype=dtype, compressors=[codec], fill_value=0)
