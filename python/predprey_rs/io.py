"""Whole checkpoints: stream a model's tensors through ``compress`` into a packed checkpoint
directory, read one back, and describe one. The layout is in FORMAT.md, section "Checkpoints".

A packed checkpoint is a directory shaped like a Hugging Face checkpoint::

    config.json                       the source's, plus "quantization_config"
    model.safetensors                 or model-0000i-of-0000n.safetensors + the index below
    model.safetensors.index.json      only when there are several shards
    tokenizer.json, ...               copied through from the source directory
    gguf_metadata.json                GGUF sources only: every key/value of the source

Every packed weight ``W`` named ``<name>`` is stored as the ten arrays of FORMAT.md under
``<name>.codes``, ``<name>.scales``, ... ``<name>.out_vals``; every other tensor is stored
unchanged under its own name.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import time
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from . import _core
from ._core import FORMAT_VERSION, FormatError, PackedMatrix
from .sources import (
    SAFETENSORS_DTYPES,
    Source,
    TensorInfo,
    importance_for,
    open_source,
    read_imatrix,
    read_safetensors_header,
    safetensors_dtype_of,
    safetensors_files,
)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "PACKED_SUFFIXES",
    "compress_checkpoint",
    "inspect_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "select_tensor",
]

# The suffixes of a packed weight's arrays, in file order (FORMAT.md "The arrays").
PACKED_SUFFIXES: tuple[str, ...] = tuple(_core.TENSOR_NAMES)
# A new shard starts when the current one would grow past this many bytes.
DEFAULT_MAX_SHARD_BYTES = 4 << 30
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_NP_TO_ST = {"uint8": "U8", "uint16": "U16", "uint32": "U32", "float16": "F16"}
# Matrices with more weights than this get their error estimated from 8 random probe vectors
# (relative output error, unbiased for the Frobenius error) instead of a dense decompression,
# which would need another float32 copy of the matrix.
_EXACT_ERROR_MAX = 1 << 24

# ---------------------------------------------------------------------------------------------
# Which tensors are packed

_EMBEDDING_PARTS = ("wte", "wpe", "token_embd", "tok_embeddings")
_HEAD_NAMES = ("lm_head.weight", "output.weight", "embed_out.weight")


def _is_embedding(name: str) -> bool:
    return any("embed" in part or part in _EMBEDDING_PARTS for part in name.split(".")[:-1])


def _is_head(name: str) -> bool:
    return name in _HEAD_NAMES or name.startswith("lm_head.")


def select_tensor(info: TensorInfo, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> tuple[bool, str]:
    """Whether a tensor is packed, and why: (pack, reason).

    Packed: 2-D float tensors that are linear-layer weights (name ends in ``.weight``, not an
    embedding, not the output head), plus any 2-D float tensor matching an ``include`` glob;
    minus any matching an ``exclude`` glob (exclude wins). Globs match the whole name
    (``fnmatch``; ``*`` crosses dots).
    """
    name = info.name
    if len(info.shape) != 2 or not info.is_float:
        return False, "not a 2-D float weight"
    if min(info.shape) < 1:
        return False, "empty"
    if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
        return False, "excluded"
    if any(fnmatch.fnmatchcase(name, pat) for pat in include):
        return True, "included"
    if not (name.endswith(".weight") or name == "weight"):
        return False, "not a .weight"
    if _is_embedding(name):
        return False, "embedding (opt in with --include)"
    if _is_head(name):
        return False, "output head (opt in with --include)"
    return True, "linear"


# ---------------------------------------------------------------------------------------------
# Writing


class _ShardWriter:
    """Writes tensors into safetensors shards inside ``tmpdir`` one at a time: each shard's body
    goes to a scratch file, and the header is put in front of it when the shard is closed, so
    nothing is held in memory beyond the tensor being written."""

    def __init__(self, tmpdir: Path, max_shard_bytes: int):
        self.dir = tmpdir
        self.max = max(1, int(max_shard_bytes))
        self.shards: list[tuple[Path, list[str]]] = []  # closed: (file, tensor names)
        self._body = None
        self._header: dict[str, Any] = {}
        self._packed: dict[str, dict] = {}
        self._pos = 0
        self.total_bytes = 0

    def _open(self, need: int) -> None:
        if self._body is not None and self._pos > 0 and self._pos + need > self.max:
            self._close()
        if self._body is None:
            i = len(self.shards) + 1
            self._body_path = self.dir / f".shard-{i:05d}.body"
            self._body = open(self._body_path, "wb", buffering=8 << 20)
            self._header, self._packed, self._pos = {}, {}, 0

    def _entry(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        if name in self._header or any(name in names for _, names in self.shards):
            raise FormatError(f"tensor name {name!r} would be written twice (a source tensor clashes with a packed array name)")
        self._header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [self._pos, self._pos + nbytes]}
        self._pos += nbytes
        self.total_bytes += nbytes

    def add_array(self, name: str, a: np.ndarray, dtype: str | None = None) -> int:
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":  # safetensors is little-endian
            a = a.astype(a.dtype.newbyteorder("<"))
        self._open(a.nbytes)
        self._body.write(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
        self._entry(name, dtype or safetensors_dtype_of(a), a.shape, a.nbytes)
        return a.nbytes

    def add_packed(self, name: str, p: PackedMatrix, info: dict) -> int:
        arrays = p.arrays()
        need = sum(a.nbytes for a in arrays.values())
        self._open(need)  # a packed weight never straddles two shards
        meta = p.metadata()
        for s in PACKED_SUFFIXES:
            a = arrays[s]
            self._body.write(memoryview(np.ascontiguousarray(a).reshape(-1)).cast("B") if a.size else b"")
            self._entry(f"{name}.{s}", _NP_TO_ST[a.dtype.name], a.shape, a.nbytes)
        self._packed[name] = {"rows": int(meta["rows"]), "cols": int(meta["cols"]), "block_size": int(meta["block_size"]), **info}
        return need

    def add_passthrough(self, name: str, src: Source, expected_bytes: int) -> int:
        self._open(expected_bytes)
        start = self._body.tell()
        dtype, shape, nbytes = src.write_passthrough(name, self._body)
        if self._body.tell() - start != nbytes:  # pragma: no cover - a reader bug, not user input
            raise FormatError(f"{name}: wrote {self._body.tell() - start} bytes, expected {nbytes}")
        self._entry(name, dtype, shape, nbytes)
        return nbytes

    def _close(self) -> None:
        self._body.close()
        i = len(self.shards) + 1
        header = dict(self._header)
        header["__metadata__"] = {
            "format": "predprey",
            "format_version": str(FORMAT_VERSION),
            "packed": json.dumps(self._packed, sort_keys=True),
        }
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * ((-len(hb)) % 8)  # the body starts 8-byte aligned, as safetensors writes it
        part = self.dir / f".shard-{i:05d}.safetensors"
        with open(part, "wb") as out, open(self._body_path, "rb") as body:
            out.write(len(hb).to_bytes(8, "little"))
            out.write(hb)
            out.flush()
            _copy_file(body, out, self._pos)
        os.unlink(self._body_path)
        self.shards.append((part, list(self._header)))
        self._body = None

    def finish(self) -> dict[str, str]:
        """Closes the last shard, gives the shards their final names, writes the index when
        there are several; returns the weight map {tensor name: file name}."""
        if self._body is not None or not self.shards:
            if self._body is None:
                self._open(0)
            self._close()
        n = len(self.shards)
        weight_map = {}
        for i, (part, names) in enumerate(self.shards, 1):
            final = SINGLE_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(part, self.dir / final)
            for t in names:
                weight_map[t] = final
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes, "format": "predprey", "format_version": str(FORMAT_VERSION)},
                     "weight_map": weight_map}
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def abort(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None


def _copy_file(src, dst, count: int) -> None:
    """Copies ``count`` bytes from the start of ``src`` to ``dst`` in the kernel where possible."""
    src.seek(0)
    off = 0
    try:
        while off < count:
            sent = os.sendfile(dst.fileno(), src.fileno(), off, min(count - off, 1 << 30))
            if sent == 0:
                raise OSError("sendfile copied nothing")
            off += sent
        return
    except (AttributeError, OSError):
        src.seek(off)
        dst.seek(0, os.SEEK_END)
        shutil.copyfileobj(src, dst, 16 << 20)


class _AtomicDir:
    """A temporary directory beside ``out`` renamed to ``out`` on success, removed on failure
    (any exception, Ctrl-C included), so ``out`` is either absent or complete."""

    def __init__(self, out: Path, overwrite: bool):
        self.out = out
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out} already exists; remove it or pass overwrite=True (--force)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.out)
        self.tmp = self.out.parent / f".{self.out.name}.predprey-tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.predprey-old-{os.getpid()}"
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(self.tmp, self.out)


def _remove_stale(out: Path) -> None:
    """Removes temporary directories for ``out`` left by processes that no longer run (killed
    with SIGKILL, or a power cut: the only ways the clean-up cannot run)."""
    for d in out.parent.glob(f".{glob_escape(out.name)}.predprey-tmp-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass  # alive, owned by someone else


def _relative_error(w: np.ndarray, p: PackedMatrix) -> tuple[float, str]:
    """||W - W'|| / ||W|| (Frobenius): exact for small matrices, else estimated from the output
    error on 8 Gaussian probe vectors (needs no second dense copy of W)."""
    from . import decompress, matmul

    if w.size <= _EXACT_ERROR_MAX:
        d = decompress(p)
        d -= w
        num, den = float(np.linalg.norm(d)), float(np.linalg.norm(w))
        method = "exact"
    else:
        x = np.random.default_rng(0).standard_normal((8, w.shape[1])).astype(np.float32)
        ref = x @ w.T
        got = matmul(p, x)
        got -= ref
        num, den = float(np.linalg.norm(got)), float(np.linalg.norm(ref))
        method = "probe"
    if den == 0.0:
        return (0.0 if num == 0.0 else math.inf), method
    return num / den, method


def _fmt_shape(shape: Iterable[int]) -> str:
    s = "x".join(str(int(d)) for d in shape)
    return s or "scalar"


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def format_record(r: dict) -> str:
    """One progress line for a tensor record of ``compress_checkpoint``."""
    name = r["name"] if len(r["name"]) <= 48 else "..." + r["name"][-45:]
    if r["action"] == "packed":
        what = f"{r['source_dtype']:>5} -> {r['bits']:.2f} bits"
        err = f"  err {r['rel_error']:.4f}" if r.get("rel_error") is not None else ""
    else:
        what = f"{r['source_dtype']:>5} kept     "
        err = f"  ({r['reason']})"
    after = r.get("bytes_after")
    after_s = _mib(after) if after is not None else "~" + _mib(r["estimated_bytes_after"])
    return f"{name:<48} {_fmt_shape(r['shape']):>12}  {what}  {_mib(r['bytes_before']):>8} -> {after_s:>8} MiB{err}"


def format_totals(t: dict) -> str:
    """The totals line of ``compress_checkpoint``."""
    ratio = t["bytes_before"] / t["bytes_after"] if t["bytes_after"] else float("nan")
    s = (f"total: {t['tensors']} tensors ({t['packed']} packed, {t['kept']} kept)  "
         f"{_mib(t['bytes_before'])} MiB -> {_mib(t['bytes_after'])} MiB (ratio {ratio:.2f}x)  "
         f"packed tensors {_mib(t['packed_bytes_before'])} -> {_mib(t['packed_bytes_after'])} MiB "
         f"at {t['avg_bits_packed']:.3f} bits avg, all tensors {t['avg_bits_all']:.3f} bits/param")
    if t.get("seconds") is not None:
        s += f"  {t['seconds']:.1f} s ({t['weights_per_s'] / 1e6:.1f} M weights/s)"
    return s


def compress_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike | None,
    *,
    bits: float = 3.0,
    block_size: int = 64,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    importance: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool | Callable[[dict], None] = False,
    packed: Mapping[str, PackedMatrix] | None = None,
    quantization_info: Mapping[str, Any] | None = None,
) -> dict:
    """Compresses a whole checkpoint into a packed checkpoint directory ``out``.

    ``src``: a safetensors file, a Hugging Face model directory (sharded or not) or a GGUF file
    (quantized tensors are dequantized first). Tensors are read memory-mapped and written one at
    a time, so peak memory is a few tensors, not the model. ``out`` is built under a temporary
    name beside it and renamed at the end: after a failure or Ctrl-C there is no ``out``.
    ``importance``: a llama.cpp imatrix file (GGUF or legacy .dat) or {name: vector}; tensors
    are matched by name or by their llama.cpp (GGUF) name. ``dry_run``: plan only, write nothing.
    ``progress``: True for a tqdm bar with one line per tensor, or a callable given each
    tensor's record as it is done. ``packed``: matrices already compressed (by calibration,
    ``predprey_rs.calibrate``), by name or GGUF name; a selected tensor found there is written
    as it is instead of being compressed again. ``quantization_info``: extra entries for the
    ``quantization_config`` of config.json (e.g. how the model was calibrated).

    Returns {"tensors": [record per tensor], "totals": {...}, "out": str or None}.
    """
    include, exclude = tuple(include), tuple(exclude)
    outp = Path(out) if out is not None else None
    if not dry_run:
        if outp is None:
            raise ValueError("compress_checkpoint needs an output directory unless dry_run=True")
        if outp.exists() and not overwrite:
            raise FileExistsError(f"{outp} already exists; remove it or pass overwrite=True (--force)")
    from . import _bits_arg, _block_size_arg

    bits, block_size = _bits_arg(bits), _block_size_arg(block_size)
    imatrix: Mapping[str, np.ndarray] | None
    imatrix_name = None
    if importance is None or isinstance(importance, Mapping):
        imatrix = importance
    else:
        imatrix_name = Path(importance).name
        imatrix = read_imatrix(importance)

    t0 = time.perf_counter()
    with open_source(src) as source:
        plan = [(info, *select_tensor(info, include, exclude)) for info in source.tensors]
        records: list[dict] = []
        bar = None
        callback = progress if callable(progress) else None
        if progress is True:
            from tqdm import tqdm

            bar = tqdm(total=sum(i.nbytes for i, _, _ in plan), unit="B", unit_scale=True, unit_divisor=1024,
                       desc="compress", leave=False, dynamic_ncols=True)

        def emit(r: dict) -> None:
            records.append(r)
            if bar is not None:
                bar.write(format_record(r))
                bar.update(r["bytes_before"])
            if callback is not None:
                callback(r)

        try:
            if dry_run:
                for info, pack, reason in plan:
                    r = _record(info, pack, reason)
                    r["estimated_bytes_after"] = (
                        int(info.numel * bits / 8) if pack else _passthrough_bytes(info)
                    )
                    if pack:
                        r["bits"] = float(bits)  # the budget: an upper bound
                    emit(r)
                totals = _totals(records, None)
                return {"tensors": records, "totals": totals, "out": None, "dry_run": True}

            with _AtomicDir(outp, overwrite) as tmp:
                writer = _ShardWriter(tmp, max_shard_bytes)
                try:
                    for info, pack, reason in plan:
                        t1 = time.perf_counter()
                        r = _record(info, pack, reason)
                        if pack:
                            _pack_one(source, info, writer, r, bits, block_size, imatrix, packed)
                        else:
                            r["bytes_after"] = writer.add_passthrough(info.name, source, _passthrough_bytes(info))
                        r["seconds"] = time.perf_counter() - t1
                        emit(r)
                    weight_map = writer.finish()
                except BaseException:
                    writer.abort()
                    raise
                totals = _totals(records, time.perf_counter() - t0)
                qc = {
                    "quant_method": "predprey",
                    "format_version": FORMAT_VERSION,
                    "bits": float(bits),
                    "block_size": int(block_size),
                    "packed_suffixes": list(PACKED_SUFFIXES),
                    "packed_tensors": totals["packed"],
                    "average_bits_per_weight": round(totals["avg_bits_packed"], 4),
                    "include": list(include),
                    "exclude": list(exclude),
                    "imatrix": imatrix_name if imatrix_name else (True if imatrix else None),
                    "source": {"format": source.kind, "name": Path(src).name},
                    "predprey_version": _core.__version__,
                    **dict(quantization_info or {}),
                }
                config = dict(source.config) if source.config else {}
                config["quantization_config"] = qc
                (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
                if source.gguf_metadata is not None:
                    (tmp / "gguf_metadata.json").write_text(json.dumps(source.gguf_metadata, default=_json_default) + "\n")
                for f in source.extra_files:
                    shutil.copy2(f, tmp / f.name)
                totals["files_bytes"] = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
                totals["shards"] = len(set(weight_map.values()))
        finally:
            if bar is not None:
                bar.close()
    return {"tensors": records, "totals": totals, "out": str(outp), "dry_run": False}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (bytes, bytearray)):
        return o.decode("utf-8", errors="replace")
    raise TypeError(f"cannot store {type(o).__name__} in JSON")


def _passthrough_bytes(info: TensorInfo) -> int:
    if info.dtype in SAFETENSORS_DTYPES:
        return info.nbytes
    return info.numel * 2  # a GGUF quantized type kept unpacked is stored as float16


def _record(info: TensorInfo, pack: bool, reason: str) -> dict:
    return {
        "name": info.name,
        "shape": list(info.shape),
        "source_dtype": info.dtype,
        "action": "packed" if pack else "kept",
        "reason": reason,
        "numel": info.numel,
        "bytes_before": info.nbytes,
    }


def _pack_one(source: Source, info: TensorInfo, writer: _ShardWriter, r: dict, bits: float,
              block_size: int, imatrix: Mapping[str, np.ndarray] | None,
              packed: Mapping[str, PackedMatrix] | None = None) -> None:
    from . import compress

    h = None
    if imatrix is not None:
        h = importance_for(imatrix, info.name)
        if h is not None and h.shape[0] != info.shape[1]:
            raise _core.ShapeError(
                f"{info.name}: the importance matrix has {h.shape[0]} values for it; expected "
                f"{info.shape[1]} (one per input column). Is the imatrix from another model?"
            )
    w = source.read_float32(info.name)
    p = importance_for(packed, info.name) if packed is not None else None
    if p is not None and tuple(p.shape) != tuple(info.shape):
        raise _core.ShapeError(f"{info.name}: the pre-compressed matrix is {p.shape[0]}x{p.shape[1]}; "
                               f"expected {_fmt_shape(info.shape)}")
    try:
        if p is None:
            p = compress(w, bits=bits, block_size=block_size, importance=h)
    except (_core.WeightError, _core.ShapeError, _core.FormatError) as e:
        raise type(e)(f"{info.name} ({_fmt_shape(info.shape)}): {e}") from e
    err, method = _relative_error(w, p)
    del w
    r["bytes_after"] = writer.add_packed(info.name, p, {"source_dtype": info.dtype})
    r.update(bits=p.bits_per_weight, rel_error=err, error_method=method, planes=p.planes,
             plane2_fraction=p.plane2_fraction, predators=p.n_outliers, importance=h is not None)


def _totals(records: list[dict], seconds: float | None) -> dict:
    packed = [r for r in records if r["action"] == "packed"]
    after_key = lambda r: r["bytes_after"] if "bytes_after" in r else r["estimated_bytes_after"]  # noqa: E731
    packed_numel = sum(r["numel"] for r in packed)
    packed_after = sum(after_key(r) for r in packed)
    all_numel = sum(r["numel"] for r in records)
    after = sum(after_key(r) for r in records)
    t = {
        "tensors": len(records),
        "packed": len(packed),
        "kept": len(records) - len(packed),
        "bytes_before": sum(r["bytes_before"] for r in records),
        "bytes_after": after,
        "packed_weights": packed_numel,
        "packed_bytes_before": sum(r["bytes_before"] for r in packed),
        "packed_bytes_after": packed_after,
        "avg_bits_packed": 8 * packed_after / packed_numel if packed_numel else 0.0,
        "avg_bits_all": 8 * after / all_numel if all_numel else 0.0,
        "seconds": seconds,
    }
    t["ratio"] = t["bytes_before"] / after if after else None
    errs = [r["rel_error"] for r in packed if r.get("rel_error") is not None]
    if errs:
        t["rel_error_median"] = float(np.median(errs))
        t["rel_error_max"] = float(np.max(errs))
    if seconds:
        t["weights_per_s"] = packed_numel / seconds
    return t


def save_checkpoint(
    out: str | os.PathLike,
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    config: dict | None = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> None:
    """Writes {name: PackedMatrix | numpy array} (or an iterable of pairs, consumed one at a
    time) as a checkpoint directory in the same layout ``compress_checkpoint`` writes.
    Arrays are stored with their own dtype (uint16 stays U16; there is no numpy bfloat16)."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    outp = Path(out)
    with _AtomicDir(outp, overwrite) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)
        try:
            for name, v in items:
                if isinstance(v, PackedMatrix):
                    writer.add_packed(name, v, {})
                else:
                    writer.add_array(name, np.asarray(v))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Reading


