"""Type stubs for ``predprey_rs._core``, the Rust extension (rust/py/src/lib.rs).

Glue only: numpy in and out, input checks, error mapping, and the GIL released around every
heavy call. The packed layout is specified in FORMAT.md. The public wrappers in
``predprey_rs`` convert inputs (float16/float64/bfloat16-bits, non-contiguous) to what these
functions take: C-contiguous float32.
"""

import os
from typing import Final, TypedDict, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "FormatError",
    "ShapeError",
    "WeightError",
    "DtypeError",
    "PackedMatrix",
    "compress",
    "decompress",
    "matvec",
    "matmul",
    "quantize_activations",
    "load",
    "from_bytes",
    "from_arrays",
    "set_num_threads",
    "get_num_threads",
    "cpu_kernel",
    "shader_source",
    "fit_block",
    "gptq_block",
    "gptq_block_fixed",
    "analyze",
    "Analysis",
    "to_parts",
    "from_parts",
    "FORMAT_VERSION",
    "ROWS_PER_GROUP",
    "BLOCK_SIZES",
    "TENSOR_NAMES",
    "MAX_K_U16_COLS",
    "__version__",
]

__version__: Final[str]
"""Version of the Rust crate the extension was built from."""

FORMAT_VERSION: Final[int]
"""Packed layout version this build reads and writes (1)."""
ROWS_PER_GROUP: Final[int]
"""Rows whose codes share one byte (5: base-3 packing, 1.6 bits per code)."""
BLOCK_SIZES: Final[list[int]]
"""Allowed block sizes B along K, in weights: [32, 64, 128, 256]."""
TENSOR_NAMES: Final[list[str]]
"""The ten stored arrays, in file order: codes, scales, p2_ptr, p2_block, p2_scales,
p2_codes, out_ptr, out_cols, out_vals."""
MAX_K_U16_COLS: Final[int]
"""Largest K whose predator columns are stored as u16 (65536); above it they are u32."""

class FormatError(ValueError):
    """A packed matrix or file breaks the format (FORMAT.md), or has an unknown version."""

class ShapeError(ValueError):
    """An array has the wrong number of dimensions or the wrong length."""

class WeightError(ValueError):
    """Weights or parameters that cannot be compressed (NaN/Inf, bad budget, bad importance)."""

class DtypeError(TypeError):
    """An array has a dtype the call cannot take."""

