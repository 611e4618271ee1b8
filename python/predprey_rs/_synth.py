"""Random *valid* packed matrices, built straight from the stored arrays (FORMAT.md).

Used by the GPU conformance suite (``predprey gpu-check``), the GPU tests and the benchmarks:
they need packed matrices of any shape with every plane and predators, drawn fresh each run,
without depending on the quantizer. Layout constants come from ``_core``, never from a copy.
"""

from __future__ import annotations

import numpy as np

from . import _core

_R = _core.ROWS_PER_GROUP
_POW3 = np.array([3**i for i in range(_R)], dtype=np.int32)
_ZERO = int(np.dot(np.ones(_R, dtype=np.int32), _POW3))  # five ternary zeros = 121


def _pack(digits: np.ndarray) -> np.ndarray:
    """digits [..., 5] in {0,1,2} -> code bytes [...] (base 3, row 0 least significant)."""
    return (digits.astype(np.int32) * _POW3).sum(axis=-1).astype(np.uint8)


def _pad_group_bytes(rng: np.random.Generator, real_rows: int, shape: tuple[int, ...]) -> np.ndarray:
    """Random code bytes for a group with only `real_rows` real rows (the rest code 0)."""
    d = rng.integers(0, 3, size=shape + (_R,), dtype=np.int8)
    d[..., real_rows:] = 1
    return _pack(d)


def random_packed(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    block_size: int = 64,
    plane2: float = 0.3,
    predators: float = 0.01,
    scale: float = 0.05,
):
    """A random valid PackedMatrix of shape (rows, cols).

    ``plane2``: fraction of (group, block) cells with a plane-2 entry; ``predators``: fraction
    of weights kept as FP16 predators. Row scales are |N(0, 2 * scale)| in FP16, the 8-bit
    scale codes uniform in 0..255 (a few exactly 0, so block scales are about ``scale``), predator
    values N(0, 20 * scale). Padding rows/columns hold code 0 and predators sit on code 0 in
    every plane, as validation requires.
    """
    from . import from_arrays

    b = int(block_size)
    g = -(-rows // _R)
    nb = -(-cols // b)
    kp = nb * b
    pad = g * _R - rows

    codes = rng.integers(0, 243, size=(g, kp), dtype=np.uint8)
    if pad:
        codes[g - 1] = _pad_group_bytes(rng, _R - pad, (kp,))
    codes[:, cols:] = _ZERO

    row_scales = np.abs(rng.standard_normal(rows) * 2 * scale).astype(np.float16)
    scales = rng.integers(0, 256, size=(rows, nb), dtype=np.uint8)
    scales[rng.random((rows, nb)) < 0.02] = 0

    cell = rng.random((g, nb)) < plane2
    eg, eb = np.nonzero(cell)  # row-major: grouped by g, blocks increasing
    e = eg.size
    p2_ptr = np.zeros(g + 1, dtype=np.uint32)
    np.cumsum(np.bincount(eg, minlength=g), out=p2_ptr[1:])
    p2_codes = rng.integers(0, 243, size=(e, b), dtype=np.uint8)
    p2_scales = rng.integers(0, 256, size=(e, _R), dtype=np.uint8)
    if pad:
        last = eg == g - 1
        p2_codes[last] = _pad_group_bytes(rng, _R - pad, (int(last.sum()), b))
        p2_scales[last, _R - pad:] = 0
    # padding columns inside a block that crosses K
    col_of = eb[:, None] * b + np.arange(b)[None, :]
    p2_codes[col_of >= cols] = _ZERO
    eidx = np.full((g, nb), -1, dtype=np.int64)
    eidx[eg, eb] = np.arange(e)

    # predators: unique positions, sorted per row; code 0 under each in every plane
    m = int(round(predators * rows * cols))
    m = min(m, rows * cols)
    flat = np.sort(rng.choice(rows * cols, size=m, replace=False)) if m else np.zeros(0, np.int64)
    pr, pc = flat // cols, flat % cols
    out_ptr = np.zeros(rows + 1, dtype=np.uint32)
    np.cumsum(np.bincount(pr, minlength=rows), out=out_ptr[1:])
    out_vals = (rng.standard_normal(m) * 20 * scale).astype(np.float16)
    if m:
        pg, pi = pr // _R, pr % _R
        digit = (codes[pg, pc].astype(np.int32) // _POW3[pi]) % 3
        delta = np.zeros((g, kp), dtype=np.int32)
        np.add.at(delta, (pg, pc), (1 - digit) * _POW3[pi])
        codes = (codes.astype(np.int32) + delta).astype(np.uint8)
        pe = eidx[pg, pc // b]
        has = pe >= 0
        if has.any():
            ee, kk, ii = pe[has], pc[has] % b, pi[has]
            digit2 = (p2_codes[ee, kk].astype(np.int32) // _POW3[ii]) % 3
            delta2 = np.zeros((e, b), dtype=np.int32)
            np.add.at(delta2, (ee, kk), (1 - digit2) * _POW3[ii])
            p2_codes = (p2_codes.astype(np.int32) + delta2).astype(np.uint8)

    col_dtype = np.uint16 if cols <= _core.MAX_K_U16_COLS else np.uint32
    meta = {
        "format": "predprey",
        "format_version": str(_core.FORMAT_VERSION),
        "rows": str(rows),
        "cols": str(cols),
        "block_size": str(b),
    }
    arrays = {
        "codes": codes,
        "scales": scales,
        "row_scales": row_scales,
        "p2_ptr": p2_ptr,
        "p2_block": eb.astype(np.uint16),
        "p2_scales": p2_scales,
        "p2_codes": p2_codes,
        "out_ptr": out_ptr,
        "out_cols": pc.astype(col_dtype),
        "out_vals": out_vals,
    }
    return from_arrays(meta, arrays)
