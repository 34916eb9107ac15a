"""The array backend: CuPy where a CUDA GPU is present, NumPy otherwise; torch on request.

The only module that chooses, and the only one that knows a backend by name. Array code
elsewhere takes its namespace from its inputs (``namespace(x)``, that is
``array_api_compat.array_namespace``) and uses only the Python Array API standard; the few
pieces the standard lacks live here, one per backend (``row_sums``, ``bincount``), and so do
the two explicit host crossings (``to_host``, ``to_device``). ``REP_PIPELINE_BACKEND=
numpy|cupy|torch`` overrides the choice. The tests also run the array code on
``array-api-strict`` on one of its extra devices, where any implicit crossing is an error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from .errors import ConfigError

BACKENDS = ("numpy", "cupy", "torch")


@dataclass(frozen=True)
class Backend:
    name: str                 # "numpy" | "cupy" | "torch" (| "strict" in the tests)
    xp: ModuleType            # numpy, cupy, or the standard namespace of torch / array-api-strict
    sparse: ModuleType | None = None   # scipy.sparse or cupyx.scipy.sparse; None elsewhere
    device: Any = None        # where ``asarray`` puts arrays (None: the namespace's default)

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """``a`` on this backend's device: the explicit host-to-device crossing. float16 host
        data is widened to float32 first where the namespace has no float16 (the standard
        does not require one)."""
        if not hasattr(self.xp, "float16") and getattr(a, "dtype", None) == np.float16:
            a = host_float32(a)
        if self.device is None:
            return self.xp.asarray(a, dtype=dtype)
        return self.xp.asarray(a, dtype=dtype, device=self.device)

    def float32(self, a: Any) -> Any:
        """A host or device array as float32 on this backend. float16 crosses to the GPU as
        it is (half the bytes) and is widened there."""
        if self.name == "numpy":
            return host_float32(a)
        if self.name == "cupy":
            return self.xp.asarray(a).astype(self.xp.float32, copy=False)
        if self.name == "torch" and str(self.device).startswith("cuda"):
            return self.asarray(a).to(self.xp.float32)
        return self.asarray(host_float32(a))

    def to_numpy(self, a: Any) -> np.ndarray:
        return to_host(a)

    def free_bytes(self) -> int | None:
        """Free device memory, or None on a host backend."""
        if self.name == "cupy":
            free, _ = self.xp.cuda.runtime.memGetInfo()
            return int(free)
        if self.name == "torch" and str(self.device).startswith("cuda"):
            import torch

            return int(torch.cuda.mem_get_info(self.device)[0])
        return None

    def synchronize(self) -> None:
        if self.name == "cupy":
            self.xp.cuda.Stream.null.synchronize()
        elif self.name == "torch" and str(self.device).startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)


# ---- the standard's missing pieces and the host crossings, per backend ----------------------

def namespace(*arrays: Any) -> Any:
    """The Array API namespace of ``arrays`` (all from one library; Python scalars ignored)."""
    return array_api_compat.array_namespace(*arrays)


def device(x: Any) -> Any:
    return array_api_compat.device(x)


def to_host(a: Any) -> np.ndarray:
    """``a`` as a NumPy array: the one device-to-host crossing (a copy off a device)."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np.asarray(a)
    if array_api_compat.is_cupy_array(a):
        return a.get()
    if array_api_compat.is_torch_array(a):
        return a.detach().cpu().numpy()
    if array_api_compat.is_array_api_strict_namespace(namespace(a)):
        import array_api_strict

        return np.asarray(a.to_device(array_api_strict.Device("CPU_DEVICE")))
    return np.asarray(a)


def to_device(a: Any, like: Any, dtype: Any = None) -> Any:
    """Host data ``a`` (a NumPy array, a list) on the namespace and device of array ``like``:
    the one host-to-device crossing."""
    xp = namespace(like)
    return xp.asarray(a, dtype=dtype, device=device(like))


def is_numpy(xp: Any) -> bool:
    return array_api_compat.is_numpy_namespace(xp)


def is_foreign_array(a: Any) -> bool:
    """True for an array of another Array API namespace than NumPy (CuPy, torch, strict);
    False for NumPy arrays and for lists, scalars and other array-likes NumPy reads."""
    return (array_api_compat.is_array_api_obj(a) and not isinstance(a, np.ndarray)
            and not is_numpy(array_api_compat.array_namespace(a)))


