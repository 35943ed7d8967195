"""The fused one-token forward over quantized weights (layers/fused_decode.py -> quant_gemv)
in the engine, Triton backend under the interpreter: batch-1 decodes take it and give the
greedy tokens of the layer path (quant.matmul) on the same weights, with every projection
quantized and with layers of different formats (as in a GGUF Q4_K_M file)."""
import pytest
import torch
from kutil import ON_GPU
from test_fused_decode_engine import _generate

import localsgl.engine.layers.fused_decode as fd
from localsgl.engine.layers.linear import Linear
from localsgl.engine.layers.quant import QuantizedWeight, RowStack, WeightFormat

pytestmark = pytest.mark.skipif(ON_GPU, reason="tests/gpu covers the GPU engine")


def _quantized_model(formats, dtype=torch.float32, hidden=64):
    from tiny import tiny_model

    m = tiny_model(vocab=96, hidden=hidden, layers=2, heads=4, kv_heads=2, seed=5, dtype=dtype)
    mods = [mod for mod in m.modules() if isinstance(mod, Linear)]
    for i, mod in enumerate(mods):
        mod.set_weight(QuantizedWeight.quantize(mod.weight.data, formats[i % len(formats)]))
    m._fused_decode_ok = None
    return m


def _two_halves(monkeypatch, words: int):
    """quant_gemv's tile, wherever it applies: 4-row blocks of 32 columns in two K halves, over
    prepared activations (``words`` 2: fp32, 3: int8)."""
    from localsgl_kernels import quant_gemv as QG

    default_tile = QG.default_config

    def tile(w, rows_per_block, device_type):
        cfg = QG.Config(4, 32, 4, 1, 2, words)
        if rows_per_block % 8 == 0 and QG.block_k(w, 32) == 32 and QG.words_apply(w, cfg):
            return cfg
        return default_tile(w, rows_per_block, device_type)

    monkeypatch.setattr(QG, "default_config", tile)


def _record_launches(monkeypatch, module, kernel: str, what) -> list:
    """module.kernel's launches recorded as ``what(args, kwargs)`` in the returned list, then run."""
    real, seen = getattr(module, kernel), []

    class Recording:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.append(what(a, k)) or real[grid](*a, **k)

    monkeypatch.setattr(module, kernel, Recording())
    return seen


def test_fused_quantized_greedy(monkeypatch):
    """The fused step's greedy tokens equal the layer path's, fp8 through the byte tiles (the
    dense GEMVs' route has its own test below)."""
    from localsgl_kernels import quant_gemv as QG

    monkeypatch.setattr(QG, "DENSE_FP8", False)
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 95, (9,), generator=g).tolist()]
    formats = [WeightFormat("int4", 32, False), WeightFormat("int4", 32, True), WeightFormat("int8", 16, True),
               WeightFormat("int8", 0, True), WeightFormat("fp8", 0, True), WeightFormat("int8", 16, False)]
    model = _quantized_model(formats)
    assert isinstance(model.layers[0].mlp.down_proj.weight, QuantizedWeight)
    assert fd.fused_decode_shapes_ok(model)
    plain, n_plain = _generate(model, "triton", False, prompts, monkeypatch)
    fused, n_fused = _generate(model, "triton", True, prompts, monkeypatch)
    assert fused == plain
    assert n_fused >= 5 and n_plain == 0


def test_fused_row_stacked_qkv_greedy(monkeypatch):
    """Each layer's qkv as a RowStack (q/k int4 g32 with offsets, v int8 g16: a Q4_K_M layer
    whose v is Q6_K): the fused step serves it and gives the layer path's greedy tokens."""
    g = torch.Generator().manual_seed(14)
    prompts = [torch.randint(0, 95, (8,), generator=g).tolist()]
    model = _quantized_model([WeightFormat("int4", 32, False)])
    for layer in model.layers:
        a = layer.self_attn
        w = a.qkv_proj.weight.dequantize()
        qk = a.q_size + a.kv_size
        a.qkv_proj.set_weight(RowStack([QuantizedWeight.quantize(w[:qk], WeightFormat("int4", 32, False)),
                                        QuantizedWeight.quantize(w[qk:], WeightFormat("int8", 16, True))]))
    model._fused_decode_ok = None
    assert fd.fused_decode_shapes_ok(model)
    plain, n_plain = _generate(model, "triton", False, prompts, monkeypatch)
    fused, n_fused = _generate(model, "triton", True, prompts, monkeypatch)
    assert fused == plain
    assert n_fused >= 5 and n_plain == 0


