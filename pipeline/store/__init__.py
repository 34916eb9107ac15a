"""Zarr I/O: the feature store and the results' ``maps.zarr``. The only package that talks to zarr.

The layouts themselves (paths, arrays, dimensions, codecs, attributes) are data in
``storage_schemas``; this package creates groups from them, validates stores against them,
refuses to mix outputs of different producers (fingerprints), and hands the stages typed
metadata and NumPy arrays. One job per module:

- ``zarr_io``: opening stores, creating arrays, concurrent reads and writes, metadata errors;
- ``fingerprints``: the hash of a producer's fingerprint, the refusal to mix producers;
- ``metadata``: the groups' attributes as frozen dataclasses (``from_dict``/``to_dict``);
- ``features``: ``FeatureStore``, ``DatasetSplit``, ``ModelSplit``;
- ``artefacts``: what a model group keeps: ``Codebook``, ``Templates``, ``Explanations``;
- ``maps``: ``MapStore``, the results' ``maps.zarr``;
- ``check``: ``validate_store``, ``check_store``, ``CheckReport``.
"""
from .artefacts import Codebook, Explanations, Templates
from .check import CheckReport, check_store, validate_store
from .features import DatasetSplit, FeatureStore, ModelSplit
from .fingerprints import fingerprint_hash
from .maps import MapStore
from .zarr_io import LIBRARY, Location, check_store_location

__all__ = ["LIBRARY", "CheckReport", "Codebook", "DatasetSplit", "Explanations", "FeatureStore", "Location", "MapStore",
           "ModelSplit", "Templates", "check_store", "check_store_location", "fingerprint_hash", "validate_store"]