def bincount(x: Any, minlength: int, weights: Any = None) -> Any:
    """Counts of the non-negative integers ``x`` (1-d), ``minlength`` of them, on ``x``'s
    device: int64, or float64 sums of ``weights`` (one per element of ``x``)."""
    xp = namespace(x) if weights is None else namespace(x, weights)
    if is_numpy(xp):
        return np.bincount(x, weights=weights, minlength=minlength)
    if array_api_compat.is_cupy_namespace(xp) or array_api_compat.is_torch_namespace(xp):
        out = xp.bincount(x, weights=weights, minlength=minlength)[:minlength]
        return xp.astype(out, xp.int64 if weights is None else xp.float64)
    # the standard has no scatter-add: a one-hot sum, in slices that bound the temporary
    dtype = xp.int64 if weights is None else xp.float64
    bins = xp.arange(minlength, dtype=x.dtype, device=device(x))
    out = xp.zeros(minlength, dtype=dtype, device=device(x))
    step = max(1, 2 ** 22 // max(minlength, 1))
    for start in range(0, x.shape[0], step):
        stop = min(start + step, x.shape[0])
        hit = xp.astype(x[start:stop, None] == bins[None, :], dtype)
        if weights is not None:
            hit = hit * xp.astype(weights[start:stop], dtype)[:, None]
        out = out + xp.sum(hit, axis=0)
    return out


def sparse_product(rows: Any, cols: Any, values: Any, shape: tuple[int, int], x: Any) -> Any:
    """M @ x for the sparse (rows, cols, values) matrix M of ``shape`` (duplicates add) and a
    dense ``x`` (shape[1], d), on ``x``'s device: out[rows[j]] += values[j] * x[cols[j]].
    NumPy / CuPy: a CSR matrix product (SciPy, cupyx); torch: ``index_add_``; elsewhere a
    dense one-hot product (the standard has no scatter-add)."""
    xp, dev = namespace(x, rows, cols, values), device(x)
    if is_numpy(xp) or array_api_compat.is_cupy_namespace(xp):
        if is_numpy(xp):
            import scipy.sparse as sparse
        else:
            import cupyx.scipy.sparse as sparse
        m = sparse.coo_matrix((values, (rows, cols)), shape=shape).tocsr()
        return xp.asarray(m @ x)
    if array_api_compat.is_torch_namespace(xp):
        out = xp.zeros((shape[0], x.shape[1]), dtype=x.dtype, device=dev)
        return out.index_add_(0, rows, xp.take(x, cols, axis=0) * xp.astype(values, x.dtype)[:, None])
    r = xp.astype(rows[:, None] == xp.arange(shape[0], dtype=rows.dtype, device=dev)[None, :], x.dtype)
    c = xp.astype(cols[:, None] == xp.arange(shape[1], dtype=cols.dtype, device=dev)[None, :], x.dtype)
    return (r * xp.astype(values, x.dtype)[:, None]).T @ (c @ x)


def row_sums(labels: Any, x: Any, n_rows: int) -> tuple[Any, Any]:
    """Scatter-add of rows: (sum of the rows of ``x`` (n, d) given to each of ``n_rows`` rows,
    counts). ``labels`` (n, m) holds m target rows per row of ``x`` (one per codebook).

    NumPy and CuPy: one sparse one-hot in CSC layout, a column per vector with m entries, so
    the product reads every vector once and adds it into each of its targets' sums (which
    stay in cache) instead of reading the batch once per codebook. torch: ``index_add_`` on
    CUDA, a dense one-hot product per codebook on the CPU.
    Elsewhere (the standard has no scatter-add): a dense one-hot product per codebook.
    """
    xp, dev = namespace(x, labels), device(x)
    n, m = labels.shape
    rows = xp.reshape(labels, (-1,))
    if is_numpy(xp) or array_api_compat.is_cupy_namespace(xp):
        if is_numpy(xp):
            import scipy.sparse as sparse
        else:
            import cupyx.scipy.sparse as sparse
        onehot = sparse.csc_matrix((xp.ones(n * m, dtype=x.dtype), rows, xp.arange(0, n * m + 1, m)),
                                   shape=(n_rows, n))
        return xp.asarray(onehot @ x), bincount(rows, n_rows)
    if array_api_compat.is_torch_namespace(xp):
        if x.device.type == "cuda":  # atomics: one read of the batch per codebook
            sums = xp.zeros((n_rows, x.shape[1]), dtype=x.dtype, device=dev)
            for j in range(m):
                sums.index_add_(0, labels[:, j], x)
            return sums, bincount(rows, n_rows)
        # on the CPU index_add_ runs serially: a dense one-hot product per target column is
        # several times faster, and (its shape set by the rows that column reaches) it sums a
        # codebook alike whether trained alone or with others
        sums = xp.zeros((n_rows, x.shape[1]), dtype=x.dtype, device=dev)
        for j in range(m):
            col = labels[:, j]
            lo, hi = int(col.min()), int(col.max()) + 1
            onehot = xp.zeros((hi - lo, n), dtype=x.dtype, device=dev)
            onehot.scatter_(0, (col - lo)[None, :], 1.0)
            sums[lo:hi, :] += onehot @ x
        return sums, bincount(rows, n_rows)
    bins = xp.arange(n_rows, dtype=labels.dtype, device=dev)
    sums = xp.zeros((n_rows, x.shape[1]), dtype=x.dtype, device=dev)
    for j in range(m):
        onehot = xp.astype(labels[:, j:j + 1] == bins[None, :], x.dtype)
        sums = sums + onehot.T @ x
    return sums, bincount(rows, n_rows)


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


def _torch() -> Backend:
    """torch on CUDA where a GPU is present, else its CPU; arrays through the standard namespace.
    A tensor extract already holds on the GPU goes to k-means as it is; torch and CuPy share
    device arrays through DLPack (``xp.from_dlpack``)."""
    import array_api_compat.torch as xp
    import torch

    return Backend("torch", xp, None, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


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
    if name == "torch":
        return _torch()
    raise ConfigError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
