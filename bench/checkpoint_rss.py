"""Peak memory and speed of whole-checkpoint compression.

Generates a float16 safetensors checkpoint of 12 tensors of 8192 x 16384 (3 GiB) in a temporary
directory, compresses it with ``predprey_rs.compress_checkpoint`` in a child process and reads the
child's peak resident set (getrusage RUSAGE_CHILDREN, ru_maxrss). The same child first measures
its own RSS after importing predprey_rs (the floor every run pays) for comparison.

    python bench/checkpoint_rss.py [--tensors 12] [--rows 8192] [--cols 16384] [--dir /tmp]

The target in the issue: < 1.5 GiB peak RSS for the 3 GiB checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD = r"""
import json, resource, sys, time
import predprey_rs as pp
floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
res = pp.compress_checkpoint(sys.argv[1], sys.argv[2], bits=float(sys.argv[3]), progress=False)
dt = time.perf_counter() - t
print(json.dumps({"floor_kib": floor, "seconds": dt, "totals": res["totals"]}))
"""


def write_source(path: str, n: int, rows: int, cols: int) -> int:
    """A float16 safetensors file of n (rows, cols) tensors, written chunk by chunk."""
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(n)]
    per = rows * cols * 2
    header = {nm: {"dtype": "F16", "shape": [rows, cols], "data_offsets": [i * per, (i + 1) * per]} for i, nm in enumerate(names)}
    hb = json.dumps(header).encode()
    hb += b" " * ((-len(hb)) % 8)
    rng = np.random.default_rng(0)
    step = 512
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for _ in names:
            for r in range(0, rows, step):
                chunk = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32) * 0.02
                f.write(chunk.astype(np.float16).tobytes())
    return os.path.getsize(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=12)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=16384)
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--dir", default=None, help="where to put the temporary checkpoints (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()

    d = tempfile.mkdtemp(prefix="predprey-rss-", dir=args.dir)
    try:
        src = os.path.join(d, "model.safetensors")
        t = time.perf_counter()
        size = write_source(src, args.tensors, args.rows, args.cols)
        print(f"source: {args.tensors} x {args.rows}x{args.cols} float16 = {size / 2**30:.2f} GiB "
              f"(generated in {time.perf_counter() - t:.0f} s)", flush=True)
        out = os.path.join(d, "packed")
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", CHILD, src, out, str(args.bits)], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            raise SystemExit(f"compress failed with exit code {p.returncode}")
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
        r = json.loads(p.stdout.strip().splitlines()[-1])
        tot = r["totals"]
        one_f32 = args.rows * args.cols * 4
        print(f"{'peak RSS of the compress process':<44}{peak_kib / 2**20:8.2f} GiB   (target < 1.5 GiB)")
        print(f"{'  of which: python + numpy + predprey_rs':<44}{r['floor_kib'] / 2**20:8.2f} GiB")
        print(f"{'  one tensor as float32 (the least it needs)':<44}{one_f32 / 2**30:8.2f} GiB")
        print(f"{'source / model size':<44}{size / 2**30:8.2f} GiB")
        print(f"{'output tensors':<44}{tot['bytes_after'] / 2**30:8.2f} GiB   ({tot['avg_bits_packed']:.3f} bits per weight)")
        print(f"{'time (compress_checkpoint, in the child)':<44}{r['seconds']:8.1f} s    (process wall {wall:.1f} s)")
        print(f"{'throughput':<44}{tot['packed_weights'] / r['seconds'] / 1e6:8.2f} M weights/s  "
              f"({size / r['seconds'] / 2**20:.1f} MiB/s of float16 source)")
        print(f"{'relative error (median / max over tensors)':<44}{tot.get('rel_error_median', float('nan')):8.4f} / {tot.get('rel_error_max', float('nan')):.4f}")
        print(f"{'threads':<44}{os.cpu_count():8d} cores on this machine")
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
        else:
            print(f"kept {d}")


if __name__ == "__main__":
    main()
