"""The feature store on a local folder: its Zarr layout on disk (dimensions, codecs, chunk
files), the documented zarr and xarray reading, and the validator on hand-broken arrays. What
every backend answers alike is the contract in tests/test_store_contract.py."""
import dataclasses

import numpy as np
import pytest
import zarr

from rep_pipeline.pipeline.errors import StoreError
from rep_pipeline.pipeline.store import FeatureStore, fingerprint_hash, validate_store
from rep_pipeline.storage_schemas.feature_store import FEATURE_CODEC, MODEL_ARRAYS

N, S, CHUNK, G, D, H, L = 10, 32, 4, 2, 8, 2, 3
DATASET_FP = {"dataset": "synthetic", "split": "val", "n_images": N, "image_size": S, "classes": ["a", "b"],
              "ignore_index": 255, "image_ids_sha256": "x", "options": {}}
MODEL_FP = {"model": "m", "timm_name": "t", "family": "tiny", "weights_source": "random:seed=0",
            "weights_sha256": "abc", "image_size": S, "input_size": 32, "patch_size": 16, "grid": G,
            "num_prefix_tokens": 1, "embed_dim": D, "num_heads": H, "depth": L, "mean": [0.5] * 3,
            "std": [0.5] * 3, "layers": [0, 1, 2], "embeddings": ["keys", "tokens"], "rope": "before",
            "last_norm": "after"}


def _fill(tmp_path):
    store = FeatureStore(tmp_path / "s.zarr", mode="a")
    data = store.require_dataset_split(DATASET_FP, [f"id{i}" for i in range(N)], np.zeros((2, 3), np.uint8), CHUNK)
    target = store.require_model_split("m", data, MODEL_FP)
    return store, data, target


def _chunk_arrays(n, value):
    return {"keys": np.full((L, n, G, G, D), value, np.float16), "tokens": np.full((L, n, G, G, D), -value, np.float16),
            "class_tokens": np.full((L, n, D), value, np.float16), "attention_mi": np.full((L, n, H), value, np.float32),
            "attention_sum": np.full((L, G * G, G * G), n / (G * G), np.float32)}


def _write_every_chunk(data, target):
    """Chunk c: labels c, keys and the rest c + 1 (tokens the negative)."""
    for chunk in range(3):
        n = data.bounds(chunk)[1] - data.bounds(chunk)[0]
        data.write_labels(chunk, np.full((n, S, S), chunk, np.uint8))
        target.write_chunk(chunk, _chunk_arrays(n, chunk + 1))


def test_layout_dimensions_codecs_and_finalisation(tmp_path):
    store, data, target = _fill(tmp_path)
    assert target.pending_chunks() == [0, 1, 2]
    keys = target.features("keys")
    assert keys.shape == (L, N, G, G, D) and keys.chunks == (1, CHUNK, G, G, D)
    assert keys.metadata.dimension_names == MODEL_ARRAYS["keys"].dims
    codec = keys.compressors[0].to_dict()
    assert codec["name"] == FEATURE_CODEC["name"] and codec["configuration"]["shuffle"] == "bitshuffle"
    _write_every_chunk(data, target)
    assert target.pending_chunks() == [] and data.image_ids()[-1] == "id9"
    assert validate_store(store.path) == []
    # one flat file per chunk, named as docs/feature-store.md says: layer slot 1, image chunk 2
    keys_dir = store.path / "models/m/synthetic/val/keys"
    assert (keys_dir / "c.1.2.0.0.0").is_file() and not (keys_dir / "c").exists()
    target.finalize()
    assert target.finished and "attention_sum" not in target.group
    np.testing.assert_allclose(target.attention_map(), np.full((L, G * G, G * G), 1 / (G * G)), rtol=1e-6)
    assert validate_store(store.path) == []
    assert target.features("keys")[1, 9, 0, 0, 0] == 3 and data.labels[5, 0, 0] == 1
    with pytest.raises(StoreError, match="captured: keys, tokens"):
        target.features("queries")
    info = FeatureStore(store.path).info()
    assert info["models"][0]["chunks_done"] == 3 and info["models"][0]["bytes_stored"] > 0


