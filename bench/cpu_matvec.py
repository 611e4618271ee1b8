"""CPU mat-vec benchmark: ours (float32 and int8 activations) vs numpy float32 ``W @ x``, same
process, same shapes, same data.

Weights are heavy-tailed (Student-t, 5 degrees of freedom) and compressed with
``pp.compress(W, bits=3.0)``. Hot: the same matrix again and again. Cold: rotating over distinct
matrices whose packed (ours) / float32 (numpy) sizes add up to more than 3x the last-level cache.
Threads: 1 and all (``pp.set_num_threads``; numpy's BLAS threads set the same way via
threadpoolctl when present, else through numpy's bundled OpenBLAS with ctypes; the table says
what numpy ran with). Median of many runs after warm-up, with the spread (IQR / median); the
three contenders are timed round-robin in blocks of 10 calls, each block after 0.2 s of untimed
calls of the same contender, so that load from other processes falls on all of them alike and
no contender pays for the previous one (numpy's spinning BLAS threads).
Cold copies of a packed matrix are made with ``from_arrays`` (distinct memory, same values), so
the cold rows do not need several slow compressions. The int8 column's relative error against
float64 ``decompress(p) @ x`` is printed too, and the compression speed (median of 3 calls of
``pp.compress`` on the first matrix, all threads; the first call is printed too).
Effective GB/s = bytes of the weights read (packed bytes for ours, 4 N K for numpy) / time.

    python bench/cpu_matvec.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import predprey_rs as pp

LLC = 32 << 20  # bytes; overridden by /sys when readable


def llc_bytes() -> int:
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(f"{base}/{d}/size") as f:
                    s = f.read().strip()
                v = int(s[:-1]) * (1 << 10 if s.endswith("K") else 1 << 20 if s.endswith("M") else 1)
                best = max(best, v)
            except (OSError, ValueError):
                pass
    except OSError:
        pass
    return best or LLC


WARM_S = 0.2  # untimed calls before every block: see timeit_interleaved


def timeit_interleaved(fns: dict, n: int, block: int = 10) -> dict:
    """Times every function n times, round-robin in blocks of `block` calls, so that load from
    other processes on the machine hits all of them alike; returns {name: (median s, IQR /
    median)}. Every block starts with WARM_S seconds of untimed calls of the same function:
    after numpy's block its BLAS threads keep spinning for ~0.1 s and take the second core from
    our workers, and after any pause the VM's idle cores come back slowly (measured on the
    2-core VM: ours int8 at 2 threads 1.1 ms alone, ~3 ms for the first 0.1 s after one numpy
    call, ~1.6 ms after a 2 s pause; a few untimed calls per block were not enough)."""
    for fn in fns.values():
        for _ in range(3):
            fn(0)
    ts = {name: [] for name in fns}
    i = 0
    while i < n:
        for name, fn in fns.items():
            t_end = time.perf_counter() + WARM_S
            while time.perf_counter() < t_end:
                fn(i)
            for j in range(i, min(n, i + block)):
                t0 = time.perf_counter()
                fn(j)
                ts[name].append(time.perf_counter() - t0)
        i += block
    out = {}
    for name, t in ts.items():
        q1, med, q3 = np.percentile(np.array(t), [25, 50, 75])
        out[name] = (float(med), float((q3 - q1) / med))
    return out


class _OpenBlas:
    """numpy's bundled OpenBLAS thread count through ctypes (when threadpoolctl is absent)."""

    def __init__(self) -> None:
        import ctypes
        import glob

        self.set = self.get = None
        libdir = os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs")
        for path in glob.glob(os.path.join(libdir, "*openblas*")):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for pre in ("scipy_openblas", "openblas"):
                for suf in ("64_", ""):
                    if hasattr(lib, f"{pre}_set_num_threads{suf}") and hasattr(lib, f"{pre}_get_num_threads{suf}"):
                        self.set = getattr(lib, f"{pre}_set_num_threads{suf}")
                        self.get = getattr(lib, f"{pre}_get_num_threads{suf}")
                        return


_OPENBLAS = _OpenBlas()


