"""The array backend: CuPy where a CUDA GPU is present, NumPy otherwise.

The only module that chooses; everything else receives ``Backend`` and writes ``xp.`` code
that runs on both. ``REP_PIPELINE_BACKEND=numpy|cupy`` overrides the choice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class Backend:
    name: str                 # "numpy" | "cupy"
    xp: ModuleType            # numpy or cupy
    sparse: ModuleType        # scipy.sparse or cupyx.scipy.sparse

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        return self.xp.asarray(a, dtype=dtype)

    def float32(self, a: Any) -> Any:
        """A host or device array as float32 on this backend. float16 crosses to the GPU as
        it is (half the bytes) and is widened there."""
        if self.name == "cupy":
            return self.xp.asarray(a).astype(self.xp.float32, copy=False)
        return host_float32(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        return a.get() if self.name == "cupy" else np.asarray(a)

    def free_bytes(self) -> int | None:
        """Free device memory, or None on the host backend."""
        if self.name != "cupy":
            return None
        free, _ = self.xp.cuda.runtime.memGetInfo()
        return int(free)

    def synchronize(self) -> None:
        if self.name == "cupy":
            self.xp.cuda.Stream.null.synchronize()


def host_float32(a: np.ndarray) -> np.ndarray:
    """``a`` as a float32 NumPy array. NumPy widens float16 in scalar code; torch's vectorised
    cast is several times faster, and the cluster and evaluate stages widen every feature they read."""
    a = np.asarray(a)
    if a.dtype != np.float16:
        return a.astype(np.float32, copy=False)
    import torch

    out = np.empty(a.shape, dtype=np.float32)
    torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(a)))
    return out


def _numpy() -> Backend:
    import scipy.sparse

    return Backend("numpy", np, scipy.sparse)


def _cupy() -> Backend:
    import cupy
    import cupyx.scipy.sparse

    return Backend("cupy", cupy, cupyx.scipy.sparse)


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # not installed, no driver, no device: all mean "no GPU"
        return False


@lru_cache(maxsize=None)
def get_backend(name: str | None = None) -> Backend:
    """The backend by name, or (once per process) CuPy if a GPU is usable, else NumPy."""
    name = name or os.environ.get("REP_PIPELINE_BACKEND") or ("cupy" if gpu_available() else "numpy")
    if name == "numpy":
        return _numpy()
    if name == "cupy":
        if not gpu_available():
            raise ConfigError("backend 'cupy' requested but no CUDA GPU with CuPy is usable here")
        return _cupy()
    raise ConfigError(f"unknown backend {name!r}; use 'numpy' or 'cupy'")