def test_a_finished_store_opens_in_zarr_and_xarray_as_documented(tmp_path):
    """The reading examples of docs/feature-store.md, on a finished store."""
    import xarray as xr  # the test extra installs it; users add it themselves
    store, data, target = _fill(tmp_path)
    _write_every_chunk(data, target)
    target.finalize()
    root = zarr.open_group(store.path, mode="r")
    layers = root["models/m/synthetic/val"].attrs["layers"]
    assert root["models/m/synthetic/val/keys"][layers.index(1), :5].shape == (5, G, G, D)
    ds = xr.open_zarr(store.path, group="models/m/synthetic/val", consolidated=False)
    assert dict(ds.sizes) == {"layer": L, "image": N, "y": G, "x": G, "channel": D, "head": H,
                              "query": G * G, "key": G * G, "chunk": 3}
    mean_keys = ds["keys"].sel(layer=layers.index(1)).mean("image")
    assert mean_keys.dims == ("y", "x", "channel")
    np.testing.assert_allclose(mean_keys.values, target.features("keys")[1].astype(np.float32).mean(0), rtol=1e-3)
    assert ds.attrs["weights_sha256"] == "abc" and ds["attention_map"].dims == ("layer", "query", "key")
    labels = xr.open_zarr(store.path, group="datasets/synthetic/val", consolidated=False)["labels"]
    assert labels.dims == ("image", "y", "x") and int(labels[5, 0, 0]) == 1


def test_validator_reports_missing_and_misshapen_arrays(tmp_path):
    store, _, target = _fill(tmp_path)
    del target.group["tokens"]
    target.group.create_array("class_tokens", shape=(L, N + 1, D), dtype="float16", overwrite=True,
                              dimension_names=("layer", "image", "channel"))
    assert validate_store(store.path) == [
        "models/m/synthetic/val/tokens is missing",
        f"models/m/synthetic/val/class_tokens has shape {(L, N + 1, D)}, expected {(L, N, D)}",
    ]


def test_a_finished_group_records_the_request_it_answers(tmp_path):
    _, data, target = _fill(tmp_path)
    request = {"model": "m", "weights": "random:seed=0", "limit": None}
    with pytest.raises(StoreError, match="not finished"):
        target.record_request(request)
    _write_every_chunk(data, target)
    target.finalize()
    assert target.request_sha256 is None
    target.record_request(request)
    reopened = FeatureStore(tmp_path / "s.zarr").model_split("m", "synthetic", "val")
    assert reopened.request_sha256 == fingerprint_hash(request) and reopened.attrs["request"] == request


def test_typed_metadata_round_trips_the_stored_attributes_and_names_what_is_wrong(tmp_path):
    from rep_pipeline.pipeline.store.metadata import CodebookMeta, DatasetMeta, ModelMeta

    store, data, target = _fill(tmp_path)
    book = target.require_codebook("online", 2, 0, {"steps": 10})
    # to_dict gives back the attributes key for key: the store layout stays as written
    assert data.meta.to_dict() == dict(data.group.attrs) and target.meta.to_dict() == dict(target.group.attrs)
    assert book.meta.to_dict() == dict(book.group.attrs)
    assert data.meta.classes == ("a", "b") and data.meta.palette_array.shape == (2, 3) and data.meta.ignore_index == 255
    assert data.meta.geometry_mode == "crop" and data.meta.primary_category == "synthetic"
    assert target.meta.grid == G and target.meta.layers == (0, 1, 2) and target.meta.class_embeddings == ("tokens",)
    assert book.meta.k == 2 and book.meta.hyperparameters == {"steps": 10} and book.meta.variant is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.meta.grid = 3  # type: ignore[misc]
    nulled = dict(target.attrs, weights_sha256=None)  # an optional attribute stored as null stays stored
    assert ModelMeta.from_dict(nulled, target.path).to_dict() == nulled
    attrs = {k: v for k, v in target.attrs.items() if k != "grid"}
    with pytest.raises(StoreError, match="models/m/synthetic/val: attribute 'grid' missing"):
        ModelMeta.from_dict(attrs, target.path)
    with pytest.raises(StoreError, match="datasets/synthetic/val: attribute 'n_images' is 'ten', expected an integer"):
        DatasetMeta.from_dict(dict(data.group.attrs, n_images="ten"), data.path)
    with pytest.raises(StoreError, match="attribute 'k' missing"):
        CodebookMeta.from_dict({k: v for k, v in book.attrs.items() if k != "k"}, book.path)
    # the stages' readers hand NumPy arrays, not zarr ones
    assert isinstance(data.read_labels(0, 2), np.ndarray) and isinstance(target.attention_mi(), np.ndarray)
