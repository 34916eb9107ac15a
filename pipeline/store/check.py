"""Check and repair: ``validate_store`` (the layout, from the metadata) and ``check_store``
(every chunk read; ``--repair`` marks bad chunks pending)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import zarr
from zarr.core.sync import sync

from rep_pipeline.storage_schemas import feature_store as layout

from ..location import as_location, remove_tree
from .artefacts import Codebook
from .features import FeatureStore, ModelSplit
from .zarr_io import Location, _bad_metadata, _create, _location_of, _zarr_store


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
