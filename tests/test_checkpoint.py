"""Whole checkpoints: compress_checkpoint / load_checkpoint / inspect_checkpoint / save_checkpoint
on the real MiniLM checkpoint and on small generated ones (FORMAT.md, "Checkpoints")."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import predprey_rs as pp
from predprey_rs import io as ppio
from predprey_rs import sources

from _ckpt_helpers import minilm_dir, mock_compress, write_safetensors


def _same_packed(a, b):
    """Same matrix: metadata and all ten arrays equal (to_bytes() is not byte-stable: the
    header's key order may differ)."""
    if a.metadata() != b.metadata():
        return False
    x, y = a.arrays(), b.arrays()
    return all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x)


def _read_source(path):
    """{name: raw numpy array} of a safetensors file, independently of our reader."""
    from safetensors.numpy import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------ real MiniLM


@pytest.fixture(scope="module")
def minilm_packed(tmp_path_factory):
    src = minilm_dir()
    out = tmp_path_factory.mktemp("minilm") / "packed"
    res = pp.compress_checkpoint(src, out, bits=3.0, block_size=64)
    return src, out, res


def test_minilm_round_trip(minilm_packed):
    src, out, res = minilm_packed
    source = _read_source(src / "model.safetensors")
    ck = pp.load_checkpoint(out)
    assert list(ck) == list(sorted(source, key=list(ck).index)), "same names, nothing lost or added"
    assert set(ck) == set(source)
    packed = {n for n, v in ck.items() if isinstance(v, pp.PackedMatrix)}
    # default rule: the 2-D weights of linear layers (6 layers x 6, plus the pooler), no embeddings
    want = {n for n, a in source.items() if a.ndim == 2 and n.endswith(".weight") and "embeddings" not in n}
    assert packed == want and len(packed) == 37
    for n, v in ck.items():
        if n in packed:
            assert v.shape == source[n].shape
            # the quantizer promises <= the budget; it should also use most of it
            assert 2.75 <= v.bits_per_weight <= 3.0 + 1e-9, (n, v.bits_per_weight)
            w = source[n]
            err = np.linalg.norm(pp.decompress(v) - w) / np.linalg.norm(w)
            assert err < 0.5, (n, err)  # a loose sanity bound: 3-bit ternary planes, not a fidelity claim
        else:
            assert v.dtype == source[n].dtype and v.shape == source[n].shape
            assert v.tobytes() == source[n].tobytes(), f"{n} must pass through bit-identical"
    for r in res["tensors"]:
        if r["action"] == "packed":
            assert r["rel_error"] == pytest.approx(
                np.linalg.norm(pp.decompress(ck[r["name"]]) - source[r["name"]]) / np.linalg.norm(source[r["name"]]),
                rel=1e-3)


def test_minilm_every_encoder_weight_at_3_bits(tmp_path):
    """The core issue's bar on real weights: every 2-D encoder weight of MiniLM compressed at
    3.0 bits comes in at or under 3.0 bits per weight, exactly the bytes its file body holds,
    with a mean weight cosine >= 0.94 (the original prototype's scheme: 0.91 at 3.0 bits)."""
    source = _read_source(minilm_dir() / "model.safetensors")
    names = [n for n, a in source.items() if a.ndim == 2 and n.startswith("encoder.")]
    assert len(names) == 36
    cos = []
    for n in names:
        w = source[n].astype(np.float32)
        p = pp.compress(w, bits=3.0)
        assert p.bits_per_weight <= 3.0, (n, p.bits_per_weight)
        f = tmp_path / "m.safetensors"
        p.save(f)
        (hlen,) = struct.unpack("<Q", f.read_bytes()[:8])
        assert f.stat().st_size - 8 - hlen == p.nbytes, n
        q = pp.decompress(p).astype(np.float64)
        cos.append(float((q * w).sum() / (np.linalg.norm(q) * np.linalg.norm(w))))
    assert np.mean(cos) >= 0.94, np.mean(cos)


