"""The feature store's contract, written once and run on every storage backend.

As zarr-python's ``src/zarr/testing/store.py`` and xarray's round-trip base class do:
``StoreContract`` holds the tests, and each backend subclasses it, overriding one fixture,
``location`` (the folder or prefix the store lives under). ``TestStoreLocal`` runs them on a
local folder, ``TestStoreS3`` on the real S3 server on 127.0.0.1 (the integration tier).

The tests use the store's public surface only (``FeatureStore``, its splits, codebooks,
templates, ``MapStore``, ``validate_store``, ``check_store``); where one needs to make a store
look foreign or outdated it edits the documented ``zarr.json`` metadata document, through the
location, as any other writer could.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from rep_pipeline.pipeline.errors import FingerprintMismatchError, StoreError
from rep_pipeline.pipeline.location import as_location
from rep_pipeline.pipeline.store import FeatureStore, MapStore, check_store, validate_store
from rep_pipeline.storage_schemas.feature_store import SCHEMA_VERSION
from rep_pipeline.storage_schemas.tables import TABLES_VERSION

N, S, CHUNK, G, D, H, L = 10, 32, 4, 2, 8, 2, 3
DATASET_FP = {"dataset": "synthetic", "split": "val", "n_images": N, "image_size": S, "classes": ["a", "b"],
              "ignore_index": 255, "image_ids_sha256": "x", "options": {}}
MODEL_FP = {"model": "m", "timm_name": "t", "family": "tiny", "weights_source": "random:seed=0",
            "weights_sha256": "abc", "image_size": S, "input_size": 32, "patch_size": 16, "grid": G,
            "num_prefix_tokens": 1, "embed_dim": D, "num_heads": H, "depth": L, "mean": [0.5] * 3,
            "std": [0.5] * 3, "layers": [0, 1, 2], "embeddings": ["keys", "tokens"], "rope": "before",
            "last_norm": "after"}
IDS = [f"id{i}" for i in range(N)]


def _chunk_arrays(n, value):
    return {"keys": np.full((L, n, G, G, D), value, np.float16), "tokens": np.full((L, n, G, G, D), -value, np.float16),
            "class_tokens": np.full((L, n, D), value, np.float16), "attention_mi": np.full((L, n, H), value, np.float32),
            "attention_sum": np.full((L, G * G, G * G), n / (G * G), np.float32)}


def _write_chunk(data, target, chunk):
    """Chunk c: labels c, keys and the rest c + 1 (tokens the negative)."""
    start, stop = data.bounds(chunk)
    data.write_labels(chunk, np.full((stop - start, S, S), chunk, np.uint8))
    target.write_chunk(chunk, _chunk_arrays(stop - start, chunk + 1))


def _edit_root_metadata(path, **changes) -> None:
    """Change the ``rep_pipeline`` entry of the root group's attributes in its ``zarr.json``."""
    document = path / "zarr.json"
    meta = json.loads(document.read_text())
    meta["attributes"]["rep_pipeline"] = {**meta["attributes"]["rep_pipeline"], **changes}
    document.write_bytes(json.dumps(meta).encode())


