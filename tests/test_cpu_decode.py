"""The lean CPU decode step (layers/cpu_decode.py) against the layer-by-layer path: same
logits in fp32 (bitwise, either weight layout), and in bf16 no further from the exact result
than the layer path's, on the native and the emulated bf16 routes, for Llama, Qwen2 (qkv bias)
and Qwen3 (q/k norm) configs, batch 1 and padded batches, with contiguous and scattered KV
slots; and the engine really takes it on CPU decode steps."""
import dataclasses
import sys

import pytest
import torch

from localsgl.engine.batch import ForwardBatch, ForwardMode
from localsgl.engine.kv_pool import KVPool, ReqToTokenPool
from localsgl.engine.debug_switches import DebugSwitches, apply_to_model
from localsgl.engine.layers import cpu_decode, cpu_routes, linear
from localsgl.engine.layers.attention.base import create_backend
from localsgl.engine.layers.linear import use_cpu_weight_layout
from localsgl.engine.models.config import ModelConfig
from localsgl.engine.models.llama import LlamaForCausalLM

sys.path.insert(0, "tests")
from test_cpu_layers import F32_INPUT_MAJOR, gemm_error_bound  # noqa: E402
from tiny import run_all, tiny_core  # noqa: E402


def _model(family: str, dtype=torch.float32, input_major=True, seed=0):
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=16, vocab_size=80, max_position_embeddings=256, rms_norm_eps=1e-6,
        attention_bias=family == "qwen2", qk_norm=family == "qwen3", tie_word_embeddings=family == "qwen2",
    )
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg, dtype, "cpu")
    for name, p in m.named_parameters():
        r = torch.randn(p.shape)
        p.data.copy_(1.0 + 0.1 * r if "norm" in name else r * (0.2 if "embed" not in name else 1.0))
    if input_major:  # the CPU layout (fp32: input-major, whatever this machine's probe chose)
        with cpu_routes.forced(F32_INPUT_MAJOR):
            use_cpu_weight_layout(m)
    return m


def _decode_batch(model, pool, rt, attn, rows, lens, slots_of, new_slots, tokens):
    """A DECODE batch: request i (row rows[i]) has lens[i] tokens in the pool and appends tokens[i]."""
    for r, n, s in zip(rows, lens, new_slots):
        rt.write(r, n, torch.tensor([s]))
    b = ForwardBatch(
        mode=ForwardMode.DECODE, batch_size=len(rows), input_ids=torch.tensor(tokens),
        positions=torch.tensor(lens), out_cache_loc=torch.tensor(new_slots),
        req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor([n + 1 for n in lens], dtype=torch.int32),
        prefix_lens=torch.tensor(lens, dtype=torch.int32), extend_lens=torch.ones(len(rows), dtype=torch.int32),
        extend_start_loc=torch.arange(len(rows), dtype=torch.int32), seq_lens_cpu=[n + 1 for n in lens],
        prefix_lens_cpu=list(lens), extend_lens_cpu=[1] * len(rows), req_to_token=rt.table, kv_pool=pool,
        attn_backend=attn,
    )
    attn.init_forward(b)
    return b


def _twin(model, dtype=torch.float64):
    """The model with the same weight values in ``dtype`` (an exact reference of a bf16 model)."""
    twin = LlamaForCausalLM(model.config, dtype, "cpu")
    for p, q in zip(twin.parameters(), model.parameters()):  # same class and config: same order
        p.data.copy_(q)
    return twin


def _exact_step(twin, pool, attn, b):
    """The layer path's logits of decode batch ``b`` in the twin's dtype, from the same pool
    contents: what both paths approximate."""
    pool64 = KVPool(pool.num_slots, pool.num_layers, pool.num_kv_heads, pool.head_dim, twin.dtype, "cpu")
    for dst, src in zip(pool64.k_buffer + pool64.v_buffer, pool.k_buffer + pool.v_buffer):
        dst.copy_(src)
    b64 = dataclasses.replace(b, kv_pool=pool64, attn_meta=None)
    attn.init_forward(b64)
    apply_to_model(twin, DebugSwitches(cpu_decode=False))
    return twin.compute_logits(twin(b64.input_ids, b64.positions, b64)).double()


