"""Typed errors raised at the boundaries of rep-pipeline.

Each one names the file, image or array at fault, and inherits the builtin a caller would
naturally catch (``ValueError``, ``FileNotFoundError``...), as zarr-python's errors do.
"""
from __future__ import annotations


class RepPipelineError(Exception):
    """Base of every error rep-pipeline raises on purpose."""


class ConfigError(RepPipelineError, ValueError):
    """An option or config value is invalid; the message lists what is allowed."""


class QueryError(ConfigError):
    """SQL given to ``rep-pipeline query`` does not parse, bind or run."""


class UnknownModelError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsUnavailableError(RepPipelineError, RuntimeError):
    """Pretrained weights could not be fetched (no network, no cache)."""


class CheckpointError(RepPipelineError, ValueError):
    """A weights file is unreadable or does not match the architecture."""


class DatasetError(RepPipelineError, ValueError):
    """A dataset root, split or list is missing or empty."""


class DataRootError(DatasetError, FileNotFoundError):
    """The data root does not have the layout the dataset expects."""


class EmptySplitError(DatasetError):
    """A split lists no images."""


class ImageReadError(DatasetError):
    """An image or label file cannot be decoded."""


class LabelValueError(DatasetError):
    """A label file holds values outside the dataset's class table."""


class SizeMismatchError(DatasetError):
    """An image and its label differ in size."""


class StoreError(RepPipelineError, ValueError):
    """A feature store is missing, malformed or of another schema version."""


class FingerprintMismatchError(StoreError):
    """Writing into a store group that was produced by another model, weights or geometry."""


class LeaseHeldError(RepPipelineError, RuntimeError):
    """Another live process is writing the same model group, codebooks or results."""


class NonFiniteFeaturesError(RepPipelineError, FloatingPointError):
    """A model produced NaN or inf features for some image."""