class StoreContract:
    """Every backend answers these alike. A subclass overrides ``location``."""

    @pytest.fixture
    def location(self):
        raise NotImplementedError("a backend's subclass says where its stores live")

    @pytest.fixture
    def filled(self, location):
        """A store with the ``synthetic/val`` split and model ``m`` over it, no chunk written."""
        store = FeatureStore(location / "s.zarr", mode="a")
        data = store.require_dataset_split(DATASET_FP, IDS, np.zeros((2, 3), np.uint8), CHUNK)
        return store, data, store.require_model_split("m", data, MODEL_FP)

    @pytest.fixture
    def finished(self, filled):
        store, data, target = filled
        for chunk in range(3):
            _write_chunk(data, target, chunk)
        target.finalize()
        return store, data, target

    # -- creating and opening --------------------------------------------------------------------
    def test_a_store_is_created_in_append_mode_and_opened_for_reading(self, location):
        with pytest.raises(StoreError, match="does not exist"):
            FeatureStore(location / "s.zarr")
        created = FeatureStore(location / "s.zarr", mode="a")
        assert created.dataset_splits() == [] and created.model_splits() == []
        reopened = FeatureStore(location / "s.zarr")
        assert reopened.path == as_location(location / "s.zarr") and reopened.schema_version == SCHEMA_VERSION
        assert validate_store(location / "s.zarr") == []

    def test_foreign_or_outdated_stores_are_refused(self, location, filled):
        for group in ("plain.zarr", "plain.zarr/x"):  # a Zarr hierarchy of someone else's, not empty
            (location / group).mkdir(parents=True, exist_ok=True)
            (location / group / "zarr.json").write_bytes(
                json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode())
        with pytest.raises(StoreError, match="not a rep-pipeline feature store"):
            FeatureStore(location / "plain.zarr", mode="a")
        store, _, _ = filled
        _edit_root_metadata(store.path, schema_version=SCHEMA_VERSION + 1)
        with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
            FeatureStore(store.path)
        assert "schema version" in validate_store(store.path)[0]

    # -- a dataset split and a model split, written and read back --------------------------------
    def test_dataset_and_model_splits_round_trip(self, finished):
        store, _, _ = finished
        reopened = FeatureStore(store.path)
        assert reopened.dataset_splits() == [("synthetic", "val")]
        assert reopened.model_splits() == [("m", "synthetic", "val")]
        data = reopened.dataset_split("synthetic", "val")
        assert data.image_ids() == IDS and data.n_images == N and data.n_chunks == 3
        assert data.fingerprint == DATASET_FP
        assert [data.bounds(c) for c in range(3)] == [(0, 4), (4, 8), (8, 10)]
        target = reopened.model_split("m", "synthetic", "val")
        assert target.finished and target.layers == (0, 1, 2) and target.embeddings == ("keys", "tokens")
        for chunk, (start, stop) in enumerate(data.bounds(c) for c in range(3)):
            for layer in target.layers:
                keys = target.read_features("keys", layer, start, stop)
                assert keys.shape == (stop - start, G, G, D) and keys.dtype == np.float16
                np.testing.assert_array_equal(keys, np.full_like(keys, chunk + 1))
                np.testing.assert_array_equal(target.read_features("tokens", layer, start, stop), -keys)
        np.testing.assert_allclose(target.attention_map(), np.full((L, G * G, G * G), 1 / (G * G)), rtol=1e-6)
        with pytest.raises(StoreError, match="captured: keys, tokens"):
            target.read_features("queries", 0, 0, 1)
        with pytest.raises(StoreError, match="no layer 5"):
            target.read_features("keys", 5, 0, 1)
        with pytest.raises(StoreError, match="no model group"):
            reopened.model_split("other", "synthetic", "val")
        with pytest.raises(StoreError, match="no dataset split synthetic/test"):
            reopened.dataset_split("synthetic", "test")

    def test_the_fingerprint_names_what_the_features_are(self, filled, location):
        _, data, target = filled
        assert target.fingerprint_hash == FeatureStore(location / "s.zarr").model_split(
            "m", "synthetic", "val").fingerprint_hash
        other = FeatureStore(location / "t.zarr", mode="a")
        twin = other.require_model_split(
            "m", other.require_dataset_split(DATASET_FP, IDS, np.zeros((2, 3), np.uint8), CHUNK), MODEL_FP)
        assert twin.fingerprint_hash == target.fingerprint_hash  # the same producer on the same data
        moved = other.require_model_split(
            "m", other.require_dataset_split(dict(DATASET_FP, split="test"), IDS, np.zeros((2, 3), np.uint8),
                                             CHUNK), MODEL_FP)
        assert moved.fingerprint_hash != target.fingerprint_hash  # other data, other features

    def test_another_producer_is_refused(self, filled):
        store, data, _ = filled
        with pytest.raises(FingerprintMismatchError, match=r"weights_sha256: stored 'abc', now 'zzz'"):
            store.require_model_split("m", data, dict(MODEL_FP, weights_sha256="zzz"))
        with pytest.raises(FingerprintMismatchError, match="n_images"):
            store.require_dataset_split(dict(DATASET_FP, n_images=4), ["a"] * 4, np.zeros((2, 3)), CHUNK)
        store.require_model_split("m", data, dict(MODEL_FP))  # the same producer is welcome
        store.require_model_split("m2", data, dict(MODEL_FP, weights_sha256="zzz"))  # and another key

    def test_a_second_model_is_appended_beside_the_first(self, finished):
        store, data, first = finished
        second = store.require_model_split("m2", data, dict(MODEL_FP, weights_sha256="zzz"))
        assert second.pending_chunks() == [0, 1, 2] and not second.finished
        for chunk in range(3):
            start, stop = data.bounds(chunk)
            second.write_chunk(chunk, _chunk_arrays(stop - start, 10 * (chunk + 1)))
        second.finalize()
        reopened = FeatureStore(store.path)
        assert reopened.model_splits() == [("m", "synthetic", "val"), ("m2", "synthetic", "val")]
        assert reopened.dataset_of("m2", "val") == "synthetic"
        assert reopened.model_split("m2", "synthetic", "val").read_features("keys", 1, 8, 10)[0, 0, 0, 0] == 30
        assert reopened.model_split("m", "synthetic", "val").read_features("keys", 1, 8, 10)[0, 0, 0, 0] == 3
        assert second.fingerprint_hash != first.fingerprint_hash
        assert validate_store(store.path) == [] and check_store(store.path).problems == []

    # -- chunks: pending, resumed, failed ---------------------------------------------------------
    def test_pending_chunks_resume_where_the_last_writer_stopped(self, filled, location):
        store, data, target = filled
        assert target.pending_chunks() == [0, 1, 2]
        _write_chunk(data, target, 1)
        with pytest.raises(StoreError, match="cannot finalise"):
            target.finalize()
        resumed = FeatureStore(location / "s.zarr", mode="a")  # another process, later
        again = resumed.require_model_split("m", resumed.dataset_split("synthetic", "val"), MODEL_FP)
        assert again.pending_chunks() == [0, 2] and not again.finished
        for chunk in again.pending_chunks():
            _write_chunk(data, again, chunk)
        again.finalize()
        target = FeatureStore(location / "s.zarr").model_split("m", "synthetic", "val")
        assert target.pending_chunks() == [] and target.finished
        assert target.read_features("keys", 2, 4, 8)[0, 0, 0, 0] == 2
        info = FeatureStore(location / "s.zarr").info()
        assert info["models"][0]["chunks_done"] == 3 and info["models"][0]["bytes_stored"] > 0

    def test_a_failed_chunk_write_finishes_the_others_and_stays_pending(self, filled):
        """The arrays of a chunk are written together; one bad array fails the chunk as a whole:
        the error is raised after the other writes are done, and the chunk's done flag stays off."""
        _, _, target = filled
        arrays = _chunk_arrays(CHUNK, 7)
        arrays["tokens"] = arrays["tokens"][:, :-1]  # one image short
        with pytest.raises(StoreError, match="models/m/synthetic/val/tokens"):
            target.write_chunk(0, arrays)
        assert target.pending_chunks() == [0, 1, 2]
        assert target.read_features("keys", 2, CHUNK - 1, CHUNK)[0, 0, 0, 0] == 7  # the good writes were not cut short
        target.write_chunk(0, _chunk_arrays(CHUNK, 8))  # the retry writes the chunk whole
        assert target.pending_chunks() == [1, 2] and target.read_features("tokens", 0, 0, 1)[0, 0, 0, 0] == -8

    # -- codebooks ----------------------------------------------------------------------------------
    def test_a_trained_codebook_is_found_only_with_its_hyperparameters(self, finished):
        _, _, target = finished
        assert target.trained_codebook("online", 2, 0, {"lr": 0.1}) is None
        book = target.require_codebook("online", 2, 0, {"lr": 0.1})
        book.write("keys", 1, np.eye(2, D, dtype=np.float32))
        found = target.trained_codebook("online", 2, 0, {"lr": 0.1})
        assert found is not None and found.is_done("keys", 1) and not found.is_done("keys", 0)
        assert target.trained_codebook("online", 2, 0, {"lr": 0.2}) is None
        assert target.trained_codebook("online", 2, 1, {"lr": 0.1}) is None
        with pytest.raises(FingerprintMismatchError, match="lr"):
            target.require_codebook("online", 2, 0, {"lr": 0.2})

    def test_codebooks_are_written_read_and_replaced_whole(self, finished, location):
        store, _, target = finished
        book = target.require_codebook("lloyd", 2, 0, {"tol": 0.0})
        for layer in target.layers:
            book.write("keys", layer, np.full((2, D), layer, np.float32))
        reread = FeatureStore(store.path).model_split("m", "synthetic", "val")
        assert reread.codebook_names() == ["lloyd-k2-s0"] and [b.name for b in reread.codebooks()] == ["lloyd-k2-s0"]
        np.testing.assert_array_equal(reread.codebook("lloyd", 2, 0).centroids("keys", 2), np.full((2, D), 2))
        with pytest.raises(StoreError, match="no finished tokens codebook"):
            reread.codebook("lloyd", 2, 0).centroids("tokens", 0)
        with pytest.raises(StoreError, match="no codebook online-k2-s0"):
            reread.codebook("online", 2, 0)
        # other hyperparameters: trained beside the finished one, which stays readable, then swapped in
        new = target.require_codebook("lloyd", 2, 0, {"tol": 0.5}, force=True)
        new.write("keys", 0, np.full((2, D), 9, np.float32))
        assert target.codebook_names() == ["lloyd-k2-s0"]  # the replacement in training is not listed
        np.testing.assert_array_equal(target.codebook("lloyd", 2, 0).centroids("keys", 0), np.zeros((2, D)))
        target.replace_codebook("lloyd", 2, 0)
        swapped = FeatureStore(store.path).model_split("m", "synthetic", "val")
        assert swapped.codebook_names() == ["lloyd-k2-s0"]
        assert swapped.trained_codebook("lloyd", 2, 0, {"tol": 0.5}) is not None
        assert swapped.trained_codebook("lloyd", 2, 0, {"tol": 0.0}) is None
        swapped_book = swapped.codebook("lloyd", 2, 0)
        np.testing.assert_array_equal(swapped_book.centroids("keys", 0), np.full((2, D), 9))
        assert not swapped_book.is_done("keys", 1)  # trained otherwise: nothing of the old one carried over
        with pytest.raises(StoreError, match=r"lloyd-k2-s0\.replacing"):  # nothing left to swap in
            swapped.replace_codebook("lloyd", 2, 0)
        assert validate_store(store.path) == [] and check_store(store.path).problems == []

    def test_a_replacement_trained_alike_keeps_the_finished_layers(self, finished):
        store, _, target = finished
        book = target.require_codebook("online", 3, 0, {"lr": 0.1})
        for layer in target.layers:
            book.write("keys", layer, np.full((3, D), layer + 1, np.float32))
        again = target.require_codebook("online", 3, 0, {"lr": 0.1}, force=True)  # the same training, forced
        again.write("keys", 0, np.full((3, D), -1, np.float32))
        target.replace_codebook("online", 3, 0)
        kept = FeatureStore(store.path).model_split("m", "synthetic", "val").codebook("online", 3, 0)
        assert all(kept.is_done("keys", layer) for layer in (0, 1, 2))
        np.testing.assert_array_equal(kept.centroids("keys", 0), np.full((3, D), -1))
        np.testing.assert_array_equal(kept.centroids("keys", 2), np.full((3, D), 3))

    # -- templates ----------------------------------------------------------------------------------
    def test_templates_are_written_read_and_replaced(self, finished):
        store, _, target = finished
        concepts = [{"concept_id": 0, "name": "a"}, {"concept_id": 1, "name": "b"}]
        assert target.templates_names() == [] and target.trained_templates(0, concepts, {"c": 1.0}) is None
        templates = target.require_templates(0, concepts, {"c": 1.0}, ("keys",))
        weights, bias = np.arange(2 * D, dtype=np.float32).reshape(2, D), np.array([0.5, -0.5], np.float32)
        templates.write("keys", 1, weights, bias)
        found = FeatureStore(store.path).model_split("m", "synthetic", "val").trained_templates(0, concepts, {"c": 1.0})
        assert found is not None and found.concepts == concepts
        assert found.is_done("keys", 1) and not found.is_done("keys", 0) and not found.is_done("tokens", 1)
        got_w, got_b = found.read("keys", 1)
        np.testing.assert_array_equal(got_w, weights)
        np.testing.assert_array_equal(got_b, bias)
        with pytest.raises(StoreError, match="no finished keys templates for layer 0"):
            found.read("keys", 0)
        assert target.trained_templates(0, concepts[:1], {"c": 1.0}) is None  # other concepts
        with pytest.raises(FingerprintMismatchError):
            target.require_templates(0, concepts, {"c": 2.0}, ("keys",))
        replacement = target.require_templates(0, concepts, {"c": 2.0}, ("keys",), force=True)
        replacement.write("keys", 0, weights + 1, bias)
        assert target.templates_names() == ["hyperplane-s0"]  # the replacement in training is not listed
        target.replace_templates(0)
        swapped = FeatureStore(store.path).model_split("m", "synthetic", "val")
        assert swapped.trained_templates(0, concepts, {"c": 2.0}) is not None
        assert swapped.trained_templates(0, concepts, {"c": 1.0}) is None
        np.testing.assert_array_equal(swapped.templates(0).read("keys", 0)[0], weights + 1)
        with pytest.raises(StoreError, match="no templates"):
            swapped.templates(1)

    # -- the whole store checked ----------------------------------------------------------------
    def test_a_valid_store_passes_validation_and_the_chunk_check(self, finished):
        store, _, target = finished
        target.require_codebook("lloyd", 2, 0, {"tol": 0.0}).write("keys", 0, np.eye(2, D, dtype=np.float32))
        assert validate_store(store.path) == []
        report = check_store(store.path)
        assert report.problems == [] and report.repairs == []
        assert check_store(store.path, group="models/m/synthetic/val").problems == []
        repaired = check_store(store.path, repair=True)
        assert repaired.problems == [] and repaired.repairs == []
        assert FeatureStore(store.path).model_split("m", "synthetic", "val").pending_chunks() == []

    # -- the maps beside the results tables ------------------------------------------------------
    def test_maps_are_written_read_and_adopted(self, location):
        maps = MapStore(location / "maps.zarr", mode="a")
        maps.write("d/s/ground_truth", attrs={"classes": ["a"]}, counts=np.ones((2, 2, 1), np.int64))
        reader = MapStore(location / "maps.zarr")
        assert reader.read("d/s/ground_truth", "counts").sum() == 4
        with pytest.raises(StoreError, match="has no d/s/nothing/counts"):
            reader.read("d/s/nothing", "counts")
        staging = MapStore(location / "staging.zarr", mode="a")
        staging.write("d/s/ground_truth", attrs={"classes": ["a", "b"]}, counts=np.full((2, 2, 2), 3, np.int64))
        staging.write("d/s/m/online-k2-s0/keys/layer_0", attrs={"k": 2},
                      aggregate=np.zeros((4, 4, 3), np.float32), examples=np.ones((1, 4, 4), np.uint8))
        maps.adopt(staging)
        adopted = MapStore(location / "maps.zarr")
        assert adopted.read("d/s/ground_truth", "counts").shape == (2, 2, 2)  # replaced whole
        assert adopted.read("d/s/ground_truth", "counts").sum() == 24
        np.testing.assert_array_equal(adopted.read("d/s/m/online-k2-s0/keys/layer_0", "examples"),
                                      np.ones((1, 4, 4), np.uint8))

    def test_maps_of_another_results_version_are_refused(self, location):
        maps = MapStore(location / "maps.zarr", mode="a")
        maps.write("d/s/ground_truth", attrs={"classes": ["a"]}, counts=np.ones((2, 2, 1), np.int64))
        assert MapStore(location / "maps.zarr").read("d/s/ground_truth", "counts").sum() == 4
        _edit_root_metadata(location / "maps.zarr", tables_version=TABLES_VERSION + 1)
        for mode in ("r", "a"):
            with pytest.raises(StoreError,
                               match=f"version {TABLES_VERSION + 1}.*reads and writes version {TABLES_VERSION}"):
                MapStore(location / "maps.zarr", mode=mode)


class TestStoreLocal(StoreContract):
    @pytest.fixture
    def location(self, tmp_path):
        return tmp_path / "root"


@pytest.mark.integration
class TestStoreS3(StoreContract):
    @pytest.fixture
    def location(self, s3):
        return as_location(s3.url("root"))