def _both_paths(model, prompt_lens, contiguous, steps=3, seed=0, shared_storage=False, twin=None):
    """Prefill every request (layer path), then decode ``steps`` tokens with each path from the
    same pool state; return the list of (lean logits, layer logits, contiguous-run start) per step,
    with the twin's exact logits of the same step appended when a ``twin`` is given.
    ``shared_storage``: every layer's K and V buffer is a view into one tensor (nonzero offsets)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    total = sum(prompt_lens) + steps * len(prompt_lens)
    pool = KVPool(total + 4, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, model.dtype, "cpu")
    if shared_storage:
        big = torch.zeros((2 * cfg.num_layers + 1, *pool.k_buffer[0].shape), dtype=model.dtype)
        pool.k_buffer = [big[1 + 2 * i] for i in range(cfg.num_layers)]
        pool.v_buffer = [big[2 + 2 * i] for i in range(cfg.num_layers)]
    rt = ReqToTokenPool(len(prompt_lens) + 1, 64, "cpu")
    attn = create_backend("torch", torch.device("cpu"))
    if contiguous:  # request i owns one ascending run, its decode slots included
        runs, s = [], 1
        for n in prompt_lens:
            runs.append(list(range(s, s + n + steps)))
            s += n + steps
    else:
        perm = (torch.randperm(total, generator=g) + 1).tolist()
        runs, s = [], 0
        for n in prompt_lens:
            runs.append(perm[s : s + n + steps])
            s += n + steps
    rows = [rt.alloc() for _ in prompt_lens]
    last = []
    for r, n, run in zip(rows, prompt_lens, runs):
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=g)
        slots = torch.tensor(run[:n])
        rt.write(r, 0, slots)
        b = ForwardBatch(
            mode=ForwardMode.EXTEND, batch_size=1, input_ids=ids, positions=torch.arange(n), out_cache_loc=slots,
            req_pool_indices=torch.tensor([r]), seq_lens=torch.tensor([n], dtype=torch.int32),
            prefix_lens=torch.tensor([0], dtype=torch.int32), extend_lens=torch.tensor([n], dtype=torch.int32),
            extend_start_loc=torch.tensor([0], dtype=torch.int32), seq_lens_cpu=[n], prefix_lens_cpu=[0],
            extend_lens_cpu=[n], req_to_token=rt.table, kv_pool=pool, attn_backend=attn,
        )
        attn.init_forward(b)
        last.append(int(model.compute_logits(model(ids, b.positions, b))[-1].argmax()))
    lens = list(prompt_lens)
    out = []
    for step in range(steps):
        b = _decode_batch(model, pool, rt, attn, rows, lens, runs, [run[n] for run, n in zip(runs, lens)], last)
        exact = _exact_step(twin, pool, attn, b) if twin is not None else None
        saved = [t.clone() for t in pool.k_buffer + pool.v_buffer]
        try:
            apply_to_model(model, DebugSwitches(cpu_decode=False))
            ref = model.compute_logits(model(b.input_ids, b.positions, b))
        finally:
            apply_to_model(model, DebugSwitches())
        for t, s in zip(pool.k_buffer + pool.v_buffer, saved):
            t.copy_(s)
        assert cpu_decode.use_cpu_decode(model, b.input_ids, b)
        lean = model.compute_logits(model(b.input_ids, b.positions, b))
        out.append((lean, ref, cpu_decode._contiguous_run(b)) + ((exact,) if twin is not None else ()))
        last = ref.argmax(-1).tolist()
        lens = [n + 1 for n in lens]
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("prompt_lens,contiguous", [([7], True), ([7], False), ([5, 9, 2, 6], False), ([4, 8, 3], True)])
def test_fp32_same_bits_as_layer_path(family, prompt_lens, contiguous):
    m = _model(family)
    for lean, ref, start in _both_paths(m, prompt_lens, contiguous):
        assert torch.equal(lean, ref)
        # batch 1 with one slot run attends over a view of the pool (no gather)
        assert (start is not None) == (len(prompt_lens) == 1 and contiguous)


def test_pool_view_respects_buffer_offsets():
    """The gather-free view of a contiguous run addresses the layer's buffer, wherever it lies
    in its storage."""
    for lean, ref, start in _both_paths(_model("llama"), [7], True, shared_storage=True):
        assert start is not None and torch.equal(lean, ref)


def test_mm_lowp_scratch_is_per_thread():
    """Two engine threads never share the widening scratch buffer."""
    import threading

    x = torch.randn(4, 8).bfloat16()
    w = torch.randn(16, 8).bfloat16().t()
    linear.mm_lowp(x, w)
    mine, theirs = linear._scratch.buf, []
    t = threading.Thread(target=lambda: (linear.mm_lowp(x, w), theirs.append(linear._scratch.buf)))
    t.start()
    t.join()
    assert theirs and theirs[0] is not mine


@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_row_major_weights_same_bits(family, onednn):
    """Row-major fp32 weights: both paths multiply through the same cpu_mm route (torch's BLAS,
    or oneDNN's matmul where the machine's probe chooses it)."""
    if onednn and not cpu_routes.onednn_available():
        pytest.skip("this torch has no oneDNN linear op")
    routes = cpu_routes.choose(torch.float32, "test", True, fp32_input_major=False, onednn=onednn)
    with cpu_routes.forced(routes):
        m = _model(family, input_major=False)
        assert not m.layers[0].self_attn.qkv_proj.weight.t().is_contiguous()
        for lean, ref, _ in _both_paths(m, [6, 3], False):
            assert torch.equal(lean, ref)


def _bf16_routes(kind: str) -> cpu_routes.CpuRoutes:
    """bf16 routes to test on any machine: torch's own bf16 kernels ("native"), those with
    oneDNN's GEMMs and attention in fp32 ("onednn", where this torch has the op), or the
    emulated route, widening from 2 rows so that the test's batches take it."""
    if kind == "onednn" and not cpu_routes.onednn_available():
        pytest.skip("this torch has no oneDNN linear op")
    routes = cpu_routes.choose(torch.bfloat16, "test", kind != "emulated", onednn=kind == "onednn",
                               lowp_attention_fp32=kind == "onednn")
    return routes if kind != "emulated" else dataclasses.replace(routes, widen_min_rows=2)