def _packed_spec(f: Path, meta: dict) -> dict[str, dict]:
    if meta.get("format") != "predprey":
        return {}
    ver = meta.get("format_version")
    if ver != str(FORMAT_VERSION):
        raise FormatError(f"{f}: format_version is {ver!r}; this build reads version {FORMAT_VERSION} only")
    try:
        spec = json.loads(meta.get("packed", "{}"))
        if not isinstance(spec, dict):
            raise TypeError("not an object")
    except (json.JSONDecodeError, TypeError) as e:
        raise FormatError(f"{f}: the `packed` metadata is not a JSON object ({e}); the file is corrupted") from e
    return spec


def _shard_groups(f: Path, header: dict, spec: dict) -> tuple[dict[str, list], list[str]]:
    """Packed names -> their array names; the other tensors, in file order."""
    owner: dict[str, str] = {}
    for name in spec:
        for s in PACKED_SUFFIXES:
            t = f"{name}.{s}"
            if t not in header:
                raise FormatError(f"{f}: packed tensor {name!r} has no array {t!r} (corrupted or incomplete file)")
            owner[t] = name
    others = [n for n in sorted(header, key=lambda n: header[n]["data_offsets"][0]) if n not in owner]
    return owner, others


def load_checkpoint(path: str | os.PathLike) -> dict[str, PackedMatrix | np.ndarray]:
    """Reads a packed checkpoint (directory, sharded or not, or one of its .safetensors files).

    Returns {original tensor name: PackedMatrix for packed weights, numpy array otherwise}, in
    file order. Unpacked tensors are the source's exactly (BF16 as uint16 bits, FP8 as uint8).
    Every packed matrix is validated (FORMAT.md); a missing shard, a truncated or corrupted
    file raise FileNotFoundError / FormatError naming the file and tensor.
    """
    from . import from_arrays

    root = Path(path)
    files, weight_map = safetensors_files(root)
    result: dict[str, Any] = {}
    seen: set[str] = set()
    for f in files:
        with open(f, "rb") as fh:
            header, meta, body = read_safetensors_header(f, fh)
            spec = _packed_spec(f, meta)
            owner, others = _shard_groups(f, header, spec)
            seen.update(header)

            def read(name: str) -> np.ndarray:
                t = header[name]
                a, b = t["data_offsets"]
                dt = SAFETENSORS_DTYPES[t["dtype"]]
                fh.seek(body + a)
                arr = np.fromfile(fh, dtype=dt, count=(b - a) // dt.itemsize) if b > a else np.zeros(0, dt)
                if arr.nbytes != b - a:
                    raise FormatError(f"{f}: tensor {name!r} is cut short (truncated file)")
                return arr.reshape(t["shape"])

            order = sorted(list(spec) + others, key=lambda n: header[n]["data_offsets"][0] if n in header
                           else header[f"{n}.{PACKED_SUFFIXES[0]}"]["data_offsets"][0])
            for name in order:
                if name in spec:
                    s = spec[name]
                    try:
                        m = {"format": "predprey", "format_version": str(FORMAT_VERSION),
                             "rows": str(int(s["rows"])), "cols": str(int(s["cols"])), "block_size": str(int(s["block_size"]))}
                    except (KeyError, TypeError, ValueError) as e:
                        raise FormatError(f"{f}: packed tensor {name!r} has malformed metadata {s!r}") from e
                    arrays = {sfx: read(f"{name}.{sfx}") for sfx in PACKED_SUFFIXES}
                    try:
                        result[name] = from_arrays(m, arrays)
                    except (FormatError, _core.DtypeError) as e:
                        raise FormatError(f"{f}: packed tensor {name!r}: {e}") from e
                else:
                    result[name] = read(name)
    if weight_map is not None:
        missing = [n for n in weight_map if n not in seen]
        if missing:
            raise FormatError(f"{root}: the index lists {len(missing)} tensor(s) its shards do not have, first {missing[0]!r} in {weight_map[missing[0]]!r}")
    return result


def inspect_checkpoint(path: str | os.PathLike, verify: bool = False) -> dict:
    """Describes a checkpoint from its headers alone (fast, reads no tensor data): per tensor
    shape, and for packed ones planes, plane-2 fraction, predators, bits per weight and bytes;
    plus totals and the ``quantization_config``. ``verify=True`` also loads and validates
    everything (``load_checkpoint``)."""
    root = Path(path)
    files, _ = safetensors_files(root)
    rows: list[dict] = []
    for f in files:
        header, meta, _body = read_safetensors_header(f)
        spec = _packed_spec(f, meta)
        owner, others = _shard_groups(f, header, spec)
        for name, s in spec.items():
            h = {sfx: header[f"{name}.{sfx}"] for sfx in PACKED_SUFFIXES}
            nbytes = sum(t["data_offsets"][1] - t["data_offsets"][0] for t in h.values())
            n, k, b = int(s["rows"]), int(s["cols"]), int(s["block_size"])
            groups, nb = -(-n // _core.ROWS_PER_GROUP), -(-k // b)
            e, m = h["p2_block"]["shape"][0], h["out_vals"]["shape"][0]
            rows.append({
                "name": name, "kind": "packed", "shape": [n, k], "block_size": b,
                "source_dtype": s.get("source_dtype"),
                "planes": 2 if e > 0 else 1, "plane2_fraction": e / (groups * nb),
                "predators": m, "predators_pct": 100.0 * m / (n * k),
                "bits": 8.0 * nbytes / (n * k), "bytes": nbytes, "file": f.name,
                "_offset": h["codes"]["data_offsets"][0],
            })
        for name in others:
            t = header[name]
            rows.append({"name": name, "kind": "kept", "shape": list(t["shape"]), "dtype": t["dtype"],
                         "bytes": t["data_offsets"][1] - t["data_offsets"][0], "file": f.name,
                         "_offset": t["data_offsets"][0]})
    order = {f.name: i for i, f in enumerate(files)}
    rows.sort(key=lambda r: (order[r["file"]], r.pop("_offset")))
    packed = [r for r in rows if r["kind"] == "packed"]
    pw = sum(r["shape"][0] * r["shape"][1] for r in packed)
    pb = sum(r["bytes"] for r in packed)
    cfg = None
    if root.is_dir() and (root / "config.json").is_file():
        try:
            cfg = json.loads((root / "config.json").read_text()).get("quantization_config")
        except json.JSONDecodeError as e:
            raise FormatError(f"{root / 'config.json'}: not valid JSON ({e})") from e
    totals = {
        "tensors": len(rows), "packed": len(packed), "kept": len(rows) - len(packed),
        "packed_weights": pw, "packed_bytes": pb, "avg_bits_packed": 8.0 * pb / pw if pw else 0.0,
        "kept_bytes": sum(r["bytes"] for r in rows if r["kind"] == "kept"),
        "predators_pct": 100.0 * sum(r["predators"] for r in packed) / pw if pw else 0.0,
        "bytes": sum(r["bytes"] for r in rows),
        "files_bytes": sum(p.stat().st_size for p in (root.iterdir() if root.is_dir() else [root]) if p.is_file()),
        "shards": len(files),
    }
    if verify:
        load_checkpoint(root)
    return {"path": str(root), "quantization_config": cfg, "tensors": rows, "totals": totals, "verified": bool(verify)}

