"""Quantizer throughput and fidelity, one build or several side by side in one run.

    python bench/quant_speed.py [--builds DIR,DIR] [--shapes 4096x14336,14336x4096] [--repeats 3]
                                [--bits 2.5,3.0,3.5] [--no-fidelity] [--json]

Speed: ``pp.compress(W, bits=3.0)`` (block 64) on heavy-tailed matrices made as
bench/cpu_matvec.py makes them (Student-t, 5 degrees of freedom, seed 0), in M weights/s;
median of ``--repeats`` runs after one warm-up (the spread is printed), all threads.

Fidelity, on real layers (the loaders of bench/fidelity.py):

* ``minilm_cos``: mean weight cosine over the 36 MiniLM matrices, no importance (block 64);
* ``smol_werr``: mean importance-weighted relative error sum h (W - Q)^2 / sum h W^2 over the
  21 SmolLM2 matrices, importance h as bench/fidelity.py draws it (block 64);
* ``bits``: bits per weight over all matrices of each model (must stay <= the budget).

``--builds`` runs each figure once per directory (a ``pip install --target`` of a wheel), in
separate processes that take turns, so builds are compared on the same data under the same
machine load. Without it the installed ``predprey_rs`` is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _speed(shape: tuple[int, int], repeats: int, bits: float) -> dict:
    import predprey_rs as pp

    n, k = shape
    w = np.random.default_rng(0).standard_t(5, size=(n, k)).astype(np.float32)
    pp.compress(w[: min(n, 500)], bits)  # warm-up (threads, page faults)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        p = pp.compress(w, bits)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"shape": f"{n}x{k}", "mws": w.size / med / 1e6, "mws_min": w.size / max(times) / 1e6,
            "mws_max": w.size / min(times) / 1e6, "bits": p.bits_per_weight, "threads": pp.get_num_threads()}


def _fidelity(bits_list: list[float]) -> dict:
    import predprey_rs as pp

    sys.path.insert(0, str(HERE))
    import fidelity as fb

    out: dict = {}
    mini = fb.minilm_layers()
    for bits in bits_list:
        cos, nbytes, nw = [], 0, 0
        for _, w in mini:
            p = pp.compress(w, bits, 64)
            q = pp.decompress(p).astype(np.float64).ravel()
            wd = w.astype(np.float64).ravel()
            cos.append(float(wd @ q / (np.linalg.norm(wd) * np.linalg.norm(q))))
            nbytes += p.nbytes
            nw += w.size
        out[f"minilm_cos@{bits}"] = float(np.mean(cos))
        out[f"minilm_bits@{bits}"] = 8.0 * nbytes / nw
    smol = fb.smollm2_layers()
    rng = np.random.default_rng(0)
    hs = [fb.activations(w.shape[1], 4, 1.0, rng)[0] for _, w in smol]
    for bits in bits_list:
        errs, nbytes, nw = [], 0, 0
        for (_, w), h in zip(smol, hs):
            p = pp.compress(w, bits, 64, importance=h)
            d = (w.astype(np.float64) - pp.decompress(p).astype(np.float64)) ** 2
            errs.append(float((d * h[None, :]).sum() / (w.astype(np.float64) ** 2 * h[None, :]).sum()))
            nbytes += p.nbytes
            nw += w.size
        out[f"smol_werr@{bits}"] = float(np.mean(errs))
        out[f"smol_bits@{bits}"] = 8.0 * nbytes / nw
    return out


def _child(args: argparse.Namespace) -> int:
    if args.task == "fidelity":
        res = _fidelity([float(b) for b in args.bits.split(",")])
    else:
        n, k = (int(v) for v in args.task.split("x"))
        res = _speed((n, k), args.repeats, 3.0)
    print(json.dumps(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--builds", default="", help="comma list of directories to put first on PYTHONPATH, compared side by side")
    ap.add_argument("--shapes", default="4096x14336,14336x4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bits", default="2.5,3.0,3.5", help="budgets of the fidelity figures")
    ap.add_argument("--no-fidelity", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--task", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.task:
        return _child(args)
    builds = [b for b in args.builds.split(",") if b] or [""]
    tasks = [s for s in args.shapes.split(",") if s] + ([] if args.no_fidelity else ["fidelity"])
    results: dict = {b: {} for b in builds}
    for task in tasks:
        for b in builds:
            env = dict(os.environ)
            if b:
                env["PYTHONPATH"] = b + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            cmd = [sys.executable, __file__, "--task", task, "--repeats", str(args.repeats), "--bits", args.bits]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results[b][task] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{b or 'installed'} {task}: {results[b][task]}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for task in tasks:
        print(f"\n{task}")
        for b in builds:
            r = results[b][task]
            if task == "fidelity":
                print(f"  {b or 'installed':<24} " + "  ".join(f"{key}={v:.5f}" for key, v in r.items()))
            else:
                print(f"  {b or 'installed':<24} {r['mws']:7.2f} M w/s (spread {r['mws_min']:.2f}..{r['mws_max']:.2f}), "
                      f"{r['bits']:.4f} bits/w, {r['threads']} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
