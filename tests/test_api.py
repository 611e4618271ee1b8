"""The public API of ``predprey_rs`` against slow, obviously-correct references.

The references are written from FORMAT.md alone: a numpy decoder of the ten arrays, the byte
count of the fixed plane-1 cost, float64 ``W @ x``, and a brute force over every ternary code.
Inputs are drawn fresh each run (hypothesis) and include awkward shapes (1 row, N not a
multiple of 5, K not a multiple of the block, K < block, K = 576), every block size, all-zero
and constant blocks, and magnitudes from 1e-6 to 6e4.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import predprey_rs as pp
from predprey_rs import _core

BLOCK_SIZES = list(pp.BLOCK_SIZES)
F16_MAX = 65504.0
POW3 = np.array([1, 3, 9, 27, 81], np.int64)
AWKWARD_K = [1, 2, 5, 7, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 255, 256, 257, 576]

FAST = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# References, from FORMAT.md only


def dims(n: int, k: int, b: int) -> tuple[int, int, int]:
    """(G, nb, Kp): row groups of 5, blocks per row, padded width."""
    g, nb = -(-n // 5), -(-k // b)
    return g, nb, nb * b


def fixed_bytes(n: int, k: int, b: int) -> int:
    """Bytes every matrix of this shape pays: codes [G, Kp] u8, scales [N, nb] u8, row_scales
    [N] f16, p2_ptr [G+1] u32 and out_ptr [N+1] u32 (no plane-2 entry, no predator)."""
    g, nb, kp = dims(n, k, b)
    return g * kp + n * nb + 2 * n + 4 * (g + 1) + 4 * (n + 1)


def min_bits(n: int, k: int, b: int) -> float:
    return 8 * fixed_bytes(n, k, b) / (n * k)


def bits_with_spare(n: int, k: int, b: int, spare_bits: float) -> float:
    """A budget of the fixed cost plus `spare_bits` in total (float rounding kept away from
    the floor that the quantizer takes of bits * N * K)."""
    return (8 * fixed_bytes(n, k, b) + spare_bits + 0.25) / (n * k)


def expected_layout(n: int, k: int, b: int, e: int, m: int) -> dict[str, tuple[str, tuple]]:
    g, nb, kp = dims(n, k, b)
    return {
        "codes": ("uint8", (g, kp)),
        "scales": ("uint8", (n, nb)),
        "row_scales": ("float16", (n,)),
        "p2_ptr": ("uint32", (g + 1,)),
        "p2_block": ("uint16", (e,)),
        "p2_scales": ("uint8", (e, 5)),
        "p2_codes": ("uint8", (e, b)),
        "out_ptr": ("uint32", (n + 1,)),
        "out_cols": ("uint16" if k <= 65536 else "uint32", (m,)),
        "out_vals": ("float16", (m,)),
    }


def digits(code_bytes: np.ndarray) -> np.ndarray:
    """Base-3 digits of packed bytes: [..., W] -> [..., 5, W], digit i = (byte / 3^i) % 3."""
    c = code_bytes.astype(np.int64)[..., None, :]
    return (c // POW3[:, None]) % 3


def ref_parts(p: pp.PackedMatrix) -> tuple[np.ndarray, np.ndarray]:
    """(T, P): the ternary part (planes 1 and 2) and the predator part of W, float32 [N, K],
    following FORMAT.md line by line (slow)."""
    a = p.arrays()
    n, k = p.shape
    b = p.block_size
    g, nb, kp = dims(n, k, b)
    t1 = digits(a["codes"]).reshape(5 * g, kp)[:n] - 1  # [N, Kp] in {-1, 0, 1}
    unit = a["row_scales"].astype(np.float64) / 256  # [N]: block scale = code * unit
    s1 = np.repeat(a["scales"].astype(np.float64) * unit[:, None], b, axis=1)  # [N, Kp]
    w1 = s1 * t1
    w2 = np.zeros_like(w1)
    for gi in range(g):
        for e in range(int(a["p2_ptr"][gi]), int(a["p2_ptr"][gi + 1])):
            blk = int(a["p2_block"][e])
            t2 = digits(a["p2_codes"][e]) - 1  # [5, B]
            for i in range(5):
                r = 5 * gi + i
                if r < n:
                    w2[r, blk * b:(blk + 1) * b] = float(a["p2_scales"][e, i]) * unit[r] * t2[i]
    # Each term (8-bit code x FP16 unit, exact) and their sum are exact in float64; one rounding
    # to float32, as a float32 sum does.
    t = (w1 + w2).astype(np.float32)[:, :k]
    pred = np.zeros((n, k), np.float32)
    for r in range(n):
        for j in range(int(a["out_ptr"][r]), int(a["out_ptr"][r + 1])):
            pred[r, int(a["out_cols"][j])] = a["out_vals"][j]
    return t, pred


def ref_decode(p: pp.PackedMatrix) -> np.ndarray:
    """Dense float32 W: T + P (the codes are 0 under every predator, so one of them is 0)."""
    t, pred = ref_parts(p)
    return t + pred


def ref_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x as the int8 path sees it (cpu/mod.rs docs): per 32 columns s = max|x| / 127 (float32),
    q = round-half-even(x / s) clamped to +-127; returns (s * q in float64, s per column)."""
    x = x.astype(np.float32)
    out = np.zeros(len(x), np.float64)
    sc = np.zeros(len(x), np.float64)
    for j in range(0, len(x), 32):
        c = x[j:j + 32]
        amax = np.abs(c).max()
        if amax == 0:
            continue
        s = np.float32(amax) / np.float32(127.0)
        q = np.clip(np.rint(c / s), -127, 127)
        out[j:j + 32] = q.astype(np.float64) * float(s)
        sc[j:j + 32] = float(s)
    return out, sc


def werr(w: np.ndarray, q: np.ndarray, h: np.ndarray | None = None) -> float:
    """Importance-weighted squared error sum_k h_k (w - q)^2, in float64."""
    d = (w.astype(np.float64) - q.astype(np.float64)) ** 2
    return float((d * (1.0 if h is None else h.astype(np.float64)[None, :])).sum())


def rel_norm(y: np.ndarray, ref: np.ndarray) -> float:
    num = float(np.linalg.norm(y.astype(np.float64) - ref))
    den = float(np.linalg.norm(ref))
    return num / den if den > 0 else num


