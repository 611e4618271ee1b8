"""A small LLaMA-family runtime in numpy whose linear layers run on packed weights.

RMSNorm, grouped-query attention with rotary position embeddings and a KV cache, SwiGLU MLP.
Every linear layer is a ``Linear``: a dense float32 matrix (``x @ W.T`` in numpy, the
uncompressed reference), a ``PackedMatrix`` (``pp.matvec`` for one token, ``pp.matmul`` for a
prompt) or a GPU matrix from ``predprey_rs.gpu``.

Weights are keyed by llama.cpp (GGUF) names (``blk.0.attn_q.weight``); Hugging Face names are
mapped on load. RoPE: GGUF files store q/k rows permuted for llama.cpp's interleaved-pair
rotation (x[2i], x[2i+1]); Hugging Face checkpoints keep the half-split rotation
(x[i], x[i + d/2]). ``LlamaConfig.rope_interleaved`` says which one the weights need.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ._core import PackedMatrix

__all__ = ["GenerateResult", "KVCache", "Linear", "LlamaConfig", "LlamaModel", "LINEAR_SUFFIXES"]

# The linear layers of one block, by GGUF name suffix.
LINEAR_SUFFIXES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class LlamaConfig:
    """Shapes and constants of a LLaMA-family model."""

    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    head_dim: int = 0
    context_length: int = 4096
    rope_interleaved: bool = True  # True for GGUF-permuted q/k weights, False for HF layout

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} heads do not split into {self.n_kv_heads} KV heads")

    @classmethod
    def from_gguf_metadata(cls, md: Mapping[str, Any]) -> "LlamaConfig":
        arch = md.get("general.architecture", "llama")
        g = lambda k, d=None: md.get(f"{arch}.{k}", d)  # noqa: E731
        n_heads = int(g("attention.head_count"))
        hidden = int(g("embedding_length"))
        vocab = g("vocab_size") or len(md.get("tokenizer.ggml.tokens", []))
        return cls(hidden_size=hidden, n_layers=int(g("block_count")), n_heads=n_heads,
                   n_kv_heads=int(g("attention.head_count_kv", n_heads)),
                   intermediate_size=int(g("feed_forward_length")), vocab_size=int(vocab),
                   rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
                   rope_theta=float(g("rope.freq_base", 10000.0)),
                   head_dim=int(g("rope.dimension_count", hidden // n_heads)),
                   context_length=int(g("context_length", 4096)), rope_interleaved=True)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "LlamaConfig":
        n_heads = int(cfg["num_attention_heads"])
        return cls(hidden_size=int(cfg["hidden_size"]), n_layers=int(cfg["num_hidden_layers"]), n_heads=n_heads,
                   n_kv_heads=int(cfg.get("num_key_value_heads", n_heads)),
                   intermediate_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
                   rms_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=float(cfg.get("rope_theta", 10000.0)),
                   head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // n_heads),
                   context_length=int(cfg.get("max_position_embeddings", 4096)),
                   rope_interleaved=cfg.get("source_format") == "gguf")


class Linear:
    """y = x W^T for x of shape (T, K). ``w``: float32 ndarray (N, K), PackedMatrix, or a GPU
    matrix with ``matvec`` / ``matmul``. ``activations`` ("float32" or "int8") is passed to
    the kernels of a packed ``w`` (``LlamaModel.set_activations``); dense layers ignore it."""

    def __init__(self, w: Any, activations: str = "float32"):
        if isinstance(w, np.ndarray):
            w = np.ascontiguousarray(w, dtype=np.float32)
        self.w = w
        self.activations = activations

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    @property
    def packed(self) -> bool:
        return not isinstance(self.w, np.ndarray)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        w = self.w
        if isinstance(w, np.ndarray):
            return x @ w.T
        from . import matmul, matvec

        if x.shape[0] == 1:
            return matvec(w, x[0], activations=self.activations)[None, :]
        return matmul(w, x, activations=self.activations)


class KVCache:
    """Keys and values of every layer for the positions seen so far (float32)."""

    def __init__(self, cfg: LlamaConfig, capacity: int = 256):
        self.cfg = cfg
        self.length = 0
        shape = (cfg.n_layers, capacity, cfg.n_kv_heads, cfg.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)

    def _grow(self, need: int) -> None:
        cap = self.k.shape[1]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        pad = ((0, 0), (0, new - cap), (0, 0), (0, 0))
        self.k = np.pad(self.k, pad)
        self.v = np.pad(self.v, pad)

    def store(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Appends (T, kv_heads, head_dim) keys/values at the current length; returns all of
        this layer's keys and values so far. ``advance`` moves the length after the last layer."""
        t = k.shape[0]
        self._grow(self.length + t)
        self.k[layer, self.length: self.length + t] = k
        self.v[layer, self.length: self.length + t] = v
        end = self.length + t
        return self.k[layer, :end], self.v[layer, :end]

    def advance(self, t: int) -> None:
        self.length += t


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * w


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