def test_fused_fp32_sums_between_layers(monkeypatch):
    """With prepared-activation tiles cut in two K halves (as the H200's tuned o/down tiles are),
    o_proj and down_proj hand fp32 sums to the next fused kernel and add their halves into them
    (no summing launch), but for the last layer's down_proj (the final norm's input, in the model's
    dtype); greedy tokens equal the layer path's."""
    from localsgl_kernels import quant_gemv as QG

    _two_halves(monkeypatch, words=2)  # words over fp32 prepared activations: exact
    launches = _record_launches(monkeypatch, QG, "_qgemv_kernel", lambda a, k: (k["SPLIT"], k["ATOMIC"], a[5].dtype))
    g = torch.Generator().manual_seed(15)
    prompts = [torch.randint(0, 95, (7,), generator=g).tolist()]
    model = _quantized_model([WeightFormat("int4", 32, False)])
    assert fd.fused_decode_shapes_ok(model)
    assert fd._fp32_sums(model, "cpu") == [(True, True), (True, False)]
    plain, _ = _generate(model, "triton", False, prompts, monkeypatch)
    launches.clear()
    fused, n_fused = _generate(model, "triton", True, prompts, monkeypatch)
    assert fused == plain and n_fused >= 5
    # every GEMV of a step (o and down of each layer, the LM head's fp32 logits) adds its halves
    # atomically: this tiny model's own dtype is fp32, so the last down_proj's output is fp32 too
    assert len(launches) >= 5 * n_fused and set(launches) == {(2, True, torch.float32)}
    # the debug switch off: the model's dtype from every GEMV (fp32 here too), nothing flagged
    from localsgl.engine.debug_switches import DebugSwitches

    model.debug_switches = DebugSwitches(fp32_sums=False)
    assert fd._fp32_sums(model, "cpu") == [(False, False), (False, False)]


@pytest.mark.parametrize("route", ["fp32", "fp16", "fp16 switched off"])
def test_fused_fp8_through_the_dense_gemvs(monkeypatch, route):
    """Every projection fp8 with row scales and quant_gemv.DENSE_FP8 on: the one-token step runs
    gemv.py's kernels with the row scales and gives the layer path's greedy tokens; a bf16 model's
    full-K kernels multiply in fp16 (gemv_tiles.E4M3_FP16) and give them too (hidden 512: each thread
    needs 16 columns, gemv.fp16_products), unless the engine's fp16_products debug switch is off."""
    from localsgl.engine.debug_switches import DebugSwitches
    from localsgl_kernels import gemv as G
    from localsgl_kernels import gemv_tiles as T
    from localsgl_kernels import quant_gemv as QG

    monkeypatch.setattr(QG, "DENSE_FP8", True)
    monkeypatch.setattr(T, "E4M3_FP16", route != "fp32")
    bf16, f16 = route != "fp32", route == "fp16"
    debug = DebugSwitches(fp16_products=route != "fp16 switched off")
    calls = []
    for name in ("gemv", "norm_gate_up", "norm_qkv"):
        real = getattr(G, name)
        monkeypatch.setattr(G, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    g = torch.Generator().manual_seed(13)
    prompts = [torch.randint(0, 95, (7,), generator=g).tolist()]
    model = _quantized_model([WeightFormat("fp8", 0, True)], torch.bfloat16 if bf16 else torch.float32,
                             hidden=512 if bf16 else 64)
    plain, _ = _generate(model, "triton", False, prompts, monkeypatch, debug=debug)
    calls.clear()
    f16_flags = _record_launches(monkeypatch, G, "_norm_gate_up_fullk_kernel", lambda a, k: k["F16"])
    fused, n_fused = _generate(model, "triton", True, prompts, monkeypatch, debug=debug)
    assert fused == plain and n_fused >= 5
    assert {"gemv", "norm_gate_up", "norm_qkv"} <= set(calls)
    assert f16_flags and set(f16_flags) == {f16}


def test_attention_writes_o_proj_int8_activations(monkeypatch):
    """With int8-activation tiles (words 3) cut in two K halves: the decode attention's merge
    writes o_proj's activations and zeroes its fp32 output, so o_proj launches no preparation; the
    greedy tokens and the preparation launches of the other GEMVs are those of the switch off."""
    from localsgl.engine import debug_switches
    from localsgl_kernels import quant_gemv as QG
    from localsgl_kernels import quant_words as QW

    _two_halves(monkeypatch, words=3)  # dp4a over int8 activations
    preps = _record_launches(monkeypatch, QW, "_prep_act_kernel", lambda a, k: a[6])  # K of each preparation
    filled = []
    real_gemv = QG.gemv
    monkeypatch.setattr(QG, "gemv", lambda *a, prepared=None, **k: filled.append(prepared is not None and prepared.filled)
                        or real_gemv(*a, prepared=prepared, **k))
    g = torch.Generator().manual_seed(16)
    prompts = [torch.randint(0, 95, (7,), generator=g).tolist()]

    from tiny import tiny_model

    m = tiny_model(vocab=96, hidden=128, layers=1, heads=4, kv_heads=2, seed=6)  # head dim 32: whole int4 chunks
    for mod in m.modules():
        if isinstance(mod, Linear):
            mod.set_weight(QuantizedWeight.quantize(mod.weight.data, WeightFormat("int4", 32, False)))
    m._fused_decode_ok = None
    assert fd.fused_decode_shapes_ok(m)
    on, n_on = _generate(m, "triton", True, prompts, monkeypatch, max_tokens=4)
    preps_on, filled_on = list(preps), list(filled)
    preps.clear()
    filled.clear()
    real_of = debug_switches.of
    monkeypatch.setattr(debug_switches, "of", lambda model: real_of(model).with_(attention_int8_epilogue=False))
    off, n_off = _generate(m, "triton", True, prompts, monkeypatch, max_tokens=4)
    assert on == off and n_on == n_off >= 3
    assert sum(filled_on) == n_on and not any(filled)  # o_proj's GEMV, one a fused step
    assert len(preps) - len(preps_on) == n_on  # one preparation fewer a step
