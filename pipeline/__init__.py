"""rep-pipeline: orchestration, configuration, model registry, datasets and store access."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rep-pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
