"""predprey_rs: Predator-Prey weight compression and reconstruction kernels.

Weights become one or two ternary planes {-1, 0, +1} times per-block 8-bit scales (under one
FP16 scale per row), plus a sparse
set of exact FP16 "predators"; ``matvec`` / ``matmul`` compute ``W x`` straight from the packed
bytes (Rust on the CPU, WGSL through wgpu on GPUs). The layout is specified in FORMAT.md.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Mapping
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
    if a.dtype.itemsize <= 4:
        return np.ascontiguousarray(a, dtype=np.float32)
    # float64 / longdouble: a finite value beyond float32's range would become +-inf in the cast
    # (with only a RuntimeWarning); name it instead.
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(a, dtype=np.float32)
    inf = np.isinf(out)
    if not inf.any():  # the usual case: one pass over the float32 result, none over the source
        return out
    lost = inf & np.isfinite(a)
    if lost.any():
        at = np.unravel_index(int(np.argmax(lost)), a.shape)
        where = f"row {at[0]}, col {at[1]}" if a.ndim == 2 else f"index {at[0]}"
        raise WeightError(
            f"{what} has finite values beyond float32's range (|value| up to "
            f"{float(np.max(np.abs(a[lost]))):.3g}, first at {where}); expected |value| <= "
            f"{float(np.finfo(np.float32).max):.4g}"
        )
    return out


def _bits_arg(bits: Any) -> float:
    """``bits`` as a positive float, or WeightError naming it (checked before any work, so a
    whole-checkpoint run fails at once; the minimum for a shape is the core's to check)."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real):
        raise WeightError(f"bits is {bits!r} ({type(bits).__name__}); expected a number of bits per weight")
    b = float(bits)
    if not (b > 0 and math.isfinite(b)):
        raise WeightError(f"bits = {b}; expected a positive number of bits per weight")
    return b


def _block_size_arg(block_size: Any) -> int:
    """``block_size`` as an int from BLOCK_SIZES, or WeightError naming it."""
    try:
        b = operator.index(block_size)
    except TypeError:
        b = None
    if isinstance(block_size, bool) or b not in BLOCK_SIZES:
        raise WeightError(f"block_size is {block_size!r}; expected one of {', '.join(map(str, BLOCK_SIZES))}")
    return b


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
    b, bs = _bits_arg(bits), _block_size_arg(block_size)
    w = _as_float32(weight, "weight", 2)
    h = None
    if importance is not None:
        h = _as_float32(importance, "importance", 1)
        if h.shape[0] != w.shape[1]:
            raise ShapeError(f"importance has length {h.shape[0]}; expected K = {w.shape[1]} (one per input column)")
    return _core.compress(w, b, bs, h)


def decompress(p: PackedMatrix) -> np.ndarray:
    """The dense matrix, float32 (N, K). For checks and tools; the kernels never build it."""
    if not isinstance(p, PackedMatrix):
        raise TypeError(f"decompress takes a PackedMatrix, got {type(p).__name__}")
    return _core.decompress(p)


def _activations_flag(activations: str) -> bool:
    if activations not in ("float32", "int8"):
        raise ValueError(f"activations is {activations!r}; expected 'float32' or 'int8'")
    return activations == "int8"


def _apply(op: str, p: Any, x: Any, what: str, ndim: int, activations: str) -> np.ndarray:
    """``op`` ("matvec" or "matmul") of ``p`` (CPU PackedMatrix or gpu.GpuMatrix) on ``x``."""
    int8 = _activations_flag(activations)
    if isinstance(p, PackedMatrix):
        return getattr(_core, op)(p, _as_float32(x, what, ndim), int8)
    from . import gpu

    if isinstance(p, gpu.GpuMatrix):
        return getattr(p, op)(_as_float32(x, what, ndim), activations)
    raise TypeError(f"{op} takes a PackedMatrix or gpu.GpuMatrix, got {type(p).__name__}")


def matvec(p: Any, x: Any, activations: str = "float32") -> np.ndarray:
    """y = W x. ``x``: (K,) float array -> (N,) float32. ``p``: PackedMatrix (CPU) or
    ``gpu.GpuMatrix`` (GPU). ``activations="int8"`` quantizes x per 32 columns (the fast path on
    the CPU and the GPU alike; same rule, predators still exact: docs/kernels.md)."""
    return _apply("matvec", p, x, "x", 1, activations)


def matmul(p: Any, x: Any, activations: str = "float32") -> np.ndarray:
    """Y = X W^T. ``X``: (B, K) -> (B, N) float32 (the nn.Linear convention)."""
    return _apply("matmul", p, x, "X", 2, activations)


def load(path: str | os.PathLike) -> PackedMatrix:
    """Read one matrix from a safetensors file written by ``PackedMatrix.save``."""
    return _core.load(os.fspath(path))


def from_arrays(metadata: dict, arrays: dict) -> PackedMatrix:
    """Rebuild a matrix from ``p.metadata()`` and ``p.arrays()`` (validated)."""
    for what, m in (("metadata", metadata), ("arrays", arrays)):
        if not isinstance(m, Mapping):
            raise TypeError(f"from_arrays takes {what} as a dict (as p.{what}() gives it), got {type(m).__name__}")
    return _core.from_arrays(dict(metadata), dict(arrays))


def set_num_threads(n: int) -> None:
    """Threads for the CPU kernels and the quantizer (0 = all cores)."""
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads the CPU kernels use now."""
    return _core.get_num_threads()
