"""Writes calibration text sampled from a LLaMA-family model itself (default: the demo's
SmolLM2-135M-Instruct), for ``--calibrate``: python/predprey_rs/data/calibration_sampled.txt.

Why: GPTQ-style error feedback needs the second moment H = X^T X of every layer's inputs with
full rank and little noise; the hand-written calibration text has ~850 tokens. Text the model
writes itself follows the model's own distribution (a form of self-distillation) and is ours to
ship. Half the samples continue an opening sentence of our own (prose, science, code, lists,
dialogue); half are chat answers through the model's template to prompts of our own, because
that is how an instruct model is used.

Decoding runs many sequences at once (one matrix product per layer per step for the whole
batch), so ~20 K tokens take minutes, not hours, in numpy. Sampling: temperature 0.8, top-k 40,
fixed seed, so the file is reproducible for a given model.

    python bench/gen_calibration.py [--tokens-per-sample 200] [--out FILE]

The evaluation text (bench/data/heldout.txt) is never read to choose anything here; the script
only checks, at the end, that no 8-word run of it appears in the output.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

OPENINGS = [
    "The history of the printing press begins",
    "In mathematics, a prime number is",
    "def merge_sort(items):\n    ",
    "Dear Sam,\n\nThank you for your letter about",
    "The recipe calls for two cups of flour,",
    "Photosynthesis in desert plants works differently because",
    "Q: How do I reverse a linked list in C?\nA:",
    "The committee met on Tuesday to discuss the budget for",
    "Chapter 3\n\nThe rain had not stopped for three days when",
    "import numpy as np\n\n# Compute the moving average of a signal\n",
    "The human heart has four chambers:",
    "Step 1: Preheat the oven to 180 degrees.",
    "The stock market fell sharply on Monday after",
    "In 1905, Albert Einstein published",
    "Honeybees communicate the location of flowers by",
    "SELECT name, COUNT(*) FROM orders",
    "The rules of chess are simple to learn:",
    "A good night's sleep is important because",
    "The spacecraft entered orbit around Jupiter",
    "Once upon a time, in a village by the sea,",
    "To install the package, run the following command:",
    "The French Revolution began in 1789 when",
    "Machine learning models learn patterns from data by",
    "The temperature in the Arctic has risen",
    "Here are five tips for learning a new language:",
    "The court ruled that the contract was",
    "Our quarterly report shows that revenue grew",
    "The city of Kyoto is famous for",
    "Water boils at 100 degrees Celsius at sea level, but",
    "function debounce(fn, delay) {\n  ",
    "The Roman Empire reached its greatest extent under",
    "Dogs were domesticated from wolves",
    "The theory of evolution by natural selection explains",
    "Meeting notes, March 14:\n- ",
    "The novel follows a young woman who",
    "Solar panels convert sunlight into electricity using",
    "The derivative of a function measures",
    "Customer: Hi, I ordered a lamp last week and",
    "The Amazon rainforest covers",
    "The quick brown fox jumps over the lazy dog. This sentence",
]

CHAT_PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short poem about autumn leaves.",
    "What are the main causes of inflation?",
    "Give me three ideas for a birthday party for a ten-year-old.",
    "How do I read a CSV file in Python?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "What is the difference between weather and climate?",
    "Write an email asking my manager for a day off next Friday.",
    "Explain recursion to a beginner programmer.",
    "What should I pack for a weekend hiking trip?",
    "Why is the sky blue?",
    "Translate 'good morning, how are you?' into Spanish and French.",
    "What are some healthy breakfast options?",
    "Describe the water cycle.",
    "How does a bill become a law in the United States?",
    "Write a JavaScript function that checks if a string is a palindrome.",
    "What is the Pythagorean theorem? Give an example.",
    "Tell me a fun fact about octopuses.",
    "How can I improve my public speaking skills?",
    "What is the capital of Australia, and why was it chosen?",
    "Explain what a neural network is in simple terms.",
    "List the planets of the solar system in order.",
    "What are the benefits of regular exercise?",
    "Write a short story about a robot who learns to paint.",
    "How do vaccines work?",
    "What is the difference between a list and a tuple in Python?",
    "Give me a simple recipe for tomato soup.",
    "Explain supply and demand with an example.",
    "How do airplanes stay in the air?",
    "What happened during the Apollo 11 mission?",
    "Write a haiku about the ocean.",
    "How do I calculate compound interest?",
    "What are black holes?",
    "Suggest a name for a coffee shop and explain it.",
    "Explain the difference between TCP and UDP.",
    "What are good habits for managing money?",
    "Write a SQL query that finds the top five customers by total spending.",
    "Why do we have seasons on Earth?",
    "How do I make my houseplants healthier?",
    "What is photosynthesis?",
]


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int) -> np.ndarray:
    """One token per row of ``logits`` (B, vocab): top-k, then softmax at ``temperature``."""
    idx = np.argpartition(-logits, top_k, axis=1)[:, :top_k]
    top = np.take_along_axis(logits, idx, axis=1).astype(np.float64) / temperature
    top -= top.max(axis=1, keepdims=True)
    p = np.exp(top)
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    pick = (np.cumsum(p, axis=1) < u).sum(axis=1).clip(0, top_k - 1)
    return idx[np.arange(idx.shape[0]), pick]


def batched_decode(model, prompts: list[list[int]], new_tokens: int, rng: np.random.Generator,
                   temperature: float = 0.8, top_k: int = 40, stop: set[int] = frozenset()) -> list[list[int]]:
    """Samples ``new_tokens`` after each prompt, all sequences in one batch: each prompt is
    prefilled on its own (its own KV cache), then every step runs the B new tokens through each
    block together (linear layers as one (B, K) product) with attention per sequence."""
    from predprey_rs.llama import KVCache, _rms_norm, _silu

    cfg = model.config
    b = len(prompts)
    caches = [KVCache(cfg, capacity=len(p) + new_tokens) for p in prompts]
    last = np.stack([model.forward(p, c) for p, c in zip(prompts, caches)])  # (B, vocab)
    out: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    rep = nh // nkv
    scale = np.float32(1.0 / np.sqrt(hd))
    for step in range(new_tokens):
        tok = sample(last, rng, temperature, top_k)
        for i, t in enumerate(tok):
            if not done[i]:
                if int(t) in stop:
                    done[i] = True
                else:
                    out[i].append(int(t))
        if done.all() or step + 1 == new_tokens:
            break
        x = model.embed(tok)  # (B, D)
        pos = np.array([c.length for c in caches])
        for li, blk in enumerate(model.blocks):
            h = _rms_norm(x, blk.attn_norm, cfg.rms_eps)
            q = model._rope(blk.q(h).reshape(b, nh, hd), pos)  # one position per row (sequence)
            k = model._rope(blk.k(h).reshape(b, nkv, hd), pos)
            v = blk.v(h).reshape(b, nkv, hd)
            o = np.empty((b, nh * hd), np.float32)
            for i, c in enumerate(caches):
                ks, vs = c.store(li, k[i:i + 1], v[i:i + 1])  # (S, nkv, hd)
                qg = q[i].reshape(nkv, rep, hd)
                s = np.einsum("grd,sgd->grs", qg, ks) * scale
                s -= s.max(axis=-1, keepdims=True)
                np.exp(s, out=s)
                s /= s.sum(axis=-1, keepdims=True)
                o[i] = np.einsum("grs,sgd->grd", s, vs).reshape(-1)
            x = x + blk.o(o)
            h = _rms_norm(x, blk.ffn_norm, cfg.rms_eps)
            x = x + blk.down(_silu(blk.gate(h)) * blk.up(h))
        for c in caches:
            c.advance(1)
        last = model.head(_rms_norm(x, model.output_norm, cfg.rms_eps))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="GGUF or HF directory (default: the demo's SmolLM2)")
    ap.add_argument("--tokens-per-sample", type=int, default=200)
    ap.add_argument("--samples-per-prompt", type=int, default=2)
    ap.add_argument("--seed", type=int, default=20261127)
    ap.add_argument("--out", default=str(ROOT / "python/predprey_rs/data/calibration_sampled.txt"))
    args = ap.parse_args()

    from predprey_rs import calibrate
    from predprey_rs._demo import default_model

    model = calibrate.load_llama(Path(args.model) if args.model else default_model())
    tok = model.tokenizer
    rng = np.random.default_rng(args.seed)
    jobs: list[tuple[str, list[int], bool]] = []
    for _ in range(args.samples_per_prompt):
        for o in OPENINGS:
            jobs.append((o, tok.encode(o), False))
        for c in CHAT_PROMPTS:
            chat = tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
            jobs.append((c, tok.encode(chat), True))
    t0 = time.perf_counter()
    texts: list[str] = []
    batch = 40
    total = 0
    for s in range(0, len(jobs), batch):
        part = jobs[s:s + batch]
        gen = batched_decode(model, [j[1] for j in part], args.tokens_per_sample, rng, stop=tok.stop_ids())
        for (prompt, _, is_chat), g in zip(part, gen):
            body = tok.decode(g).strip()
            texts.append(f"{prompt}\n\n{body}" if is_chat else prompt + tok.decode(g))
            total += len(g)
        print(f"{min(s + batch, len(jobs))}/{len(jobs)} samples, {total} tokens, {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    text = "\n\n".join(t.strip() for t in texts) + "\n"
    held = (ROOT / "bench/data/heldout.txt").read_text(encoding="utf-8")
    words = re.findall(r"\w+", held.lower())
    grams = {" ".join(words[i:i + 8]) for i in range(len(words) - 7)}
    mine = re.findall(r"\w+", text.lower())
    shared = [" ".join(mine[i:i + 8]) for i in range(len(mine) - 7) if " ".join(mine[i:i + 8]) in grams]
    if shared:
        print(f"refusing to write: {len(shared)} 8-word runs shared with the held-out text, e.g. {shared[0]!r}",
              file=sys.stderr)
        return 1
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text)} chars, {len(tok.encode(text))} tokens (re-encoded), "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
