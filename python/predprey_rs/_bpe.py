"""A small byte-level BPE tokenizer (GPT-2 style) built from GGUF tokenizer metadata
(``tokenizer.ggml.tokens`` / ``merges`` / ``token_type``), enough for the LLaMA runtime's prompts
without the ``tokenizers`` package. Pre-tokenization follows llama.cpp's regexes for the
``gpt2`` family (with digits split one by one for ``smollm``, ``starcoder``, ... models)."""

from __future__ import annotations

import re
from functools import lru_cache

try:  # `regex` knows \p{L} / \p{N}; plain `re` gets a close equivalent below
    import regex as _regex
except ImportError:  # pragma: no cover - depends on the environment
    _regex = None

# llama.cpp's token types
_CONTROL, _USER_DEFINED = 3, 4
# Pre-tokenizer families whose digits are split one at a time before the GPT-2 regex.
_DIGITS_FIRST = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}

if _regex is not None:
    _GPT2 = _regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    _DIGIT = _regex.compile(r"\p{N}")
else:
    _L, _N = r"[^\W\d_]", r"\d"
    _GPT2 = re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?{_L}+| ?{_N}+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")
    _DIGIT = re.compile(r"\d")


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class BPETokenizer:
    """encode(text) -> ids, decode(ids) -> text. Special (control / user-defined) tokens written
    in the text, like ``<|im_start|>``, become their own ids."""

    def __init__(self, tokens: list[str], merges: list[str], token_types: list[int] | None = None,
                 pre: str = "gpt2", bos_id: int | None = None, eos_id: int | None = None,
                 chat_template: str | None = None):
        self.tokens = list(tokens)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {}
        for i, m in enumerate(merges):
            a, _, b = m.partition(" ")
            self.ranks[(a, b)] = i
        types = token_types or [1] * len(tokens)
        self.special = {t: i for i, (t, ty) in enumerate(zip(self.tokens, types)) if ty in (_CONTROL, _USER_DEFINED)}
        self._special_ids = {i for i, ty in enumerate(types) if ty == _CONTROL}
        self._special_re = (
            re.compile("(" + "|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True)) + ")")
            if self.special else None
        )
        self.digits_first = pre in _DIGITS_FIRST
        self.bos_id, self.eos_id = bos_id, eos_id
        self.chat_template = chat_template
        self._b2u = _bytes_to_unicode()
        self._u2b = {c: b for b, c in self._b2u.items()}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_gguf_metadata(cls, md: dict) -> "BPETokenizer":
        model = md.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"tokenizer.ggml.model is {model!r}; this tokenizer handles byte-level BPE ('gpt2') only")
        return cls(md["tokenizer.ggml.tokens"], md.get("tokenizer.ggml.merges", []), md.get("tokenizer.ggml.token_type"),
                   pre=md.get("tokenizer.ggml.pre", "gpt2"), bos_id=md.get("tokenizer.ggml.bos_token_id"),
                   eos_id=md.get("tokenizer.ggml.eos_token_id"), chat_template=md.get("tokenizer.chat_template"))

    def _bpe(self, word: str) -> list[int]:
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        parts = list(word)
        while len(parts) > 1:
            best, best_i = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            parts[best_i: best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        ids = []
        for p in parts:
            i = self.vocab.get(p)
            if i is None:  # not in the vocabulary: fall back to its single bytes
                ids.extend(self.vocab[c] for c in p if c in self.vocab)
            else:
                ids.append(i)
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def _pieces(self, text: str) -> list[str]:
        chunks = [text]
        if self.digits_first:
            chunks = []
            pos = 0
            for m in _DIGIT.finditer(text):
                if m.start() > pos:
                    chunks.append(text[pos: m.start()])
                chunks.append(m.group())
                pos = m.end()
            if pos < len(text):
                chunks.append(text[pos:])
        out = []
        for c in chunks:
            out.extend(_GPT2.findall(c))
        return out

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        segments = self._special_re.split(text) if self._special_re else [text]
        for seg in segments:
            if not seg:
                continue
            if seg in self.special:
                ids.append(self.special[seg])
                continue
            for piece in self._pieces(seg):
                ids.extend(self._bpe("".join(self._b2u[b] for b in piece.encode("utf-8"))))
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        out = bytearray()
        for i in ids:
            if skip_special and i in self._special_ids:
                continue
            t = self.tokens[i]
            if i in self._special_ids or t in self.special:
                out += t.encode("utf-8")
            else:
                out += bytes(self._u2b.get(c, 63) for c in t)
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a chat, from the model's own template (jinja2 when installed;
        otherwise the ChatML layout, which is what ``<|im_start|>`` templates render)."""
        tpl = self.chat_template
        if tpl:
            try:
                import jinja2

                env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
                return env.from_string(tpl).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   bos_token=self.tokens[self.bos_id] if self.bos_id is not None else "",
                                                   eos_token=self.tokens[self.eos_id] if self.eos_id is not None else "")
            except ImportError:
                pass
        if tpl is None or "<|im_start|>" in tpl:
            s = ""
            default_system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", tpl or "", re.DOTALL)
            if default_system and messages and messages[0]["role"] != "system":
                s += f"<|im_start|>system\n{default_system.group(1)}<|im_end|>\n"
            for m in messages:
                s += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
            if add_generation_prompt:
                s += "<|im_start|>assistant\n"
            return s
        raise RuntimeError("rendering this model's chat template needs jinja2: pip install jinja2")

    def stop_ids(self) -> set[int]:
        """Ids that end a reply: end-of-sequence and the chat end markers the vocabulary has."""
        ids = {self.vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<|end|>") if t in self.vocab}
        if self.eos_id is not None and self.tokens[self.eos_id] not in ("<|im_start|>",):
            ids.add(self.eos_id)
        return ids