@dataclass
class _Block:
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear


@dataclass
class GenerateResult:
    """Output of ``LlamaModel.generate``."""

    ids: list[int]  # the new tokens (stop token excluded)
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    stopped: bool  # ended on a stop token (else on max_new_tokens)
    text: str | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(len(self.ids) - 1, 0)  # the first new token comes out of the prefill
        return n / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")


@dataclass
class LlamaModel:
    """A LLaMA-family decoder. Build with ``from_gguf``, ``from_checkpoint`` or ``from_weights``."""

    config: LlamaConfig
    embedding: np.ndarray  # (vocab, hidden) float32
    blocks: list[_Block]
    output_norm: np.ndarray
    head: Linear
    tokenizer: Any = None
    weights: dict = field(default_factory=dict, repr=False)  # GGUF name -> array or PackedMatrix

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_weights(cls, config: LlamaConfig, weights: Mapping[str, Any], tokenizer: Any = None,
                     device: str = "cpu") -> "LlamaModel":
        """``weights``: {name: float array | PackedMatrix} under GGUF or Hugging Face names.
        ``device``: "cpu", or "gpu" to upload packed weights with ``predprey_rs.gpu``."""
        from .sources import gguf_name

        w: dict[str, Any] = {}
        for name, v in weights.items():
            g = name if name.startswith(("blk.", "token_embd", "output")) else gguf_name(name)
            if g is not None:
                w[g] = v
        upload = _uploader(device)

        def dense(name: str) -> np.ndarray:
            v = w.get(name)
            if v is None:
                raise KeyError(f"the model has no tensor {name!r}")
            if isinstance(v, PackedMatrix):
                from . import decompress

                return decompress(v)
            return _as_f32(v)

        def linear(name: str) -> Linear:
            v = w.get(name)
            if v is None:
                raise KeyError(f"the model has no tensor {name!r}")
            return Linear(upload(v) if isinstance(v, PackedMatrix) else _as_f32(v))

        blocks = []
        for i in range(config.n_layers):
            p = f"blk.{i}."
            blocks.append(_Block(
                attn_norm=dense(p + "attn_norm.weight"), ffn_norm=dense(p + "ffn_norm.weight"),
                q=linear(p + "attn_q.weight"), k=linear(p + "attn_k.weight"), v=linear(p + "attn_v.weight"),
                o=linear(p + "attn_output.weight"), gate=linear(p + "ffn_gate.weight"),
                up=linear(p + "ffn_up.weight"), down=linear(p + "ffn_down.weight")))
        emb = dense("token_embd.weight")
        head = linear("output.weight") if "output.weight" in w else Linear(emb)
        return cls(config, emb, blocks, dense("output_norm.weight"), head, tokenizer, w)

    @classmethod
    def from_gguf(cls, path: str | Path, device: str = "cpu") -> "LlamaModel":
        """Loads a LLaMA-family GGUF file, dequantizing every tensor to float32."""
        from ._bpe import BPETokenizer
        from .sources import GGUFSource

        with GGUFSource(Path(path)) as src:
            md = src.gguf_metadata
            cfg = LlamaConfig.from_gguf_metadata(md)
            weights = {t.name: src.read_float32(t.name) for t in src.tensors}
        return cls.from_weights(cfg, weights, BPETokenizer.from_gguf_metadata(md), device=device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> "LlamaModel":
        """Loads a checkpoint directory written by ``compress_checkpoint`` (or a plain Hugging
        Face LLaMA safetensors directory); packed weights stay packed."""
        from .io import load_checkpoint

        root = Path(path)
        cfg_json = json.loads((root / "config.json").read_text())
        cfg = LlamaConfig.from_hf_config(cfg_json)
        tok = None
        md_path = root / "gguf_metadata.json"
        if md_path.is_file():
            from ._bpe import BPETokenizer

            tok = BPETokenizer.from_gguf_metadata(json.loads(md_path.read_text()))
        elif (root / "tokenizer.json").is_file():
            tok = _HFTokenizer.load(root)
        weights = load_checkpoint(root)
        return cls.from_weights(cfg, weights, tok, device=device)

    def compressed(self, bits: float = 3.0, block_size: int = 64, importance: Mapping[str, np.ndarray] | None = None,
                   on_layer: Callable[[str, PackedMatrix, float], None] | None = None,
                   device: str = "cpu") -> "LlamaModel":
        """A copy with every linear layer of every block packed by ``pp.compress`` (embedding,
        norms and the output head stay as they are). ``on_layer(name, packed, seconds)`` is
        called after each layer."""
        from . import compress

        new = {}
        for name, v in self.weights.items():
            if any(name.endswith(f".{s}.weight") for s in LINEAR_SUFFIXES) and isinstance(v, np.ndarray):
                t0 = time.perf_counter()
                h = importance.get(name) if importance else None
                p = compress(v, bits=bits, block_size=block_size, importance=h)
                if on_layer is not None:
                    on_layer(name, p, time.perf_counter() - t0)
                new[name] = p
            else:
                new[name] = v
        return LlamaModel.from_weights(self.config, new, self.tokenizer, device=device)

    def set_activations(self, activations: str) -> "LlamaModel":
        """How the packed linear layers take their inputs: "float32" (exact; the default, and
        what docs/fidelity.md measured) or "int8" (quantized per 32 values, the kernels' fast
        path: ~0.5 % error per product, docs/kernels.md; SmolLM2-135M decodes ~1.5x faster on
        2 cores, `predprey demo`: 50 against 32-35 tokens/s).
        Dense layers are unaffected. Returns the model."""
        from . import _activations_flag

        _activations_flag(activations)  # ValueError for anything else
        for b in self.blocks:
            for lin in (b.q, b.k, b.v, b.o, b.gate, b.up, b.down):
                lin.activations = activations
        self.head.activations = activations
        return self

    def linear_layers(self) -> dict[str, Any]:
        """{GGUF name: weight} of the linear layers of the blocks."""
        return {n: v for n, v in self.weights.items() if any(n.endswith(f".{s}.weight") for s in LINEAR_SUFFIXES)}

    # ---------------------------------------------------------------- forward

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Rotates (T, heads, head_dim) by the positions ``pos`` (T,)."""
        cfg = self.config
        d = cfg.head_dim
        inv = cfg.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        cos = np.cos(ang).astype(np.float32)[:, None, :]
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        if cfg.rope_interleaved:
            a, b = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2] = a * cos - b * sin
            out[..., 1::2] = a * sin + b * cos
        else:
            h = d // 2
            a, b = x[..., :h], x[..., h:]
            out = np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
        return out

    def forward(self, tokens: Iterable[int], cache: KVCache | None = None, all_logits: bool = False) -> np.ndarray:
        """Logits (T, vocab) of every position if ``all_logits`` else (vocab,) of the last.
        With a cache, the tokens continue what the cache holds and are appended to it."""
        cfg = self.config
        ids = np.asarray(list(tokens), dtype=np.int64)
        t = ids.shape[0]
        if cache is None:
            cache = KVCache(cfg, capacity=t)
        pos = np.arange(cache.length, cache.length + t)
        x = self.embed(ids)
        for li in range(len(self.blocks)):
            x = self.block_step(li, x, pos, cache)
        cache.advance(t)
        if not all_logits:
            x = x[-1:]
        logits = self.head(_rms_norm(x, self.output_norm, cfg.rms_eps))
        return logits if all_logits else logits[0]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """The hidden states (T, hidden) that enter block 0."""
        return self.embedding[np.asarray(ids, dtype=np.int64)].astype(np.float32)

    def block_step(self, li: int, x: np.ndarray, pos: np.ndarray, cache: KVCache) -> np.ndarray:
        """Block ``li`` applied to hidden states ``x`` (T, hidden) at positions ``pos`` (T,);
        stores this block's keys and values in ``cache`` (``forward`` advances it after the
        last block). Calibration runs the blocks one at a time through this."""
        cfg = self.config
        blk = self.blocks[li]
        t = x.shape[0]
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        rep = nh // nkv
        scale = np.float32(1.0 / np.sqrt(hd))
        # causal mask: query i (position pos[i]) sees keys 0..pos[i]
        mask = np.arange(cache.length + t)[None, :] > pos[:, None]  # (T, S)
        h = _rms_norm(x, blk.attn_norm, cfg.rms_eps)
        q = self._rope(blk.q(h).reshape(t, nh, hd), pos)
        k = self._rope(blk.k(h).reshape(t, nkv, hd), pos)
        v = blk.v(h).reshape(t, nkv, hd)
        ks, vs = cache.store(li, k, v)  # (S, nkv, hd)
        qg = q.reshape(t, nkv, rep, hd).transpose(1, 2, 0, 3).reshape(nkv, rep * t, hd)
        s = qg @ ks.transpose(1, 2, 0) * scale  # (nkv, rep*T, S)
        s = s.reshape(nkv, rep, t, -1)
        s[:, :, mask] = -np.inf
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        o = s.reshape(nkv, rep * t, -1) @ vs.transpose(1, 0, 2)  # (nkv, rep*T, hd)
        o = o.reshape(nkv, rep, t, hd).transpose(2, 0, 1, 3).reshape(t, nh * hd)
        x = x + blk.o(o)
        h = _rms_norm(x, blk.ffn_norm, cfg.rms_eps)
        return x + blk.down(_silu(blk.gate(h)) * blk.up(h))

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 64, stop_ids: Iterable[int] = (),
                 on_token: Callable[[int], None] | None = None) -> GenerateResult:
        """Greedy decoding with a KV cache: the prompt in one pass (``matmul``), then one token
        at a time (``matvec``)."""
        stop = set(stop_ids)
        cache = KVCache(self.config, capacity=len(prompt_ids) + max_new_tokens)
        t0 = time.perf_counter()
        logits = self.forward(prompt_ids, cache)
        t1 = time.perf_counter()
        out: list[int] = []
        stopped = False
        for i in range(max_new_tokens):
            nxt = int(np.argmax(logits))
            if nxt in stop:
                stopped = True
                break
            out.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if i + 1 == max_new_tokens:
                break
            logits = self.forward([nxt], cache)
        t2 = time.perf_counter()
        text = self.tokenizer.decode(out) if self.tokenizer is not None else None
        return GenerateResult(out, len(prompt_ids), t1 - t0, t2 - t1, stopped, text)

    def chat(self, prompt: str, max_new_tokens: int = 64, system: str | None = None) -> GenerateResult:
        """Greedy answer to one user message, through the model's chat template."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer")
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True))
        return self.generate(ids, max_new_tokens, self.tokenizer.stop_ids())


