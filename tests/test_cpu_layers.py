"""The CPU fast paths of the model layers against their references: fused fp32 RMSNorm and
the one-table rotary give the reference's exact bits; input-major Linear weights keep
names, shapes and results; the tied-head copy is used for logits; the CPU routes follow what
torch runs natively, and every GEMM route stays within the rounding bound of its arithmetic."""
import dataclasses
import os
import platform
import subprocess
import sys

import pytest
import torch

from localsgl.engine.layers import cpu_routes
from localsgl.engine.layers.linear import Linear, MergedLinear, cpu_mm, linear, use_cpu_weight_layout
from localsgl.engine.layers.norm import RMSNorm, rms_norm_ref
from localsgl.engine.layers.rotary import RotaryEmbedding, apply_rotary_ref

sys.path.insert(0, "tests")

F32_INPUT_MAJOR = cpu_routes.choose(torch.float32, "test", native=True)  # whatever this CPU's probe chose


def gemm_error_bound(x: torch.Tensor, w: torch.Tensor, acc: torch.dtype, out: torch.dtype | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise worst-case |computed - exact| of x [M, K] @ w [K, N] (+ bias) with the sums
    accumulated in ``acc`` and the result rounded to ``out``: gamma_n * (|x| @ |w| + |bias|)
    with gamma_n = n*u / (1 - n*u) for sums of n terms in any order (Higham, Accuracy and
    Stability of Numerical Algorithms, 3.1; the bias is one more term), plus out's unit
    roundoff times the result's size.  In fp64, from the operands' own values."""
    n = x.shape[-1] + (bias is not None)
    u = torch.finfo(acc).eps / 2
    mag = x.double().abs() @ w.double().abs()
    exact = x.double() @ w.double()
    if bias is not None:
        mag, exact = mag + bias.double().abs(), exact + bias.double()
    bound = n * u / (1 - n * u) * mag
    if out is not None and torch.finfo(out).eps > torch.finfo(acc).eps:
        bound = bound + torch.finfo(out).eps / 2 * (exact.abs() + bound)
    return bound


def test_rmsnorm_fp32_bits_equal_reference():
    g = torch.Generator().manual_seed(0)
    for h in (64, 576, 960):
        norm = RMSNorm(h, 1e-5)
        norm.weight.data = torch.randn(h, generator=g)
        for scale in (1e-3, 1.0, 1e3):
            x = torch.randn(5, h, generator=g) * scale
            r = torch.randn(5, h, generator=g)
            assert torch.equal(norm(x), rms_norm_ref(x, norm.weight, 1e-5))
            y, s = norm(x, r)
            assert torch.equal(s, x + r) and torch.equal(y, rms_norm_ref(x + r, norm.weight, 1e-5))
    nb = RMSNorm(64, 1e-5, dtype=torch.bfloat16)  # other dtypes: the reference itself
    xb = torch.randn(3, 64, generator=g).bfloat16()
    assert torch.equal(nb(xb), rms_norm_ref(xb, nb.weight, 1e-5))


def test_rotary_tables_bits_equal_reference():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    rope = RotaryEmbedding(64, 512, 500000.0, llama3)
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, 512, (7,), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(7, 6, 64, generator=g).to(dtype)
        k = torch.randn(7, 2, 64, generator=g).to(dtype)
        rope.begin_forward()
        oq, ok = rope(pos, q, k)
        rq, rk = apply_rotary_ref(q, k, pos, rope.cos_sin)
        assert torch.equal(oq, rq) and torch.equal(ok, rk)
    # the tables are rebuilt for a new positions tensor, and after begin_forward
    pos2 = pos + 1
    q = torch.randn(7, 6, 64, generator=g)
    k = torch.randn(7, 2, 64, generator=g)
    assert torch.equal(rope(pos2, q, k)[0], apply_rotary_ref(q, k, pos2, rope.cos_sin)[0])


def test_input_major_linear_weights():
    g = torch.Generator().manual_seed(2)
    lin = Linear(48, 80, bias=True)
    merged = MergedLinear(48, {"a": 16, "b": 32})
    for p in (lin.weight, lin.bias, merged.weight):
        p.data = torch.randn(p.shape, generator=g)
    x1, x8 = torch.randn(1, 48, generator=g), torch.randn(8, 48, generator=g)
    before = [m(x) for m in (lin, merged) for x in (x1, x8)]
    model = torch.nn.ModuleDict({"lin": lin, "merged": merged})
    with cpu_routes.forced(F32_INPUT_MAJOR):
        use_cpu_weight_layout(model)
    assert lin.weight.shape == (80, 48) and lin.weight.stride() == (1, 80)
    after = [m(x) for m in (lin, merged) for x in (x1, x8)]
    bounds = [gemm_error_bound(x, m.weight.t(), torch.float32, bias=m.bias) for m in (lin, merged) for x in (x1, x8)]
    for a, b, bound in zip(before, after, bounds):  # two fp32 roundings of the same sums
        assert ((a - b).abs() <= 2 * bound).all()


def _tied_model():
    from tiny import tiny_model

    from localsgl.engine.models.llama import LlamaForCausalLM

    cfg = tiny_model(vocab=96, hidden=32).config
    cfg.tie_word_embeddings = True
    torch.manual_seed(3)
    m = LlamaForCausalLM(cfg, torch.float32, "cpu")
    for p in m.parameters():
        p.data.copy_(torch.randn(p.shape) * 0.3)
    return m


def test_tied_head_copy_gives_same_logits():
    m = _tied_model()
    assert m.lm_head is None
    h = torch.randn(3, 32)
    ref = m.compute_logits(h)
    bound = 2 * gemm_error_bound(h, m.embed_tokens.weight.t(), torch.float32)  # two fp32 roundings
    m2 = _tied_model()
    with cpu_routes.forced(F32_INPUT_MAJOR):
        use_cpu_weight_layout(m)
        use_cpu_weight_layout(m2, max_head_copy_bytes=0)  # too big to copy: the embedding serves
    assert m.lm_head_weight_cpu is not None and m.lm_head_weight_cpu.stride() == (1, 96)
    assert ((m.compute_logits(h) - ref).abs() <= bound).all()
    assert m2.lm_head_weight_cpu is None and ((m2.compute_logits(h) - ref).abs() <= bound).all()


def test_loader_applies_the_cpu_layout():
    """load_model on the CPU lays every Linear out as this machine's fp32 route says and gives
    a tied head its input-major copy when the route is input-major."""
    from localsgl.engine.models.loader import load_model
    from localsgl.store.resolve import resolve_model

    m = load_model(resolve_model("smollm2-135m"), torch.float32, "cpu")
    input_major = cpu_routes.cpu_routes(torch.float32).input_major
    lins = [mod for mod in m.modules() if isinstance(mod, Linear)]
    assert lins and all((mod.weight.stride(0) == 1) == input_major for mod in lins)
    assert m.lm_head is None and (m.lm_head_weight_cpu is not None) == input_major
    if input_major:
        assert torch.equal(m.lm_head_weight_cpu, m.embed_tokens.weight)


# ----------------------------------------------------------------------------- CPU routes


def test_routes_by_signal():
    f32 = cpu_routes.choose(torch.float32, "AVX2", native=True)
    assert f32.input_major and not f32.widen(32) and not f32.attention_fp32
    assert not cpu_routes.choose(torch.float32, "AVX2", True, fp32_input_major=False).input_major
    for dtype in (torch.bfloat16, torch.float16):
        native = cpu_routes.choose(dtype, "AVX512", native=True)
        assert not native.input_major and not native.widen(1 << 20) and not native.attention_fp32
        emulated = cpu_routes.choose(dtype, "AVX2", native=False)
        assert not emulated.input_major and emulated.attention_fp32
        assert emulated.widen(cpu_routes.WIDEN_MIN_ROWS) and not emulated.widen(cpu_routes.WIDEN_MIN_ROWS - 1)
        assert not emulated.widen(1)  # one row: torch's low-precision GEMV
        assert "emulated" in emulated.describe() and "native" in native.describe()
        probed = cpu_routes.choose(dtype, "AVX512", True, onednn=True, lowp_attention_fp32=True)
        assert probed.onednn and probed.attention_fp32 and not probed.input_major and "oneDNN" in probed.describe()
        assert not cpu_routes.choose(dtype, "AVX2", False, onednn=True, lowp_attention_fp32=True).onednn
    onednn = cpu_routes.choose(torch.float32, "AVX512", True, fp32_input_major=True, onednn=True)
    assert onednn.onednn and not onednn.input_major and not onednn.attention_fp32  # oneDNN takes row-major weights
    assert "BLAS" in f32.describe()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 ISA variables")
def test_routes_read_what_torch_and_onednn_run():
    """ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 make any x86 CPU take the AVX2-only
    routes: the routes read torch's capability and oneDNN's native bf16, which honour them."""
    code = ("import torch; from localsgl.engine.layers.cpu_routes import cpu_routes as r; "
            "b = r(torch.bfloat16); print(b.capability, b.native, b.widen(32), b.input_major)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["AVX2", "False", "True", "False"]


def test_fp32_layout_probe():
    """The probe times both layouts at each row count (at least two rounds after a warm-up,
    however small its budget); the decision keeps input-major unless row-major is clearly
    faster over the row counts together."""
    times = cpu_routes.probe_fp32_layout(rows=(1, 4), k=64, n=96, mib=1, budget_s=0.0)
    assert len(times) == 2 and all(0 < t < float("inf") for pair in times for t in pair)
    m = cpu_routes.ROW_MAJOR_MARGIN
    assert cpu_routes.prefer_input_major([(1.0, 1.0), (1.0, 1.0)])
    assert cpu_routes.prefer_input_major([(1.1, 1.0)])  # within the margin: input-major
    assert not cpu_routes.prefer_input_major([(m + 0.01, 1.0)])
    # input-major 1.6x slower at one row and as fast at 32 rows: row-major (sqrt(1.6) > m)
    assert not cpu_routes.prefer_input_major([(1.6, 1.0), (1.0, 1.0)])
    # input-major 1.5x slower at one row, 2.8x faster at 32 rows: input-major
    assert cpu_routes.prefer_input_major([(1.5, 1.0), (1.0, 2.8)])


def test_onednn_and_attention_probes():
    """The probes time both candidates at each row count (tiny shapes, no budget); a route moves
    only for a clear gain over the row counts together."""
    if cpu_routes.onednn_available():
        for dtype in (torch.float32, torch.bfloat16):
            times = cpu_routes.probe_onednn(dtype, rows=(1, 4), k=64, n=96, mib=1, budget_s=0.0)
            assert len(times) == 2 and all(0 < t < float("inf") for pair in times for t in pair)
    times = cpu_routes.probe_lowp_attention(torch.bfloat16, batches=(1, 3), context=16, budget_s=0.0)
    assert len(times) == 2 and all(0 < t < float("inf") for pair in times for t in pair)
    m = cpu_routes.ONEDNN_MARGIN
    assert not cpu_routes._faster([(1.0, 1.0)], m) and cpu_routes._faster([(m + 0.01, 1.0)], m)
    assert not cpu_routes._faster([(2.0, 1.0), (1.0, 2.0)], m)  # faster at one row count, slower at the other
    assert cpu_routes._faster([(1.6, 1.0), (1.0, 1.0)], m)


@pytest.mark.parametrize("onednn_gain,attention_gain", [(1.0, 1.0), (2.0, 3.0)])
def test_detected_routes_follow_the_probes(monkeypatch, onednn_gain, attention_gain):
    """detected_routes turns the probes' times into the routes: oneDNN GEMMs (row-major weights)
    and fp32 attention only where their probe found them clearly faster; the layout probe decides
    fp32's layout otherwise; an emulated bf16 runs none of the GEMM and attention probes."""
    ran = []
    monkeypatch.setattr(cpu_routes, "onednn_available", lambda: True)
    monkeypatch.setattr(cpu_routes, "native_matmul", lambda dtype: dtype != torch.float16)
    monkeypatch.setattr(cpu_routes, "probe_fp32_layout", lambda: ran.append("layout") or [(1.0, 1.0), (1.0, 1.0)])
    monkeypatch.setattr(cpu_routes, "probe_onednn",
                        lambda dtype, im: ran.append(("onednn", dtype, im)) or [(onednn_gain, 1.0)] * 2)
    monkeypatch.setattr(cpu_routes, "probe_lowp_attention",
                        lambda dtype: ran.append(("attention", dtype)) or [(attention_gain, 1.0)] * 2)
    detect = cpu_routes.detected_routes.__wrapped__  # uncached: this machine's routes stay as probed
    on = onednn_gain > cpu_routes.ONEDNN_MARGIN
    f32 = detect(torch.float32)
    assert ran == ["layout", ("onednn", torch.float32, True)]
    assert f32.onednn == on and f32.input_major == (not on) and not f32.attention_fp32
    ran.clear()
    bf16 = detect(torch.bfloat16)
    assert ran == [("onednn", torch.bfloat16, True), ("attention", torch.bfloat16)]
    assert bf16.native and bf16.onednn == on and bf16.attention_fp32 == (attention_gain > cpu_routes.ATTENTION_FP32_MARGIN)
    ran.clear()
    fp16 = detect(torch.float16)  # emulated here: no probe, the fixed emulated routes
    assert ran == [] and not fp16.native and not fp16.onednn and fp16.attention_fp32


def test_blas_route_takes_the_gemv_for_one_row_of_a_row_major_weight(monkeypatch):
    """blas_mm (cpu_mm's route without oneDNN, and the oneDNN probe's baseline): torch's GEMV for
    one row of a row-major weight, its GEMM for more rows or an input-major weight; same values."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(40, 200, generator=g)
    calls = []
    real_mv, real_mm = torch.mv, torch.mm
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append("mv") or real_mv(*a))
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append("mm") or real_mm(*a))
    for rows, view, route in ((1, w.t(), "mv"), (2, w.t(), "mm"), (1, w.t().contiguous(), "mm")):
        x = torch.randn(rows, 200, generator=g)
        calls.clear()
        y = cpu_routes.blas_mm(x, view)
        assert calls == [route] and y.shape == (rows, 40)
        torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu_routes.onednn_available(), reason="this torch has no oneDNN linear op")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_gemm_route_within_the_rounding_bound(dtype):
    """oneDNN's matmul on a row-major weight, as cpu_mm takes it: fp32 accumulation in its own
    order (within the accumulation bound), rounded once to the dtype; an input-major weight
    keeps the BLAS route."""
    g = torch.Generator().manual_seed(5)
    routes = dataclasses.replace(cpu_routes.choose(dtype, "test", True, onednn=True))
    w = torch.randn(40, 200, generator=g).to(dtype)
    calls = []
    real = cpu_routes.onednn_mm
    with cpu_routes.forced(routes), pytest.MonkeyPatch.context() as mp:
        mp.setattr("localsgl.engine.layers.linear.onednn_mm", lambda x, w: calls.append(1) or real(x, w))
        for rows in (1, 2, 7, 32):
            x = torch.randn(rows, 200, generator=g).to(dtype)
            bound = gemm_error_bound(x, w.t(), torch.float32, dtype)
            y = cpu_mm(x, w.t())
            assert y.dtype == dtype and y.shape == (rows, 40)
            assert ((y.double() - x.double() @ w.double().t()).abs() <= bound).all(), rows
        assert len(calls) == 4
        cpu_mm(x, w.t().contiguous())  # input-major: torch's GEMM
        assert len(calls) == 4


def test_weight_layout_follows_the_routes():
    lin = Linear(48, 80)
    lin.weight.data = torch.randn(80, 48)
    for routes, stride in ((F32_INPUT_MAJOR, (1, 80)), (dataclasses.replace(F32_INPUT_MAJOR, input_major=False), (48, 1))):
        with cpu_routes.forced(routes):
            use_cpu_weight_layout(lin)
        assert lin.weight.stride() == stride
    for native in (True, False):
        bf = Linear(48, 80, dtype=torch.bfloat16)
        bf.weight.data = torch.randn(80, 48).bfloat16().t().contiguous().t()  # input-major to start
        with cpu_routes.forced(cpu_routes.choose(torch.bfloat16, "test", native)):
            use_cpu_weight_layout(bf)
        assert bf.weight.stride() == (48, 1)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lowp_gemm_routes_within_the_rounding_bound(dtype, native):
    """Every low-precision route (torch's GEMV, its GEMM, the widened fp32 GEMM) on either
    weight layout accumulates in fp32 and rounds once to the dtype."""
    g = torch.Generator().manual_seed(4)
    routes = dataclasses.replace(cpu_routes.choose(dtype, "test", native), widen_min_rows=0 if native else 3)
    row_major = torch.randn(40, 200, generator=g).to(dtype)
    with cpu_routes.forced(routes):
        for rows in (1, 2, 3, 8):
            x = torch.randn(rows, 200, generator=g).to(dtype)
            bound = gemm_error_bound(x, row_major.t(), torch.float32, dtype)
            exact = x.double() @ row_major.double().t()
            for w in (row_major.t(), row_major.t().contiguous()):
                y = cpu_mm(x, w)
                assert y.dtype == dtype and ((y.double() - exact).abs() <= bound).all(), (rows, w.stride())


def test_logits_into_a_shared_buffer():
    """compute_logits(out=) writes the logits into the given rows (the buffer the captured decode
    graphs share) with the values of a fresh output; logits_width names its columns."""
    m = _tied_model().to(torch.bfloat16)
    h = torch.randn(3, 32).to(torch.bfloat16)
    buf = torch.full((5, m.logits_width()), float("nan"))
    got = m.compute_logits(h, out=buf[:3])
    assert got.data_ptr() == buf.data_ptr() and got.dtype == torch.float32
    assert torch.equal(buf[:3], m.compute_logits(h)) and buf[3:].isnan().all()
