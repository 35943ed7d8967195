"""Quantized weights on the CPU (layers/cpu_quant.py): each format's route (packed int4 GEMM,
int8 GEMM, grouped int8 as two int4 GEMMs, cached dense copy) against the dequantized reference, and the lean CPU decode step
running quantized layers with the layer path's logits."""
from __future__ import annotations

import pytest
import torch

from localsgl.engine.layers import cpu_decode
from localsgl.engine.layers.cpu_quant import cpu_matmul
from localsgl.engine.layers.linear import Linear
from localsgl.engine.layers.quant import QuantizedWeight, RowStack, WeightFormat, matmul_ref
from model_utils import needs_embedded_model

ROUTES = [(WeightFormat("int4", 32, False), "int4"), (WeightFormat("int4", 128, True), "int4"),
          (WeightFormat("int8", 0, True), "int8"), (WeightFormat("int8", 32, True), "int8-nibbles"),
          (WeightFormat("int8", 128, False), "int8-nibbles"), (WeightFormat("int8", 16, False), "dense"),
          (WeightFormat("fp8", 0, True), "dense")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,route", ROUTES, ids=[f.label().replace(" ", "-") for f, _ in ROUTES])
def test_routes_match_the_reference(fmt, route, dtype):
    g = torch.Generator().manual_seed(3)
    w = QuantizedWeight.quantize(torch.randn(192, 256, generator=g) * 0.05, fmt)
    for rows in (1, 5):
        x = torch.randn(rows, 256, generator=g).to(dtype)
        y = cpu_matmul(x, w)
        ref = x.double() @ w.dequantize(torch.float64).t()
        assert y.dtype == dtype and y.shape == (rows, 192)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert float((y.double() - ref).norm() / ref.norm()) < tol
    assert w._cpu_cache[("route", dtype)] == (route if dtype != torch.float32 else "dense")
    assert torch.equal(cpu_matmul(x, w), cpu_matmul(x, w))  # prepared once, then reused
    assert torch.allclose(matmul_ref(x.float(), w), x.float() @ w.dequantize().t(), atol=1e-5)


def _off_by(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """A copy of ``t`` whose data starts ``nbytes`` past a 64-byte boundary (as a tensor inside a
    safetensors file can)."""
    raw = torch.empty(t.numel() * t.element_size() + 128, dtype=torch.uint8)
    start = (-raw.data_ptr()) % 64 + nbytes
    view = raw[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 64 == nbytes
    return view


def test_the_int8_gemm_gets_aligned_operands():
    """torch's int8 weight GEMM crashed the process on a per-row int8 weight that started 24
    bytes past a 64-byte boundary (a quantize output's o_proj on a 2-core EPYC) and on
    activations 48 bytes off: both operands reach it aligned, with the same result."""
    g = torch.Generator().manual_seed(5)
    w = QuantizedWeight.quantize(torch.randn(576, 576, generator=g) * 0.05, WeightFormat("int8", 0, True))
    x = torch.randn(7, 576, generator=g).to(torch.bfloat16)
    want = cpu_matmul(x, QuantizedWeight.quantize(w.dequantize(torch.float32), WeightFormat("int8", 0, True)))
    w._buffers["qweight"] = _off_by(w.qweight, 24)
    assert torch.equal(cpu_matmul(_off_by(x, 48), w), want)
    assert w._cpu_cache[("route", torch.bfloat16)] == "int8"


@pytest.mark.parametrize("formats", [
    [WeightFormat("int4", 32, False)],
    [WeightFormat("int4", 32, True), WeightFormat("int8", 0, True), WeightFormat("int8", 16, True)],
], ids=["int4", "mixed"])
def test_lean_decode_step_runs_quantized_layers(formats):
    from test_cpu_decode import _both_paths, _model

    m = _model("llama")
    dense = {n: mod.weight.data.clone() for n, mod in m.named_modules() if isinstance(mod, Linear)}
    for i, mod in enumerate(mod for mod in m.modules() if isinstance(mod, Linear)):
        mod.set_weight(QuantizedWeight.quantize(mod.weight.data, formats[i % len(formats)]))
    assert cpu_decode.cpu_decode_plan(m) is not None  # the lean step serves quantized layers
    for lean, ref, _ in _both_paths(m, [6, 3], contiguous=False, steps=2):
        assert torch.equal(lean, ref)  # both paths multiply by the same routes
    assert len(dense) == 3 * 4 + 1  # (the LM head is a Linear too)


def test_lean_decode_step_runs_a_row_stacked_qkv():
    """q/k in int4 and v in int8 as one RowStack (a Q4_K_M layer with a Q6_K v): the lean step
    serves it and agrees with the layer path."""
    from test_cpu_decode import _both_paths, _model

    m = _model("llama")
    for mod in (mod for mod in m.modules() if isinstance(mod, Linear)):
        w = mod.weight.data
        if w.shape[0] == (4 + 2 * 2) * 16:  # qkv: q and k rows, then v rows
            qk, v = w[:96], w[96:]
            mod.set_weight(RowStack([QuantizedWeight.quantize(qk, WeightFormat("int4", 32, False)),
                                     QuantizedWeight.quantize(v, WeightFormat("int8", 16, True))]))
        else:
            mod.set_weight(QuantizedWeight.quantize(w, WeightFormat("int4", 32, False)))
    assert isinstance(m.layers[0].self_attn.qkv_proj.weight, RowStack)
    assert cpu_decode.cpu_decode_plan(m) is not None
    for lean, ref, _ in _both_paths(m, [6, 3], contiguous=False, steps=2):
        assert torch.equal(lean, ref)


@needs_embedded_model
def test_embedded_model_kept_quantized_in_bf16_matches_its_dense_load():
    """The embedded GGUF kept quantized in bf16 (Q4_1 layers through the int4 GEMM, the Q8_0
    LM head through two int4 GEMMs) against the exact fp32 dequantized model."""
    from model_utils import prefill_logits

    from localsgl.engine.models.loader import load_model
    from localsgl.store.resolve import resolve_model

    src = resolve_model("smollm2-135m", record_use=False)
    kept = load_model(src, torch.bfloat16, "cpu", weights="keep")
    dense = load_model(src, torch.float32, "cpu", weights="dequantize")
    tok = src.load_tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=False)
    ids = tok.encode(ids, add_special_tokens=False)
    a, b = prefill_logits(kept, ids)[-4:].double(), prefill_logits(dense, ids)[-4:].double()
    head = kept.embed_tokens.weight
    assert isinstance(head, QuantizedWeight) and head._cpu_cache[("route", torch.bfloat16)] == "int8-nibbles"
    # the dense model's choice is the kept model's too, up to one bf16 step of its logits (a tie in
    # bf16 goes to the lower token id: on a 2-core EPYC two logits of the last position rounded to 25.125)
    top = a.max(-1).values
    step = torch.exp2(torch.floor(torch.log2(top.abs())) - 7)  # bf16's spacing at the top logit
    assert (a.gather(1, b.argmax(-1, keepdim=True))[:, 0] >= top - step).all()
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()) > 0.999  # 0.9996 seen; without the low nibbles 0.970
