"""The int8-activation GEMVs (quant_gemv ``words == 3``, quant_words._qstream_prepped with INT8): the
preparation's int8 activations and scales against the fp64 normed activations (each within
half its chunk's step), and every kernel against the fp64 product of the dequantized weight
with the activations as prepared (x̂ read back from the preparation), where dp4a's integer sums
leave only the fp32 scaling's rounding."""
import pytest
import torch
from kutil import DEV, ON_GPU, gen, randn, rel_err

from localsgl.engine.layers.quant import QuantizedWeight, RowStack, WeightFormat
from localsgl.engine.layers.rotary import RotaryEmbedding
from localsgl_kernels import gemv as G
from localsgl_kernels import quant_gemv as QG
from localsgl_kernels import quant_words as QW

FORMATS = [WeightFormat("int4", 128, False), WeightFormat("int4", 32, True), WeightFormat("int8", 0, True),
           WeightFormat("int8", 16, True), WeightFormat("int8", 32, False)]  # the last: GGUF Q5_K / Q5_1
IDS = [f.label().replace(" ", "-") for f in FORMATS]
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
TOL = 2e-2 if ON_GPU else 1e-5  # the output's rounding (bf16 on the GPU)


def _qw(n, k, fmt, g):
    return QuantizedWeight.quantize(torch.randn(n, k, generator=g) * k**-0.5, fmt).to(DEV)


def _cfg(bk=128, r=4):
    return QG.Config(r, bk, 4, 1, 1, 3)