def make_weight(n: int, k: int, b: int, kind: str, mag: float, seed: int) -> np.ndarray:
    """A float32 [n, k] matrix with max |w| == mag (<= 65504) unless all zero."""
    rng = np.random.default_rng(seed)
    if kind == "zeros":
        return np.zeros((n, k), np.float32)
    if kind == "normal":
        w = rng.standard_normal((n, k))
    elif kind == "heavy":  # LLM-like: Student-t tails, a few large outliers
        w = rng.standard_t(2.0, (n, k))
    elif kind == "const_blocks":  # every (row, block) constant
        nb = -(-k // b)
        w = np.repeat(rng.standard_normal((n, nb)), b, axis=1)[:, :k]
    elif kind == "zero_blocks":  # some blocks entirely zero
        nb = -(-k // b)
        keep = np.repeat(rng.random((n, nb)) < 0.5, b, axis=1)[:, :k]
        w = rng.standard_normal((n, k)) * keep
    elif kind == "row_scales":  # rows of wildly different magnitude in one matrix
        w = rng.standard_normal((n, k)) * np.logspace(-6, 0, n)[:, None]
    else:  # pragma: no cover
        raise AssertionError(kind)
    top = np.abs(w).max()
    if top == 0:
        return np.zeros((n, k), np.float32)
    return np.clip(w * (mag / top), -F16_MAX, F16_MAX).astype(np.float32)


def _llm_like(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Heavy-tailed weights and a heavy-tailed importance (mean x^2 per input channel)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4.0, (n, k)) * 0.02).astype(np.float32)
    h = np.exp(rng.normal(0.0, 1.5, k)).astype(np.float32) ** 2
    return w, h


KINDS = ["normal", "heavy", "const_blocks", "zero_blocks", "row_scales", "zeros"]
MAGS = [1e-6, 1e-3, 1.0, 100.0, 6e4]


@st.composite
def weights(draw, max_rows: int = 23, max_cols: int = 600, kinds=KINDS):
    n = draw(st.one_of(st.just(1), st.integers(1, max_rows)))
    k = draw(st.one_of(st.sampled_from(AWKWARD_K), st.integers(1, max_cols)))
    b = draw(st.sampled_from(BLOCK_SIZES))
    kind = draw(st.sampled_from(kinds))
    mag = draw(st.sampled_from(MAGS))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_weight(n, k, b, kind, mag, seed), b, kind


@st.composite
def budgets(draw, n: int, k: int, b: int) -> float:
    """Just above the minimum, a typical 2.0 / 3.0 / 4.0, or generous; never below the minimum."""
    lo = bits_with_spare(n, k, b, 0)
    choice = draw(st.sampled_from(["min", "spare", "2.0", "3.0", "4.0", "generous"]))
    if choice == "min":
        return lo
    if choice == "spare":
        return lo + draw(st.floats(0.01, 3.0))
    if choice == "generous":
        return max(lo, 4.0) * 2
    return max(lo, float(choice))


# ---------------------------------------------------------------------------------------------
# compress: budget, byte count, layout, decode


@FAST
@given(data=st.data(), wb=weights())
def test_compress_budget_layout_and_decode(data, wb):
    w, b, kind = wb
    n, k = w.shape
    bits = data.draw(budgets(n, k, b), label="bits")
    p = pp.compress(w, bits, b)

    assert p.shape == (n, k) and p.block_size == b and p.format_version == pp.FORMAT_VERSION == 2
    arrays = p.arrays()
    e, m = len(arrays["p2_block"]), len(arrays["out_vals"])
    # Every stored byte counted: nbytes is the sum of the ten arrays, bits follow from it.
    assert list(arrays) == list(_core.TENSOR_NAMES)
    assert p.nbytes == sum(a.nbytes for a in arrays.values())
    assert p.bits_per_weight == pytest.approx(8 * p.nbytes / (n * k), rel=1e-12)
    assert p.bits_per_weight <= bits
    assert p.nbytes >= fixed_bytes(n, k, b)
    for name, (dt, shape) in expected_layout(n, k, b, e, m).items():
        assert (arrays[name].dtype.name, arrays[name].shape) == (dt, shape), name
    assert p.n_outliers == m
    assert p.planes == (2 if e else 1)
    g, nb, _ = dims(n, k, b)
    assert p.plane2_fraction == pytest.approx(e / (g * nb), abs=1e-12)
    assert p.metadata() == {"format": "predprey", "format_version": "2", "rows": str(n), "cols": str(k), "block_size": str(b)}
    assert f"shape=({n}, {k})" in repr(p)

    q = pp.decompress(p)
    assert q.dtype == np.float32 and q.shape == (n, k) and q.flags.c_contiguous
    # The Rust decoder and the spec-only decoder agree bit for bit.
    np.testing.assert_array_equal(q, ref_decode(p))
    assert np.isfinite(q).all()
    # Any fit is at least as good as all zeros (the empty support is one of the choices);
    # the slack covers FP16 rounding of a scale that is itself only a few FP16 ulps.
    assert werr(w, q) <= werr(w, np.zeros_like(w)) * (1 + 1e-6) + 1e-30
    if kind == "zeros":
        assert not q.any()
    if kind == "const_blocks":
        # A constant block is one ternary plane times its value: exact up to the rounding of
        # that value to its row's 8-bit grid (half a step, row_scales[r] / 512) and the FP16
        # rounding of the row scale (2^-11 relative, 2^-25 absolute for subnormals).
        half_step = arrays["row_scales"].astype(np.float64)[:, None] / 512
        tol = half_step + np.maximum(np.abs(w) * 2.0**-11, 2.0**-25)
        assert (np.abs(q.astype(np.float64) - w) <= tol * (1 + 1e-6)).all()


@FEW
@given(wb=weights(), frac=st.floats(0.05, 0.9999))
def test_bits_below_minimum_says_the_minimum(wb, frac):
    w, b, _ = wb
    n, k = w.shape
    lo = min_bits(n, k, b)
    with pytest.raises(pp.WeightError, match="below the minimum") as ei:
        pp.compress(w, lo * frac, b)
    assert f"{lo:.4f}" in str(ei.value)


def test_compress_at_exactly_the_minimum_terminates():
    # 8 * fixed / (N * K) * (N * K) rounds to just under 8 * fixed for this shape. Run in a
    # child process: the hang is in Rust with the GIL released and cannot be interrupted.
    n, k, b = 1, 79, 32
    lo = min_bits(n, k, b)
    assert np.floor(lo * n * k) < 8 * fixed_bytes(n, k, b)  # the shape still triggers the edge
    code = f"""
import numpy as np, predprey_rs as pp
w = np.random.default_rng(0).standard_normal(({n}, {k})).astype(np.float32)
p = pp.compress(w, {lo!r}, {b})
assert p.bits_per_weight <= {lo!r}
"""
    try:
        r = subprocess.run([sys.executable, "-c", code], timeout=10, capture_output=True)
    except subprocess.TimeoutExpired:
        pytest.fail("compress(bits = the minimum) did not finish in 10 s")
    assert r.returncode == 0, r.stderr.decode()


def test_big_shapes_rows_over_65535_and_cols_over_65536():
    # N > 65535 rows (u32 pointers) and K > 65536 (u32 predator columns), kept small in area.
    for n, k, b in [(70_001, 3, 32), (2, 70_000, 256)]:
        w = make_weight(n, k, b, "heavy", 1.0, 7)
        p = pp.compress(w, max(4.0, bits_with_spare(n, k, b, 0) + 2.0), b)
        a = p.arrays()
        assert a["out_cols"].dtype == (np.uint16 if k <= 65536 else np.uint32)
        assert p.n_outliers > 0
        q = pp.decompress(p)
        np.testing.assert_array_equal(q, ref_decode(p))
        np.testing.assert_array_equal(pp.decompress(_core.from_bytes(p.to_bytes())), q)
        x = np.random.default_rng(1).standard_normal(k).astype(np.float32)
        ref = q.astype(np.float64) @ x.astype(np.float64)
        assert rel_norm(pp.matvec(p, x), ref) <= 1e-5


# ---------------------------------------------------------------------------------------------
# save / load / to_bytes / from_arrays


def read_header(raw: bytes) -> tuple[int, dict]:
    (hlen,) = struct.unpack("<Q", raw[:8])
    return hlen, json.loads(raw[8:8 + hlen])


def canon(p_or_raw) -> tuple[dict, bytes]:
    """A file's parsed header and its body: equal for equal matrices whatever the order of the
    header's JSON keys."""
    raw = bytes(p_or_raw) if isinstance(p_or_raw, (bytes, bytearray)) else p_or_raw.to_bytes()
    hlen, header = read_header(raw)
    return header, raw[8 + hlen:]


def test_to_bytes_is_reproducible():
    p = pp.compress(make_weight(7, 70, 32, "normal", 1.0, 0), 8.0, 32)
    assert len({p.to_bytes() for _ in range(20)}) == 1


@FEW
@given(wb=weights(max_rows=12, max_cols=300), use_pathlib=st.booleans())
def test_save_load_round_trip(wb, use_pathlib):
    w, b, _ = wb
    n, k = w.shape
    p = pp.compress(w, bits_with_spare(n, k, b, 0) + 1.5, b)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        p.save(path if use_pathlib else str(path))
        raw = path.read_bytes()
        assert os.listdir(d) == ["m.safetensors"]  # no temporary file left behind
        hlen, header = read_header(raw)
        # The body is exactly the ten arrays: file size - 8 - header == nbytes.
        assert len(raw) - 8 - hlen == p.nbytes
        assert header.pop("__metadata__") == p.metadata()
        assert sorted(header) == sorted(_core.TENSOR_NAMES)
        st_dtype = {"uint8": "U8", "uint16": "U16", "uint32": "U32", "float16": "F16"}
        arrays = p.arrays()
        for name, t in header.items():
            assert t["dtype"] == st_dtype[arrays[name].dtype.name] and tuple(t["shape"]) == arrays[name].shape
        assert canon(raw) == canon(p)
        # Any safetensors reader sees the same arrays.
        from safetensors.numpy import load_file

        other = load_file(str(path))
        for name, a in arrays.items():
            np.testing.assert_array_equal(other[name], a)
        q = pp.load(path)
    assert q.shape == p.shape and q.block_size == p.block_size and q.nbytes == p.nbytes
    np.testing.assert_array_equal(pp.decompress(q), pp.decompress(p))
    assert canon(q) == canon(p)
    assert canon(_core.from_bytes(raw)) == canon(raw)


@FEW
@given(wb=weights(max_rows=12, max_cols=300), contiguous=st.booleans())
def test_arrays_metadata_from_arrays_round_trip(wb, contiguous):
    w, b, _ = wb
    n, k = w.shape
    p = pp.compress(w, bits_with_spare(n, k, b, 0) + 2.0, b)
    arrays = p.arrays()
    if not contiguous:  # any layout numpy can describe is accepted
        arrays = {name: np.asfortranarray(a) for name, a in arrays.items()}
    q = pp.from_arrays(p.metadata(), arrays)
    assert canon(q) == canon(p)
    np.testing.assert_array_equal(pp.decompress(q), pp.decompress(p))
    # arrays() are copies: writing to them does not change the matrix.
    a2 = p.arrays()
    a2["scales"][...] = 0
    np.testing.assert_array_equal(p.arrays()["scales"], arrays["scales"])


# ---------------------------------------------------------------------------------------------
# matvec / matmul


@FAST
@given(wb=weights(), seed=st.integers(0, 2**32 - 1), xmag=st.sampled_from([1e-3, 1.0, 50.0]))
def test_matvec_matches_float64_reference(wb, seed, xmag):
    w, b, _ = wb
    n, k = w.shape
    p = pp.compress(w, max(3.0, bits_with_spare(n, k, b, 0)), b)
    q = pp.decompress(p).astype(np.float64)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(k) * xmag * np.exp(rng.standard_normal(k))).astype(np.float32)
    y = pp.matvec(p, x)
    assert y.dtype == np.float32 and y.shape == (n,)
    ref = q @ x.astype(np.float64)
    # Tolerance 1e-5 norm-wise: the kernel rounds x to float32 (exact here) and accumulates
    # in float32 over K <= 600 terms, an error of about sqrt(K) * 2^-24 ~ 1.5e-6 of ||y|| for
    # random signs; 1e-5 is several times that, while one wrong code or scale anywhere moves
    # y by a whole term |s x_k| (~ ||y|| / sqrt(K) >= 4e-2 of it). The second term covers the
    # rare draw where y cancels to almost nothing (error relative to sum |w x| instead).
    slack = 1e-6 * float(np.linalg.norm(np.abs(q) @ np.abs(x.astype(np.float64))))
    assert float(np.linalg.norm(y - ref)) <= 1e-5 * float(np.linalg.norm(ref)) + slack


