"""``predprey eval`` and the fidelity figures (predprey_rs.evaluate); the checkpoint written by
``predprey compress --calibrate`` against an independent float64 numpy forward (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from predprey_rs import calibrate, cli, evaluate
from test_calibrate import tiny_model

HELDOUT = Path(__file__).resolve().parents[1] / "bench" / "data" / "heldout.txt"


def _lp(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_compare_by_hand():
    rng = np.random.default_rng()
    t, v = 12, 7
    ids = list(rng.integers(0, v, t))
    a, b = _lp(rng.standard_normal((t, v))), _lp(rng.standard_normal((t, v)))
    f = evaluate.compare(a, b, ids, 3.0)
    nll = -np.mean([b[i, ids[i + 1]] for i in range(t - 1)])
    kl = np.mean([np.sum(np.exp(a[i]) * (a[i] - b[i])) for i in range(t - 1)])
    top1 = np.mean([a[i].argmax() == b[i].argmax() for i in range(t - 1)])
    assert f.tokens == t - 1 and f.bits_per_weight == 3.0
    assert f.ppl == pytest.approx(np.exp(nll), rel=1e-12)
    assert f.kl == pytest.approx(kl, rel=1e-12) and f.kl > 0
    assert f.top1 == pytest.approx(top1)
    same = evaluate.compare(a, a, ids)
    assert same.kl == 0 and same.top1 == 1 and same.ratio == 1
    uniform = np.full((t, v), -np.log(v))
    assert evaluate.perplexity(uniform, ids) == pytest.approx(v, rel=1e-12)


def test_log_probs_windows_match_one_pass():
    m = tiny_model()
    ids = list(np.random.default_rng(0).integers(0, 40, 20))
    whole = evaluate.log_probs(m, ids)
    # float32 logits of size ~30 from separate forward calls (BLAS may sum in another order): 1e-4
    np.testing.assert_allclose(whole, _lp(m.forward(ids, all_logits=True).astype(np.float64)), rtol=0, atol=1e-4)
    windows = evaluate.log_probs(m, ids, window=8)
    np.testing.assert_allclose(windows[:8], whole[:8], rtol=0, atol=1e-4)  # same first window
    assert windows.shape == whole.shape


class _ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return [b % 40 for b in text.encode()]


def test_eval_cli_json(monkeypatch, tmp_path, capsys):
    m = tiny_model(7)
    m.tokenizer = _ByteTokenizer()
    monkeypatch.setattr(calibrate, "load_llama", lambda src: m)
    text = tmp_path / "t.txt"
    text.write_text("held-out words that the calibration never saw, " * 3)
    cal = tmp_path / "c.txt"
    cal.write_text("some calibration text about lighthouses and plants " * 4)
    rc = cli.main(["eval", "tiny.gguf", "--bits", "3.5", "--block-size", "32", "--text", str(text),
                   "--calibration", str(cal), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("ppl_ref", "ppl", "kl", "top1", "bits_per_weight", "tokens"):
        assert k in out
    assert out["tokens"] == len(text.read_text().encode()) - 1
    assert 0 < out["bits_per_weight"] <= 3.5 and 0 <= out["top1"] <= 1 and out["kl"] >= 0
    # the same text for both is refused
    assert cli.main(["eval", "x", "--text", str(cal), "--calibration", str(cal)]) == 1


@pytest.mark.slow
def test_calibrated_checkpoint_reloads_to_the_same_perplexity(tmp_path):
    """SmolLM2 through ``predprey compress --calibrate``: the checkpoint, reloaded by
    load_checkpoint + decompress and run by the float64 textbook forward of test_llama, gives
    the perplexity of the packed model run by the runtime, and the model still works at 3.5
    bits: <= 2.5x the original's perplexity (measured 2.02x on the whole held-out text with the
    30 K-token default calibration; docs/fidelity.md)."""
    import predprey_rs as pp
    from _ckpt_helpers import smollm2_gguf
    from predprey_rs import llama
    from predprey_rs.io import load_checkpoint
    from test_llama import _hf_weights, reference_logits

    src = smollm2_gguf()
    out = tmp_path / "ckpt"
    assert cli.main(["compress", str(src), str(out), "--bits", "3.5", "--calibrate", "--json"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["calibration"]["method"] == "gptq" and qc["average_bits_per_weight"] <= 3.5
    orig = llama.LlamaModel.from_gguf(src)
    ids = orig.tokenizer.encode(HELDOUT.read_text())[:256]
    loaded = load_checkpoint(out)
    dense = {k: pp.decompress(v) if isinstance(v, pp.PackedMatrix) else v for k, v in loaded.items()}
    q = llama.LlamaModel.from_weights(orig.config, dense)  # GGUF names: llama.cpp q/k layout
    ppl_ref = evaluate.perplexity(_lp(reference_logits(_hf_weights(orig), orig.config, ids)), ids)
    ppl_np = evaluate.perplexity(_lp(reference_logits(_hf_weights(q), q.config, ids)), ids)
    runtime = llama.LlamaModel.from_checkpoint(out)
    ppl_rt = evaluate.perplexity(evaluate.log_probs(runtime, ids), ids)
    # float32 packed kernels vs float64 dense: the perplexities agree to ~1e-4 relative
    assert ppl_np == pytest.approx(ppl_rt, rel=1e-3)
    assert ppl_np <= 2.5 * ppl_ref
