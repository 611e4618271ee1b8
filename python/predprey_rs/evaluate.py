"""End-to-end fidelity of a compressed LLaMA-family model against the uncompressed one on the
same text: perplexity of both, mean KL divergence of the next-token distributions, top-1
agreement and bits per packed weight (``predprey eval``)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ._core import PackedMatrix

__all__ = ["Fidelity", "log_probs", "perplexity", "compare", "bits_per_weight", "evaluate_model"]


@dataclass
class Fidelity:
    """Figures of ``compare`` (KL in nats per token, mean over the scored positions)."""

    ppl_ref: float
    ppl: float
    kl: float
    top1: float
    bits_per_weight: float
    tokens: int

    @property
    def ratio(self) -> float:
        return self.ppl / self.ppl_ref

    def as_dict(self) -> dict:
        return asdict(self)


def log_probs(model: Any, ids: Sequence[int], window: int = 2048) -> np.ndarray:
    """Log-probabilities (T, vocab), float64, of the next token after each position; texts
    longer than ``window`` are scored in consecutive windows (no overlap)."""
    out = []
    ids = list(ids)
    for i in range(0, len(ids), window):
        lg = model.forward(ids[i: i + window], all_logits=True).astype(np.float64)
        lg -= lg.max(-1, keepdims=True)
        out.append(lg - np.log(np.exp(lg).sum(-1, keepdims=True)))
    return np.concatenate(out)


def perplexity(lp: np.ndarray, ids: Sequence[int]) -> float:
    """exp(mean negative log-likelihood of ids[1:]) from ``log_probs`` output."""
    ids = np.asarray(ids)
    return float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))


def bits_per_weight(weights: Mapping[str, Any]) -> float:
    """Stored bits over all packed matrices (every byte counted) per packed weight."""
    nbytes = sum(p.nbytes for p in weights.values() if isinstance(p, PackedMatrix))
    n = sum(p.shape[0] * p.shape[1] for p in weights.values() if isinstance(p, PackedMatrix))
    return 8.0 * nbytes / n if n else float("nan")


def compare(lp_ref: np.ndarray, lp: np.ndarray, ids: Sequence[int], bits: float = float("nan")) -> Fidelity:
    """Fidelity of log-probabilities ``lp`` against the reference ``lp_ref`` on ``ids``. KL and
    top-1 are over the positions that predict a token (all but the last)."""
    t = len(ids) - 1
    a, b = lp_ref[:t], lp[:t]
    kl = float((np.exp(a) * (a - b)).sum(-1).mean())
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    return Fidelity(perplexity(lp_ref, ids), perplexity(lp, ids), kl, top1, bits, t)


def evaluate_model(model: Any, text: str, bits: float = 3.0, block_size: int = 64, method: str = "gptq",
                   calibration: str | None = None, type_offsets: Mapping[str, float] | None = None,
                   progress: Any = None, sequential: bool | None = None) -> tuple[Fidelity, dict]:
    """Compresses ``model`` (dense ``LlamaModel``) with calibration (default text) and compares
    it with the original on ``text``. ``sequential``: None for calibrate.DEFAULT_SEQUENTIAL.
    Returns (Fidelity, info) where info has timings."""
    from . import calibrate
    from .llama import LlamaModel

    ids = model.tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError("the evaluation text has fewer than 2 tokens")
    t0 = time.perf_counter()
    lp_ref = log_probs(model, ids)
    t1 = time.perf_counter()
    seqs = calibrate.calibration_ids(model.tokenizer, calibration)
    seq = calibrate.DEFAULT_SEQUENTIAL if sequential is None else sequential
    budget = calibrate.default_layer_bits(model, bits, block_size, type_offsets)
    packed, _ = calibrate.quantize_model(model, seqs, budget, block_size, method=method,
                                         sequential=seq, upstream=calibrate.DEFAULT_UPSTREAM and seq,
                                         on_layer=progress)
    t2 = time.perf_counter()
    q = LlamaModel.from_weights(model.config, {**model.weights, **packed}, model.tokenizer)
    lp = log_probs(q, ids)
    t3 = time.perf_counter()
    fid = compare(lp_ref, lp, ids, bits_per_weight(packed))
    return fid, {"seconds_reference": t1 - t0, "seconds_compress": t2 - t1, "seconds_eval": t3 - t2,
                 "calibration_tokens": sum(len(s) for s in seqs), "method": method,
                 "sequential": seq}
