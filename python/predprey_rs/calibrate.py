"""Calibration of LLaMA-family models through the runtime (``predprey_rs.llama``).

The model is run on calibration text and, for every linear layer, the statistics of its input
are collected: the importance vector (mean x^2 per input column, what llama.cpp's imatrix
stores) and, for error feedback, the second-moment matrix H = X^T X / T.

``quantize_model`` compresses the layers **in order**: block by block, and inside a block in the
order the data flows (q/k/v, then o, then gate/up, then down). Each layer's statistics are taken
from the model whose earlier layers are already compressed, so the quantizer sees (and can
compensate) the errors that reach it, instead of errors compounding unseen.

Methods:

* ``"importance"``: ``compress(w, bits, importance=mean x^2)`` per layer.
* ``"gptq"``: the same options (planes per cell, predators per row and block) from a first
  importance-weighted pass, then GPTQ-style error feedback across columns: blocks of
  ``block_size`` columns are fitted one after another (``_core.fit_block``: scales for the
  fixed options), each column is rounded to the nearest of its row's levels and its error,
  scaled by the inverse Hessian, is pushed onto the columns not yet quantized.

Bit allocation: ``bits`` is the average over all packed weights; ``type_offsets`` (e.g.
``{"attn_v": +0.5}``) moves bits between layer types, the rest of the model paying for it
evenly, so the average stays ``bits``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ._core import PackedMatrix

__all__ = [
    "LayerStats",
    "default_calibration_text",
    "calibration_ids",
    "collect_stats",
    "quantize_model",
    "layer_bits",
    "default_layer_bits",
    "gptq_quantize",
    "refit_scales",
    "DEFAULT_TYPE_OFFSETS",
    "DEFAULT_BLOCK_OFFSETS",
    "load_llama",
    "calibrate_source",
]

# Per-type bit offsets used by ``--calibrate``, from SmolLM2-135M's KL on the CALIBRATION text
# (never the held-out text) with one layer type compressed at 2.5/3.0/3.5/4.0 bits, the rest
# original: the offsets that minimise the summed KL at a 3.0-bit average with every type kept
# within 2.5..4.25 bits (docs/fidelity.md). attn_v is the most sensitive per weight, attn_q
# the least.
DEFAULT_TYPE_OFFSETS: dict[str, float] = {"attn_q": -0.5, "attn_k": 0.25, "attn_v": 1.0, "attn_output": -0.25,
                                          "ffn_up": 0.125, "ffn_down": -0.375}

# Extra bits for the first blocks (block index -> offset), paid by all the others: errors made
# early pass through every later block. A taper over the first five blocks measured better than
# +0.5 on blocks 0-1 at both 3.0 and 3.5 bits on bench/data/validation.txt (docs/fidelity.md).
DEFAULT_BLOCK_OFFSETS: dict[int, float] = {0: 1.0, 1: 0.75, 2: 0.5, 3: 0.25, 4: 0.25}

# GPTQ refinements on by default (docs/fidelity.md: each measured on the validation text).
DEFAULT_ACT_ORDER = True
DEFAULT_REFIT = True
DEFAULT_PASSES = 1
# GPTQ rounds to block scales already on each row's 8-bit grid (fixed up front at the first
# encoding's row scale times this), or None: to the fitted scales, rounded to a grid afterwards.
DEFAULT_GRID_HEADROOM: float | None = 1.1

# attribute of llama._Block -> GGUF suffix, and the order the data reaches them inside a block
# What --calibrate does by default (docs/fidelity.md has the measurements behind the choice).
DEFAULT_SEQUENTIAL = False
DEFAULT_UPSTREAM = False

_ATTR = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
         "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
_STAGES: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
_SAME_INPUT = _STAGES  # the layers of a stage read the same array


# The default calibration text: ``calibration.txt`` (written for the package: prose, science,
# code, dialogue, numbers), ``calibration_generated.txt`` (text sampled from SmolLM2-135M-Instruct
# after the first 12 tokens of each paragraph of calibration.txt) and ``calibration_sampled.txt``
# (bench/gen_calibration.py: ~27 K tokens sampled from the same model after 40 openings and 40
# chat prompts of our own, two samples each). ~30 K tokens in all. GPTQ needs many tokens: at 3.0
# bits 851 -> 2915 tokens took the held-out perplexity ratio 7.2x -> 6.1x and 2915 -> 30 K took
# it 6.1x -> 4.2x; a second 27 K-token sample of the same prompts (58 K) measured worse on the
# validation text (docs/fidelity.md).
DEFAULT_CALIBRATION_FILES = ("data/calibration.txt", "data/calibration_generated.txt", "data/calibration_sampled.txt")


def default_calibration_text() -> str:
    """The calibration text shipped with the package (DEFAULT_CALIBRATION_FILES, joined)."""
    root = resources.files("predprey_rs")
    return "\n\n".join(root.joinpath(f).read_text(encoding="utf-8") for f in DEFAULT_CALIBRATION_FILES)


def calibration_ids(tokenizer: Any, text: str | None = None, chunk: int = 1024) -> list[list[int]]:
    """The calibration text (default: the shipped one) as token sequences of at most ``chunk``."""
    ids = tokenizer.encode(default_calibration_text() if text is None else text)
    if not ids:
        raise ValueError("the calibration text has no tokens")
    return [ids[i: i + chunk] for i in range(0, len(ids), chunk)]


@dataclass
class LayerStats:
    """Input statistics of one linear layer: ``n`` rows (tokens) seen, ``sq`` = sum of x^2 per
    column (K,), ``xtx`` = X^T X (K, K) when collected (float64)."""

    n: int
    sq: np.ndarray
    xtx: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x).reshape(-1, x.shape[-1])
        x64 = x.astype(np.float64)
        self.n += x.shape[0]
        self.sq += np.einsum("ij,ij->j", x64, x64)
        if self.xtx is not None:
            # one chunk's product in float32 (sums of <= a few thousand terms: ~1e-6 relative),
            # accumulated across chunks in float64; twice as fast as a float64 product
            x32 = x.astype(np.float32)
            self.xtx += x32.T @ x32

    @property
    def importance(self) -> np.ndarray:
        """Mean x^2 per input column, float32 (K,)."""
        return (self.sq / max(self.n, 1)).astype(np.float32)

    @property
    def hessian(self) -> np.ndarray:
        """X^T X / n, float64 (K, K)."""
        if self.xtx is None:
            raise ValueError("these statistics were collected without the second-moment matrix")
        return self.xtx / max(self.n, 1)


class _Tap:
    """Stands in for a ``Linear`` of a block: records its input, then calls it. Layers that
    read the same input (q/k/v, gate/up) share one LayerStats and one ``seen`` cell, so the
    input is counted once: the cell keeps the last array recorded (alive, so its identity
    cannot be reused by a new array)."""

    def __init__(self, lin: Any, stats: LayerStats, seen: list):
        self.lin, self.stats, self.seen = lin, stats, seen

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.seen[0] is not x:
            self.stats.add(x)
            self.seen[0] = x
        return self.lin(x)


def _new_stats(k: int, want_h: bool) -> LayerStats:
    return LayerStats(0, np.zeros(k), np.zeros((k, k)) if want_h else None)


def collect_stats(model: Any, sequences: Sequence[Sequence[int]], want_h: bool = False) -> dict[str, LayerStats]:
    """Input statistics of every linear layer of the blocks, from one forward pass per
    sequence of the model as it is (no quantization). {GGUF name: LayerStats}; layers that
    read the same input (q/k/v, gate/up) share one LayerStats object."""
    from .llama import KVCache

    stats: dict[str, LayerStats] = {}
    saved = []
    for i, blk in enumerate(model.blocks):
        for group in _SAME_INPUT:
            st = _new_stats(getattr(blk, group[0]).shape[1], want_h)
            seen: list = [None]
            for attr in group:
                lin = getattr(blk, attr)
                stats[f"blk.{i}.{_ATTR[attr]}.weight"] = st
                saved.append((blk, attr, lin))
                setattr(blk, attr, _Tap(lin, st, seen))
    try:
        for ids in sequences:
            model.forward(ids, KVCache(model.config, capacity=len(ids)), all_logits=False)
    finally:
        for blk, attr, lin in saved:
            setattr(blk, attr, lin)
    return stats


def layer_bits(model: Any, bits: float, type_offsets: Mapping[str, float] | None = None,
               block_size: int = 64, block_offsets: Mapping[int, float] | None = None) -> dict[str, float]:
    """Bits per layer (GGUF name -> bits) whose weight-weighted mean is ``bits``: each layer gets
    ``bits + type offset + block offset`` (``block_offsets``: block index -> offset, e.g. more
    bits for the first blocks), then every layer the same correction so the mean comes out right. No
    layer goes below the floor 1.7 + 8 / block_size (a little above the fixed cost of plane 1,
    codes + 8-bit block scales): those are held at the floor and the others pay."""
    offs = dict(type_offsets or {})
    unknown = set(offs) - set(_ATTR.values())
    if unknown:
        raise ValueError(f"unknown layer types {sorted(unknown)}; expected some of {list(_ATTR.values())}")
    floor = 1.7 + 8.0 / block_size
    sizes, want = {}, {}
    for i, blk in enumerate(model.blocks):
        for attr, suf in _ATTR.items():
            n, k = getattr(blk, attr).shape
            name = f"blk.{i}.{suf}.weight"
            sizes[name] = n * k
            want[name] = bits + offs.get(suf, 0.0) + float((block_offsets or {}).get(i, 0.0))
    total = sum(sizes.values())
    held: set[str] = set()
    for _ in range(len(want) + 1):
        free = [n for n in sizes if n not in held]
        spent = sum(sizes[n] * floor for n in held)
        corr = ((bits * total - spent) - sum(sizes[n] * want[n] for n in free)) / max(sum(sizes[n] for n in free), 1)
        low = [n for n in free if want[n] + corr < floor]
        if not low:
            break
        held.update(low)
    return {n: floor if n in held else want[n] + corr for n in sizes}


def default_layer_bits(model: Any, bits: float, block_size: int = 64,
                       type_offsets: Mapping[str, float] | None = None) -> dict[str, float]:
    """What ``--calibrate`` allocates: ``layer_bits`` with ``type_offsets`` (default
    DEFAULT_TYPE_OFFSETS) and DEFAULT_BLOCK_OFFSETS."""
    offs = DEFAULT_TYPE_OFFSETS if type_offsets is None else type_offsets
    return layer_bits(model, bits, offs, block_size, DEFAULT_BLOCK_OFFSETS)


def quantize_model(
    model: Any,
    sequences: Sequence[Sequence[int]],
    bits: float | Mapping[str, float] = 3.0,
    block_size: int = 64,
    method: str = "importance",
    sequential: bool = True,
    damp: float = 0.01,
    upstream: bool = False,
    on_layer: Callable[[str, PackedMatrix, float], None] | None = None,
    act_order: bool = DEFAULT_ACT_ORDER,
    refit: bool = DEFAULT_REFIT,
    stats: Mapping[str, LayerStats] | None = None,
    passes: int = DEFAULT_PASSES,
) -> tuple[dict[str, PackedMatrix], dict[str, np.ndarray]]:
    """Compresses every linear layer of ``model`` (a ``LlamaModel`` with dense weights) with
    statistics from ``sequences`` (token id lists). ``bits``: one budget for all layers or
    {GGUF name: bits} (``layer_bits``). ``method``: "importance" or "gptq". ``sequential``: take
    each layer's statistics from the partially compressed model (else from the original in one
    pass). ``upstream`` (sequential only): aim each layer at the ORIGINAL model's output
    W x from its compressed-model input x~, i.e. quantize W' = W + W (x - x~)^T x~ (x~^T x~ +
    damp)^-1 (ridge regression of the upstream error) instead of W. ``act_order``, ``refit``
    (gptq only): see ``gptq_quantize`` and ``refit_scales``; ``passes`` (gptq with refit):
    rounds of codes-then-scales (pass 2 on: GPTQ around the refitted scales). ``stats`` (one pass only): the
    ``collect_stats`` of ``sequences`` already collected (with H for gptq), to reuse them across
    budgets. The model is left as it was. Returns ({GGUF name: PackedMatrix}, {GGUF name: importance vector})."""
    from . import compress
    from .llama import KVCache, Linear

    if method not in ("importance", "gptq"):
        raise ValueError(f"method is {method!r}; expected 'importance' or 'gptq'")
    want_h = method == "gptq"
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    if not seqs or any(s.size == 0 for s in seqs):
        raise ValueError("calibration needs at least one non-empty token sequence")

    def budget(name: str) -> float:
        return float(bits[name]) if isinstance(bits, Mapping) else float(bits)

    def pack(name: str, w: np.ndarray, st: LayerStats) -> PackedMatrix:
        t0 = time.perf_counter()
        h = st.importance
        if method == "gptq":
            p = gptq_quantize(w, st.hessian, budget(name), block_size, damp=damp, act_order=act_order,
                              grid_headroom=DEFAULT_GRID_HEADROOM)
            for i in range(passes if refit else 1):
                if i:  # codes again around the refitted scales, then refit those
                    p = gptq_quantize(w, st.hessian, budget(name), block_size, damp=damp, act_order=act_order, fixed=p)
                if refit:
                    p = refit_scales(p, w, st.hessian, damp=damp)
        else:
            p = compress(w, bits=budget(name), block_size=block_size, importance=h if np.any(h > 0) else None)
        if on_layer is not None:
            on_layer(name, p, time.perf_counter() - t0)
        return p

    packed: dict[str, PackedMatrix] = {}
    importance: dict[str, np.ndarray] = {}
    if not sequential:
        if stats is None:
            stats = collect_stats(model, seqs, want_h)
        elif want_h and any(st.xtx is None for st in stats.values()):
            raise ValueError("method 'gptq' needs statistics collected with want_h=True")
        for name, st in stats.items():
            packed[name] = pack(name, _dense(model.weights[name]), st)
            importance[name] = st.importance
        return packed, importance

    cfg = model.config
    xs = [model.embed(s) for s in seqs]
    xo = list(xs) if upstream else None  # the original model's hidden states
    poss = [np.arange(s.size) for s in seqs]
    caches = [KVCache(cfg, capacity=s.size) for s in seqs]  # length stays 0: each run rewrites it
    originals = [{a: getattr(b, a) for a in _ATTR} for b in model.blocks]
    try:
        for li, blk in enumerate(model.blocks):
            for stage in _STAGES:
                got = _stage_inputs(model, li, xs, poss, caches, stage)
                ref = _stage_inputs(model, li, xo, poss, caches, stage, originals[li]) if xo is not None else None
                for a in stage:
                    name = f"blk.{li}.{_ATTR[a]}.weight"
                    st = _new_stats(got[a][0].shape[1], want_h)
                    for x in got[a]:
                        st.add(x)
                    w = _dense(model.weights[name])
                    if ref is not None:
                        w = _upstream_target(w, got[a], ref[a], damp)
                    packed[name] = pack(name, w, st)
                    importance[name] = st.importance
                    setattr(blk, a, Linear(packed[name]))
            xs = [model.block_step(li, x, pos, cache) for x, pos, cache in zip(xs, poss, caches)]
            if xo is not None:
                cur = {a: getattr(blk, a) for a in _ATTR}
                _set(blk, originals[li])
                try:
                    xo = [model.block_step(li, x, pos, cache) for x, pos, cache in zip(xo, poss, caches)]
                finally:
                    _set(blk, cur)
    finally:
        for blk, orig in zip(model.blocks, originals):
            _set(blk, orig)
    return packed, importance


def _set(blk: Any, lins: Mapping[str, Any]) -> None:
    for a, lin in lins.items():
        setattr(blk, a, lin)


def _upstream_target(w: np.ndarray, xq: list[np.ndarray], xo: list[np.ndarray], damp: float) -> np.ndarray:
    """W' = W + W D^T Xq (Xq^T Xq + damp * mean diag * I)^-1 with D = Xo - Xq: the weights whose
    outputs on the compressed inputs Xq best match (ridge) the original outputs W Xo."""
    a = np.concatenate(xq).astype(np.float64)
    d = np.concatenate(xo).astype(np.float64) - a
    g = a.T @ a
    g[np.diag_indices_from(g)] += damp * max(float(np.mean(np.diag(g))), 1e-30)
    c = d.T @ a  # (K, K)
    corr = np.linalg.solve(g, c.T).T  # c g^-1 (g symmetric)
    return (w.astype(np.float64) + w.astype(np.float64) @ corr).astype(np.float32)


class _StopBlock(Exception):
    pass


def _stage_inputs(model: Any, li: int, xs: list[np.ndarray], poss: list[np.ndarray], caches: list[Any],
                  stage: tuple[str, ...], lins: Mapping[str, Any] | None = None) -> dict[str, list[np.ndarray]]:
    """The inputs (one array per sequence) that the layers of ``stage`` of block ``li`` see when
    the block runs on ``xs`` (with its linears replaced by ``lins`` if given). Runs the block
    only as far as needed."""
    blk = model.blocks[li]
    saved = {a: getattr(blk, a) for a in _ATTR}
    seen: dict[str, list[np.ndarray]] = {a: [] for a in stage}
    later = [a for s in _STAGES[_STAGES.index(stage) + 1:] for a in s]

    def tap(a: str, lin: Any) -> Callable[[np.ndarray], np.ndarray]:
        def f(x: np.ndarray) -> np.ndarray:
            seen[a].append(np.asarray(x, dtype=np.float32))
            return lin(x)
        return f

    def stop(_x: np.ndarray) -> np.ndarray:
        raise _StopBlock

    base = dict(lins) if lins is not None else dict(saved)
    try:
        _set(blk, base)
        for a in stage:
            setattr(blk, a, tap(a, base[a]))
        if later:
            setattr(blk, later[0], stop)
        for x, pos, cache in zip(xs, poss, caches):
            try:
                model.block_step(li, x, pos, cache)
            except _StopBlock:
                pass
    finally:
        _set(blk, saved)
    return seen


def _dense(v: Any) -> np.ndarray:
    from .llama import _as_f32

    if isinstance(v, PackedMatrix):
        raise ValueError("quantize_model needs the dense (uncompressed) model")
    return _as_f32(v)


# --------------------------------------------------------------------------------- GPTQ

def gptq_quantize(w: np.ndarray, hessian: np.ndarray, bits: float, block_size: int = 64,
                  damp: float = 0.01, act_order: bool = False, fixed: PackedMatrix | None = None,
                  grid_headroom: float | None = None) -> PackedMatrix:
    """Compresses ``w`` (N, K) minimising ||(W - Q) X||^2 for inputs with second moment
    ``hessian`` (K, K) = X^T X / T, by error feedback across columns (GPTQ) inside the
    format: the options of every cell (planes, predators per row and block) come from an
    importance-weighted ``compress`` at ``bits``, so the size is that of ``compress``.
    ``act_order``: inside each block, round the columns in order of decreasing importance
    (H's diagonal), so the most important ones are rounded first and the later ones absorb
    their errors (blocks stay in order: the block scales are unaffected). ``fixed``: a
    previous encoding of ``w`` (e.g. after ``refit_scales``) whose options, block scales and
    predator positions are kept; only the codes and predator values are chosen again, with
    error feedback, around those scales. ``grid_headroom`` (no ``fixed``): fix each row's 8-bit
    scale grid up front, at the row scale of the importance-weighted encoding times this factor
    (room for the feedback to raise scales), and round every fitted block scale to it before
    the columns are rounded, so the codes are chosen for the stored scales; None: fit freely,
    and the final scales are rounded to a grid afterwards."""
    from . import _core, compress

    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    hs = np.array(hessian, dtype=np.float64)
    diag = np.diag(hs).copy()
    dead = diag <= 0
    hs[dead, dead] = 1.0
    h = np.diag(hs).astype(np.float32)
    first = fixed if fixed is not None else compress(w, bits=bits, block_size=block_size, importance=h)
    if first.shape != (n, k) or first.block_size != block_size:
        raise ValueError(f"fixed is {first.shape} with block_size {first.block_size}; expected {(n, k)} and {block_size}")
    parts = _core.to_parts(first)
    nb = parts["s1"].shape[1]
    p2 = parts["p2"]
    two_rows = np.repeat(p2, 5, axis=0)[:n]  # (N, nb)
    npred_all = np.isfinite(parts["pred"])
    hs[np.diag_indices(k)] += damp * float(np.mean(np.diag(hs)))
    perm = np.arange(k)
    if act_order:
        for c0 in range(0, k, block_size):
            c1 = min(k, c0 + block_size)
            perm[c0:c1] = c0 + np.argsort(-h[c0:c1], kind="stable")
        hs = hs[np.ix_(perm, perm)]
        h = h[perm]
        npred_all = npred_all[:, perm]
    try:
        u = np.linalg.cholesky(np.linalg.inv(hs)).T  # upper: Hinv = U^T U
    except np.linalg.LinAlgError:
        return first
    u = u.astype(np.float32)
    units = None
    if fixed is None and grid_headroom is not None:
        units = np.minimum(parts["row_scales"].astype(np.float64) * grid_headroom, 65504.0)
        units = units.astype(np.float16).astype(np.float32)
    W = w[:, perm].copy()
    t1 = np.zeros((n, k), np.int8)
    t2 = np.zeros((n, k), np.int8)
    s1 = np.zeros((n, nb), np.float32)
    s2 = np.zeros((n, nb), np.float32)
    pred = np.full((n, k), np.nan, np.float32)
    for b in range(nb):
        c0, c1 = b * block_size, min(k, (b + 1) * block_size)
        planes = np.where(two_rows[:, b], 2, 1).astype(np.uint8)
        npred = npred_all[:, c0:c1].sum(1).astype(np.uint8)
        wb, ub = np.ascontiguousarray(W[:, c0:c1]), np.ascontiguousarray(u[c0:c1, c0:c1])
        # (fit +) column-by-column rounding with in-block feedback, in Rust (rows in parallel)
        if fixed is None:
            s1[:, b], s2[:, b], t1[:, c0:c1], t2[:, c0:c1], pred[:, c0:c1], err = _core.gptq_block(
                wb, np.ascontiguousarray(h[c0:c1]), ub, planes, npred, units=units)
        else:
            s1[:, b], s2[:, b] = parts["s1"][:, b], np.where(two_rows[:, b], parts["s2"][:, b], 0)
            t1[:, c0:c1], t2[:, c0:c1], pred[:, c0:c1], err = _core.gptq_block_fixed(
                wb, ub, np.ascontiguousarray(s1[:, b]), np.ascontiguousarray(s2[:, b]),
                np.ascontiguousarray(npred_all[:, c0:c1]))
        if c1 < k:
            W[:, c1:] -= err @ u[c0:c1, c1:]
    s2[~two_rows] = 0
    if act_order:
        inv = np.argsort(perm)
        t1, t2, pred = (np.ascontiguousarray(a[:, inv]) for a in (t1, t2, pred))
    # fixed: the same scales, so the same row scales (8-bit grid); else the grid chosen above,
    # or (no headroom) one for the new fit
    keep = parts["row_scales"] if fixed is not None else units
    out = _core.from_parts(block_size, t1, s1, p2, t2, s2, pred, keep)
    return _keep_better_rows(out, first, w, hessian)


def _keep_better_rows(new: PackedMatrix, old: PackedMatrix, w: np.ndarray, hessian: np.ndarray) -> PackedMatrix:
    """``new`` with every row whose output error (w - q) H (w - q)^T exceeds ``old``'s replaced
    by ``old``'s row (codes, scales, predators and row scale; both must share the options:
    plane-2 cells and predator counts, so the size is unchanged). GPTQ's feedback can run away
    on a row, e.g. when the fixed scale grid clamps the scales it wants, and then end far worse
    than the encoding it started from; this guard makes a GPTQ row never worse than that one."""
    from . import _core, decompress

    h = np.asarray(hessian, dtype=np.float64)
    wd = np.asarray(w, dtype=np.float64)

    def row_err(p: PackedMatrix) -> np.ndarray:
        d = wd - decompress(p)
        return np.einsum("ij,ij->i", d @ h, d)

    worse = row_err(new) > row_err(old)
    if not worse.any():
        return new
    pn, po = _core.to_parts(new), _core.to_parts(old)
    for key in ("t1", "s1", "t2", "s2", "pred", "row_scales"):
        pn[key][worse] = po[key][worse]
    return _core.from_parts(new.block_size, pn["t1"], pn["s1"], pn["p2"], pn["t2"], pn["s2"], pn["pred"], pn["row_scales"])


def refit_scales(packed: PackedMatrix, w: np.ndarray, hessian: np.ndarray, damp: float = 0.01,
                 predators: bool = False) -> PackedMatrix:
    """The same codes and predators with every row's block scales re-solved jointly to
    minimise the output error (w - q) H (w - q)^T over the calibration inputs (H = X^T X / T,
    damped like GPTQ's), instead of each block's own weighted fit. Per row, the scales of all
    planes and blocks are the unknowns of one small least-squares problem: with T the codes
    placed in their columns, s = (T^T H T)^-1 T^T H (w - p). ``predators``: the row's predator
    values are unknowns of the same problem (columns e_c of T), instead of kept. A negative
    solution flips that block's codes (scales stay >= 0); the scales are then rounded to a new
    8-bit grid per row (``from_parts``), predator values to FP16. Size and layout are unchanged."""
    from . import _core

    w = np.asarray(w, dtype=np.float64)
    n, k = w.shape
    parts = _core.to_parts(packed)
    bs = packed.block_size
    nb = parts["s1"].shape[1]
    kp = nb * bs
    hs = np.zeros((kp, kp))
    hs[:k, :k] = hessian
    hs[np.diag_indices(k)] += damp * float(np.mean(np.diag(hs)[:k])) + 1e-12
    pred = parts["pred"]
    ispred = np.isfinite(pred)
    p = np.where(ispred, pred, 0.0)
    two = np.repeat(parts["p2"], 5, axis=0)[:n]  # (N, nb)
    codes = np.zeros((2, n, kp))
    codes[0, :, :k] = parts["t1"]
    codes[1, :, :k] = parts["t2"]
    codes[1] *= np.repeat(two, bs, axis=1)
    cb = codes.reshape(2, n, nb, bs)
    m = 2 * nb
    # predator unknowns: up to pm per row, padded with a dead slot (identity row, rhs 0)
    pm = int(ispred.sum(1).max()) if predators and ispred.any() else 0
    pcol = np.zeros((n, pm), np.int64)
    plive = np.zeros((n, pm), bool)
    if pm:
        rr, cc = np.nonzero(ispred)
        slot = np.arange(rr.size) - np.searchsorted(rr, rr)  # rank of each predator in its row
        pcol[rr, slot], plive[rr, slot] = cc, True
    rows = np.arange(n)[:, None]

    def per_unknown(v: np.ndarray) -> np.ndarray:
        """(N, Kp) -> (N, m): sum of v over each (plane, block) unknown's codes, t_u^T v."""
        return (codes * v[None]).reshape(2, n, nb, bs).sum(-1).transpose(1, 0, 2).reshape(n, m)

    gram = np.zeros((n, m + pm, m + pm))
    for pl in range(2):
        for b in range(nb):
            a = cb[pl, :, b, :] @ hs[b * bs:(b + 1) * bs, :]  # (N, Kp): t_u^T H for unknown u
            u = pl * nb + b
            gram[:, u, :m] = per_unknown(a)
            if pm:
                gram[:, u, m:] = np.where(plive, a[rows, pcol], 0.0)
                gram[:, m:, u] = gram[:, u, m:]
    target = np.zeros((n, kp))
    target[:, :k] = w if pm else w - p
    r = target @ hs
    rhs = np.zeros((n, m + pm))
    rhs[:, :m] = per_unknown(r)
    if pm:
        live2 = plive[:, :, None] & plive[:, None, :]
        gram[:, m:, m:] = np.where(live2, hs[pcol[:, :, None], pcol[:, None, :]], 0.0)
        rhs[:, m:] = np.where(plive, r[rows, pcol], 0.0)
    d = np.einsum("nii->ni", gram)
    empty = d <= 0
    idx = np.arange(m + pm)
    gram[:, idx, idx] += np.where(empty, 1.0, 1e-9 * d)
    rhs[empty] = 0.0
    sol = np.linalg.solve(gram, rhs[..., None])[..., 0]
    sol = np.clip(sol, -65504.0, 65504.0).astype(np.float32)
    s = sol[:, :m].reshape(n, 2, nb)
    if pm:
        pred = pred.copy()
        rr, ss = np.nonzero(plive)
        pred[rr, pcol[rr, ss]] = sol[:, m:][rr, ss]
    flip = np.repeat(np.where(s < 0, -1, 1).astype(np.int8), bs, axis=2)[:, :, :k]  # (N, 2, K)
    t1 = parts["t1"] * flip[:, 0]
    t2 = parts["t2"] * flip[:, 1]
    s1, s2 = np.abs(s[:, 0]), np.abs(s[:, 1]) * two
    return _core.from_parts(bs, t1, s1, parts["p2"], t2, s2, pred)


def read_text(path: str | Path | None) -> str | None:
    """The calibration text at ``path`` (None: the shipped default)."""
    return None if path is None else Path(path).read_text(encoding="utf-8")


def load_llama(src: str | Path) -> Any:
    """The dense ``LlamaModel`` of a LLaMA-family source for calibration: a GGUF file or a
    Hugging Face model directory (config.json + safetensors). Raises ValueError otherwise."""
    from .llama import LlamaModel

    p = Path(src)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return LlamaModel.from_gguf(p)
    if p.is_dir() and (p / "config.json").is_file():
        import json

        cfg = json.loads((p / "config.json").read_text())
        if cfg.get("quantization_config", {}).get("quant_method") == "predprey":
            raise ValueError(f"{p} is already compressed; calibration needs the original model")
        if "num_attention_heads" not in cfg:
            raise ValueError(f"{p}/config.json is not a LLaMA-family config; use --imatrix instead of --calibrate")
        return LlamaModel.from_checkpoint(p)
    raise ValueError(f"--calibrate runs the model, so SRC must be a LLaMA-family GGUF file or Hugging Face "
                     f"directory; {p} is neither (use --imatrix FILE for other models)")


def calibrate_source(src: str | Path, text: str | None = None, bits: float = 3.0, block_size: int = 64,
                     method: str = "gptq", type_offsets: Mapping[str, float] | None = None,
                     sequential: bool = DEFAULT_SEQUENTIAL, upstream: bool = DEFAULT_UPSTREAM,
                     on_layer: Callable[[str, PackedMatrix, float], None] | None = None,
                     ) -> tuple[dict[str, PackedMatrix], dict[str, np.ndarray], dict]:
    """Loads ``src`` (``load_llama``), calibrates on ``text`` (default: the shipped text) and
    compresses every linear layer (``quantize_model``; ``sequential``: in order, each layer from
    the already-compressed model's activations) with ``bits`` as the average over the layers
    (``layer_bits`` with ``type_offsets``, default DEFAULT_TYPE_OFFSETS). Returns (packed,
    importance, info for the checkpoint's config)."""
    model = load_llama(src)
    seqs = calibration_ids(model.tokenizer, text) if model.tokenizer is not None else None
    if seqs is None:
        raise ValueError(f"{src} has no tokenizer to encode the calibration text with")
    offs = DEFAULT_TYPE_OFFSETS if type_offsets is None else type_offsets
    budget = default_layer_bits(model, bits, block_size, offs)
    packed, imp = quantize_model(model, seqs, budget, block_size, method=method, sequential=sequential,
                                 upstream=upstream and sequential, on_layer=on_layer)
    info = {"calibration": {"method": method, "sequential": sequential, "upstream": upstream and sequential, "tokens": sum(len(s) for s in seqs),
                            "text": "default" if text is None else "user", "type_offsets": dict(offs),
                            "block_offsets": {str(i): v for i, v in DEFAULT_BLOCK_OFFSETS.items()},
                            "act_order": DEFAULT_ACT_ORDER if method == "gptq" else None,
                            "refit": DEFAULT_REFIT if method == "gptq" else None,
                            "grid_headroom": DEFAULT_GRID_HEADROOM if method == "gptq" else None}}
    return packed, imp, info