@pytest.mark.parametrize("routes", ["native", "onednn", "emulated"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("prompt_lens,contiguous", [([7], True), ([5, 9, 2], False), ([3, 8, 4, 6, 2], False)])
def test_bf16_as_accurate_as_layer_path(family, prompt_lens, contiguous, routes):
    """bf16: both paths approximate the same exact result (the step computed in fp64 from the
    same bf16 weights and KV contents) through the same GEMM route; the lean path rounds no
    more intermediates than the layer path (fewer on the emulated route: attention in fp32).
    So its error is bounded by the layer path's, with a factor 2 for the roundings landing
    differently (flash-attention's tests hold a bf16 kernel to the same criterion).  The error
    is the RMS over the step's logits: the largest single error of two paths fluctuates by
    +-60% with where their roundings land, the RMS by +-20%."""
    with cpu_routes.forced(_bf16_routes(routes)):
        m = _model(family, dtype=torch.bfloat16)
        for lean, ref, _, exact in _both_paths(m, prompt_lens, contiguous, twin=_twin(m)):
            lean_err = (lean.double() - exact).pow(2).mean().sqrt()
            ref_err = (ref.double() - exact).pow(2).mean().sqrt()
            assert 0 < ref_err and lean_err <= 2 * ref_err, (float(lean_err), float(ref_err))


def test_partial_rotary_falls_back():
    m = _model("llama")
    m.rotary.cos_sin = m.rotary.cos_sin[:, :8]
    m._cpu_decode_plan = None
    assert cpu_decode.cpu_decode_plan(m) is None


def test_plan_follows_a_relayout():
    m = _model("llama", input_major=False)
    p1 = cpu_decode.cpu_decode_plan(m)
    with cpu_routes.forced(F32_INPUT_MAJOR):
        use_cpu_weight_layout(m)
    p2 = cpu_decode.cpu_decode_plan(m)
    assert p2 is not p1 and p2.layers[0].w_qkv.is_contiguous()


def _engine_outputs(prompts, params, debug=None):
    core = tiny_core(kv_tokens=256, max_running=6, chunk_size=16, max_model_len=128, debug=debug)
    try:
        return run_all(core, prompts, params, tag="c")
    finally:
        core.shutdown()


def test_engine_decode_steps_take_the_lean_path(monkeypatch):
    """The engine's CPU decode steps (batch 1 and padded batches) go through the lean path,
    and the tokens equal those of the layer path."""
    import random

    import localsgl.engine.models.llama as llama
    from localsgl.engine.params import SamplingParams as SP

    calls = []
    real = llama.cpu_forward_decode

    def counting(model, ids, pos, batch):
        calls.append(batch.batch_size)
        return real(model, ids, pos, batch)

    monkeypatch.setattr(llama, "cpu_forward_decode", counting)
    rng = random.Random(3)
    prompts = [[rng.randrange(63) for _ in range(rng.randrange(1, 40))] for _ in range(10)]
    params = [SP(temperature=0.0, max_tokens=rng.randrange(2, 20), ignore_eos=True) for _ in prompts]
    lean = _engine_outputs(prompts, params)
    assert calls and min(calls) == 1 and max(calls) > 1
    n = len(calls)
    ref = _engine_outputs(prompts, params, debug=DebugSwitches(cpu_decode=False))
    assert len(calls) == n
    assert lean == ref


def test_lean_rms_norm_bits_equal_reference():
    """sum(x·x)/n with tensor operands gives rms_norm_ref's exact bits (fp32 and bf16)."""
    from localsgl.engine.layers.norm import rms_norm_ref

    g = torch.Generator().manual_seed(0)
    eps = torch.tensor(1e-5)
    for shape, wshape in (((1, 576), (576,)), ((32, 576), (576,)), ((5, 960), (960,)), ((3, 12, 64), (12, 64))):
        n = torch.tensor(float(shape[-1]))
        for scale in (1e-3, 1.0, 1e3):
            for dtype in (torch.float32, torch.bfloat16):
                x = (torch.randn(shape, generator=g) * scale).to(dtype)
                w = torch.randn(wshape, generator=g).to(dtype)
                ref = rms_norm_ref(x, w.expand(shape[1:]) if len(wshape) > 1 else w, 1e-5)
                assert torch.equal(cpu_decode._rms_norm(x, w, n, eps), ref)


def test_slot_allocator_hands_out_ascending_runs():
    from localsgl.engine.kv_pool import SlotAllocator

    a = SlotAllocator(torch.arange(1, 11))
    first, nxt = a.alloc(3), a.alloc(1)
    assert first.tolist() == [1, 2, 3] and nxt.tolist() == [4]
    a.free(torch.cat([first, nxt]))
    assert a.alloc(4).tolist() == [1, 2, 3, 4]


def test_mm_lowp_matches_fp32_product():
    """The widened bf16 GEMM is the fp32 product of the same values, chunked or not, from
    either weight layout: within the fp32 accumulation bound of each."""
    g = torch.Generator().manual_seed(2)
    for k, n in ((64, 96), (64, 40000)):  # the second needs several scratch chunks
        x = torch.randn(6, k, generator=g).bfloat16()
        row_major = torch.randn(n, k, generator=g).bfloat16()
        exact = x.double() @ row_major.double().t()
        bound = gemm_error_bound(x, row_major.t(), torch.float32)
        for w in (row_major.t(), row_major.t().contiguous()):
            got = linear.mm_lowp(x, w)
            assert got.dtype == torch.float32 and ((got.double() - exact).abs() <= bound).all()


def test_lowp_logits_route_follows_the_routes():
    with cpu_routes.forced(_bf16_routes("emulated")):
        assert cpu_decode.lowp_logits_on_cpu(torch.zeros(2, 8, dtype=torch.bfloat16))
        assert not cpu_decode.lowp_logits_on_cpu(torch.zeros(1, 8, dtype=torch.bfloat16))
    with cpu_routes.forced(_bf16_routes("native")):
        assert not cpu_decode.lowp_logits_on_cpu(torch.zeros(32, 8, dtype=torch.bfloat16))
    assert not cpu_decode.lowp_logits_on_cpu(torch.zeros(32, 8))