def _as_f32(v: Any) -> np.ndarray:
    from .sources import _bf16_bits_to_f32

    a = np.asarray(v)
    if a.dtype == np.uint16:  # bfloat16 bits, as load_checkpoint returns them
        return _bf16_bits_to_f32(a)
    return np.ascontiguousarray(a, dtype=np.float32)


def _uploader(device: str) -> Callable[[PackedMatrix], Any]:
    if device == "cpu":
        return lambda p: p
    if device != "gpu":
        raise ValueError(f"device is {device!r}; expected 'cpu' or 'gpu'")
    from . import gpu

    up = getattr(gpu, "upload", None)
    if up is None:
        raise RuntimeError("predprey_rs.gpu has no `upload`; the GPU runtime is not available in this build")
    return up


class _HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package (optional)."""

    def __init__(self, tok: Any, cfg: dict):
        self.tok = tok
        self.chat_template = cfg.get("chat_template")
        self.eos = cfg.get("eos_token")

    @classmethod
    def load(cls, root: Path) -> "_HFTokenizer":
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("this checkpoint's tokenizer.json needs the `tokenizers` package: pip install tokenizers") from e
        cfg_path = root / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        return cls(Tokenizer.from_file(str(root / "tokenizer.json")), cfg)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2

        if not self.chat_template:
            raise RuntimeError("tokenizer_config.json has no chat_template")
        return jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt)

    def stop_ids(self) -> set[int]:
        ids = set()
        for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", self.eos if isinstance(self.eos, str) else None):
            if t is not None and self.tok.token_to_id(t) is not None:
                ids.add(self.tok.token_to_id(t))
        return ids
