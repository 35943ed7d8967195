"""Quantized weights on the CPU (layers/cpu_quant.py): each format's route (packed int4 GEMM,
int8 GEMM, cached dense copy) against the dequantized reference, and the lean CPU decode step
running quantized layers with the layer path's logits."""
from __future__ import annotations

import pytest
import torch

from localsgl.engine.layers import cpu_decode
from localsgl.engine.layers.cpu_quant import cpu_matmul
from localsgl.engine.layers.linear import Linear
from localsgl.engine.layers.quant import QuantizedWeight, WeightFormat, matmul_ref

ROUTES = [(WeightFormat("int4", 32, False), "int4"), (WeightFormat("int4", 128, True), "int4"),
          (WeightFormat("int8", 0, True), "int8"), (WeightFormat("int8", 16, False), "dense"),
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