def _xhat(w, xq, xs, k, bk):
    """x̂ [k] in fp64 from _store_int8's words (int8 bytes in their layout) and chunk scales."""
    e = 8 if w.fmt.kind == "int4" else 4
    b = xq.cpu().view(torch.int8).view(-1).double()  # little-endian: byte p of word j
    if e == 4:
        q = b
    else:  # per BK-column step: W words of even columns, then W of odd ones
        wds = bk // 8
        steps = b.view(k // bk, 2, wds, 4)
        q = torch.stack([steps[:, 0], steps[:, 1]], dim=-1).reshape(-1)  # column 8j + 2p + (0 even | 1 odd)
    dx = xs.cpu().double().view(-1, 2)[:, 0]
    return q * dx.repeat_interleave(4 * e)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("one_pass", [True, False])
def test_preparation(fmt, one_pass, monkeypatch):
    """x̂ within half a step of the normed activations, the chunk sums Σ x̂, the residual stored."""
    if not one_pass:
        monkeypatch.setattr(QW, "ONE_PASS_MAX_K", 0)
    g = gen(51 + one_pass)
    k, bk = 512, 128
    w = _qw(8, k, fmt, g)
    x, res = randn(k, g=g, dtype=DTYPE), randn(k, g=g, dtype=DTYPE)
    x[:32] = 0  # an all-zero chunk
    res[:32] = 0
    nw = (1 + 0.1 * randn(k, g=g)).to(DTYPE)
    r_out = torch.empty_like(x)
    xq, xs = QW.prepare_activations(w, x, res, nw, 1e-5, r_out, bk, int8=True)
    r = (x.double() + res.double()).to(DTYPE)
    n = (r.double() * torch.rsqrt(r.double().pow(2).mean() + 1e-5) * nw.double()).cpu()
    e = 8 if fmt.kind == "int4" else 4
    dx_ref = n.view(-1, 4 * e).abs().amax(1) / 127
    pairs = xs.cpu().double().view(-1, 2)
    assert torch.allclose(pairs[:, 0], dx_ref, rtol=1e-5, atol=0) and pairs[0, 0] == 0
    xh = _xhat(w, xq, xs, k, bk)
    step = dx_ref.repeat_interleave(4 * e)
    assert ((xh - n).abs() <= step * (0.5 + 1e-4) + 1e-12).all()
    assert torch.allclose(pairs[:, 1], xh.view(-1, 4 * e).sum(1), rtol=1e-5, atol=1e-6)
    assert torch.equal(r_out, r)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_quality_script_rounds_as_the_kernel(fmt):
    """scripts/int8act_quality.py measures what this rounding costs a model by rounding each
    quantized linear's input in torch: its x̂ equals the preparation kernel's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "int8act_quality.py"
    spec = importlib.util.spec_from_file_location("int8act_quality", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = gen(56)
    k, bk = 512, 128
    w = _qw(8, k, fmt, g)
    x = randn(k, g=g, dtype=torch.float32) * torch.linspace(0.1, 10, k, device=DEV)  # chunks of many scales
    x[64:96] = 0
    xq, xs = QW.prepare_activations(w, x, None, None, 1e-5, None, bk, int8=True)
    assert mod.chunk_of(w) == (32 if fmt.kind == "int4" else 16)
    ours = mod.round_chunks(x.cpu()[None], mod.chunk_of(w))[0].double()
    kernel = _xhat(w, xq, xs, k, bk).float().double()  # q·dx, rounded as an fp32 product is
    # equal on the CPU; on the GPU Triton's fp32 division (dx = amax / 127, 127 / amax) is correct to
    # 2 ulp, so dx may differ by a few ulp (|q·dx| <= amax), and x·127/amax at a tie may round the other way
    ch = mod.chunk_of(w)
    amax = x.cpu().double().view(-1, ch).abs().amax(1).repeat_interleave(ch)
    scaled = x.cpu().double() * 127 / amax.clamp_min(1e-30)
    at_tie = (scaled - scaled.floor() - 0.5).abs() < 127 * 2.0**-20
    diff = (ours - kernel).abs()
    ulps = 0 if DEV == "cpu" else 2.0**-20
    assert ((diff <= amax * ulps) | (at_tie & (diff <= amax / 127 * 1.0001))).all()
    assert (diff <= amax * ulps).float().mean() > 0.99


# stages 2 / 3: each step's weight words loaded 1 / 2 steps ahead (_qstream_prepped's AHEAD)
@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("split", [1, 2])
def test_gemv(fmt, split, stages):
    g = gen(53 + split)
    n, k, bk = (64, 384, 128) if not ON_GPU else (4096, 14336, 512)
    w = _qw(n, k, fmt, g)
    x = randn(1, k, g=g, dtype=DTYPE)
    cfg = QG.Config(4 if not ON_GPU else 8, bk if split == 1 else bk // 2, 4, stages, split, 3)
    assert QG._meta(w, cfg, x.device)["AHEAD"] == stages - 1
    assert QG.words_apply(w, cfg)
    xq, xs = QW.prepare_activations(w, x.view(-1), None, None, 0.0, None, cfg.block_k, int8=True)
    ref = _xhat(w, xq, xs, k, cfg.block_k).to(DEV)[None] @ w.dequantize(torch.float64).t()
    y = QG.gemv(x, w, config=cfg)
    assert rel_err(y, ref) < TOL
    # against the unquantized activations: off by the activations' rounding only
    exact = x.double() @ w.dequantize(torch.float64).t()
    assert rel_err(y, exact) < 2e-2


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_gemv_two_halves_added_into_fp32(fmt):
    """A tile cut in two K halves, asked for fp32 sums: the halves added into an output the
    preparation zeroed (no summing launch) give the partials-then-sum result, whatever the
    output's memory held before; and the fused kernel after it takes those fp32 sums (norm +
    gate/up in the model's dtype, equal to it over the sums rounded first up to that rounding)."""
    g = gen(59)
    n, k, bk = (256, 256, 128) if not ON_GPU else (4096, 14336, 512)
    w = _qw(n, k, fmt, g)
    x = randn(1, k, g=g, dtype=DTYPE)
    cfg = QG.Config(4 if not ON_GPU else 8, bk, 4, 1, 2, 3)
    summed = QG.gemv(x, w, out_dtype=torch.float32, config=cfg._replace(split_k=1))
    for fill in (float("nan"), 7.0):  # the caching allocator hands the output back dirty
        torch.empty(n, dtype=torch.float32, device=DEV).fill_(fill)
        y = QG.gemv(x, w, out_dtype=torch.float32, config=cfg)
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
        assert rel_err(y, summed) < (1e-6 if not ON_GPU else 1e-5)
    wg = _qw(2 * 32, n, fmt, g)
    res = randn(1, n, g=g, dtype=DTYPE)
    nw = randn(n, g=g, dtype=DTYPE) + 2
    gcfg = QG.Config(4, 128, 4, 1, 1, 3)
    a32, r32 = QG.norm_gate_up(y, res, nw, 1e-5, wg, config=gcfg)
    a, r = QG.norm_gate_up(y.to(DTYPE), res, nw, 1e-5, wg, config=gcfg)
    assert a32.dtype == DTYPE and r32.dtype == DTYPE
    assert rel_err(a32, a) < (2e-2 if ON_GPU else 1e-5) and rel_err(r32, r) < (1e-2 if ON_GPU else 1e-6)


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_norm_gate_up(fmt, stages):
    g = gen(57)
    h, i, bk = (256, 48, 64) if not ON_GPU else (4096, 14336, 512)
    x, res = randn(1, h, g=g, dtype=DTYPE), randn(1, h, g=g, dtype=DTYPE)
    nw = (1 + 0.1 * randn(h, g=g)).to(DTYPE)
    w = _qw(2 * i, h, fmt, g)
    cfg = QG.Config(4 if not ON_GPU else 8, bk, 4, stages, 1, 3)
    xq, xs = QW.prepare_activations(w, x.view(-1), res.view(-1), nw, 1e-6, torch.empty(h, dtype=DTYPE, device=DEV),
                                    bk, int8=True)
    xh = _xhat(w, xq, xs, h, bk).to(DEV)[None]
    # x̂ through the reference: rmsnorm(x̂)·rms(x̂) = x̂ (eps 0, unit norm weight)
    wd = w.dequantize(torch.float64) * xh.pow(2).mean().sqrt()
    ra, _ = G.norm_gate_up_ref(xh, torch.zeros_like(xh), torch.ones(h, dtype=torch.float64, device=DEV), 0.0, wd)
    a, r = QG.norm_gate_up(x, res, nw, 1e-6, w, config=cfg)
    assert rel_err(a, ra) < 2 * TOL
    assert torch.equal(r, (x.double() + res.double()).to(DTYPE))


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_norm_qkv(fmt, stages, monkeypatch):
    """The fused q/k/v kernel over int8 activations, alone and as a row stack's first block; the
    stack's second block (int8 g16) then streams the raw activations (its tile without
    preparation) or int8 ones in its own layout from the same preparation (its tile prepares)."""
    g = gen(59)
    hq, hkv, d, h, bk = (4, 2, 32, 256, 128) if not ON_GPU else (32, 8, 128, 4096, 512)
    x, res = randn(1, h, g=g, dtype=DTYPE), randn(1, h, g=g, dtype=DTYPE)
    nw = (1 + 0.1 * randn(h, g=g)).to(DTYPE)
    cfg = QG.Config(4 if not ON_GPU else 8, bk, 4, stages, 1, 3)
    rope = RotaryEmbedding(d, 64, 10000.0, None, device=DEV)
    pos, loc = torch.tensor([21], device=DEV), torch.tensor([1], device=DEV)
    i8 = WeightFormat("int8", 16, True)
    one = _qw((hq + 2 * hkv) * d, h, fmt, g)
    stack = RowStack([_qw((hq + hkv) * d, h, fmt, g), _qw(hkv * d, h, i8, g)])
    ones = torch.ones(h, dtype=torch.float64, device=DEV)

    def xhat(w, bk_w):
        xq, xs = QW.prepare_activations(w, x.view(-1), res.view(-1), nw, 1e-5, torch.empty(h, dtype=DTYPE, device=DEV),
                                        bk_w, int8=True)
        return _xhat(w, xq, xs, h, bk_w).to(DEV)[None]

    for w, v_words in ((one, None), (stack, 1), (stack, 3)):
        v_cfg = QG.Config(4, 64, 4, 1, 1, v_words or 1)
        monkeypatch.setattr(QG, "default_config", lambda b, rows, dev: cfg if b.fmt == fmt else v_cfg)
        first = w if w is one else w.parts[0]
        xh = xhat(first, bk)
        wd = w.dequantize(torch.float64) * xh.pow(2).mean().sqrt()  # rmsnorm(x̂)·rms(x̂) = x̂
        rq, rk, rv, _ = G.norm_qkv_ref(xh, None, ones, 0.0, wd, None, rope.cos_sin.double(), pos, hq, hkv)
        kc, vc = torch.zeros(3, hkv, d, dtype=DTYPE, device=DEV), torch.zeros(3, hkv, d, dtype=DTYPE, device=DEV)
        q, r = QG.norm_qkv(x, res, nw, 1e-5, w, None, rope.cos_sin, pos, loc, kc, vc, hq, hkv)
        assert rel_err(q, rq) < 2 * TOL and rel_err(kc[1], rk[0]) < 2 * TOL
        if v_words == 3:  # v over the int8 activations of its own layout (16-column chunks)
            assert QG._pair_configs(w.parts, d, h, DEV)[1].words == 3
            rv = (xhat(w.parts[1], 64) @ w.parts[1].dequantize(torch.float64).t()).view(1, hkv, d)
        # the raw v: the exact normed activations, within their rounding to x̂ of the reference
        assert rel_err(vc[1], rv[0]) < (2e-2 if v_words == 1 else 2 * TOL)
        assert torch.equal(r.view(-1), (x.double() + res.double()).to(DTYPE).view(-1))