@final
class PackedMatrix:
    """A compressed matrix (FORMAT.md). Immutable; cheap to share between threads.

    Built only by ``compress``, ``load``, ``from_bytes`` and ``from_arrays``.
    """

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K): rows (outputs) by columns (inputs)."""
    @property
    def block_size(self) -> int:
        """Weights per block along K (one of BLOCK_SIZES)."""
    @property
    def bits_per_weight(self) -> float:
        """8 * nbytes / (N * K): every stored byte counted."""
    @property
    def nbytes(self) -> int:
        """Bytes of all ten stored arrays (the file body without its header)."""
    @property
    def n_outliers(self) -> int:
        """Number of predators (weights kept exactly in FP16)."""
    @property
    def planes(self) -> int:
        """2 if any block has a second ternary plane, else 1."""
    @property
    def plane2_fraction(self) -> float:
        """Fraction of (row group, block) cells that carry a second plane, 0..1."""
    @property
    def format_version(self) -> int:
        """Layout version of this matrix (FORMAT_VERSION)."""
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes one safetensors file, atomically (temporary sibling file + rename).

        Raises OSError when the file cannot be written; nothing is left behind then.
        """
    def to_bytes(self) -> bytes:
        """The exact bytes ``save`` writes: u64 LE header length, header JSON, the arrays."""
    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` strings: format, format_version, rows, cols,
        block_size."""
    def arrays(self) -> dict[str, np.ndarray]:
        """The ten stored arrays by name as numpy copies (uint8/uint16/uint32/float16,
        shapes as in FORMAT.md)."""

def compress(
    weight: npt.NDArray[np.float32],
    bits: float,
    block_size: int,
    importance: npt.NDArray[np.float32] | None = None,
) -> PackedMatrix:
    """Compresses C-contiguous float32 weights [N, K] to at most ``bits`` bits per weight
    (every stored byte counted). ``importance``: optional C-contiguous float32 [K], finite,
    >= 0, not all zero; weights the squared error per input column. Releases the GIL.

    Raises WeightError (non-finite or |w| > 65504 weights, bad importance, bits <= 0 or
    below the fixed plane-1 cost), ShapeError (empty, wrong importance length, not
    C-contiguous), FormatError (block_size not in BLOCK_SIZES).
    """

def decompress(p: PackedMatrix) -> npt.NDArray[np.float32]:
    """The dense matrix W as float32 [N, K], row-major."""

def matvec(p: PackedMatrix, x: npt.NDArray[np.float32], int8: bool = False) -> npt.NDArray[np.float32]:
    """y[N] = W x for C-contiguous float32 x[K]; ``int8`` quantizes x per 32 columns first.
    Raises ShapeError for a wrong length. Releases the GIL."""

def matmul(p: PackedMatrix, x: npt.NDArray[np.float32], int8: bool = False) -> npt.NDArray[np.float32]:
    """Y[B, N] = X[B, K] W^T for C-contiguous float32 X (the nn.Linear convention).
    Raises ShapeError for a wrong K. Releases the GIL."""

def quantize_activations(
    x: npt.NDArray[np.float32], padded_cols: int
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """X[B, K] quantized as the int8 kernels do it: rows zero-padded to ``padded_cols`` (a
    multiple of 32, >= K), per 32 columns scale = max|x| / 127 and codes round_half_even(x /
    scale). Returns (codes [B, padded_cols] int8, scales [B, padded_cols / 32] float32). Raises
    ShapeError for a bad ``padded_cols``. Releases the GIL."""

def load(path: str | os.PathLike[str]) -> PackedMatrix:
    """Reads and validates one matrix from a safetensors file.
    Raises OSError (unreadable file) or FormatError (anything malformed)."""

def from_bytes(data: bytes) -> PackedMatrix:
    """Parses and validates bytes written by ``PackedMatrix.to_bytes`` / ``save``."""

def from_arrays(meta: dict[str, str | int], arrays: dict[str, np.ndarray]) -> PackedMatrix:
    """Builds a matrix from ``metadata()`` and ``arrays()`` output, validating every rule of
    FORMAT.md. Raises FormatError, or DtypeError for an array dtype the format never uses."""

def set_num_threads(n: int) -> None:
    """Threads for the CPU kernels and the quantizer (0 = all cores)."""

def get_num_threads() -> int:
    """Threads the CPU kernels use now."""

def cpu_kernel() -> str:
    """Which CPU kernel ``matvec`` uses on this machine: "avx512-vbmi-vnni", "avx2", "neon-dotprod",
    "neon" or "scalar"."""

def shader_source(name: str) -> str:
    """The WGSL source of ``shaders/<name>`` (embedded at build time); KeyError if unknown."""

def fit_block(
    w: npt.NDArray[np.float32],
    h: npt.NDArray[np.float32],
    planes: npt.NDArray[np.uint8],
    npred: npt.NDArray[np.uint8],
    joint_iters: int = 4,
) -> tuple[
    npt.NDArray[np.float32],
    npt.NDArray[np.float32],
    npt.NDArray[np.int8],
    npt.NDArray[np.int8],
    npt.NDArray[np.float32],
]:
    """Fits one block column of many rows with fixed options (error-feedback calibration).

    ``w``: float32 [N, L] with 1 <= L <= 256; ``h``: float32 [L] importance (>= 0);
    ``planes``: uint8 [N], 1 or 2 per row; ``npred``: uint8 [N], predators per row.
    Returns (s1 [N], s2 [N], t1 int8 [N, L], t2 int8 [N, L], pred float32 [N, L] with NaN
    where there is no predator). Scales are FP16-rounded float32; codes are -1/0/+1.
    """

class Analysis:
    """The priced options of one matrix: every block's error for each choice of planes and
    predator count. ``bits(lam)`` / ``encode(lam)`` give the encoding chosen at price ``lam``
    (weighted squared error removed per stored bit), so one budget can be spread over many
    matrices with a shared price. Build with ``analyze``."""

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K)."""
    def bits(self, lam: float) -> float:
        """Total stored bits (every array) of the encoding chosen at price ``lam``."""
    def error(self, lam: float) -> float:
        """Estimated weighted squared error at price ``lam`` (an upper bound of encode's)."""
    def min_bits(self) -> float:
        """Bits of the cheapest encoding: plane 1 only, no predators."""
    def max_lambda(self) -> float:
        """A price above which nothing beyond plane 1 is bought."""
    def lambda_for_budget(self, budget_bits: float) -> float:
        """The smallest price whose encoding fits ``budget_bits`` total stored bits."""
    def encode(self, lam: float) -> PackedMatrix:
        """The PackedMatrix chosen at price ``lam``."""

def gptq_block(
    w: npt.NDArray[np.float32],
    h: npt.NDArray[np.float32],
    u: npt.NDArray[np.float32],
    planes: npt.NDArray[np.uint8],
    npred: npt.NDArray[np.uint8],
    joint_iters: int = 4,
    units: npt.NDArray[np.float32] | None = None,
) -> tuple[
    npt.NDArray[np.float32],
    npt.NDArray[np.float32],
    npt.NDArray[np.int8],
    npt.NDArray[np.int8],
    npt.NDArray[np.float32],
    npt.NDArray[np.float32],
]:
    """One block column of GPTQ-style error feedback inside the format.

    ``w``: float32 [N, L] (the block's weights after the feedback from earlier blocks);
    ``h``: float32 [L] importance; ``u``: float32 [L, L], the block's diagonal slice of the
    upper Cholesky factor U of the damped inverse Hessian (H^-1 = U^T U); ``planes``,
    ``npred``: uint8 [N] fixed options per row. Fits the block scales (as ``fit_block``), then
    rounds the columns left to right to the nearest level, pushing each column's error onto
    the block's later columns. Returns (s1 [N], s2 [N], t1 int8 [N, L], t2 int8 [N, L],
    pred float32 [N, L] (NaN where none), err float32 [N, L]); the caller updates the later
    blocks with ``W[:, right] -= err @ U[block, right]``. ``units``: float32 [N] FP16 row
    scales (FORMAT.md): round the fitted scales to the rows' 8-bit grids first, so the columns
    are rounded to the levels that will be stored. Releases the GIL.
    """

def gptq_block_fixed(
    w: npt.NDArray[np.float32],
    u: npt.NDArray[np.float32],
    s1: npt.NDArray[np.float32],
    s2: npt.NDArray[np.float32],
    is_pred: npt.NDArray[np.bool_],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int8], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``gptq_block`` with the scales (``s1``, ``s2``: float32 [N]; s2 = 0 for one plane) and
    predator positions (``is_pred``: bool [N, L]) given instead of fitted. Returns (t1, t2,
    pred, err) as ``gptq_block``. Releases the GIL."""

def analyze(
    weight: npt.NDArray[np.float32],
    block_size: int,
    importance: npt.NDArray[np.float32] | None = None,
) -> Analysis:
    """Fits every option of every block of float32 weights [N, K] (C-contiguous); see Analysis."""

class _Parts(TypedDict):
    """The dense spelling of a matrix, as ``to_parts`` returns it."""

    t1: npt.NDArray[np.int8]
    """Plane-1 codes -1/0/+1, [N, K]."""
    t2: npt.NDArray[np.int8]
    """Plane-2 codes, [N, K] (0 outside plane-2 cells)."""
    s1: npt.NDArray[np.float32]
    """Plane-1 scales, [N, nb] (each ``row_scales[r] * code / 256`` for an 8-bit code)."""
    s2: npt.NDArray[np.float32]
    """Plane-2 scales, [N, nb] (0 outside plane-2 cells)."""
    p2: npt.NDArray[np.bool_]
    """Which (row group of 5, block) cells carry plane 2, [G, nb]."""
    pred: npt.NDArray[np.float32]
    """Predator values, [N, K]; NaN where there is no predator."""
    row_scales: npt.NDArray[np.float32]
    """FP16 row scales [N]: the unit of the row's 8-bit scale codes (FORMAT.md)."""

def to_parts(p: PackedMatrix) -> _Parts:
    """The dense spelling of a matrix (inverse of ``from_parts``); see ``_Parts``."""

def from_parts(
    block_size: int,
    t1: npt.NDArray[np.int8],
    s1: npt.NDArray[np.float32],
    p2: npt.NDArray[np.bool_],
    t2: npt.NDArray[np.int8],
    s2: npt.NDArray[np.float32],
    pred: npt.NDArray[np.float32],
    row_scales: npt.NDArray[np.float32] | None = None,
) -> PackedMatrix:
    """Packs a dense spelling (C-contiguous arrays, shapes as in ``_Parts``) into a validated
    PackedMatrix. Scales become 8-bit codes under one FP16 row scale per row: ``row_scales[r]``
    where given and every scale of the row fits under it, else one chosen for the row's
    largest scale (so ``from_parts(**to_parts(m))`` gives ``m`` back, and new scales get the
    finest grid). A negative scale is stored as its magnitude with its block's codes negated.
    Raises FormatError for anything FORMAT.md forbids."""