@FAST
@given(b=st.integers(1, 3), k=st.integers(1, 200), pad=st.integers(0, 2), seed=st.integers(0, 2**32 - 1))
def test_quantize_activations_is_the_documented_rule(b, k, pad, seed):
    """_core.quantize_activations (what the GPU's int8 path uploads) is ref_int8's rule: zero
    padding to a multiple of 32, per chunk scale max|x| / 127 and round-half-even codes; a chunk
    with a NaN or infinity gets scale NaN and codes 0."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((b, k)) * np.exp(rng.normal(0, 2, (b, k)))).astype(np.float32)
    if k > 3 and seed % 3 == 0:
        x[0, k // 2] = np.inf
    kp = (-(-k // 32) + pad) * 32
    q, s = pp._core.quantize_activations(x, kp)
    assert q.shape == (b, kp) and q.dtype == np.int8 and s.shape == (b, kp // 32) and s.dtype == np.float32
    assert not q[:, k:].any()
    for r in range(b):
        row = np.zeros(kp, np.float32)
        row[:k] = x[r]
        for j in range(kp // 32):
            c = row[32 * j:32 * j + 32]
            if not np.isfinite(c).all():
                assert np.isnan(s[r, j]) and not q[r, 32 * j:32 * j + 32].any()
                continue
            want_s = np.float32(np.abs(c).max()) / np.float32(127.0)
            assert s[r, j] == want_s
            if want_s > 0:
                want_q = np.clip(np.rint(c / want_s), -127, 127)
                assert np.array_equal(q[r, 32 * j:32 * j + 32], want_q.astype(np.int8))
    for bad in (k - 1, kp + 16):
        if bad >= 0 and (bad < k or bad % 32):
            with pytest.raises(pp.ShapeError, match="padded_cols"):
                pp._core.quantize_activations(x, bad)


@FAST
@given(wb=weights(), seed=st.integers(0, 2**32 - 1), heavy=st.booleans())
def test_matvec_int8_follows_the_documented_rule(wb, seed, heavy):
    w, b, _ = wb
    n, k = w.shape
    p = pp.compress(w, max(3.0, bits_with_spare(n, k, b, 0)), b)
    t, pred = (a.astype(np.float64) for a in ref_parts(p))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(k)
    if heavy:  # LLM-like: a heavy-tailed scale per channel
        x *= np.exp(rng.normal(0, 1.5, k))
    x = x.astype(np.float32)
    xd = x.astype(np.float64)
    xq, s = ref_int8(x)
    y = pp.matvec(p, x, activations="int8").astype(np.float64)
    # 1. The rule of cpu/mod.rs: ternary part against the quantized x, predators against x
    #    in float32. Only float32 rounding differs (1e-5 of the sum of |terms|).
    want = t @ xq + pred @ xd
    mag = np.abs(t) @ np.abs(xq) + np.abs(pred) @ np.abs(xd)
    assert (np.abs(y - want) <= 1e-5 * mag + 1e-30).all()
    # 2. The documented bound against the exact product: |x - s q| <= s / 2 per column.
    exact = (t + pred) @ xd
    bound = np.abs(t) @ (s / 2) + 1e-5 * (np.abs(t + pred) @ np.abs(xd)) + 1e-30
    assert (np.abs(y - exact) <= bound).all()
    # x = 0 gives exactly 0 in both paths.
    z = np.zeros(k, np.float32)
    assert not pp.matvec(p, z, activations="int8").any() and not pp.matvec(p, z).any()


@pytest.mark.parametrize("heavy", [False, True])
def test_matvec_int8_error_is_small_norm_wise(heavy):
    w, _ = _llm_like(256, 1024, 3)
    p = pp.compress(w, 3.0, 64)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(1024) * (np.exp(rng.normal(0, 1.0, 1024)) if heavy else 1.0)
    x = x.astype(np.float32)
    ref = pp.decompress(p).astype(np.float64) @ x.astype(np.float64)
    # Symmetric int8 per 32 columns moves each x_k by <= max|x_chunk| / 254: about 0.5 % of
    # ||y|| for Gaussian x, ~1 % with per-channel outliers; 2e-2 is the documented promise.
    assert rel_norm(pp.matvec(p, x, activations="int8"), ref) <= 2e-2


@FAST
@given(wb=weights(max_rows=17, max_cols=300), batch=st.integers(1, 9), seed=st.integers(0, 2**32 - 1),
       act=st.sampled_from(["float32", "int8"]))
def test_matmul_rows_equal_matvec(wb, batch, seed, act):
    w, b, _ = wb
    n, k = w.shape
    p = pp.compress(w, max(3.0, bits_with_spare(n, k, b, 0)), b)
    xs = np.random.default_rng(seed).standard_normal((batch, k)).astype(np.float32)
    y = pp.matmul(p, xs, activations=act)
    assert y.dtype == np.float32 and y.shape == (batch, n)
    rows = np.stack([pp.matvec(p, xs[i], activations=act) for i in range(batch)])
    # Same decode, same per-row quantization of x; only the summation order may differ
    # (float32 rounding, ~1e-7 relative), so 1e-6 of |W||x| per output is ample.
    q = pp.decompress(p).astype(np.float64)
    bound = 1e-6 * (np.abs(xs).astype(np.float64) @ np.abs(q).T) + 1e-30
    assert (np.abs(y.astype(np.float64) - rows) <= bound).all()


def test_matmul_empty_batch():
    p = pp.compress(make_weight(7, 40, 32, "normal", 1.0, 0), 8.0, 32)
    y = pp.matmul(p, np.zeros((0, 40), np.float32))
    assert y.shape == (0, 7) and y.dtype == np.float32


@FEW
@given(wb=weights(max_rows=12, max_cols=300), seed=st.integers(0, 2**32 - 1))
def test_activation_dtypes_and_layouts_accepted(wb, seed):
    w, b, _ = wb
    n, k = w.shape
    p = pp.compress(w, max(3.0, bits_with_spare(n, k, b, 0)), b)
    rng = np.random.default_rng(seed)
    x16 = rng.standard_normal(k).astype(np.float16)
    x32 = x16.astype(np.float32)  # every variant below holds exactly these values
    want = pp.matvec(p, x32)
    variants = {
        "float16": x16,
        "float64": x32.astype(np.float64),
        "strided": np.repeat(x32, 2)[::2],
        "list": x32.tolist(),
    }
    # bfloat16 given as its raw bits (uint16) means the float32 with those top 16 bits.
    bf = (x32.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(pp.matvec(p, bf), pp.matvec(p, (bf.astype(np.uint32) << 16).view(np.float32)))
    for name, v in variants.items():
        np.testing.assert_array_equal(pp.matvec(p, v), want, err_msg=name)
    xs = rng.standard_normal((3, k)).astype(np.float32)
    want2 = pp.matmul(p, xs)
    for name, v in {"float64": xs.astype(np.float64), "fortran": np.asfortranarray(xs),
                    "transposed view": np.ascontiguousarray(xs.T).T, "strided": np.repeat(xs, 2, axis=1)[:, ::2]}.items():
        np.testing.assert_array_equal(pp.matmul(p, v), want2, err_msg=name)


@FEW
@given(wb=weights(max_rows=12, max_cols=300))
def test_weight_dtypes_and_layouts_accepted(wb):
    w, b, _ = wb
    n, k = w.shape
    bits = max(3.0, bits_with_spare(n, k, b, 0))
    w16 = w.astype(np.float16)
    if not np.isfinite(w16).all():  # 65504 < |w| rounds to inf in f16: not an input to try
        w16 = np.clip(w, -60000, 60000).astype(np.float16)
    w32 = w16.astype(np.float32)
    want = canon(pp.compress(w32, bits, b))
    # The same values in any dtype / layout give the identical matrix (the quantizer is
    # deterministic).
    variants = {
        "float16": w16,
        "float64": w32.astype(np.float64),
        "fortran": np.asfortranarray(w32),
        "transposed view": np.ascontiguousarray(w32.T).T,
        "strided": np.repeat(w32, 2, axis=1)[:, ::2],
    }
    for name, v in variants.items():
        assert canon(pp.compress(v, bits, b)) == want, name
    bf = (w.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 by truncation
    bf32 = (bf.astype(np.uint32) << 16).view(np.float32)
    want_bf = canon(pp.compress(bf32, bits, b))
    assert canon(pp.compress(bf, bits, b)) == want_bf
    assert canon(pp.compress(np.ascontiguousarray(bf.T).T, bits, b)) == want_bf


# ---------------------------------------------------------------------------------------------
# Fidelity properties


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("b", [64, 128])
def test_importance_reduces_weighted_error(seed, b):
    w, h = _llm_like(60, 512, seed)
    e_plain = werr(w, pp.decompress(pp.compress(w, 3.0, b)), h)
    e_imp = werr(w, pp.decompress(pp.compress(w, 3.0, b, importance=h)), h)
    # Minimising the h-weighted error directly must beat ignoring h on the h-weighted error.
    # With this spread of h (lognormal, sigma 3 on x^2) the gain is typically 30-50 %;
    # asking for 10 % fails if importance were ignored or misapplied (e.g. to rows).
    assert e_imp < 0.9 * e_plain, (e_imp, e_plain)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("b", [32, 64, 256])
@pytest.mark.parametrize("use_importance", [False, True])
def test_analysis_priced_by_hand_encodes_like_compress(seed, b, use_importance):
    # The Analysis object (one budget spread over many matrices) encodes from the per-block
    # records its analysis kept; at compress's price it must give compress's matrix exactly,
    # and a dearer price fewer bits (never more) with no smaller error.
    w, h = _llm_like(37, 300, seed)
    imp = h if use_importance else None
    a = _core.analyze(w, b, importance=imp)
    budget = np.floor(3.6 * w.size)  # (at B = 256 the padded plane 1 alone takes 3.19 bits here)
    lam = a.lambda_for_budget(budget)
    p = a.encode(lam)
    assert p.to_bytes() == pp.compress(w, 3.6, b, importance=imp).to_bytes()
    assert 8 * p.nbytes == a.bits(lam) <= budget
    q = a.encode(lam * 4)
    assert q.nbytes <= p.nbytes
    hh = h if use_importance else np.ones_like(h)
    assert werr(w, pp.decompress(q), hh) >= werr(w, pp.decompress(p), hh) * (1 - 1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("b", [64, 128])
@pytest.mark.parametrize("use_importance", [False, True])
def test_more_bits_never_increase_the_error(seed, b, use_importance):
    w, h = _llm_like(80, 576, seed)
    imp = h if use_importance else None
    errs = []
    for bits in [2.5, 3.0, 3.5, 4.5]:
        p = pp.compress(w, bits, b, importance=imp)
        assert p.bits_per_weight <= bits
        errs.append(werr(w, pp.decompress(p), imp))
    # A bigger budget can take every choice a smaller one took; 1e-9 relative covers nothing
    # but float summation order.
    for lo, hi in zip(errs, errs[1:]):
        assert hi <= lo * (1 + 1e-9), errs
    assert errs[-1] < 0.7 * errs[0], errs  # and 2 more bits per weight must buy a real gain


def _brute_ternary(x: np.ndarray, h: np.ndarray) -> float:
    """min over all 3^K codes t and real s of sum h (x - s t)^2 (weighted least squares s)."""
    kk = len(x)
    t = (np.arange(3**kk)[:, None] // (3 ** np.arange(kk))[None, :]) % 3 - 1.0  # [3^K, K]
    xd, hd = x.astype(np.float64), h.astype(np.float64)
    num = t @ (hd * xd)
    den = (t * t) @ hd
    gain = np.where(den > 0, num * num / np.where(den > 0, den, 1.0), 0.0)
    return float((hd * xd * xd).sum() - gain.max())


@settings(deadline=None, max_examples=60)
@given(
    k=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    mag=st.sampled_from([1e-6, 1e-2, 1.0, 3e4]),
    weighted=st.booleans(),
)
def test_plane1_is_the_optimal_ternary(k, seed, mag, weighted):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(k) * mag).astype(np.float32)
    x = np.clip(x, -F16_MAX, F16_MAX)
    h = np.ones(k, np.float32)
    if weighted:
        h = (rng.random(k) * 3).astype(np.float32)
        h[rng.integers(k)] += 0.5  # never all zero
    w = x[None, :]
    # Budget: the fixed cost plus 16 bits, less than one predator (32 bits) or one plane-2
    # entry: the result is plane 1 alone, one FP16 scale for the (short) block.
    p = pp.compress(w, bits_with_spare(1, k, 32, 16), 32, importance=h if weighted else None)
    assert p.planes == 1 and p.n_outliers == 0
    ours = werr(w, pp.decompress(p), h)
    brute = _brute_ternary(x, h)
    total = float((h.astype(np.float64) * x.astype(np.float64) ** 2).sum())
    # Ours is a ternary code times one scale, so it cannot beat the brute force (up to float
    # summation); it may lose only the rounding of the optimal scale s: to FP16 in the fit
    # (half an ulp, s <= max|x|, 2^-25 absolute for subnormal s), then to the row's 8-bit grid
    # (half a step, row_scales[0] / 512), or clamped to the largest block scale FP16 row
    # scales reach (65504 * 255 / 256): at most sum(h) * (all three)^2.
    half_ulp = max(float(np.abs(x).max()) * 2.0**-11, 2.0**-25)
    half_step = float(p.arrays()["row_scales"][0]) / 512
    over = max(0.0, float(np.abs(x).max()) - F16_MAX * 255 / 256)
    assert ours >= brute - 1e-9 * total
    assert ours <= brute + float(h.sum()) * (half_ulp + half_step + over) ** 2 * 1.01 + 1e-12 * total
    # Any larger budget may only lower the error.
    p2 = pp.compress(w, bits_with_spare(1, k, 32, 16) + 40.0, 32, importance=h if weighted else None)
    assert werr(w, pp.decompress(p2), h) <= ours * (1 + 1e-9) + 1e-30


# ---------------------------------------------------------------------------------------------
# Bad input: the right exception, a message that names the problem, never a crash


W_OK = make_weight(6, 40, 32, "normal", 1.0, 3)
BITS_OK = 16.0


def test_nan_and_inf_in_weight_are_counted_and_located():
    w = W_OK.copy()
    w[1, 2] = np.nan
    w[4, 7] = np.inf
    w[5, 0] = -np.inf
    with pytest.raises(pp.WeightError) as ei:
        pp.compress(w, BITS_OK, 32)
    msg = str(ei.value)
    assert "3 non-finite" in msg and "1 NaN" in msg and "2 Inf" in msg
    assert "row 1" in msg and "col 2" in msg


@pytest.mark.parametrize("what", ["weight", "importance"])
def test_float64_beyond_float32_range_is_named(what, recwarn):
    # A finite float64 past float32's range would become inf in the cast: named, not reported as
    # a non-finite value (and no RuntimeWarning from numpy on the way).
    w, h = W_OK.astype(np.float64), np.ones(W_OK.shape[1])
    if what == "weight":
        w[3, 5] = -1e300
    else:
        h[7] = 1e39
    with pytest.raises(pp.WeightError, match=rf"{what} has finite values beyond float32's range") as ei:
        pp.compress(w, BITS_OK, 32, importance=h)
    assert ("row 3, col 5" if what == "weight" else "index 7") in str(ei.value)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_weight_out_of_fp16_range():
    w = W_OK.astype(np.float64)
    w[2, 3] = 65505.0
    w[3, 1] = -1e6
    with pytest.raises(pp.WeightError, match=r"65504") as ei:
        pp.compress(w, BITS_OK, 32)
    assert "row 2, col 3" in str(ei.value)
    # Exactly the FP16 maximum is fine.
    w2 = W_OK.copy()
    w2[0, 0] = -F16_MAX
    pp.compress(w2, BITS_OK, 32)


@pytest.mark.parametrize(
    "weight, exc, words",
    [
        (np.ones(40, np.float32), pp.ShapeError, ["1 dimension", "expected 2"]),
        (np.ones((2, 3, 40), np.float32), pp.ShapeError, ["3 dimension", "expected 2"]),
        (np.ones((0, 40), np.float32), pp.ShapeError, ["0x40", "at least 1 row"]),
        (np.ones((6, 0), np.float32), pp.ShapeError, ["6x0", "at least 1 row and 1 column"]),
        (np.ones((6, 40), np.int32), pp.DtypeError, ["int32", "float"]),
        (np.ones((6, 40), np.uint8), pp.DtypeError, ["uint8", "float"]),
        (np.ones((6, 40), np.complex64), pp.DtypeError, ["complex64", "float"]),
        (np.ones((6, 40), object), pp.DtypeError, ["object", "float"]),
        (np.ones((6, 40), bool), pp.DtypeError, ["bool", "float"]),
        ("not an array", pp.ShapeError, ["0 dimension"]),
    ],
)
def test_bad_weight_arrays(weight, exc, words):
    with pytest.raises(exc) as ei:
        pp.compress(weight, BITS_OK, 32)
    for word in words:
        assert word in str(ei.value)


@pytest.mark.parametrize("bits", [0.0, -3.0, float("nan"), float("inf"), float("-inf")])
def test_bits_not_a_positive_number(bits):
    with pytest.raises(pp.WeightError, match="bits"):
        pp.compress(W_OK, bits, 32)


@pytest.mark.parametrize("bits", [None, "3", True, [3.0], 3 + 0j])
def test_bits_not_a_number(bits):
    with pytest.raises(pp.WeightError, match=r"bits is .*expected a number of bits per weight"):
        pp.compress(W_OK, bits, 32)


@pytest.mark.parametrize("block_size", [0, 16, 48, 65, 512, -64, 2**70, 64.0, True, "64", None])
def test_block_size_not_allowed(block_size):
    # A ValueError subclass of predprey_rs that lists the allowed sizes.
    with pytest.raises((pp.WeightError, pp.FormatError), match="32, 64, 128, 256") as ei:
        pp.compress(W_OK, BITS_OK, block_size)
    assert str(block_size) in str(ei.value)


@pytest.mark.parametrize(
    "importance, exc, words",
    [
        (np.ones(39, np.float32), pp.ShapeError, ["length 39", "K = 40"]),
        (np.ones(41, np.float32), pp.ShapeError, ["length 41", "K = 40"]),
        (np.ones((40, 1), np.float32), pp.ShapeError, ["2 dimension"]),
        (np.r_[np.ones(5), -1.0, np.ones(34)].astype(np.float32), pp.WeightError, ["importance[5]", ">= 0"]),
        (np.r_[np.ones(9), np.nan, np.ones(30)].astype(np.float32), pp.WeightError, ["importance[9]", "finite"]),
        (np.r_[np.inf, np.ones(39)].astype(np.float32), pp.WeightError, ["importance[0]", "finite"]),
        (np.zeros(40, np.float32), pp.WeightError, ["all zero"]),
        (np.ones(40, np.int64), pp.DtypeError, ["int64"]),
    ],
)
def test_bad_importance(importance, exc, words):
    with pytest.raises(exc) as ei:
        pp.compress(W_OK, BITS_OK, 32, importance=importance)
    for word in words:
        assert word in str(ei.value)


@pytest.fixture(scope="module")
def packed() -> pp.PackedMatrix:
    """A small matrix with both planes and predators in use (so every array is non-empty)."""
    w = make_weight(13, 150, 64, "heavy", 1.0, 11)
    p = pp.compress(w, 6.0, 64)
    assert p.planes == 2 and p.n_outliers > 0
    return p


def test_bad_activations(packed):
    n, k = packed.shape
    cases = [
        (lambda: pp.matvec(packed, np.ones(k - 1, np.float32)), pp.ShapeError, [f"length {k - 1}", f"K = {k}"]),
        (lambda: pp.matvec(packed, np.ones(k + 1, np.float32)), pp.ShapeError, [f"length {k + 1}"]),
        (lambda: pp.matvec(packed, np.ones((1, k), np.float32)), pp.ShapeError, ["2 dimension", "expected 1"]),
        (lambda: pp.matvec(packed, np.ones(k, np.int64)), pp.DtypeError, ["int64"]),
        (lambda: pp.matvec(packed, np.ones(k, np.complex128)), pp.DtypeError, ["complex128"]),
        (lambda: pp.matmul(packed, np.ones((2, k - 1), np.float32)), pp.ShapeError, [f"(2, {k - 1})", f"K = {k}"]),
        (lambda: pp.matmul(packed, np.ones(k, np.float32)), pp.ShapeError, ["1 dimension", "expected 2"]),
        (lambda: pp.matvec(packed, np.ones(k, np.float32), activations="fp8"), ValueError, ["'fp8'", "int8"]),
        (lambda: pp.matmul(packed, np.ones((1, k), np.float32), activations="fp8"), ValueError, ["'fp8'"]),
        (lambda: pp.matvec(np.ones((n, k)), np.ones(k)), TypeError, ["PackedMatrix"]),
        (lambda: pp.decompress(np.ones((n, k))), TypeError, ["PackedMatrix"]),
    ]
    for call, exc, words in cases:
        with pytest.raises(exc) as ei:
            call()
        for word in words:
            assert word in str(ei.value), (str(ei.value), word)


def test_packed_matrix_is_not_constructible_or_mutable(packed):
    with pytest.raises(TypeError):
        _core.PackedMatrix()
    with pytest.raises(AttributeError):
        packed.block_size = 32  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Corrupted files -> FormatError (OSError for a missing file)


def _save(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=meta)


def test_missing_file_is_oserror(tmp_path):
    # OSError with errno and filename, so Python's own subclass (FileNotFoundError, ...).
    with pytest.raises(FileNotFoundError) as ei:
        pp.load(tmp_path / "nope.safetensors")
    assert ei.value.filename == str(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(ei.value)
    with pytest.raises(IsADirectoryError):
        pp.load(tmp_path)


def test_truncated_file_every_length(packed, tmp_path):
    raw = packed.to_bytes()
    for cut in range(len(raw)):
        with pytest.raises(pp.FormatError):
            _core.from_bytes(raw[:cut])
    hlen = struct.unpack("<Q", raw[:8])[0]
    for cut in [0, 3, 8, 8 + hlen // 2, 8 + hlen, 8 + hlen + 1, len(raw) - 1]:
        f = tmp_path / f"cut{cut}.safetensors"
        f.write_bytes(raw[:cut])
        with pytest.raises(pp.FormatError, match=str(f.name)):
            pp.load(f)


@pytest.mark.parametrize("garbage", [b"\x00", b"garbage!", b"\x00" * 4096])
def test_appended_garbage(packed, tmp_path, garbage):
    f = tmp_path / "m.safetensors"
    f.write_bytes(packed.to_bytes() + garbage)
    with pytest.raises(pp.FormatError):
        pp.load(f)


@pytest.mark.parametrize("length", [0, 1, 2**40, 2**64 - 1])
def test_header_length_prefix_corrupted(packed, length):
    raw = packed.to_bytes()
    with pytest.raises(pp.FormatError):
        _core.from_bytes(struct.pack("<Q", length) + raw[8:])


def stable_bytes(p: pp.PackedMatrix) -> bytes:
    """The file bytes with the header's keys sorted, so byte positions mean the same thing on
    every call (written before ``to_bytes`` became deterministic; kept as the weaker check)."""
    header, body = canon(p)
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    raw = struct.pack("<Q", len(hb)) + hb + body
    assert canon(_core.from_bytes(raw)) == canon(p)
    return raw


@settings(deadline=None, max_examples=300)
@given(data=st.data())
def test_any_single_byte_corruption_is_rejected_or_valid(packed, data):
    raw = bytearray(stable_bytes(packed))
    hlen = struct.unpack("<Q", raw[:8])[0]
    where = data.draw(st.sampled_from(["prefix", "header", "body"]))
    lo, hi = {"prefix": (0, 8), "header": (8, 8 + hlen), "body": (8 + hlen, len(raw))}[where]
    pos = data.draw(st.integers(lo, hi - 1))
    new = data.draw(st.integers(0, 255).filter(lambda v: v != raw[pos]))
    raw[pos] = new
    try:
        q = _core.from_bytes(bytes(raw))
    except pp.FormatError:
        return
    # Accepted: then it passed every check of FORMAT.md and behaves like any valid matrix.
    assert q.block_size == packed.block_size
    d = pp.decompress(q)
    np.testing.assert_array_equal(d, ref_decode(q))
    pp.matvec(q, np.ones(q.shape[1], np.float32))
    if where != "body":
        # Without a checksum a header edit can still describe a valid matrix: whitespace, or
        # `cols` moved inside the last block (K = 150 -> 158 with B = 64 keeps every array
        # shape, and padding columns hold code 0). Then it is the same matrix, zero-extended
        # or cut in its padding: equal on the common columns, zero beyond.
        n, k = packed.shape
        k2 = q.shape[1]
        assert q.shape[0] == n and -(-k2 // q.block_size) == -(-k // packed.block_size)
        d0 = pp.decompress(packed)
        c = min(k, k2)
        np.testing.assert_array_equal(d[:, :c], d0[:, :c])
        assert not d[:, c:].any() and not d0[:, c:].any()
    else:
        assert q.shape == packed.shape


def test_header_corruptions(packed):
    raw = packed.to_bytes()
    hlen, header = read_header(raw)
    body = raw[8 + hlen:]

    def with_header(h: dict) -> bytes:
        hb = json.dumps(h).encode()
        hb += b" " * (-len(hb) % 8)
        return struct.pack("<Q", len(hb)) + hb + body

    cases = {}
    h = json.loads(json.dumps(header))
    h["__metadata__"]["format"] = "gguf"
    cases["format"] = (with_header(h), "format")
    h = json.loads(json.dumps(header))
    h["__metadata__"]["rows"] = str(packed.shape[0] + 1)
    cases["rows"] = (with_header(h), "")
    h = json.loads(json.dumps(header))
    h["__metadata__"]["block_size"] = "48"
    cases["block_size"] = (with_header(h), "block_size")
    h = json.loads(json.dumps(header))
    h["__metadata__"]["cols"] = "-3"
    cases["negative cols"] = (with_header(h), "cols")
    h = json.loads(json.dumps(header))
    del h["__metadata__"]
    cases["no metadata"] = (with_header(h), "")
    h = json.loads(json.dumps(header))
    h["scales"]["shape"] = list(reversed(h["scales"]["shape"]))
    cases["scales shape"] = (with_header(h), "scales")
    cases["not json"] = (raw[:8] + b"x" + raw[9:], "")
    cases["not utf-8"] = (raw[:8] + b"\xff" + raw[9:], "")
    for name, (bad, word) in cases.items():
        with pytest.raises(pp.FormatError, match=word or None):
            _core.from_bytes(bad)


@pytest.mark.parametrize("version", ["1", "3", "0", "2.0", "", "one"])
def test_format_version_other_than_2(packed, tmp_path, version):
    meta = dict(packed.metadata(), format_version=version)
    f = tmp_path / "v.safetensors"
    _save(f, packed.arrays(), meta)
    with pytest.raises(pp.FormatError, match="format_version|version") as ei:
        pp.load(f)
    assert f.name in str(ei.value)
    with pytest.raises(pp.FormatError):
        pp.from_arrays(meta, packed.arrays())


@pytest.mark.parametrize("name", list(_core.TENSOR_NAMES))
def test_missing_tensor(packed, tmp_path, name):
    arrays = packed.arrays()
    del arrays[name]
    f = tmp_path / "m.safetensors"
    _save(f, arrays, packed.metadata())
    with pytest.raises(pp.FormatError, match=name):
        pp.load(f)
    with pytest.raises(pp.FormatError, match=name):
        pp.from_arrays(packed.metadata(), arrays)


def test_extra_tensor(packed, tmp_path):
    arrays = dict(packed.arrays(), bias=np.zeros(3, np.float16))
    f = tmp_path / "m.safetensors"
    _save(f, arrays, packed.metadata())
    with pytest.raises(pp.FormatError, match="bias"):
        pp.load(f)
    # The same for from_arrays, whatever the stray array's dtype (a misspelt name is not ignored).
    for dtype in (np.float16, np.uint8):
        with pytest.raises(pp.FormatError, match="unexpected array `bias`"):
            pp.from_arrays(packed.metadata(), dict(packed.arrays(), bias=np.zeros(3, dtype)))


def test_from_arrays_metadata_as_integers_or_strings(packed):
    meta = dict(packed.metadata())
    ints = {k: (int(v) if v.isdigit() else v) for k, v in meta.items()}
    q = pp.from_arrays(ints, packed.arrays())
    assert q.to_bytes() == packed.to_bytes()
    for key, bad in [("rows", 13.0), ("cols", None), ("block_size", True), ("format_version", [2])]:
        with pytest.raises(pp.FormatError, match=rf"metadata `{key}` is .*expected a string or an integer"):
            pp.from_arrays(dict(meta, **{key: bad}), packed.arrays())
    with pytest.raises(pp.FormatError, match="non-negative integer"):
        pp.from_arrays(dict(ints, rows=-13), packed.arrays())
    with pytest.raises(TypeError, match="metadata as a dict"):
        pp.from_arrays(5, packed.arrays())
    with pytest.raises(TypeError, match="arrays as a dict"):
        pp.from_arrays(meta, list(packed.arrays().items()))


@pytest.mark.parametrize(
    "name, dtype",
    [("codes", np.int8), ("codes", np.uint16), ("scales", np.float16), ("scales", np.int8),
     ("row_scales", np.float32), ("row_scales", np.uint16), ("p2_scales", np.float16),
     ("p2_ptr", np.int32), ("p2_ptr", np.uint64), ("out_cols", np.uint32), ("out_vals", np.float32),
     ("p2_block", np.uint8), ("out_ptr", np.float32)],
)
def test_tensor_with_another_dtype(packed, tmp_path, name, dtype):
    arrays = packed.arrays()
    arrays[name] = arrays[name].astype(dtype)
    f = tmp_path / "m.safetensors"
    _save(f, arrays, packed.metadata())
    with pytest.raises(pp.FormatError, match=name):
        pp.load(f)
    # from_arrays: a dtype the format never uses is a DtypeError; a format dtype in the wrong
    # place is a FormatError.
    with pytest.raises((pp.FormatError, pp.DtypeError), match=name):
        pp.from_arrays(packed.metadata(), arrays)


def _corrupt(packed: pp.PackedMatrix, fn) -> tuple[dict, dict]:
    arrays = {k: v.copy() for k, v in packed.arrays().items()}
    fn(arrays)
    return packed.metadata(), arrays


def _set(name, index, value):
    def f(a):
        a[name][index] = value
    return f


def _corruptions(packed: pp.PackedMatrix) -> dict:
    n, k = packed.shape
    b = packed.block_size
    g, nb, kp = dims(n, k, b)
    a = packed.arrays()
    assert n % 5 != 0 and k % b != 0  # the fixture has padding rows and padding columns
    counts = np.diff(a["out_ptr"].astype(np.int64))
    r = int(np.flatnonzero(counts)[0])  # first row with a predator
    j = int(a["out_ptr"][r])
    col = int(a["out_cols"][j])
    r2 = int(np.flatnonzero(counts >= 2)[0])  # first row with two predators
    j2 = int(a["out_ptr"][r2])

    def code_at_predator(arr):
        # The predator's row has digit 1 (t = 0) there; make it 2 (t = +1).
        arr["codes"][r // 5, col] += 3 ** (r % 5)

    def repeat_column(arr):
        arr["out_cols"][j2 + 1] = arr["out_cols"][j2]

    def p2_ptr_decreasing(arr):
        arr["p2_ptr"][1] = arr["p2_ptr"][2] + 1

    return {
        "code byte 250": ("codes", _set("codes", (0, 0), 250)),
        "code byte 243": ("codes", _set("codes", (g - 1, 1), 243)),
        "p2 code byte 255": ("p2_codes", _set("p2_codes", (0, 0), 255)),
        "padding column code": ("codes", _set("codes", (0, kp - 1), 121 + 1)),  # row 0: t = +1
        "padding row code": ("codes", _set("codes", (g - 1, 0), 121 + 81)),  # row 5G-1 >= N
        "out_cols = K": ("out_cols", _set("out_cols", j, k)),
        "out_cols not increasing": ("out_cols", repeat_column),
        "out_ptr[0] != 0": ("out_ptr", _set("out_ptr", 0, 1)),
        "out_ptr end": ("out_ptr", _set("out_ptr", -1, len(a["out_vals"]) + 1)),
        "p2_ptr decreasing": ("p2_ptr", p2_ptr_decreasing),
        "p2_block >= nb": ("p2_block", _set("p2_block", 0, nb)),
        "row scale inf": ("row_scales", _set("row_scales", 0, np.inf)),
        "row scale nan": ("row_scales", _set("row_scales", n - 1, np.nan)),
        "predator inf": ("out_vals", _set("out_vals", 0, -np.inf)),
        "code at a predator": ("predator", code_at_predator),
    }


def test_array_corruptions_are_rejected_by_name(packed, tmp_path):
    failures = []
    for label, (name, fn) in _corruptions(packed).items():
        meta, arrays = _corrupt(packed, fn)
        f = tmp_path / f"{label.replace(' ', '_')}.safetensors"
        _save(f, arrays, meta)
        for how, call in [("load", lambda: pp.load(f)), ("from_arrays", lambda: pp.from_arrays(meta, arrays))]:
            try:
                call()
            except pp.FormatError as e:
                if name not in str(e):
                    failures.append(f"{label} via {how}: message does not name `{name}`: {e}")
            else:
                failures.append(f"{label} via {how}: accepted")
    assert failures == []


# ---------------------------------------------------------------------------------------------
# Saving: atomic, nothing left behind on failure


def test_save_into_missing_directory(packed, tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        packed.save(tmp_path / "no" / "such" / "dir" / "m.safetensors")
    assert "m.safetensors" in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_save_onto_a_directory_leaves_no_temp_file(packed, tmp_path):
    target = tmp_path / "m.safetensors"
    target.mkdir()
    with pytest.raises(OSError):
        packed.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"] and target.is_dir()


def test_save_overwrites_atomically(packed, tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"old contents")
    packed.save(f)
    assert canon(f.read_bytes()) == canon(packed)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_failed_write_leaves_old_file_and_no_partial_file(tmp_path):
    # A write that fails half way (file size limit, EFBIG) in a child process: the old file
    # must be untouched and no temporary file may remain.
    script = textwrap.dedent(
        """
        import resource, signal, sys
        import numpy as np, predprey_rs as pp
        from pathlib import Path
        d = Path(sys.argv[1])
        w = np.random.default_rng(0).standard_normal((200, 256)).astype(np.float32)
        p = pp.compress(w, 3.0, 64)
        (d / "m.safetensors").write_bytes(b"old contents")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            p.save(d / "m.safetensors")
        except OSError as e:
            print("OSError", e)
        else:
            print("saved")
        """
    )
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OSError"), r.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert (tmp_path / "m.safetensors").read_bytes() == b"old contents"


def test_concurrent_saves_to_one_path_never_corrupt(tmp_path):
    # Two threads saving different matrices to the same path: each save either succeeds or
    # raises OSError, and the file is always one of the two matrices, whole.
    a = pp.compress(make_weight(50, 256, 64, "normal", 1.0, 1), 3.0, 64)
    b = pp.compress(make_weight(50, 256, 64, "heavy", 1.0, 2), 3.5, 64)
    f = tmp_path / "m.safetensors"
    errors: list[str] = []

    def worker(p):
        for _ in range(30):
            try:
                p.save(f)
            except OSError as e:
                errors.append(str(e))

    for _ in range(3):
        ts = [threading.Thread(target=worker, args=(p,)) for p in (a, b)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert canon(f.read_bytes()) in (canon(a), canon(b))
    assert errors == [], errors[:3]
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ---------------------------------------------------------------------------------------------
# Threads and the GIL


def test_threads_get_the_single_threaded_results():
    rng = np.random.default_rng(5)
    ws = [make_weight(int(rng.integers(1, 60)), int(rng.choice(AWKWARD_K)), b, "heavy", 1.0, i)
          for i, b in enumerate([32, 64, 128, 256] * 2)]
    # and two products split into tasks (>= 2^17 code bytes): two threads calling at once
    # means one runs on the kernels' team and the other, finding it busy, on the pool
    ws += [make_weight(600, 1100, 64, "heavy", 1.0, 20), make_weight(700, 1000, 64, "heavy", 1.0, 21)]
    jobs = []
    for i, w in enumerate(ws):
        n, k = w.shape
        b = BLOCK_SIZES[i % 4]
        bits = max(3.0, bits_with_spare(n, k, b, 0))
        p = pp.compress(w, bits, b)
        x = rng.standard_normal(k).astype(np.float32)
        xs = rng.standard_normal((4, k)).astype(np.float32)
        jobs.append((w, bits, b, p, x, xs, canon(p), pp.matvec(p, x), pp.matvec(p, x, "int8"), pp.matmul(p, xs)))

    def run(order):
        bad = []
        for _ in range(5):
            for j in order:
                w, bits, b, p, x, xs, want_bytes, want_y, want_y8, want_ys = jobs[j]
                if canon(pp.compress(w, bits, b)) != want_bytes:
                    bad.append(("compress", j))
                if not np.array_equal(pp.matvec(p, x), want_y):
                    bad.append(("matvec", j))
                if not np.array_equal(pp.matvec(p, x, "int8"), want_y8):
                    bad.append(("matvec int8", j))
                if not np.array_equal(pp.matmul(p, xs), want_ys):
                    bad.append(("matmul", j))
        return bad

    order = list(range(len(jobs)))
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(run, [order, order[::-1]]))
    assert results == [[], []]


def test_compress_releases_the_gil():
    w = make_weight(1536, 1536, 64, "heavy", 1.0, 0)
    window: dict[str, float] = {}

    def work():
        window["start"] = time.perf_counter()
        pp.compress(w, 3.0, 64)
        window["end"] = time.perf_counter()

    t = threading.Thread(target=work)
    stamps: list[float] = []
    n = 0
    t.start()
    while t.is_alive():
        n += 1
        if n % 256 == 0:
            stamps.append(time.perf_counter())
    t.join()
    start, end = window["start"], window["end"]
    span = end - start
    assert span > 0.02, "compress too quick to tell; make the matrix bigger"
    # If compress held the GIL this thread could not run Python at all between start and end.
    # Progress in the middle half of the call shows the GIL was free there.
    mid = [s for s in stamps if start + 0.25 * span < s < end - 0.25 * span]
    assert len(mid) >= 10, (len(mid), len(stamps), span)


def test_set_and_get_num_threads():
    before = pp.get_num_threads()
    try:
        pp.set_num_threads(1)
        assert pp.get_num_threads() == 1
        w = make_weight(40, 300, 64, "normal", 1.0, 0)
        one = canon(pp.compress(w, 3.0, 64))
        pp.set_num_threads(2)
        assert pp.get_num_threads() == 2
        assert canon(pp.compress(w, 3.0, 64)) == one  # the result does not depend on threads
        # Products big enough to be split into tasks (>= 2^17 code bytes): one thread runs them
        # all on the caller, two on the caller and a helper (`cpu/team.rs`); every row is
        # computed the same way either way.
        p = pp.compress(make_weight(600, 1100, 64, "heavy", 1.0, 1), 3.0, 64)
        x = np.random.default_rng(3).standard_normal((3, 1100)).astype(np.float32)
        got = {}
        for n in (1, 2):
            pp.set_num_threads(n)
            got[n] = [pp.matvec(p, x[0]), pp.matvec(p, x[0], activations="int8"), pp.matmul(p, x), pp.matmul(p, x, activations="int8")]
        for a, b in zip(got[1], got[2]):
            np.testing.assert_array_equal(a, b)
        pp.set_num_threads(0)
        assert pp.get_num_threads() >= 1
    finally:
        pp.set_num_threads(before)
    assert isinstance(_core.cpu_kernel(), str) and _core.cpu_kernel()


def test_cpu_kernel_can_be_forced_to_a_slower_one():
    """PREDPREY_CPU_KERNEL picks a kernel this CPU runs (here: the scalar reference, which every
    CPU runs) and it computes the same products; a name it cannot run warns and is ignored."""
    script = (
        "import warnings, numpy as np, predprey_rs as pp\n"
        "from predprey_rs import _core\n"
        "w = np.random.default_rng(0).standard_normal((37, 300)).astype(np.float32)\n"
        "x = np.random.default_rng(1).standard_normal(300).astype(np.float32)\n"
        "p = pp.compress(w, 3.0)\n"
        "import json; print(_core.cpu_kernel()); print(json.dumps([pp.matvec(p, x).tolist(), pp.matvec(p, x, activations='int8').tolist()]))\n"
    )
    ys = {}
    for want in ("scalar", ""):
        env = dict(os.environ, PREDPREY_CPU_KERNEL=want)
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        name, data = r.stdout.decode().splitlines()
        if want:
            assert name == want
        ys[want] = np.array(json.loads(data))
    np.testing.assert_allclose(ys["scalar"][0], ys[""][0], rtol=1e-4, atol=1e-4 * np.abs(ys[""][0]).max())
    np.testing.assert_allclose(ys["scalar"][1], ys[""][1], rtol=1e-4, atol=1e-4 * np.abs(ys[""][1]).max())
    env = dict(os.environ, PREDPREY_CPU_KERNEL="no-such-kernel")
    r = subprocess.run([sys.executable, "-c", "import predprey_rs"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "PREDPREY_CPU_KERNEL='no-such-kernel'" in r.stderr, r.stderr


@FEW
@given(n=st.integers(1, 23), k=st.sampled_from(AWKWARD_K), b=st.sampled_from(BLOCK_SIZES), seed=st.integers(0, 2**32 - 1))
def test_parts_round_trip_keeps_the_row_scales(n, k, b, seed):
    """to_parts / from_parts give back the same matrix, array for array: the dense spelling
    carries the FP16 row scales, and from_parts keeps a row's scale when its scales fit."""
    from predprey_rs import _synth

    p = _synth.random_packed(np.random.default_rng(seed), n, k, block_size=b, plane2=0.5, predators=0.05)
    parts = _core.to_parts(p)
    q = _core.from_parts(b, parts["t1"], parts["s1"], parts["p2"], parts["t2"], parts["s2"], parts["pred"],
                         parts["row_scales"])
    for name, a in p.arrays().items():
        np.testing.assert_array_equal(q.arrays()[name], a, err_msg=name)
    # Without the row scales a fresh grid is chosen: the same weights up to half a step.
    r = _core.from_parts(b, parts["t1"], parts["s1"], parts["p2"], parts["t2"], parts["s2"], parts["pred"])
    half_step = p.arrays()["row_scales"].astype(np.float64)[:, None] / 512 * 1.01 + 1e-30
    assert (np.abs(pp.decompress(r).astype(np.float64) - pp.decompress(p)) <= half_step * 2 + 1e-6 * np.abs(pp.decompress(p))).all()