def numpy_threads() -> str:
    """How many threads numpy's BLAS uses now (as far as we can tell)."""
    try:
        from threadpoolctl import threadpool_info

        return ",".join(str(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas") or "?"
    except ImportError:
        return str(_OPENBLAS.get()) if _OPENBLAS.get else "?"


def blas_threads(n: int | None):
    """Context manager: numpy's BLAS limited to n threads (None = all cores)."""
    import contextlib

    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=n)
    except ImportError:
        pass
    if _OPENBLAS.set is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def limit():
        old = _OPENBLAS.get()
        _OPENBLAS.set(n or (os.cpu_count() or 1))
        try:
            yield
        finally:
            _OPENBLAS.set(old)

    return limit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs, hot cache only for the big shapes")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON on the last line")
    ap.add_argument("--bits", type=float, default=3.0)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    llc = llc_bytes()
    ncpu = os.cpu_count() or 1
    print(f"CPU kernel: {pp._core.cpu_kernel()}; {ncpu} cores; last-level cache {llc >> 20} MiB; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')} OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '-')}")
    rows = []
    shapes = [(4096, 14336), (14336, 4096), (576, 1536)]
    for n, k in shapes:
        w0 = rng.standard_t(5, size=(n, k)).astype(np.float32)
        # compress: the first call (fresh pages for every array) and two more; the median is
        # reported (this VM's speed moves by +-10 % from minute to minute)
        tcs = []
        for _ in range(1 if args.quick else 3):
            t0 = time.perf_counter()
            p0 = pp.compress(w0, bits=args.bits)
            tcs.append(time.perf_counter() - t0)
        tc = float(np.median(tcs))
        # cold: enough distinct matrices that each sweep overflows the LLC 3x
        n_np = max(1, -(-3 * llc // (4 * n * k)))
        n_pp = max(1, -(-3 * llc // p0.nbytes))
        if args.quick:
            n_np = n_pp = 1
        ws = [w0] + [rng.standard_t(5, size=(n, k)).astype(np.float32) for _ in range(n_np - 1)]
        meta, arrs = p0.metadata(), p0.arrays()
        ps = [p0] + [pp.from_arrays(meta, {a: v.copy() for a, v in arrs.items()}) for _ in range(n_pp - 1)]
        x = rng.standard_normal(k).astype(np.float32)
        y_ref = pp.decompress(p0).astype(np.float64) @ x.astype(np.float64)
        err = {a: float(np.linalg.norm(pp.matvec(p0, x, activations=a) - y_ref) / np.linalg.norm(y_ref))
               for a in ("float32", "int8")}
        runs = 20 if args.quick else 100
        for threads in (1, 0):
            pp.set_num_threads(threads)
            tl = 1 if threads == 1 else None
            with blas_threads(tl):
                np_thr = numpy_threads()
                res = {}
                for cache in ("hot", "cold") if not args.quick else ("hot",):
                    wl = ws[:1] if cache == "hot" else ws
                    pl = ps[:1] if cache == "hot" else ps
                    res[cache] = timeit_interleaved({
                        "numpy": lambda i: wl[i % len(wl)] @ x,
                        "f32": lambda i: pp.matvec(pl[i % len(pl)], x),
                        "int8": lambda i: pp.matvec(pl[i % len(pl)], x, activations="int8"),
                    }, runs)
            for cache, r in res.items():
                tn = r["numpy"][0]
                rows.append(dict(
                    shape=f"{n}x{k}", threads=threads or ncpu, numpy_threads=np_thr, cache=cache, bits=p0.bits_per_weight,
                    err_f32=err["float32"], err_int8=err["int8"], packed_mb=p0.nbytes / 2**20,
                    numpy_ms=1e3 * tn, numpy_spread=r["numpy"][1],
                    f32_ms=1e3 * r["f32"][0], f32_spread=r["f32"][1], f32_x=tn / r["f32"][0],
                    int8_ms=1e3 * r["int8"][0], int8_spread=r["int8"][1], int8_x=tn / r["int8"][0],
                    numpy_gbs=4 * n * k / tn / 1e9, int8_gbs=p0.nbytes / r["int8"][0] / 1e9,
                    f32_gbs=p0.nbytes / r["f32"][0] / 1e9, compress_mws=n * k / tc / 1e6, compress_first_mws=n * k / tcs[0] / 1e6, compress_runs=len(tcs),
                ))
        pp.set_num_threads(0)
    head = (f"{'shape':>11} {'thr':>3} {'np thr':>6} {'cache':>5} {'bits':>5} {'numpy ms':>9} {'ours f32 ms':>11} {'x':>5} "
            f"{'ours int8 ms':>12} {'x':>5} {'GB/s np':>8} {'GB/s f32':>8} {'GB/s i8':>8} {'spread np/f32/i8':>17}")
    print(head)
    for r in rows:
        print(f"{r['shape']:>11} {r['threads']:>3} {r['numpy_threads']:>6} {r['cache']:>5} {r['bits']:5.2f} {r['numpy_ms']:9.3f} "
              f"{r['f32_ms']:11.3f} {r['f32_x']:5.1f} {r['int8_ms']:12.3f} {r['int8_x']:5.1f} {r['numpy_gbs']:8.1f} "
              f"{r['f32_gbs']:8.1f} {r['int8_gbs']:8.1f} {r['numpy_spread']:5.0%}/{r['f32_spread']:4.0%}/{r['int8_spread']:4.0%}")
    print("GB/s: bytes of the weights read per call (numpy 4 N K, ours the packed bytes) / median time; "
          "x: numpy time / ours, same run.")
    for n, k in shapes:
        r = next(r for r in rows if r["shape"] == f"{n}x{k}")
        print(f"{n}x{k}: packed {r['packed_mb']:.1f} MiB; rel. error vs float64 decompress@x: float32 {r['err_f32']:.1e}, "
              f"int8 {r['err_int8']:.1e}; compress at {args.bits} bits: {r['compress_mws']:.1f} M weights/s "
              f"(all threads; median of {r['compress_runs']}, the first {r['compress_first_mws']:.1f})")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
