#!/usr/bin/env python3
"""GPU GEMV from the packed bytes vs the baselines, measured side by side in one run.

For each shape and batch: our kernel (shaders/predprey_gemv1.wgsl) timed by timestamp queries
(wall clock where the adapter has none), many dispatches per submit, rotating over distinct
matrices totalling > 3x the GPU's L2 ("cold") and on one matrix ("hot"); our dense FP16 WGSL
GEMV on the same device (cold); a WGSL copy kernel for the achievable bandwidth; and, where
torch with CUDA is installed, torch fp16 ``W @ x``. Printed: median time (spread over trials),
effective GB/s = packed bytes / time, % of the measured copy bandwidth, speed-up over the dense
kernel (and torch); the same for our kernel with int8 activations (``activations="int8"``: x
quantized per 32 columns as on the CPU, dot4I8Packed sums; cold) unless --no-int8.

    python bench/gpu_matvec.py                      # 4096x14336, 14336x4096, 8192x28672; batch 1, 4, 8
    python bench/gpu_matvec.py --quick              # fewer trials (software adapters)
    python bench/gpu_matvec.py --sweep              # also try launch shapes on 4096x14336, batch 1
    PREDPREY_GPU_ADAPTER=vulkan python bench/gpu_matvec.py --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

import predprey_rs as pp
from predprey_rs import _gpubench as gb
from predprey_rs import _synth, gpu

# untimed work before every timed block (WARM_S) and after uploading a shape's matrices (SETTLE_S).
# Without them, and again with 0.2 s only, H100 runs showed the first cold row of a shape 4-5x slow
# (4096x14336: 148 us; the same matrices timed later in the same run: 29 us); the two runs with
# 1 s after the uploads showed no such row.
WARM_S = 0.2
SETTLE_S = 1.0
SWEEP_SHAPES = [(4096, 14336), (14336, 4096), (8192, 28672)]
L2_MB = {"H200": 60, "H100": 50, "GH200": 60, "A100": 40, "A10": 6, "L40": 96, "L4": 48, "4090": 72,
         "4080": 64, "3090": 6, "MI300": 256, "MI250": 16, "MI210": 16}


def guess_l2_mb(info: dict) -> int:
    name = info["device"]
    for key, mb in L2_MB.items():
        if key in name:
            return mb
    if info["adapter_type"] == "CPU":
        try:
            with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
                s = f.read().strip().upper()
            return max(1, int(s.rstrip("KMB")) // (1024 if s.endswith("K") else 1))
        except (OSError, ValueError):
            return 32
    return 64


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def time_rotation(ctx, calls, trials, warm_s=None):
    """Per-call summary of recording `calls` (each `call(compute_pass)` one product) one after
    another, many rounds per submit (gb.time_dispatches), WARM_S of untimed work first unless
    `warm_s` says otherwise. Returns (summary, timer source)."""

    def record(cpass):
        for call in calls:
            call(cpass)

    reps = gb.pick_reps(ctx, record)
    times, src = gb.time_dispatches(ctx, record, reps, trials, warmup_s=WARM_S if warm_s is None else warm_s)
    return gb.summarize([t / len(calls) for t in times]), src


def time_ours(ctx, mats, batch, trials, warm_s=None, int8=False):
    calls = []
    for m in mats:
        pr = m._prepare(batch, int8)
        m._write_x(np.ones((batch, m.shape[1]), np.float32), pr)
        calls.append(lambda cpass, m=m, pr=pr: m._dispatch(cpass, pr))
    return time_rotation(ctx, calls, trials, warm_s)


def dispatch_floor(ctx, rng, trials) -> float:
    """Seconds per dispatch of our kernel on a 5x64 matrix (one workgroup), 16 rotating: what
    every product pays whatever its size (launch, barrier between dependent dispatches, tail)."""
    mats = [gpu.upload(_synth.random_packed(rng, 5, 64, block_size=64, plane2=0.0, predators=0.0))
            for _ in range(16)]
    s, _ = time_ours(ctx, mats, 1, trials)
    return s["median_s"]


def time_copy_at(ctx, nbytes, l2, cap, trials) -> float:
    """Seconds per dispatch of the copy kernel moving `nbytes` (reading and writing nbytes / 2),
    rotating over buffers totalling > 3x L2: the copy kernel at our matrix's size, its fixed
    per-dispatch cost included."""
    cps = [gb.Copy(ctx, nbytes // 2) for _ in range(copies_for(nbytes, l2, cap))]
    return time_rotation(ctx, [c.dispatch for c in cps], trials)[0]["median_s"]


def time_dense(ctx, dens, batch, trials):
    calls = []
    for d in dens:
        pr = d.prepare(batch)
        d.write_x(np.ones((batch, d.shape[1]), np.float32))
        calls.append(lambda cpass, d=d, pr=pr: d.dispatch(cpass, batch, pr))
    return time_rotation(ctx, calls, trials)[0]


def time_torch(shape, batch, copies, trials):
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n, k = shape
    ws = [torch.randn(n, k, dtype=torch.float16, device="cuda") for _ in range(copies)]
    x = torch.randn(k, batch, dtype=torch.float16, device="cuda")
    for w in ws:
        (w @ x)
    torch.cuda.synchronize()
    one = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    one[0].record()
    for w in ws:
        w @ x
    one[1].record()
    torch.cuda.synchronize()
    reps = max(1, min(200, int(20.0 / max(one[0].elapsed_time(one[1]), 1e-3))))
    out = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            for w in ws:
                w @ x
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) * 1e-3 / (reps * len(ws)))
    del ws
    torch.cuda.empty_cache()
    return gb.summarize(out)


def copies_for(nbytes: int, l2_bytes: int, cap: int) -> int:
    return max(1, min(cap, math.ceil(3 * l2_bytes / max(nbytes, 1))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x14336,14336x4096,8192x28672", help="NxK list (N outputs, K inputs)")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--block-size", type=int, default=64, choices=(32, 64, 128, 256))
    ap.add_argument("--plane2", type=float, default=0.5, help="fraction of (group, block) cells with a plane-2 entry (compress at 3.0 bits gives ~0.5 on MiniLM)")
    ap.add_argument("--predators", type=float, default=0.005, help="fraction of weights kept as FP16 predators")
    ap.add_argument("--l2-mb", type=int, help="L2 size used for the rotation (default: known GPUs, else 64; CPU: LLC)")
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 trials, fewer copies (software adapters)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense FP16 baseline")
    ap.add_argument("--no-torch", action="store_true", help="skip torch even where it is installed")
    ap.add_argument("--no-int8", action="store_true", help="skip our kernel with int8 activations")
    ap.add_argument("--sweep", action="store_true",
                    help="also time launch shapes (SWEEP_CONFIGS: fast, wg, direct) at batch 1 on 4096x14336 and 14336x4096")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--json-out", metavar="FILE", help="also write the JSON result to FILE")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    trials = 3 if args.quick else args.trials
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    batches = [int(b) for b in args.batches.split(",") if b]
    rng = np.random.default_rng(args.seed)

    t_start = time.perf_counter()
    ctx = gpu._context()
    info = gpu.adapter_info()
    l2 = (args.l2_mb or guess_l2_mb(info)) << 20
    cap = 3 if args.quick else 16
    log(f"adapter: {info['device']} via {info['backend']} ({info['adapter_type']}), kernel {info['kernel_variant']}, "
        f"timestamps {'yes' if ctx.timestamps else 'no (wall clock)'}, L2 taken as {l2 >> 20} MiB")
    copy = gb.copy_bandwidth(ctx, min(max(3 * l2, 256 << 20), ctx.max_binding), trials=trials)
    log(f"copy kernel: {copy['gbps']:.1f} GB/s (counting bytes read + written: {copy['bytes'] >> 20} MiB per copy)")
    copy["floor_us"] = dispatch_floor(ctx, rng, trials) * 1e6
    log(f"per-dispatch floor (5x64 matrix): {copy['floor_us']:.2f} us")

    rows = []
    sweep_mats = {}
    for shape in shapes:
        n, k = shape
        t0 = time.perf_counter()
        first = _synth.random_packed(rng, n, k, block_size=args.block_size, plane2=args.plane2, predators=args.predators)
        count = copies_for(first.nbytes, l2, cap)
        mats = [gpu.upload(first)]
        del first
        for _ in range(count - 1):
            mats.append(gpu.upload(_synth.random_packed(rng, n, k, block_size=args.block_size, plane2=args.plane2,
                                                        predators=args.predators)))
        bpw = 8 * mats[0].nbytes / (n * k)
        dens = []
        if not args.no_dense:
            dcount = copies_for(n * k * 2, l2, cap)
            for _ in range(dcount):
                w16 = (rng.integers(0, 1 << 16, size=(n, k), dtype=np.uint16) & np.uint16(0xB3FF)).view(np.float16)
                dens.append(gb.DenseF16(ctx, w16))
                del w16
        log(f"{n}x{k}: {len(mats)} packed matrices of {mats[0].nbytes / 2**20:.1f} MiB ({bpw:.2f} bits/weight), "
            f"{len(dens)} dense of {n * k * 2 / 2**20:.0f} MiB, made in {time.perf_counter() - t0:.1f} s")
        copy_at_us = None
        for i, b in enumerate(batches):
            # the first measurement after uploading a shape's matrices gets SETTLE_S of untimed work
            cold, src = time_ours(ctx, mats, b, trials, warm_s=SETTLE_S if i == 0 else None)
            hot, _ = time_ours(ctx, mats[:1], b, trials)
            if copy_at_us is None:
                copy_at_us = time_copy_at(ctx, mats[0].nbytes, l2, cap, trials) * 1e6
            row = {"shape": f"{n}x{k}", "batch": b, "bits_per_weight": bpw, "packed_bytes": mats[0].nbytes,
                   "matrices": len(mats), "timer": src,
                   "ours_us": cold["median_s"] * 1e6, "ours_spread_pct": cold["spread_pct"],
                   "ours_gbps": mats[0].nbytes / cold["median_s"] / 1e9,
                   "ours_hot_gbps": mats[0].nbytes / hot["median_s"] / 1e9}
            row["pct_of_copy"] = 100 * row["ours_gbps"] / copy["gbps"]
            row["copy_at_size_us"] = copy_at_us
            if not args.no_int8:
                i8, _ = time_ours(ctx, mats, b, trials, int8=True)
                row.update(int8_us=i8["median_s"] * 1e6, int8_gbps=mats[0].nbytes / i8["median_s"] / 1e9)
                row["int8_pct_of_copy"] = 100 * row["int8_gbps"] / copy["gbps"]
            if dens:
                d = time_dense(ctx, dens, b, trials)
                row.update(dense_us=d["median_s"] * 1e6, dense_gbps=n * k * 2 / d["median_s"] / 1e9,
                           speedup_vs_dense=d["median_s"] / cold["median_s"])
                if "int8_us" in row:
                    row["int8_speedup_vs_dense"] = d["median_s"] * 1e6 / row["int8_us"]
            if not args.no_torch:
                t = time_torch(shape, b, copies_for(n * k * 2, l2, cap), trials)
                if t is not None:
                    row.update(torch_us=t["median_s"] * 1e6, speedup_vs_torch=t["median_s"] / cold["median_s"])
            rows.append(row)
            log(f"  batch {b}: ours {row['ours_us']:.1f} us ({row['ours_gbps']:.1f} GB/s, {row['pct_of_copy']:.0f}% of copy)"
                + (f", int8 {row['int8_us']:.1f} us ({row['int8_pct_of_copy']:.0f}% of copy)" if "int8_us" in row else "")
                + (f", dense {row['dense_us']:.1f} us (x{row['speedup_vs_dense']:.2f})" if "dense_us" in row else "")
                + (f", torch {row['torch_us']:.1f} us" if "torch_us" in row else ""))
        if args.sweep and shape in SWEEP_SHAPES:
            sweep_mats[shape] = mats
        del mats, dens

    result = {"adapter": info, "copy_gbps": copy["gbps"], "dispatch_floor_us": copy["floor_us"], "l2_mb": l2 >> 20, "rows": rows, "sweep": [],
              "seconds": time.perf_counter() - t_start}

    def emit() -> None:
        result["seconds"] = time.perf_counter() - t_start
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=1, default=float)

    emit()  # the main table is safe before the (optional, longer) sweep starts
    if not args.json:
        print_table(info, copy, l2, rows)
    if args.sweep:
        sweep(args, ctx, rng, l2, cap, trials, sweep_mats, result, emit)
        if not args.json:
            print_sweep(result["sweep"], rows, copy)
    if args.json:
        print(json.dumps(result, indent=1, default=float))
    else:
        print(f"({result['seconds']:.0f} s)")
    return 0


# launch shapes tried by --sweep at batch 1: the fast kernel (predprey_gemv1.wgsl) over its
# workgroup sizes, x layouts (xperm 1: chunk-transposed, 0: plain rows) and DIRECT (2: rows 0-1
# summed directly, exact to float32; 0: two FMAs fewer per byte, ~1e-5 rel. error), plus the
# general kernel's best known shape for reference; and the int8 path's workgroup sizes
SWEEP_CONFIGS = ([{"fast": 1, "wg": wg, "gpw": 1, "direct": 2, "xperm": xp} for wg in (64, 128, 256) for xp in (1, 0)]
                 + [{"fast": 1, "wg": wg, "gpw": 1, "direct": 0, "xperm": 1} for wg in (64, 128, 256)]
                 + [{"fast": 1, "wg": wg, "gpw": 1, "direct": 2, "xperm": 1, "int8": 1} for wg in (64, 128, 256)]
                 + [{"fast": 0, "wg": 64, "gpw": 1, "direct": 2, "xperm": 0}])


def sweep(args, ctx, rng, l2, cap, trials, sweep_mats, result, emit) -> None:
    """Launch shapes (SWEEP_CONFIGS) at batch 1 on SWEEP_SHAPES; result["sweep"] grows as it goes."""
    old = os.environ.get("PREDPREY_GPU_TUNE")
    try:
        for (n, k) in SWEEP_SHAPES:
            mats = sweep_mats.pop((n, k), None) or [
                gpu.upload(_synth.random_packed(rng, n, k, block_size=args.block_size, plane2=args.plane2,
                                                predators=args.predators))
                for _ in range(copies_for(20 << 20, l2, cap))]
            for cfg in SWEEP_CONFIGS:
                os.environ["PREDPREY_GPU_TUNE"] = ",".join(f"{key}={v}" for key, v in cfg.items() if key != "int8")
                s, _ = time_ours(ctx, mats, 1, min(trials, 5), int8=bool(cfg.get("int8", 0)))
                result["sweep"].append({"shape": f"{n}x{k}", **cfg,
                                        "us": s["median_s"] * 1e6, "gbps": mats[0].nbytes / s["median_s"] / 1e9})
                emit()
            del mats
    finally:
        if old is None:
            os.environ.pop("PREDPREY_GPU_TUNE", None)
        else:
            os.environ["PREDPREY_GPU_TUNE"] = old


def print_table(info, copy, l2, rows) -> None:
    print(f"\n{info['device']} via {info['backend']}, kernel {info['kernel_variant']}, timer {rows[0]['timer'] if rows else '-'}; "
          f"copy bandwidth {copy['gbps']:.1f} GB/s (read + write); cold = rotating over > 3x L2 ({l2 >> 20} MiB); "
          f"per-dispatch floor {copy['floor_us']:.2f} us (5x64 matrix); copy@size = the copy kernel moving the "
          f"packed bytes (reading and writing half each), cold")
    head = ["shape", "B", "bits/w", "ours us", "spread", "GB/s", "% copy", "hot GB/s", "copy@size us",
            "dense f16 us", "x dense"]
    has_int8 = any("int8_us" in r for r in rows)
    if has_int8:
        head += ["int8 us", "int8 % copy", "int8 x dense"]
    has_torch = any("torch_us" in r for r in rows)
    if has_torch:
        head += ["torch us", "x torch"]
    body = []
    for r in rows:
        line = [r["shape"], str(r["batch"]), f"{r['bits_per_weight']:.2f}", f"{r['ours_us']:.1f}",
                f"{r['ours_spread_pct']:.0f}%", f"{r['ours_gbps']:.3g}", f"{r['pct_of_copy']:.0f}%",
                f"{r['ours_hot_gbps']:.3g}", f"{r['copy_at_size_us']:.1f}",
                f"{r['dense_us']:.1f}" if "dense_us" in r else "-",
                f"{r['speedup_vs_dense']:.2f}" if "dense_us" in r else "-"]
        if has_int8:
            line += [f"{r['int8_us']:.1f}" if "int8_us" in r else "-",
                     f"{r['int8_pct_of_copy']:.0f}%" if "int8_us" in r else "-",
                     f"{r['int8_speedup_vs_dense']:.2f}" if "int8_speedup_vs_dense" in r else "-"]
        if has_torch:
            line += [f"{r['torch_us']:.1f}" if "torch_us" in r else "-",
                     f"{r['speedup_vs_torch']:.2f}" if "torch_us" in r else "-"]
        body.append(line)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    for line in [head] + body:
        print("  ".join(x.rjust(w) for x, w in zip(line, widths)), flush=True)


def print_sweep(sweep_rows, rows, copy) -> None:
    print("\nlaunch sweep, batch 1 (cold): the best 5 float32 launches of each shape, the best int8 one, and "
          "the defaults (fast=1, wg by K, direct=2, xperm=1):")
    for shape in dict.fromkeys(s["shape"] for s in sweep_rows):
        mine = [s for s in sweep_rows if s["shape"] == shape]
        f32 = sorted((s for s in mine if not s.get("int8")), key=lambda s: s["us"])
        i8 = sorted((s for s in mine if s.get("int8")), key=lambda s: s["us"])
        default = [r for r in rows if r["shape"] == shape and r["batch"] == 1]
        for s in f32[:5] + i8[:1]:
            print(f"  {shape:>10} {'int8' if s.get('int8') else 'f32 '} fast={s.get('fast', 0)} wg={s['wg']:<4} gpw={s['gpw']} "
                  f"direct={s['direct']} xperm={s.get('xperm', 0)}  {s['us']:8.1f} us  "
                  f"{s['gbps']:7.4g} GB/s  {100 * s['gbps'] / copy['gbps']:.0f}% of copy")
        if default:
            d = default[0]
            print(f"  {shape:>10} f32  default               {d['ours_us']:8.1f} us  {d['ours_gbps']:7.4g} GB/s  {d['pct_of_copy']:.0f}% of copy")
            if "int8_us" in d:
                print(f"  {shape:>10} int8 default               {d['int8_us']:8.1f} us  {d['int8_gbps']:7.4g} GB/s  "
                      f"{d['int8_pct_of_copy']:.0f}% of copy")


if __name__ == "__main__":
    sys.exit(main())
