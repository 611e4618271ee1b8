"""predprey_rs: Predator-Prey weight compression and reconstruction kernels.

Weights become one or two ternary planes {-1, 0, +1} times per-block 8-bit scales (under one
FP16 scale per row), plus a sparse
set of exact FP16 "predators"; ``matvec`` / ``matmul`` compute ``W x`` straight from the packed
bytes (Rust on the CPU, WGSL through wgpu on GPUs). The layout is specified in FORMAT.md.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import _core
from ._core import (
    BLOCK_SIZES,
    FORMAT_VERSION,
    DtypeError,
    FormatError,
    PackedMatrix,
    ShapeError,
    WeightError,
)
from .io import compress_checkpoint, inspect_checkpoint, load_checkpoint, save_checkpoint

__version__ = _core.__version__

_want_kernel = os.environ.get("PREDPREY_CPU_KERNEL", "").strip()
if _want_kernel and _want_kernel != _core.cpu_kernel():
    import warnings

    warnings.warn(
        f"PREDPREY_CPU_KERNEL={_want_kernel!r} is not a CPU kernel this machine runs (names: scalar, "
        f"avx2, avx512-vbmi-vnni, neon, neon-dotprod); using {_core.cpu_kernel()!r}",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = [
    "BLOCK_SIZES",
    "FORMAT_VERSION",
    "DtypeError",
    "FormatError",
    "GpuUnavailableError",
    "PackedMatrix",
    "ShapeError",
    "WeightError",
    "compress",
    "compress_checkpoint",
    "decompress",
    "from_arrays",
    "get_num_threads",
    "inspect_checkpoint",
    "load",
    "load_checkpoint",
    "matmul",
    "matvec",
    "save_checkpoint",
    "set_num_threads",
]


class GpuUnavailableError(RuntimeError):
    """No usable wgpu adapter was found (the message says what was tried)."""


def _as_float32(a: Any, what: str, ndim: int) -> np.ndarray:
    """Any real float array (or bfloat16 bits as uint16) -> C-contiguous float32 of `ndim` dims."""
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except Exception as e:  # pragma: no cover - numpy's own message is the useful part
            raise DtypeError(f"{what} could not be converted to a numpy array: {e}") from e
    if a.ndim != ndim:
        raise ShapeError(f"{what} has {a.ndim} dimension(s) with shape {a.shape}; expected {ndim}")
    if a.dtype == np.uint16:
        # bfloat16 stored as its raw 16 bits: widen to the float32 with the same top half.
        a = (np.ascontiguousarray(a).astype(np.uint32) << 16).view(np.float32)
    elif a.dtype.kind != "f":
        raise DtypeError(
            f"{what} has dtype {a.dtype}; expected a float dtype (float32, float16, float64, "
            "or bfloat16 bits as uint16)"
        )
    return np.ascontiguousarray(a, dtype=np.float32)


def compress(
    weight: Any,
    bits: float = 3.0,
    block_size: int = 64,
    importance: Any | None = None,
) -> PackedMatrix:
    """Compress a weight matrix W (N out, K in) to at most ``bits`` bits per weight.

    ``importance`` is an optional (K,) non-negative vector (mean squared input per input
    channel, as llama.cpp's imatrix stores it); with it every choice minimises
    sum_k h_k (w - q)^2 instead of the plain squared error. Releases the GIL while working.
    """
    w = _as_float32(weight, "weight", 2)
    h = None
    if importance is not None:
        h = _as_float32(importance, "importance", 1)
        if h.shape[0] != w.shape[1]:
            raise ShapeError(f"importance has length {h.shape[0]}; expected K = {w.shape[1]} (one per input column)")
    return _core.compress(w, float(bits), int(block_size), h)


def decompress(p: PackedMatrix) -> np.ndarray:
    """The dense matrix, float32 (N, K). For checks and tools; the kernels never build it."""
    if not isinstance(p, PackedMatrix):
        raise TypeError(f"decompress takes a PackedMatrix, got {type(p).__name__}")
    return _core.decompress(p)


def _activations_flag(activations: str) -> bool:
    if activations not in ("float32", "int8"):
        raise ValueError(f"activations is {activations!r}; expected 'float32' or 'int8'")
    return activations == "int8"


def matvec(p: Any, x: Any, activations: str = "float32") -> np.ndarray:
    """y = W x. ``x``: (K,) float array -> (N,) float32. ``p``: PackedMatrix (CPU) or
    ``gpu.GpuMatrix`` (GPU). ``activations="int8"`` quantizes x per 32 columns (the fast path on
    the CPU and the GPU alike; same rule, predators still exact: docs/kernels.md)."""
    int8 = _activations_flag(activations)
    if isinstance(p, PackedMatrix):
        return _core.matvec(p, _as_float32(x, "x", 1), int8)
    from . import gpu

    if isinstance(p, gpu.GpuMatrix):
        return p.matvec(_as_float32(x, "x", 1), activations)
    raise TypeError(f"matvec takes a PackedMatrix or gpu.GpuMatrix, got {type(p).__name__}")


def matmul(p: Any, x: Any, activations: str = "float32") -> np.ndarray:
    """Y = X W^T. ``X``: (B, K) -> (B, N) float32 (the nn.Linear convention)."""
    int8 = _activations_flag(activations)
    if isinstance(p, PackedMatrix):
        return _core.matmul(p, _as_float32(x, "X", 2), int8)
    from . import gpu

    if isinstance(p, gpu.GpuMatrix):
        return p.matmul(_as_float32(x, "X", 2), activations)
    raise TypeError(f"matmul takes a PackedMatrix or gpu.GpuMatrix, got {type(p).__name__}")


def load(path: str | os.PathLike) -> PackedMatrix:
    """Read one matrix from a safetensors file written by ``PackedMatrix.save``."""
    return _core.load(os.fspath(path))


def from_arrays(metadata: dict, arrays: dict) -> PackedMatrix:
    """Rebuild a matrix from ``p.metadata()`` and ``p.arrays()`` (validated)."""
    return _core.from_arrays(dict(metadata), dict(arrays))


def set_num_threads(n: int) -> None:
    """Threads for the CPU kernels and the quantizer (0 = all cores)."""
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads the CPU kernels use now."""
    return _core.get_num_threads()
