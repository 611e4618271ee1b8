"""Calibration (predprey_rs.calibrate) on a tiny random LLaMA: the statistics are those of the
layer inputs (checked against inputs recomputed by hand), sequential calibration takes each
layer's statistics from the model whose earlier layers are already compressed, the bit
allocation keeps its average, and GPTQ lowers the output error at the same size."""

from __future__ import annotations

import numpy as np
import pytest

import predprey_rs as pp
from predprey_rs import _core, calibrate, llama

SUFFIXES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def tiny_model(seed: int = 0, layers: int = 2, d: int = 64, ff: int = 160, vocab: int = 40) -> llama.LlamaModel:
    rng = np.random.default_rng(seed)
    cfg = llama.LlamaConfig(hidden_size=d, n_layers=layers, n_heads=4, n_kv_heads=2, intermediate_size=ff,
                            vocab_size=vocab)
    hd = cfg.head_dim
    w = {"token_embd.weight": rng.standard_normal((vocab, d)).astype(np.float32),
         "output_norm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)}
    shapes = {"attn_q": (d, d), "attn_k": (2 * hd, d), "attn_v": (2 * hd, d), "attn_output": (d, d),
              "ffn_gate": (ff, d), "ffn_up": (ff, d), "ffn_down": (d, ff)}
    for i in range(layers):
        w[f"blk.{i}.attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        w[f"blk.{i}.ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        for s, (n, k) in shapes.items():
            w[f"blk.{i}.{s}.weight"] = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    return llama.LlamaModel.from_weights(cfg, w)


def _inputs(model: llama.LlamaModel, ids: list[int]) -> dict[str, np.ndarray]:
    """Every linear layer's input for ``ids``, recomputed by hand from the runtime's pieces."""
    cfg = model.config
    x = model.embedding[np.asarray(ids)]
    out = {}
    for i, blk in enumerate(model.blocks):
        h = llama._rms_norm(x, blk.attn_norm, cfg.rms_eps)
        for s in ("attn_q", "attn_k", "attn_v"):
            out[f"blk.{i}.{s}.weight"] = h
        # the attention output (o's input) is what block_step feeds o: capture it through o itself
        seen = {}
        o_lin, down_lin = blk.o, blk.down
        blk.o = lambda a, f=o_lin: seen.setdefault("o", a) is not None and f(a)
        blk.down = lambda a, f=down_lin: seen.setdefault("down", a) is not None and f(a)
        try:
            x_next = model.block_step(i, x, np.arange(len(ids)), llama.KVCache(cfg, len(ids)))
        finally:
            blk.o, blk.down = o_lin, down_lin
        out[f"blk.{i}.attn_output.weight"] = seen["o"]
        x_mid = x + o_lin(seen["o"])
        h2 = llama._rms_norm(x_mid, blk.ffn_norm, cfg.rms_eps)
        out[f"blk.{i}.ffn_gate.weight"] = out[f"blk.{i}.ffn_up.weight"] = h2
        down_in = llama._silu(blk.gate(h2)) * blk.up(h2)
        assert np.allclose(down_in, seen["down"], rtol=1e-5, atol=1e-6)
        out[f"blk.{i}.ffn_down.weight"] = down_in
        x = x_next
    return out


def test_collect_stats_are_input_moments():
    m = tiny_model()
    rng = np.random.default_rng(1)
    seqs = [list(rng.integers(0, 40, 17)), list(rng.integers(0, 40, 9))]
    st = calibrate.collect_stats(m, seqs, want_h=True)
    assert set(st) == {f"blk.{i}.{s}.weight" for i in range(2) for s in SUFFIXES}
    xs = [_inputs(m, s) for s in seqs]
    for name, s in st.items():
        x = np.concatenate([a[name] for a in xs]).astype(np.float64)
        assert s.n == 26
        # float32 activations summed in float64: agreement to float32 rounding
        np.testing.assert_allclose(s.importance, (x * x).mean(0), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(s.hessian, x.T @ x / 26, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["importance", "gptq"])
def test_sequential_stats_come_from_the_compressed_prefix(method):
    """Layer L's importance equals mean x^2 of its input in the model whose layers before L
    (in data-flow order) are the packed ones and the rest original."""
    m = tiny_model(2)
    rng = np.random.default_rng(3)
    ids = list(rng.integers(0, 40, 24))
    before = m.forward(ids, all_logits=True)
    packed, imp = calibrate.quantize_model(m, [ids], 3.0, 32, method=method)
    assert np.array_equal(m.forward(ids, all_logits=True), before), "the model must be left as it was"
    order = [f"blk.{i}.{s}.weight" for i in range(2) for s in SUFFIXES]
    stage_of = {"attn_q": 0, "attn_k": 0, "attn_v": 0, "attn_output": 1, "ffn_gate": 2, "ffn_up": 2, "ffn_down": 3}
    for name in ["blk.0.attn_output.weight", "blk.0.ffn_down.weight", "blk.1.attn_q.weight", "blk.1.ffn_up.weight"]:
        i, s = int(name.split(".")[1]), name.split(".")[2]
        earlier = [n for n in order if (int(n.split(".")[1]), stage_of[n.split(".")[2]]) < (i, stage_of[s])]
        mixed = llama.LlamaModel.from_weights(m.config, {**m.weights, **{n: packed[n] for n in earlier}})
        x = _inputs(mixed, ids)[name].astype(np.float64)
        np.testing.assert_allclose(imp[name], (x * x).mean(0), rtol=1e-4, atol=1e-7)
    # and not from the original model (the compression error is visible in the statistics)
    x0 = _inputs(m, ids)["blk.1.attn_q.weight"].astype(np.float64)
    assert not np.allclose(imp["blk.1.attn_q.weight"], (x0 * x0).mean(0), rtol=1e-4)


def test_one_pass_equals_plain_importance_compress():
    m = tiny_model(4)
    ids = list(np.random.default_rng(5).integers(0, 40, 30))
    packed, imp = calibrate.quantize_model(m, [ids], 3.0, 32, sequential=False)
    for name, p in packed.items():
        want = pp.compress(m.weights[name], bits=3.0, block_size=32, importance=imp[name])
        assert p.to_bytes() == want.to_bytes()


def test_layer_bits_keep_the_average():
    m = tiny_model()
    offs = {"attn_v": 0.5, "attn_k": 0.25, "ffn_down": 0.1}
    b = calibrate.layer_bits(m, 3.0, offs)
    size = {n: np.prod(m.weights[n].shape) for n in b}
    assert abs(sum(b[n] * size[n] for n in b) / sum(size.values()) - 3.0) < 1e-12
    assert b["blk.0.attn_v.weight"] - b["blk.0.attn_q.weight"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown layer types"):
        calibrate.layer_bits(m, 3.0, {"attn_x": 1.0})
    d = calibrate.layer_bits(m, 3.0, offs, 64, {0: 0.5})  # block 0 gets 0.5 bits more than block 1
    assert abs(sum(d[n] * size[n] for n in d) / sum(size.values()) - 3.0) < 1e-12
    for suf in SUFFIXES:
        assert d[f"blk.0.{suf}.weight"] - d[f"blk.1.{suf}.weight"] == pytest.approx(0.5)
    packed, _ = calibrate.quantize_model(m, [list(range(20))], b, 64)
    for n, p in packed.items():
        assert p.bits_per_weight <= b[n] + 1e-9


def _correlated_layer(n: int, k: int, t: int = 2048):
    """Heavy-tailed weights (n, k), inputs (t, k) with correlated columns of uneven scale (as
    in a real layer), and their second moment H."""
    rng = np.random.default_rng()
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = (rng.standard_normal((t, k)) @ mix * rng.uniform(0.2, 3.0, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) * rng.standard_t(4, (n, k)) / np.sqrt(k)).astype(np.float32)
    return w, x, x.astype(np.float64).T @ x / t


def test_gptq_lowers_output_error_at_the_same_size():
    """Correlated inputs (as in a real layer): error feedback gives a smaller ||(W - Q) X||
    than rounding each weight on its own, at exactly the importance-only encoding's options."""
    w, x, h = _correlated_layer(48, 256)
    imp = np.diag(h).astype(np.float32)
    for bits in (2.5, 3.0, 3.5):
        plain = pp.compress(w, bits=bits, block_size=64, importance=imp)
        g = calibrate.gptq_quantize(w, h, bits, 64)
        assert g.nbytes == plain.nbytes  # same options, same size
        assert _core.to_parts(g)["p2"].tolist() == _core.to_parts(plain)["p2"].tolist()
        e_plain = np.linalg.norm((w - pp.decompress(plain)) @ x.T)
        e_gptq = np.linalg.norm((w - pp.decompress(g)) @ x.T)
        # GPTQ typically removes 20-40% here; 5% leaves room for unlucky draws
        assert e_gptq < 0.95 * e_plain, (bits, e_gptq, e_plain)


def test_act_order_and_refit_keep_the_size_and_lower_the_output_error():
    """Inside-block act order and the joint least-squares refit of the scales change neither
    the options nor the size; the refit never raises ||(W - Q) X|| beyond FP16 rounding of the
    scales, since the codes it starts from are one point of its search space."""
    w, x, h = _correlated_layer(40, 200)
    plain = pp.compress(w, bits=3.0, block_size=64, importance=np.diag(h).astype(np.float32))
    err = lambda p: np.linalg.norm((w - pp.decompress(p)) @ x.T)  # noqa: E731
    for act in (False, True):
        g = calibrate.gptq_quantize(w, h, 3.0, 64, act_order=act)
        assert g.nbytes == plain.nbytes
        assert _core.to_parts(g)["p2"].tolist() == _core.to_parts(plain)["p2"].tolist()
        assert np.isfinite(_core.to_parts(g)["pred"]).sum() == np.isfinite(_core.to_parts(plain)["pred"]).sum()
        assert err(g) < 0.97 * err(plain)
        r = calibrate.refit_scales(g, w, h, damp=0.0)
        assert r.nbytes == g.nbytes
        pr, pg = _core.to_parts(r), _core.to_parts(g)
        assert np.array_equal(np.abs(pr["t1"]), np.abs(pg["t1"]))  # same supports (signs may flip)
        assert np.array_equal(pr["pred"], pg["pred"], equal_nan=True)
        assert np.all(pr["s1"] >= 0) and np.all(pr["s2"] >= 0)
        assert err(r) <= err(g) * (1 + 1e-3)
        rp = calibrate.refit_scales(g, w, h, damp=0.0, predators=True)  # predator values re-solved too
        assert rp.nbytes == g.nbytes
        assert np.array_equal(np.isfinite(_core.to_parts(rp)["pred"]), np.isfinite(pg["pred"]))
        assert err(rp) <= err(r) * (1 + 1e-3)
        # around given scales: same options and size; and around its own scales (already on
        # their 8-bit grid, which the fixed pass keeps) a pass rounds exactly as before
        again = calibrate.gptq_quantize(w, h, 3.0, 64, act_order=act, fixed=g)
        assert again.nbytes == g.nbytes and np.array_equal(_core.to_parts(again)["s1"], _core.to_parts(g)["s1"])
        assert err(again) < 1.05 * err(g)
        twice = calibrate.gptq_quantize(w, h, 3.0, 64, act_order=act, fixed=again)
        assert np.array_equal(pp.decompress(twice), pp.decompress(again))
        # with the grid fixed up front the first pass already rounds to the stored scales
        gg = calibrate.gptq_quantize(w, h, 3.0, 64, act_order=act, grid_headroom=1.1)
        assert gg.nbytes == g.nbytes and err(gg) < 0.97 * err(plain)
        # rows GPTQ kept are on the grid; any other row is plain's own (the runaway guard)
        own = np.any(pp.decompress(gg) != pp.decompress(plain), axis=1)
        unit = _core.to_parts(plain)["row_scales"] * 1.1
        np.testing.assert_allclose(_core.to_parts(gg)["row_scales"][own], unit[own], rtol=2**-10)
        assert np.array_equal(_core.to_parts(gg)["row_scales"][~own], _core.to_parts(plain)["row_scales"][~own])
        same = calibrate.gptq_quantize(w, h, 3.0, 64, act_order=act, fixed=gg)
        assert np.array_equal(pp.decompress(same)[own], pp.decompress(gg)[own])
        assert err(same) <= err(gg) * (1 + 1e-6)
        # around the refitted scales: same options and size, a different encoding
        p2 = calibrate.gptq_quantize(w, h, 3.0, 64, act_order=act, fixed=r)
        assert p2.nbytes == g.nbytes and np.array_equal(_core.to_parts(p2)["s1"], pr["s1"])
        assert err(p2) < 1.05 * err(r)


def test_gptq_never_ends_a_row_worse_than_its_start():
    """A scale grid far too tight (a quarter of the row scale the plain fit needs) clamps the
    scales GPTQ wants, and its error feedback then runs away on most rows; every such row must
    fall back to the importance-weighted encoding, so no row's output error (w - q) H (w - q)^T
    exceeds that encoding's and the size stays the same."""
    w, x, h = _correlated_layer(30, 160)
    plain = pp.compress(w, bits=3.0, block_size=64, importance=np.diag(h).astype(np.float32))

    def row_err(p):
        d = w.astype(np.float64) - pp.decompress(p)
        return np.einsum("ij,ij->i", d @ h, d)

    for fixed_grid in (0.25, 1.1):
        q = calibrate.gptq_quantize(w, h, 3.0, 64, act_order=True, grid_headroom=fixed_grid)
        assert q.nbytes == plain.nbytes
        assert np.all(row_err(q) <= row_err(plain) * (1 + 1e-9))
        fell_back = np.all(pp.decompress(q) == pp.decompress(plain), axis=1)
        if fixed_grid == 0.25:
            assert fell_back.mean() > 0.5  # the guard was needed, not idle
        else:
            assert fell_back.mean() < 0.5  # a fitting grid: GPTQ's rows are kept


_U = np.array([-1, -1, -1, 0, 0, 0, 1, 1, 1], dtype=np.int8)
_V = np.array([-1, 0, 1, -1, 0, 1, -1, 0, 1], dtype=np.int8)


def _gptq_block_reference(w, h, u, planes, npred):
    """The obviously-correct numpy spelling of one block column of GPTQ (what _core.gptq_block
    does): fit the scales, then round column by column to the nearest of the row's levels,
    pushing each column's scaled error onto the block's later columns."""
    w = w.copy()
    n, l = w.shape
    s1, s2, _, _, fpred = _core.fit_block(w, h, planes, npred)
    s2 = np.where(planes == 2, s2, 0).astype(np.float32)
    ispred = np.isfinite(fpred)
    lev = s1[:, None] * _U[None, :] + s2[:, None] * _V[None, :]
    rows = np.arange(n)
    t1, t2 = np.zeros((n, l), np.int8), np.zeros((n, l), np.int8)
    pred = np.full((n, l), np.nan, np.float32)
    err = np.zeros((n, l), np.float32)
    for j in range(l):
        col = w[:, j]
        idx = np.abs(col[:, None] - lev).argmin(1)
        q = lev[rows, idx]
        pv = ispred[:, j]
        q = np.where(pv, col.astype(np.float16).astype(np.float32), q)
        pred[pv, j] = col[pv].astype(np.float16).astype(np.float32)
        t1[:, j] = np.where(pv, 0, _U[idx])
        t2[:, j] = np.where(pv | (planes == 1), 0, _V[idx])
        err[:, j] = (col - q) / u[j, j]
        w[:, j + 1:] -= np.outer(err[:, j], u[j, j + 1:])
    return s1, s2, t1, t2, pred, err


@pytest.mark.parametrize("l", [32, 64, 37])
def test_gptq_block_matches_the_numpy_reference(l):
    rng = np.random.default_rng()
    n = 23
    w = (rng.standard_normal((n, l)) * rng.standard_t(4, (n, l))).astype(np.float32)
    a = rng.standard_normal((l, l))
    u_f = np.linalg.cholesky(np.linalg.inv(a @ a.T / l + np.eye(l))).T.astype(np.float32)  # Fortran order
    u = np.ascontiguousarray(u_f)
    h = rng.uniform(0.1, 2.0, l).astype(np.float32)
    planes = rng.integers(1, 3, n).astype(np.uint8)
    npred = rng.integers(0, 5, n).astype(np.uint8)
    got = _core.gptq_block(w, h, u, planes, npred)
    ref = _gptq_block_reference(w, h, u, planes, npred)
    for name, g, r in zip(("s1", "s2", "t1", "t2", "pred", "err"), got, ref):
        assert g.shape == r.shape, name
        if g.dtype == np.int8:
            # float32 sums in another order may flip a rounding exactly at a tie: allow a few
            assert np.mean(g != r) < 0.01, name
        else:
            assert np.allclose(g, r, rtol=1e-3, atol=1e-4, equal_nan=True), name
    with pytest.raises(pp.ShapeError, match="C-contiguous"):  # never read transposed
        _core.gptq_block(w, h, u_f, planes, npred)
    with pytest.raises(pp.ShapeError, match="u has shape"):
        _core.gptq_block(w, h, u[:-1], planes, npred)
    bad = u.copy()
    bad[3, 3] = 0
    with pytest.raises(pp.WeightError, match="positive finite diagonal"):
        _core.gptq_block(w, h, bad, planes, npred)


def test_bad_calls():
    m = tiny_model()
    with pytest.raises(ValueError, match="method"):
        calibrate.quantize_model(m, [[1, 2]], 3.0, 32, method="nope")
    with pytest.raises(ValueError, match="non-empty"):
        calibrate.quantize_model(m, [[]], 3.0, 32)
    with pytest.raises(ValueError, match="LLaMA-family"):
        calibrate.load_llama(__file__)


def test_upstream_target_is_the_ridge_solution():
    """W' makes W' xq match W xo: exactly W when the inputs agree, W M when xo = xq M^T."""
    rng = np.random.default_rng()
    n, k, t = 8, 24, 600
    w = rng.standard_normal((n, k)).astype(np.float32)
    xq = [rng.standard_normal((t, k)).astype(np.float32), rng.standard_normal((t // 2, k)).astype(np.float32)]
    np.testing.assert_allclose(calibrate._upstream_target(w, xq, xq, 0.01), w, rtol=0, atol=1e-5)
    mix = (np.eye(k) + 0.1 * rng.standard_normal((k, k))).astype(np.float32)
    xo = [x @ mix.T for x in xq]
    # damping 1e-6 of the mean diagonal: the ridge solution is W M to ~1e-5
    np.testing.assert_allclose(calibrate._upstream_target(w, xq, xo, 1e-6), w @ mix, rtol=0, atol=1e-3)


def test_upstream_runs_and_fits_the_budget():
    m = tiny_model(9)
    ids = list(np.random.default_rng(2).integers(0, 40, 50))
    for method in ("importance", "gptq"):
        packed, _ = calibrate.quantize_model(m, [ids], 3.0, 32, method=method, upstream=True)
        assert set(packed) == set(m.linear_layers())
        assert all(p.bits_per_weight <= 3.0 for p in packed.values())


def test_layer_bits_floor():
    """At a low average the offsets would push attn_q under the fixed plane-1 cost: it is held at
    the floor and the rest pay, the average still exact."""
    m = tiny_model()
    b = calibrate.layer_bits(m, 2.0, {"attn_q": -1.0, "attn_v": 1.0}, 64)
    size = {n: np.prod(m.weights[n].shape) for n in b}
    assert abs(sum(b[n] * size[n] for n in b) / sum(size.values()) - 2.0) < 1e-12
    assert min(b.values()) == pytest.approx(1.7 + 8 / 64)
    assert b["blk.0.attn_q.weight"] == pytest.approx(1.825)


def test_default_calibration_text_is_not_the_heldout_text():
    from pathlib import Path

    text = calibrate.default_calibration_text()
    root = Path(calibrate.__file__).parent / "data"
    assert text.startswith((root / "calibration.txt").read_text()[:200])
    assert (root / "calibration_generated.txt").read_text()[:200] in text
    assert (root / "calibration_sampled.txt").read_text()[:200] in text
    assert len(text) > 100_000  # ~30 K tokens: GPTQ needs them (docs/fidelity.md)
    flat = " ".join(text.split())
    for name in ("heldout.txt", "validation.txt"):  # neither evaluation text leaks into calibration
        words = (Path(__file__).resolve().parents[1] / "bench" / "data" / name).read_text().split()
        # no 8-word run of the evaluation text appears in the calibration text
        assert not any(" ".join(words[i:i + 8]) in flat for i in range(len(words) - 7)), name
