"""The feature store's Zarr v3 layout, as data, with a validator.

::

    <store>.zarr/                         attrs: rep_pipeline = {kind, schema_version, ...}
      datasets/<dataset>/<split>/         attrs: dataset fingerprint (DATASET_ATTRS)
        image_ids     (image,)                    string
        labels        (image, y, x)               uint8, 255 = ignore, S x S grid
        done          (chunk,)                    bool, labels of image chunk i written
        example_images (example, y, x, rgb)       uint8, the first EXAMPLE_IMAGES crops, for figures
      models/<model>/<dataset>/<split>/   attrs: model fingerprint (MODEL_ATTRS)
        queries|keys|values|tokens
                      (layer, image, y, x, channel) float16, one chunk = one layer x one run
                                                  of ``chunk_images`` images
        class_tokens  (layer, image, channel)     float16
        attention_mi  (layer, image, head)        float32, I(K,Q) in nats (PROTOCOL.md s. 5)
        attention_sum (chunk, layer, query, key)  float32, while extracting: head-averaged
                                                  patch attention summed over a chunk's images
        attention_map (layer, query, key)         float32, when finished: its image mean
        done          (chunk,)                    bool, image chunk i complete for this model
        codebooks/<method>-k<K>-s<seed>/  attrs: training fingerprint (CODEBOOK_ATTRS)
          <embedding>       (layer, cluster, channel) float32, unit centroids
          <embedding>_done  (layer,)                  bool, layer trained to the end

``layer`` indexes the captured layers, whose block numbers are the ``layers`` attribute.
Every array carries ``dimension_names``, so ``xarray.open_zarr`` names the axes itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STORE_KIND = "rep-pipeline feature store"

# Chosen by measurement (bench/codecs.py): fp16 activations have noisy mantissas, so no codec
# gets far; Blosc-LZ4 with bit-shuffle compresses best (~1.15x on ViT features) and encodes at
# 1-2.5 GB/s, decodes at ~4 GB/s, so writing stays off the critical path. Zstd levels gain
# nothing on this data and cost 2-3x the time.
FEATURE_CODEC: dict[str, Any] = {"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}}
# Attention probabilities are float32 with smooth exponents: byte-shuffled LZ4 compresses them
# 1.5-1.7x at ~3 GB/s; bit-shuffle gains 5 % for 4x the time, and zarr's default (Zstd) gets
# 1.3x at 150-500 MB/s, which made these writes the slowest of a tiny model's chunk
# (bench/codecs.py --array attention_sum).
ATTENTION_CODEC: dict[str, Any] = {"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}}
LABEL_CODEC: dict[str, Any] = {"name": "zstd", "configuration": {"level": 3, "checksum": False}}
# Chunk files lie flat in their array's folder (``c.<layer>.<chunk>.0.0.0``): zarr's default
# ``/`` separator nests a folder per index, and creating those folders for every new chunk took
# longer than compressing it (one embedding of a 64-d model, 16 images x 4 layers: 11.7 ms
# with folders, 6.2 ms flat; docs/benchmarks.md).
CHUNK_KEY_ENCODING: dict[str, Any] = {"name": "default", "separator": "."}

# chunk rules per dimension: "full" = whole extent, "images" = chunk_images, an int = that size
FULL, IMAGES = "full", "images"


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dims: tuple[str, ...]
    dtype: str
    chunks: tuple[str | int, ...]
    doc: str
    codec: dict[str, Any] | None = None

    def chunk_shape(self, shape: tuple[int, ...], chunk_images: int) -> tuple[int, ...]:
        rule = {FULL: None, IMAGES: chunk_images}
        out = []
        for extent, c in zip(shape, self.chunks):
            size = rule[c] if isinstance(c, str) else c
            out.append(max(1, extent if size is None else min(size, extent)))
        return tuple(out)


DATASET_ARRAYS: dict[str, ArraySpec] = {a.name: a for a in (
    ArraySpec("image_ids", ("image",), "str", (FULL,), "image ids in list order"),
    ArraySpec("labels", ("image", "y", "x"), "uint8", (IMAGES, FULL, FULL),
              "class id per pixel on the S x S grid; 255 = ignore", LABEL_CODEC),
    ArraySpec("done", ("chunk",), "bool", (1,), "labels of image chunk i are written"),
    ArraySpec("example_images", ("example", "y", "x", "rgb"), "uint8", (1, FULL, FULL, FULL),
              "RGB crops of the first images of the split, as the model saw them, for figures"),
)}

EXAMPLE_IMAGES = 8  # crops kept per split for the report's image grids

_FEATURE_DIMS = ("layer", "image", "y", "x", "channel")
MODEL_ARRAYS: dict[str, ArraySpec] = {a.name: a for a in (
    *(ArraySpec(e, _FEATURE_DIMS, "float16", (1, IMAGES, FULL, FULL, FULL),
                f"patch {e} per captured layer (PROTOCOL.md s. 2)", FEATURE_CODEC)
      for e in ("queries", "keys", "values", "tokens")),
    ArraySpec("class_tokens", ("layer", "image", "channel"), "float16", (FULL, IMAGES, FULL),
              "class token per captured layer", FEATURE_CODEC),
    ArraySpec("attention_mi", ("layer", "image", "head"), "float32", (FULL, IMAGES, FULL),
              "attention key-query mutual information I(K,Q), nats", ATTENTION_CODEC),
    ArraySpec("attention_sum", ("chunk", "layer", "query", "key"), "float32", (1, FULL, FULL, FULL),
              "head-averaged patch attention summed over the chunk's images (while extracting)", ATTENTION_CODEC),
    ArraySpec("attention_map", ("layer", "query", "key"), "float32", (1, FULL, FULL),
              "image- and head-averaged patch-to-patch attention (once finished)", ATTENTION_CODEC),
    ArraySpec("done", ("chunk",), "bool", (1,), "image chunk i is complete for this model"),
)}

CODEBOOK_ARRAYS: dict[str, ArraySpec] = {a.name: a for a in (
    ArraySpec("centroids", ("layer", "cluster", "channel"), "float32", (1, FULL, FULL),
              "unit-norm centroids of each captured layer (stored under the embedding's name)"),
    ArraySpec("done", ("layer",), "bool", (1,), "the layer's codebook is trained to the end"),
)}

DATASET_ATTRS = ("dataset", "split", "n_images", "image_size", "classes", "palette", "ignore_index",
                 "image_ids_sha256", "chunk_images", "options")
MODEL_ATTRS = ("model", "timm_name", "family", "weights_source", "weights_sha256", "image_size",
               "input_size", "patch_size", "grid", "num_prefix_tokens", "embed_dim", "num_heads",
               "depth", "mean", "std", "layers", "embeddings", "rope", "last_norm", "chunk_images",
               "dataset_fingerprint", "schema_version", "package_version", "finished")
CODEBOOK_ATTRS = ("method", "k", "seed", "hyperparameters", "features_fingerprint", "schema_version",
                  "package_version")
CODEBOOK_FINGERPRINT_KEYS = ("method", "k", "seed", "hyperparameters", "features_fingerprint")
# what must match for a writer to add to an existing model group (package_version may differ)
MODEL_FINGERPRINT_KEYS = tuple(k for k in MODEL_ATTRS if k not in ("package_version", "finished"))


def dataset_path(dataset: str, split: str) -> str:
    return f"datasets/{dataset}/{split}"


def model_path(model: str, dataset: str, split: str) -> str:
    return f"models/{model}/{dataset}/{split}"


def codebook_name(method: str, k: int, seed: int) -> str:
    return f"{method}-k{k}-s{seed}"


def parse_codebook_name(name: str) -> tuple[str, int, int]:
    """``"online-k27-s0"`` -> ``("online", 27, 0)``."""
    method, k, seed = name.rsplit("-", 2)
    return method, int(k[1:]), int(seed[1:])


def n_chunks(n_images: int, chunk_images: int) -> int:
    return -(-n_images // chunk_images)


def model_array_shapes(attrs: dict[str, Any], n_images: int) -> dict[str, tuple[int, ...]]:
    """The shape of every array of a model group, from its attributes."""
    L, G, D, H = len(attrs["layers"]), attrs["grid"], attrs["embed_dim"], attrs["num_heads"]
    P, C = G * G, n_chunks(n_images, attrs["chunk_images"])
    shapes = {e: (L, n_images, G, G, D) for e in attrs["embeddings"]}
    shapes.update(class_tokens=(L, n_images, D), attention_mi=(L, n_images, H), done=(C,))
    shapes["attention_map" if attrs.get("finished") else "attention_sum"] = (
        (L, P, P) if attrs.get("finished") else (C, L, P, P))
    return shapes


def validate_store(path: str | Path) -> list[str]:
    """Every way the store at ``path`` departs from this layout, as readable sentences."""
    import zarr

    problems: list[str] = []
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # not a zarr group at all
        return [f"{path} is not a Zarr group: {exc}"]
    meta = dict(root.attrs).get("rep_pipeline", {})
    if meta.get("kind") != STORE_KIND:
        return [f"{path} is not a rep-pipeline feature store (no rep_pipeline.kind attribute)"]
    if meta.get("schema_version") != SCHEMA_VERSION:
        return [f"{path} has schema version {meta.get('schema_version')}, this rep-pipeline reads {SCHEMA_VERSION}"]

    def check_arrays(group: Any, where: str, specs: dict[str, ArraySpec], shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            spec = specs[name]
            if name not in group:
                problems.append(f"{where}/{name} is missing")
                continue
            arr = group[name]
            if tuple(arr.shape) != shape:
                problems.append(f"{where}/{name} has shape {tuple(arr.shape)}, expected {shape}")
            if tuple(arr.metadata.dimension_names or ()) != spec.dims:
                problems.append(f"{where}/{name} has dimensions {arr.metadata.dimension_names}, expected {spec.dims}")
            if spec.dtype != "str" and str(arr.dtype) != spec.dtype:
                problems.append(f"{where}/{name} has dtype {arr.dtype}, expected {spec.dtype}")

    n_by_split: dict[tuple[str, str], int] = {}
    for ds_name, ds_group in root["datasets"].groups() if "datasets" in root else []:
        for split, group in ds_group.groups():
            where = dataset_path(ds_name, split)
            attrs = dict(group.attrs)
            missing = [k for k in DATASET_ATTRS if k not in attrs]
            if missing:
                problems.append(f"{where} lacks attributes {missing}")
                continue
            n, S, c = attrs["n_images"], attrs["image_size"], attrs["chunk_images"]
            n_by_split[(ds_name, split)] = n
            check_arrays(group, where, DATASET_ARRAYS,
                         {"image_ids": (n,), "labels": (n, S, S), "done": (n_chunks(n, c),),
                          "example_images": (min(n, EXAMPLE_IMAGES), S, S, 3)})
    for model, m_group in root["models"].groups() if "models" in root else []:
        for ds_name, d_group in m_group.groups():
            for split, group in d_group.groups():
                where = model_path(model, ds_name, split)
                attrs = dict(group.attrs)
                missing = [k for k in MODEL_ATTRS if k not in attrs]
                if missing:
                    problems.append(f"{where} lacks attributes {missing}")
                    continue
                if (ds_name, split) not in n_by_split:
                    problems.append(f"{where} has no dataset group {dataset_path(ds_name, split)}")
                    continue
                check_arrays(group, where, MODEL_ARRAYS, model_array_shapes(attrs, n_by_split[(ds_name, split)]))
                if "codebooks" in group:
                    _check_codebooks(group["codebooks"], where, attrs, problems)
    return problems


def _check_codebooks(codebooks: Any, where: str, model_attrs: dict[str, Any], problems: list[str]) -> None:
    L, D = len(model_attrs["layers"]), model_attrs["embed_dim"]
    for name, book in codebooks.groups():
        here = f"{where}/codebooks/{name}"
        attrs = dict(book.attrs)
        missing = [k for k in CODEBOOK_ATTRS if k not in attrs]
        if missing:
            problems.append(f"{here} lacks attributes {missing}")
            continue
        for emb in model_attrs["embeddings"]:
            if emb not in book:
                continue
            expect = {emb: ((L, attrs["k"], D), CODEBOOK_ARRAYS["centroids"]),
                      f"{emb}_done": ((L,), CODEBOOK_ARRAYS["done"])}
            for arr_name, (shape, spec) in expect.items():
                if arr_name not in book:
                    problems.append(f"{here}/{arr_name} is missing")
                elif tuple(book[arr_name].shape) != shape or str(book[arr_name].dtype) != spec.dtype:
                    problems.append(f"{here}/{arr_name} is {book[arr_name].dtype}{tuple(book[arr_name].shape)}, "
                                    f"expected {spec.dtype}{shape}")
