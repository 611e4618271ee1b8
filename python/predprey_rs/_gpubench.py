"""Measuring the GPU kernels: timestamp-query timers, the dense FP16 GEMV and copy baselines
(shaders/dense_gemv.wgsl, shaders/copy.wgsl), and the conformance suite of `predprey gpu-check`.

Used by bench/gpu_matvec.py and cli.py; not public API.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

from . import gpu as _gpu
from . import _synth

_DENSE_KINDS = ("uniform", "read-only-storage", "storage", "read-only-storage")
_COPY_KINDS = ("uniform", "read-only-storage", "storage")


# ---- timing


def time_dispatches(ctx, record: Callable[[Any], None], reps: int, trials: int = 5,
                    warmup: int = 1, warmup_s: float = 0.0) -> tuple[list[float], str]:
    """Seconds per call of `record(compute_pass)`: each trial is one submit with `reps` calls
    inside one compute pass, timed by timestamp queries at the pass's ends (wall clock around
    submit-to-completion where the adapter has none). Untimed submits first: at least `warmup`,
    and for at least `warmup_s` seconds (on an H100 the first timed block after the host spent
    seconds making and uploading matrices came out up to 5x slow; bench/gpu_matvec.py).
    Returns (per-call seconds of each trial, "timestamp" or "wall")."""
    wgpu = _gpu._wgpu()
    dev = ctx.device
    qs = resolve = readback = None
    if ctx.timestamps:
        qs = dev.create_query_set(type=wgpu.QueryType.timestamp, count=2)
        resolve = dev.create_buffer(size=16, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
        readback = dev.create_buffer(size=16, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
    else:
        readback = dev.create_buffer(size=16, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        dummy = dev.create_buffer(size=16, usage=wgpu.BufferUsage.COPY_SRC)
    source = "timestamp" if qs is not None else "wall"

    def submit() -> float:
        """One submit of `reps` calls; its seconds."""
        nonlocal source
        enc = dev.create_command_encoder()
        if qs is not None:
            cpass = enc.begin_compute_pass(timestamp_writes={
                "query_set": qs, "beginning_of_pass_write_index": 0, "end_of_pass_write_index": 1})
        else:
            cpass = enc.begin_compute_pass()
        for _ in range(reps):
            record(cpass)
        cpass.end()
        if qs is not None:
            enc.resolve_query_set(qs, 0, 2, resolve, 0)
            enc.copy_buffer_to_buffer(resolve, 0, readback, 0, 16)
        else:
            enc.copy_buffer_to_buffer(dummy, 0, readback, 0, 16)
        t0 = time.perf_counter()
        dev.queue.submit([enc.finish()])
        raw = ctx.map_read(readback, 16)  # waits for the submit to finish
        wall = time.perf_counter() - t0
        if qs is None:
            return wall
        a, b = np.frombuffer(raw, dtype=np.uint64)[:2]
        ts = (int(b) - int(a)) * 1e-9  # WebGPU timestamps are nanoseconds
        # a timestamp span longer than the wall clock, or 0, is not a reading: use the wall
        if 0 < ts <= wall * 1.05:
            return ts
        source = "wall"
        return wall

    warm_until = time.perf_counter() + warmup_s
    for _ in range(warmup):
        submit()
    while time.perf_counter() < warm_until:
        submit()
    out = [submit() / reps for _ in range(trials)]
    return out, source


def pick_reps(ctx, record, target_s: float = 0.02, cap: int = 200) -> int:
    """Calls per submit so that one submit takes about `target_s` (at least 1)."""
    one, _ = time_dispatches(ctx, record, 1, trials=1, warmup=1)
    return max(1, min(cap, int(target_s / max(one[0], 1e-7))))


def summarize(xs: list[float]) -> dict:
    med = statistics.median(xs)
    return {"median_s": med, "min_s": min(xs), "max_s": max(xs),
            "spread_pct": 100.0 * (max(xs) - min(xs)) / med if med > 0 else 0.0}


# ---- baselines


class DenseF16:
    """Our own dense FP16 GEMV (shaders/dense_gemv.wgsl) over W [N, K] (K a multiple of 8)."""

    def __init__(self, ctx, w16: np.ndarray):
        wgpu = _gpu._wgpu()
        w16 = np.ascontiguousarray(w16, dtype=np.float16)
        n, k = w16.shape
        if k % 8:
            raise ValueError(f"dense baseline needs K % 8 == 0, got K = {k}")
        self.ctx, self.shape, self.nbytes = ctx, (n, k), w16.nbytes
        rows_per = max(1, ctx.max_binding // (k * 2))
        self._grid_x = ctx.max_wg_per_dim
        self._chunks = []
        for r0 in range(0, n, rows_per):
            part = w16[r0:r0 + rows_per]
            params = np.array([part.shape[0], k // 8, k // 4, n, self._grid_x, r0, 0, 0], dtype="<u4")
            self._chunks.append([part.shape[0], ctx.buffer(part, wgpu.BufferUsage.STORAGE),
                                 ctx.buffer(params, wgpu.BufferUsage.UNIFORM), None])
        self._cap = 0

    def _config(self, batch: int) -> tuple[int, int, int, int]:
        nb = min(batch, 8)
        slices = -(-batch // nb)
        rpw = 2 if nb <= 4 else 1
        k8 = self.shape[1] // 8
        wg = 32 if k8 <= 64 else 64 if k8 <= 512 else 128 if k8 <= 2048 else 256
        return nb, slices, rpw, wg

    def prepare(self, batch: int):
        wgpu = _gpu._wgpu()
        nb, slices, rpw, wg = self._config(batch)
        rows = slices * nb
        if rows > self._cap:
            n, k = self.shape
            dev = self.ctx.device
            self._x = dev.create_buffer(size=rows * k * 4, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST)
            self._y = dev.create_buffer(size=rows * n * 4, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC)
            self._staging = dev.create_buffer(size=rows * n * 4, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
            bgl, _ = self.ctx.layout(_DENSE_KINDS)
            for c in self._chunks:
                res = [c[2], self._x, self._y, c[1]]
                c[3] = dev.create_bind_group(layout=bgl, entries=[
                    {"binding": i, "resource": {"buffer": r, "offset": 0, "size": r.size}} for i, r in enumerate(res)])
            self._cap = rows
        const = {"WG": wg, "NB": nb, "RPW": rpw}
        if self.ctx.subgroups:
            const["SG_SLOTS"] = max(1, wg // 4)
        pipe = self.ctx.pipeline("dense_gemv.wgsl", _DENSE_KINDS, const)
        return pipe, slices, rpw

    def write_x(self, xs: np.ndarray) -> None:
        self.ctx.device.queue.write_buffer(self._x, 0, np.ascontiguousarray(xs, dtype=np.float32))

    def dispatch(self, cpass, batch: int, prepared=None) -> None:
        pipe, slices, rpw = prepared or self.prepare(batch)
        cpass.set_pipeline(pipe)
        for rows, _, _, bg in self._chunks:
            n_wg = -(-rows // rpw)
            gx = min(n_wg, self._grid_x)
            cpass.set_bind_group(0, bg)
            cpass.dispatch_workgroups(gx, -(-n_wg // gx), slices)

    def matmul(self, xs: np.ndarray) -> np.ndarray:
        b = xs.shape[0]
        prepared = self.prepare(b)
        self.write_x(xs)
        enc = self.ctx.device.create_command_encoder()
        cpass = enc.begin_compute_pass()
        self.dispatch(cpass, b, prepared)
        cpass.end()
        size = b * self.shape[0] * 4
        enc.copy_buffer_to_buffer(self._y, 0, self._staging, 0, size)
        self.ctx.device.queue.submit([enc.finish()])
        return np.frombuffer(self.ctx.map_read(self._staging, size), dtype=np.float32).reshape(b, -1).copy()


class Copy:
    """dst = src over `nbytes` (shaders/copy.wgsl); moves 2 * nbytes per call."""

    def __init__(self, ctx, nbytes: int, wg: int = 256):
        wgpu = _gpu._wgpu()
        nbytes = min(int(nbytes), ctx.max_binding) // 16 * 16
        self.ctx, self.nbytes = ctx, nbytes
        dev = ctx.device
        self._src = dev.create_buffer(size=nbytes, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST)
        self._dst = dev.create_buffer(size=nbytes, usage=wgpu.BufferUsage.STORAGE)
        n4 = nbytes // 16
        per_thread = 4
        n_wg = max(1, -(-n4 // (wg * per_thread)))
        gx = min(n_wg, ctx.max_wg_per_dim)
        gy = -(-n_wg // gx)
        self._grid = (gx, gy, 1)
        params = np.array([n4, gx, gx * gy * wg, 0], dtype="<u4")
        self._params = ctx.buffer(params, wgpu.BufferUsage.UNIFORM)
        bgl, _ = ctx.layout(_COPY_KINDS)
        res = [self._params, self._src, self._dst]
        self._bg = dev.create_bind_group(layout=bgl, entries=[
            {"binding": i, "resource": {"buffer": r, "offset": 0, "size": r.size}} for i, r in enumerate(res)])
        self._pipe = ctx.pipeline("copy.wgsl", _COPY_KINDS, {"WG": wg}, reduce=False)

    def dispatch(self, cpass) -> None:
        cpass.set_pipeline(self._pipe)
        cpass.set_bind_group(0, self._bg)
        cpass.dispatch_workgroups(*self._grid)


def copy_bandwidth(ctx, nbytes: int, trials: int = 5) -> dict:
    """Achievable bandwidth: bytes read + written per second by the copy kernel."""
    c = Copy(ctx, nbytes)
    reps = pick_reps(ctx, c.dispatch)
    times, src = time_dispatches(ctx, c.dispatch, reps, trials)
    s = summarize(times)
    s.update(gbps=2 * c.nbytes / s["median_s"] / 1e9, bytes=2 * c.nbytes, timer=src)
    return s


# ---- conformance (gpu-check)

# The awkward shapes, with the big ones shrunk on CPU adapters only when asked to.
CONFORMANCE_SHAPES = [
    ((1, 64), 32, (0, 8)),
    ((3, 100), 64, (0, 3)),
    ((17, 63), 128, (0, 5)),
    ((257, 1000), 256, (0, 8)),
    ((4096, 4096), 64, (0, 4)),
    ((70000, 64), 32, (0,)),
    ((1024, 14336), 128, (0, 2)),
]


# int8 activations: the GPU against the CPU's int8 path on the same x (tests/test_gpu.py TOL_INT8)
INT8_TOL = 1e-5


def rel_err_terms(y: np.ndarray, ref: np.ndarray, wabs: np.ndarray, x: np.ndarray) -> float:
    """max over batch rows b and outputs r of |y - ref| / sum_k |W_rk x_bk|: an error relative
    to the size of the terms summed, which float32 rounding scales with (an output that cancels
    to nearly 0 does not inflate it). `wabs` = |W| [N, K], `x` [B, K], `y`, `ref` [B, N]."""
    mag = np.abs(x).astype(np.float64) @ wabs.T.astype(np.float64)
    diff = np.abs(y.astype(np.float64) - ref.astype(np.float64))
    return float((diff / np.maximum(mag, 1e-30)).max()) if diff.size else 0.0


def conformance(ctx, rng: np.random.Generator, quick: bool = False, log=None) -> dict:
    """GPU vs the CPU oracle (decompress + float64) on the awkward shapes, planes 1 and 2, with
    predators; and activations="int8" against the CPU's int8 path. Returns {"max_rel_err",
    "max_rel_err_int8", "cases", "failures"}."""
    import predprey_rs as pp

    worst, worst8, cases, failures = 0.0, 0.0, 0, []
    for shape, block, batches in CONFORMANCE_SHAPES:
        if quick and shape[0] * shape[1] > 5_000_000:
            continue
        for plane2, pred in ((0.0, 0.0), (0.5, 0.02)):
            p = _synth.random_packed(rng, *shape, block_size=block, plane2=plane2, predators=pred)
            g = _gpu.upload(p, _ctx=ctx)
            w = pp.decompress(p).astype(np.float64)
            for b in batches:
                x = rng.standard_normal((max(b, 1), shape[1])).astype(np.float32)
                y = g.matvec(x[0])[None, :] if b == 0 else g.matmul(x)
                ref = x.astype(np.float64) @ w.T
                err = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))
                worst = max(worst, err)
                cases += 1
                if not err <= 1e-4:
                    failures.append(f"{shape[0]}x{shape[1]} B={block} plane2={plane2} pred={pred} batch={b}: {err:.3g}")
                y8 = g.matvec(x[0], "int8")[None, :] if b == 0 else g.matmul(x, "int8")
                ref8 = pp.matvec(p, x[0], "int8")[None, :] if b == 0 else pp.matmul(p, x, "int8")
                err8 = rel_err_terms(y8, ref8, np.abs(w), x)
                worst8 = max(worst8, err8)
                cases += 1
                if not err8 <= INT8_TOL:
                    failures.append(f"{shape[0]}x{shape[1]} B={block} plane2={plane2} pred={pred} batch={b} int8: {err8:.3g}")
            if log:
                log(f"  {shape[0]}x{shape[1]} B={block} planes={p.planes} predators={p.n_outliers}: max rel. err "
                    f"{worst:.2e}, int8 vs the CPU {worst8:.2e}")
            del g, w
    return {"max_rel_err": worst, "max_rel_err_int8": worst8, "cases": cases, "failures": failures}


def kernel_bandwidth(ctx, rng: np.random.Generator, shape=(4096, 4096), block: int = 64,
                     copies: int = 2, trials: int = 5, int8: bool = False) -> dict:
    """Packed bytes per second of our kernel at batch 1 (float32 or int8 activations), rotating
    over `copies` matrices."""
    mats = [_gpu.upload(_synth.random_packed(rng, *shape, block_size=block, plane2=0.45, predators=0.005), _ctx=ctx)
            for _ in range(copies)]
    x = rng.standard_normal(shape[1]).astype(np.float32)
    preps = []
    for m in mats:
        preps.append(m._prepare(1, int8))
        m._write_x(x[None, :], preps[-1])

    def record(cpass):
        for m, pr in zip(mats, preps):
            m._dispatch(cpass, pr)

    reps = pick_reps(ctx, record)
    times, src = time_dispatches(ctx, record, reps, trials)
    s = summarize([t / len(mats) for t in times])
    s.update(gbps=mats[0].nbytes / s["median_s"] / 1e9, bytes=mats[0].nbytes, timer=src)
    return s