def test_minilm_config_and_files(minilm_packed):
    src, out, res = minilm_packed
    cfg = json.loads((out / "config.json").read_text())
    orig = json.loads((src / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    assert cfg == orig, "the source's config.json is kept as it was"
    assert qc["quant_method"] == "predprey"
    assert qc["format_version"] == pp.FORMAT_VERSION
    assert qc["bits"] == 3.0 and qc["block_size"] == 64
    assert qc["packed_suffixes"] == list(pp._core.TENSOR_NAMES)
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    header, meta, _ = sources.read_safetensors_header(out / "model.safetensors")
    assert meta["format"] == "predprey" and meta["format_version"] == str(pp.FORMAT_VERSION)
    n = "encoder.layer.0.attention.self.query.weight"
    assert {f"{n}.{s}" for s in pp._core.TENSOR_NAMES} <= set(header)
    assert n not in header
    # readable by the reference safetensors implementation too
    st = _read_source(out / "model.safetensors")
    assert st[f"{n}.codes"].dtype == np.uint8
    assert not list(out.parent.glob(".*predprey-tmp*")), "no temporary directory left behind"


def test_minilm_inspect(minilm_packed):
    _, out, res = minilm_packed
    info = pp.inspect_checkpoint(out, verify=True)
    t = info["totals"]
    assert t["packed"] == 37 and t["tensors"] == 104 and info["verified"]
    ck = pp.load_checkpoint(out)
    for r in info["tensors"]:
        v = ck[r["name"]]
        if r["kind"] == "packed":
            assert r["bits"] == pytest.approx(v.bits_per_weight)
            assert r["bytes"] == v.nbytes
            assert r["predators"] == v.n_outliers
            assert r["planes"] == v.planes
            assert r["plane2_fraction"] == pytest.approx(v.plane2_fraction)
        else:
            assert r["bytes"] == v.nbytes
    assert t["avg_bits_packed"] == pytest.approx(res["totals"]["avg_bits_packed"])
    assert info["quantization_config"]["quant_method"] == "predprey"


def test_minilm_include_exclude_and_bits(tmp_path):
    src = minilm_dir()
    out = tmp_path / "o"
    res = pp.compress_checkpoint(src, out, bits=2.5, block_size=128, include=["*word_embeddings*"],
                                 exclude=["encoder.layer.[1-5].*", "pooler.*"])
    ck = pp.load_checkpoint(out)
    packed = sorted(n for n, v in ck.items() if isinstance(v, pp.PackedMatrix))
    assert packed == sorted(["embeddings.word_embeddings.weight"] + [
        f"encoder.layer.0.{m}.weight" for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                                                "attention.output.dense", "intermediate.dense", "output.dense")])
    for n in packed:
        assert ck[n].block_size == 128 and ck[n].bits_per_weight <= 2.5 + 1e-9
    assert res["totals"]["packed"] == 7


def test_dry_run_writes_nothing(tmp_path):
    src = minilm_dir()
    out = tmp_path / "never"
    res = pp.compress_checkpoint(src, out, dry_run=True)
    assert not out.exists() and res["dry_run"]
    assert res["totals"]["packed"] == 37
    assert res["totals"]["avg_bits_packed"] == pytest.approx(3.0, abs=1e-3)


@pytest.mark.parametrize("kw", [dict(bits=-1.0), dict(bits=float("nan")), dict(bits="3"), dict(block_size=48)])
def test_bad_arguments_fail_before_any_work(tmp_path, monkeypatch, kw):
    # Checked up front: not after the tensors before the first packed one were read (as bits
    # were before), and nothing is left behind.
    opened = []
    monkeypatch.setattr(ppio, "open_source", lambda *a, **k: opened.append(a) or pytest.fail("opened the source"))
    out = tmp_path / "out"
    with pytest.raises(pp.WeightError, match="bits|block_size"):
        pp.compress_checkpoint(minilm_dir(), out, **kw)
    assert not opened and not out.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ generated


@pytest.fixture
def mock_quant(monkeypatch):
    """Plumbing tests do not need the real quantizer's quality, only valid matrices, fast."""
    monkeypatch.setattr(pp, "compress", mock_compress)


def _small_model(path, rng):
    w = {
        "model.embed_tokens.weight": ("F16", rng.standard_normal((50, 64)).astype(np.float16)),
        "model.layers.0.self_attn.q_proj.weight": ("BF16", (rng.standard_normal((64, 64)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)),
        "model.layers.0.mlp.up_proj.weight": ("F16", rng.standard_normal((96, 64)).astype(np.float16)),
        "model.layers.0.mlp.down_proj.weight": ("F32", rng.standard_normal((64, 96)).astype(np.float32)),
        "model.layers.0.input_layernorm.weight": ("BF16", np.full(64, 0x3F80, np.uint16)),
        "model.norm.weight": ("F32", np.ones(64, np.float32)),
        "lm_head.weight": ("F16", rng.standard_normal((50, 64)).astype(np.float16)),
        "rotary.inv_freq": ("I64", np.arange(8, dtype=np.int64)),
    }
    write_safetensors(path, w, {"format": "pt"})
    return w


def test_dtypes_bf16_f16_f32(tmp_path, mock_quant):
    rng = np.random.default_rng()
    src = tmp_path / "m.safetensors"
    w = _small_model(src, rng)
    ck_dir = tmp_path / "o"
    res = pp.compress_checkpoint(src, ck_dir)
    ck = pp.load_checkpoint(ck_dir)
    assert {n for n, v in ck.items() if isinstance(v, pp.PackedMatrix)} == {
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"}
    # packing saw the right float values for every source dtype (compare with mock on f32)
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        dt, a = w[n]
        f = (a.astype(np.uint32) << 16).view(np.float32) if dt == "BF16" else a.astype(np.float32)
        np.testing.assert_array_equal(pp.decompress(ck[n]), pp.decompress(mock_compress(f)))
    # passthrough: raw bits, BF16 as uint16
    assert ck["model.layers.0.input_layernorm.weight"].dtype == np.uint16
    np.testing.assert_array_equal(ck["model.layers.0.input_layernorm.weight"], w["model.layers.0.input_layernorm.weight"][1])
    np.testing.assert_array_equal(ck["rotary.inv_freq"], np.arange(8))
    assert ck["model.embed_tokens.weight"].dtype == np.float16
    header, _, _ = sources.read_safetensors_header(ck_dir / "model.safetensors")
    assert header["model.layers.0.input_layernorm.weight"]["dtype"] == "BF16"
    by = {r["name"]: r for r in res["tensors"]}
    assert by["model.embed_tokens.weight"]["reason"].startswith("embedding")
    assert by["lm_head.weight"]["reason"].startswith("output head")
    assert by["model.layers.0.self_attn.q_proj.weight"]["source_dtype"] == "BF16"


def test_shards_and_index(tmp_path, mock_quant):
    rng = np.random.default_rng()
    src = tmp_path / "m.safetensors"
    _small_model(src, rng)
    one, many = tmp_path / "one", tmp_path / "many"
    pp.compress_checkpoint(src, one)
    res = pp.compress_checkpoint(src, many, max_shard_bytes=8000)
    assert res["totals"]["shards"] > 2
    files = sorted(p.name for p in many.glob("*.safetensors"))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert index["metadata"]["format_version"] == str(pp.FORMAT_VERSION)
    a, b = pp.load_checkpoint(one), pp.load_checkpoint(many)
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], pp.PackedMatrix):
            assert _same_packed(a[k], b[k])
        else:
            assert a[k].tobytes() == b[k].tobytes()
    # a packed weight's ten arrays stay in one shard
    wm = index["weight_map"]
    for k, v in a.items():
        if isinstance(v, pp.PackedMatrix):
            assert len({wm[f"{k}.{s}"] for s in pp._core.TENSOR_NAMES}) == 1
    # a missing shard is named
    victim = files[1]
    os.unlink(many / victim)
    with pytest.raises(FileNotFoundError, match=victim):
        pp.load_checkpoint(many)
    with pytest.raises(FileNotFoundError, match=victim):
        pp.inspect_checkpoint(many)


def test_sharded_source(tmp_path, mock_quant):
    """A Hugging Face directory with an index and two shards as input."""
    rng = np.random.default_rng()
    d = tmp_path / "hf"
    d.mkdir()
    a = rng.standard_normal((40, 64)).astype(np.float32)
    b = rng.standard_normal((64, 40)).astype(np.float16)
    write_safetensors(d / "model-00001-of-00002.safetensors", {"l0.weight": ("F32", a)})
    write_safetensors(d / "model-00002-of-00002.safetensors", {"l1.weight": ("F16", b), "l1.bias": ("F16", b[:, 0].copy())})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "l0.weight": "model-00001-of-00002.safetensors", "l1.weight": "model-00002-of-00002.safetensors",
        "l1.bias": "model-00002-of-00002.safetensors"}}))
    (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
    (d / "tokenizer.json").write_text("{}")
    pp.compress_checkpoint(d, tmp_path / "o")
    ck = pp.load_checkpoint(tmp_path / "o")
    assert isinstance(ck["l0.weight"], pp.PackedMatrix) and isinstance(ck["l1.weight"], pp.PackedMatrix)
    assert ck["l1.bias"].tobytes() == b[:, 0].tobytes()
    assert json.loads((tmp_path / "o" / "config.json").read_text())["model_type"] == "toy"
    assert (tmp_path / "o" / "tokenizer.json").read_text() == "{}"
    os.unlink(d / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        pp.compress_checkpoint(d, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_save_checkpoint_round_trip(tmp_path):
    from predprey_rs._synth import random_packed

    rng = np.random.default_rng()
    t = {"a": random_packed(rng, 13, 300, 32), "b": rng.standard_normal((3, 5)).astype(np.float32),
         "c": random_packed(rng, 7, 70000, 64, predators=0.001), "d": np.zeros(0, np.float16)}
    pp.save_checkpoint(tmp_path / "s", t, config={"x": 1})
    ck = pp.load_checkpoint(tmp_path / "s")
    assert list(ck) == list(t)
    for k in t:
        if isinstance(t[k], pp.PackedMatrix):
            assert _same_packed(ck[k], t[k])
        else:
            np.testing.assert_array_equal(ck[k], t[k])
    with pytest.raises(FileExistsError):
        pp.save_checkpoint(tmp_path / "s", t)


# ------------------------------------------------------------------------------ damage


@pytest.fixture
def packed_file(tmp_path):
    from predprey_rs._synth import random_packed

    rng = np.random.default_rng()
    pp.save_checkpoint(tmp_path / "c", {"w": random_packed(rng, 20, 128, 64), "bias": np.ones(20, np.float32)})
    return tmp_path / "c" / "model.safetensors"


def test_truncated_file(packed_file):
    data = packed_file.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 20, 4):
        packed_file.write_bytes(data[:cut])
        with pytest.raises(pp.FormatError, match="truncated|too short"):
            pp.load_checkpoint(packed_file.parent)
        with pytest.raises(pp.FormatError):
            pp.inspect_checkpoint(packed_file.parent)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    edit(header)
    hb = json.dumps(header, separators=(",", ":")).encode()
    assert len(hb) <= n, "the edit must not grow the header"
    path.write_bytes(data[:8] + hb + b" " * (n - len(hb)) + data[8 + n:])


def test_corrupted_files(packed_file):
    data = packed_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    # garbage in the header
    packed_file.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(pp.FormatError, match="not valid JSON"):
        pp.load_checkpoint(packed_file.parent)
    # a packed weight with an array missing
    packed_file.write_bytes(data)
    _rewrite_header(packed_file, lambda h: h.pop("w.out_vals"))
    with pytest.raises(pp.FormatError, match="'w' has no array 'w.out_vals'"):
        pp.load_checkpoint(packed_file.parent)
    # a code byte outside 0..=242: validation names the tensor
    packed_file.write_bytes(data)
    header, _, body = sources.read_safetensors_header(packed_file)
    a = header["w.codes"]["data_offsets"][0]
    bad = bytearray(data)
    bad[body + a] = 250
    packed_file.write_bytes(bytes(bad))
    with pytest.raises(pp.FormatError, match="'w'"):
        pp.load_checkpoint(packed_file.parent)
    # another format version
    packed_file.write_bytes(data)
    _rewrite_header(packed_file, lambda h: h["__metadata__"].update(format_version="9"))
    with pytest.raises(pp.FormatError, match="format_version"):
        pp.load_checkpoint(packed_file.parent)
    # offsets that do not match the shape
    packed_file.write_bytes(data)
    _rewrite_header(packed_file, lambda h: h["bias"].update(shape=[21]))
    with pytest.raises(pp.FormatError, match="'bias'"):
        pp.load_checkpoint(packed_file.parent)
    assert n > 0


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        pp.load_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        pp.load_checkpoint(tmp_path / "empty")


# ------------------------------------------------------------------------------ atomic output


def test_failure_leaves_no_out(tmp_path, mock_quant):
    rng = np.random.default_rng()
    src = tmp_path / "m.safetensors"
    _small_model(src, rng)
    out = tmp_path / "out"
    seen = []

    def boom(r):
        seen.append(r["name"])
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pp.compress_checkpoint(src, out, progress=boom)
    assert not out.exists()
    assert os.listdir(tmp_path) == ["m.safetensors"], "the temporary directory is removed too"
    # an existing OUT is refused up front, replaced only when asked
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        pp.compress_checkpoint(src, out)
    assert (out / "keep").exists()
    with pytest.raises(KeyboardInterrupt):
        pp.compress_checkpoint(src, out, overwrite=True, progress=lambda r: (_ for _ in ()).throw(KeyboardInterrupt))
    assert (out / "keep").exists(), "a failed overwrite leaves the old OUT alone"
    pp.compress_checkpoint(src, out, overwrite=True)
    assert not (out / "keep").exists() and (out / "model.safetensors").exists()


def test_stale_temporary_dir_is_removed(tmp_path, mock_quant):
    """A temporary directory left by a process killed with SIGKILL is removed by the next run."""
    src = tmp_path / "m.safetensors"
    _small_model(src, np.random.default_rng())
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".out.predprey-tmp-{int(p.stdout)}"
    dead.mkdir()
    (dead / ".shard-00001.body").write_bytes(b"x" * 100)
    live = tmp_path / f".out.predprey-tmp-{os.getppid()}"  # a running process: left alone
    live.mkdir()
    pp.compress_checkpoint(src, tmp_path / "out")
    assert not dead.exists() and live.exists()


def test_killed_process_leaves_no_out(tmp_path):
    """SIGINT in the middle of a real compress (in another process): no OUT directory."""
    rng = np.random.default_rng()
    src = tmp_path / "m.safetensors"
    write_safetensors(src, {f"l{i}.weight": ("F32", rng.standard_normal((256, 256)).astype(np.float32)) for i in range(40)})
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys, time
        import predprey_rs as pp
        def slow(r):
            print(r["name"], flush=True)
            time.sleep(0.2)
        pp.compress_checkpoint({str(src)!r}, {str(out)!r}, progress=slow)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(3):  # wait until it is in the middle of the work
        assert p.stdout.readline(), p.stderr.read()
    assert any(x.name.startswith(".out.predprey-tmp") for x in tmp_path.iterdir()), "work in progress is hidden"
    p.send_signal(2)
    p.wait(timeout=60)
    assert p.returncode != 0
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


# ------------------------------------------------------------------------------ GGUF, imatrix


def test_gguf_source(tmp_path, mock_quant):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng()
    path = tmp_path / "toy.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_head_count(2)
    a = rng.standard_normal((96, 64)).astype(np.float32)
    q8 = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((64, 64)).astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    w.add_tensor("token_embd.weight", q8.copy(), raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    res = pp.compress_checkpoint(path, tmp_path / "o")
    ck = pp.load_checkpoint(tmp_path / "o")
    deq = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(pp.decompress(ck["blk.0.ffn_up.weight"]), pp.decompress(mock_compress(deq)))
    assert isinstance(ck["blk.0.attn_q.weight"], pp.PackedMatrix)
    # a quantized tensor that is not packed is dequantized and kept as float16
    assert ck["token_embd.weight"].dtype == np.float16
    np.testing.assert_array_equal(ck["token_embd.weight"], deq.astype(np.float16))
    np.testing.assert_array_equal(ck["blk.0.attn_norm.weight"], np.ones(64, np.float32))
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 64
    assert cfg["quantization_config"]["source"]["format"] == "gguf"
    md = json.loads((tmp_path / "o" / "gguf_metadata.json").read_text())
    assert md["llama.block_count"] == 1
    assert {r["name"]: r["source_dtype"] for r in res["tensors"]}["blk.0.ffn_up.weight"] == "Q8_0"


def _write_imatrix_dat(path, entries, ncall=4):
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, v in entries.items():
            b = name.encode()
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, len(v)))
            f.write(np.asarray(v, "<f4").tobytes())
        f.write(struct.pack("<i", 10) + struct.pack("<i", 7) + b"dataset")


def _write_imatrix_gguf(path, entries, count=5.0):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "")
    w.add_type("imatrix")
    for name, v in entries.items():
        w.add_tensor(f"{name}.in_sum2", (np.asarray(v, np.float32) * count).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[count]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("fmt", ["dat", "gguf"])
def test_imatrix(tmp_path, fmt, monkeypatch):
    rng = np.random.default_rng()
    h = rng.random(64).astype(np.float32) + 0.1
    # llama.cpp names; our source uses Hugging Face names and must find them through the mapping
    entries = {"blk.0.ffn_up.weight": h, "blk.0.attn_q.weight": h[::-1].copy()}
    path = tmp_path / f"imatrix.{fmt}"
    if fmt == "dat":
        _write_imatrix_dat(path, {k: v * 4 for k, v in entries.items()}, ncall=4)
    else:
        _write_imatrix_gguf(path, entries)
    im = sources.read_imatrix(path)
    for k, v in entries.items():
        np.testing.assert_allclose(im[k], v, rtol=1e-6)
    got = {}

    def spy(weight, bits=3.0, block_size=64, importance=None):
        got[weight.shape] = importance
        return mock_compress(weight, bits, block_size)

    monkeypatch.setattr(pp, "compress", spy)
    src = tmp_path / "m.safetensors"
    _small_model(src, rng)
    res = pp.compress_checkpoint(src, tmp_path / "o", importance=path)
    np.testing.assert_allclose(got[(96, 64)], h, rtol=1e-6)  # up_proj
    np.testing.assert_allclose(got[(64, 64)], h[::-1], rtol=1e-6)  # q_proj
    assert got[(64, 96)] is None  # down_proj: not in the imatrix
    assert json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["imatrix"] == path.name
    assert sum(r.get("importance", False) for r in res["tensors"]) == 2


def test_imatrix_wrong_model(tmp_path, mock_quant):
    path = tmp_path / "im.dat"
    _write_imatrix_dat(path, {"blk.0.ffn_up.weight": np.ones(17)})
    src = tmp_path / "m.safetensors"
    _small_model(src, np.random.default_rng())
    with pytest.raises(pp.ShapeError, match="17 values.*expected 64"):
        pp.compress_checkpoint(src, tmp_path / "o", importance=path)
    assert not (tmp_path / "o").exists()
    (tmp_path / "junk.dat").write_bytes(b"\x05\x00\x00\x00\xff\xff")
    with pytest.raises(pp.FormatError):
        sources.read_imatrix(tmp_path / "junk.dat")


def test_select_tensor_rules():
    T = lambda n, shape, dt="F16": sources.TensorInfo(n, shape, dt, 0, dt in ("F16", "F32", "BF16", "Q4_K"))  # noqa: E731
    sel = lambda *a, **k: ppio.select_tensor(*a, **k)[0]  # noqa: E731
    assert sel(T("model.layers.3.mlp.down_proj.weight", (8, 16)))
    assert sel(T("blk.3.ffn_down.weight", (8, 16), "Q4_K"))
    assert not sel(T("model.layers.3.mlp.down_proj.bias", (8,)))
    assert not sel(T("model.embed_tokens.weight", (8, 16)))
    assert not sel(T("token_embd.weight", (8, 16)))
    assert not sel(T("transformer.wte.weight", (8, 16)))
    assert not sel(T("lm_head.weight", (8, 16)))
    assert not sel(T("output.weight", (8, 16)))
    assert sel(T("lm_head.weight", (8, 16)), include=["lm_head.weight"])
    assert not sel(T("lm_head.weight", (8, 16)), include=["lm_head.*"], exclude=["lm_*"])
    assert not sel(T("conv.weight", (8, 16, 3, 3)), include=["*"])
    assert not sel(T("pos_ids", (1, 16), "I64"), include=["*"])
    assert sel(T("encoder.layer.0.output.dense.weight", (8, 16)))


def _rss_file_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_reader_gives_pages_back():
    """Reading every tensor of a 87 MB file through the memory map leaves few of its pages in
    this process's resident set (madvise DONTNEED after each tensor): peak memory stays at the
    tensors in use, not the file."""
    src = minilm_dir() / "model.safetensors"
    size_kib = src.stat().st_size // 1024
    with sources.open_source(src) as s:
        before = _rss_file_kib()
        total = 0.0
        for t in s.tensors:
            a = s.read_raw(t.name)
            total += float(a.view(np.uint8).sum())  # touch every page
            del a
            s.release(t.name)
        after = _rss_file_kib()
    assert total > 0
    # without the release, RssFile grows by the whole file (~85000 KiB)
    assert after - before < size_kib // 4, (before, after, size_kib)
