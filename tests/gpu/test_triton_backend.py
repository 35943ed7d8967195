"""TritonAttentionBackend vs TorchAttentionBackend on a GPU at real sizes, CUDA-graph
capture/replay of decode, and (test_timing_table, run with -s) a short timing table of the
attention and sampling kernels against their floors.

Checks: random ragged extend batches (prefix lens incl. 0, extends of 1 mixed with long
ones), decode-only batches, all-ones extend batches; bf16 and fp16; head configs of
Llama-3-8B (32/8/128), Qwen2.5-7B (28/4/128), a head_dim-64 MHA model and an odd GQA
ratio; both backends must also leave identical KV pools.  The graph test captures decode
for a padded bucket and replays it with new requests, lengths and batch sizes."""
from __future__ import annotations

import copy
import statistics

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from localsgl.engine.batch import ForwardBatch, ForwardMode  # noqa: E402
from localsgl.engine.kv_pool import KVPool, ReqToTokenPool  # noqa: E402
from localsgl.engine.layers.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from localsgl.engine.layers.attention.triton_backend import TritonAttentionBackend  # noqa: E402

DEV = torch.device("cuda")
LAYERS = 2


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_world(hkv, d, dtype, slots=300000, rows=300, ctx=8192, seed=0):
    torch.manual_seed(seed)
    pool = KVPool(slots, LAYERS, hkv, d, dtype, DEV)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.normal_()
    return pool, ReqToTokenPool(rows, ctx, DEV)


def make_batch(pool, req_pool, prefix, ext, mode, backend):
    B = len(prefix)
    rows = (torch.randperm(req_pool.max_reqs - 1)[:B] + 1).tolist()
    out_loc, starts, pos = [], [], []
    for i in range(B):
        slots = pool.alloc(prefix[i] + ext[i])
        assert slots is not None
        req_pool.write(rows[i], 0, slots)
        out_loc.append(slots[prefix[i]:])
        starts.append(sum(ext[:i]))
        pos.extend(range(prefix[i], prefix[i] + ext[i]))
    i32 = dict(dtype=torch.int32, device=DEV)
    seq = [p + e for p, e in zip(prefix, ext)]
    return ForwardBatch(
        mode=mode, batch_size=B,
        input_ids=torch.zeros(sum(ext), dtype=torch.int64, device=DEV),
        positions=torch.tensor(pos, dtype=torch.int64, device=DEV),
        out_cache_loc=torch.cat(out_loc).to(DEV),
        req_pool_indices=torch.tensor(rows, dtype=torch.int64, device=DEV),
        seq_lens=torch.tensor(seq, **i32), prefix_lens=torch.tensor(prefix, **i32),
        extend_lens=torch.tensor(ext, **i32), extend_start_loc=torch.tensor(starts, **i32),
        seq_lens_cpu=seq, prefix_lens_cpu=list(prefix), extend_lens_cpu=list(ext),
        req_to_token=req_pool.table, kv_pool=pool, attn_backend=backend,
    )


def free_batch(batch):
    for i in range(batch.batch_size):
        row = int(batch.req_pool_indices[i])
        batch.kv_pool.free(batch.req_to_token[row, : batch.seq_lens_cpu[i]].long().cpu())


def compare(batch, hq, d, dtype):
    """Both backends, every layer, on twin pools: max rel error of the outputs."""
    T = batch.num_tokens
    hkv = batch.kv_pool.num_kv_heads
    pool = batch.kv_pool
    ref_pool = copy.copy(pool)
    ref_pool.k_buffer = [b.clone() for b in pool.k_buffer]
    ref_pool.v_buffer = [b.clone() for b in pool.v_buffer]
    ref = copy.copy(batch)
    ref.kv_pool = ref_pool
    ref.attn_backend = TorchAttentionBackend()
    ref.attn_backend.init_forward(ref)
    batch.attn_backend.init_forward(batch)
    errs = []
    for layer in range(LAYERS):
        q = torch.randn(T, hq, d, device=DEV).to(dtype)
        k = torch.randn(T, hkv, d, device=DEV).to(dtype)
        v = torch.randn(T, hkv, d, device=DEV).to(dtype)
        out = batch.attn_backend.forward(q, k, v, layer, batch, d**-0.5)
        r = ref.attn_backend.forward(q.float(), k.float(), v.float(), layer, ref, d**-0.5)
        assert not torch.isnan(out).any()
        errs.append(rel_err(out, r))
        assert torch.equal(pool.k_buffer[layer], ref_pool.k_buffer[layer])
        assert torch.equal(pool.v_buffer[layer], ref_pool.v_buffer[layer])
    return max(errs)


HEADS = [(32, 8, 128), (28, 4, 128), (16, 16, 64), (12, 4, 64), (24, 8, 96)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", HEADS)
def test_backend_matches_torch(dtype, hq, hkv, d):
    pool, rp = make_world(hkv, d, dtype, seed=hq + d)
    be = TritonAttentionBackend()
    g = torch.Generator().manual_seed(hq * d)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    cases = [
        ("prefill", [0], [2048], ForwardMode.EXTEND),
        ("mixed", [0, 1000, 17, 0, 300, 4000, 5, 77], [777, 1, 300, 1, 64, 129, 1, 1], ForwardMode.EXTEND),
        ("decode", torch.randint(0, 5000, (37,), generator=g).tolist(), [1] * 37, ForwardMode.DECODE),
        ("ones", [3, 0, 2500, 60], [1, 1, 1, 1], ForwardMode.EXTEND),
        ("chunks", torch.randint(0, 3000, (6,), generator=g).tolist(),
         torch.randint(2, 400, (6,), generator=g).tolist(), ForwardMode.EXTEND),
    ]
    for name, pre, ext, mode in cases:
        batch = make_batch(pool, rp, pre, ext, mode, be)
        err = compare(batch, hq, d, dtype)
        assert err < tol, (name, err)
        free_batch(batch)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cuda_graph_decode(dtype):
    """Capture decode for a bucket of 8 the way CudaGraphRunner does (static tensors, padded
    rows on request row 0 / slot 0), then replay with fresh batches of 8, 5 and 1 requests."""
    hq, hkv, d = 32, 8, 128
    pool, rp = make_world(hkv, d, dtype, seed=1)
    be = TritonAttentionBackend()
    n = 8
    be.init_cuda_graph_state(n, rp.max_context)
    st = dict(
        out_cache_loc=torch.zeros(n, dtype=torch.int64, device=DEV),
        req_pool_indices=torch.zeros(n, dtype=torch.int64, device=DEV),
        seq_lens=torch.ones(n, dtype=torch.int32, device=DEV),
    )
    q_st = torch.zeros(n, hq, d, dtype=dtype, device=DEV)
    k_st = torch.zeros(n, hkv, d, dtype=dtype, device=DEV)
    v_st = torch.zeros(n, hkv, d, dtype=dtype, device=DEV)
    static = ForwardBatch(
        mode=ForwardMode.DECODE, batch_size=n, input_ids=torch.zeros(n, dtype=torch.int64, device=DEV),
        positions=torch.zeros(n, dtype=torch.int64, device=DEV), prefix_lens=torch.zeros(n, dtype=torch.int32, device=DEV),
        extend_lens=torch.ones(n, dtype=torch.int32, device=DEV),
        extend_start_loc=torch.arange(n, dtype=torch.int32, device=DEV),
        seq_lens_cpu=[1] * n, prefix_lens_cpu=[0] * n, extend_lens_cpu=[1] * n,
        req_to_token=rp.table, kv_pool=pool, attn_backend=be, **st,
    )
    be.init_forward_for_capture(static)

    def run():
        return [be.forward(q_st, k_st, v_st, layer, static, d**-0.5) for layer in range(LAYERS)]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()

    for bs in (8, 5, 1):
        pre = torch.randint(0, 6000, (bs,)).tolist()
        real = make_batch(pool, rp, pre, [1] * bs, ForwardMode.DECODE, be)
        q = torch.randn(bs, hq, d, device=DEV).to(dtype)
        k = torch.randn(bs, hkv, d, device=DEV).to(dtype)
        v = torch.randn(bs, hkv, d, device=DEV).to(dtype)
        for name, src in (("out_cache_loc", real.out_cache_loc), ("req_pool_indices", real.req_pool_indices)):
            st[name].zero_()
            st[name][:bs].copy_(src)
        st["seq_lens"].fill_(1)
        st["seq_lens"][:bs].copy_(real.seq_lens)
        for t, src in ((q_st, q), (k_st, k), (v_st, v)):
            t.zero_()
            t[:bs].copy_(src)
        static.seq_lens_cpu = real.seq_lens_cpu + [1] * (n - bs)
        be.init_forward_for_replay(static)
        graph.replay()
        # reference: the torch backend on the unpadded batch (stores the same K/V again)
        ref_be = TorchAttentionBackend()
        real.attn_backend = ref_be
        ref_be.init_forward(real)
        for layer in range(LAYERS):
            r = ref_be.forward(q.float(), k, v, layer, real, d**-0.5)
            assert rel_err(outs[layer][:bs], r) < 2e-2
        free_batch(real)
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------- timings


def _time_graph(fn, reps=20, trials=7):
    """Median µs per call of fn, replayed from a CUDA graph of `reps` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    return statistics.median(times)


def _copy_bw():
    x = torch.empty(1 << 28, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    us = _time_graph(lambda: y.copy_(x), reps=10)
    return 2 * x.numel() / (us * 1e-6)


def _matmul_rate():
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    us = _time_graph(lambda: a @ b, reps=5, trials=5)
    return 2 * 8192**3 / (us * 1e-6)


def test_timing_table():
    from localsgl_kernels import decode_attention as dec
    from localsgl_kernels import extend_attention as ext
    from localsgl_kernels.sampling import filtered_sample

    name = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    bw = _copy_bw()
    mm = _matmul_rate()
    hq, hkv, d, L = 32, 8, 128, 4096
    dtype = torch.bfloat16
    rows = [f"device: {name} ({sms} SMs), copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {mm / 1e12:.0f} TFLOP/s",
            "kernel                               | time µs | floor µs | of floor"]
    for B in (1, 64):
        slots = B * L
        kc = torch.randn(slots + 1, hkv, d, device=DEV, dtype=dtype)
        vc = torch.randn_like(kc)
        table = (torch.randperm(slots, device=DEV)[: B * L] + 1).view(B, L).int()
        rows_idx = torch.arange(B, device=DEV)
        seq = torch.full((B,), L, dtype=torch.int32, device=DEV)
        q = torch.randn(B, hq, d, device=DEV, dtype=dtype)
        floor_us = B * L * hkv * d * 2 * 2 / bw * 1e6  # K+V bytes at the copy rate (DESIGN §5)
        default = dec.choose_num_splits(B, hkv, sms)
        ref = dec.decode_attention_ref(q[:1], kc, vc, table, rows_idx[:1], seq[:1], d**-0.5)
        for S in sorted({default, 4, 8, 16, 32}):
            ws = dec.alloc_workspace(B, hq, d, S, DEV)
            out = dec.decode_attention(q, kc, vc, table, rows_idx, seq, d**-0.5, num_splits=S, workspace=ws)
            assert rel_err(out[:1], ref) < 2e-2
            us = _time_graph(lambda: dec.decode_attention(q, kc, vc, table, rows_idx, seq, d**-0.5,
                                                          num_splits=S, workspace=ws))
            tag = " (default)" if S == default else ""
            rows.append(f"decode B={B:<3d} L={L} S={S:<2d}{tag:10s}    | {us:7.1f} | {floor_us:8.1f} | {floor_us / us:6.2f}")
            print(rows[-1], flush=True)
        del kc, vc
    # extend: one 2048-token prompt, no prefix
    n = 2048
    kc = torch.randn(n + 1, hkv, d, device=DEV, dtype=dtype)
    vc = torch.randn_like(kc)
    table = (torch.arange(n, device=DEV) + 1).view(1, n).int()
    q = torch.randn(n, hq, d, device=DEV, dtype=dtype)
    i32 = dict(dtype=torch.int32, device=DEV)
    zero, lens = torch.zeros(1, **i32), torch.full((1,), n, **i32)
    ridx = torch.zeros(1, dtype=torch.int64, device=DEV)
    flops = 4 * hq * d * n * (n + 1) / 2
    default_cfg = ext.extend_config(d, hq // hkv, DEV)
    ref = ext.extend_attention_ref(q[:, :8], kc[:, :2], vc[:, :2], table, ridx, [0], [n], d**-0.5)
    others = [(128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (256, 64, 8, 3)]
    for cfg in [default_cfg] + [ext.ExtendConfig(*c) for c in others if ext.ExtendConfig(*c) != default_cfg]:
        tag = "default" if cfg == default_cfg else "M%d N%d w%d s%d" % cfg[:4]
        try:
            work = ext.build_work([n], [0], cfg.block_m // (hq // hkv), DEV)
            run = lambda: ext.extend_attention(q, kc, vc, table, ridx, zero, lens, zero, d**-0.5, work,  # noqa: E731
                                               config=cfg)
            assert rel_err(run()[:, :8], ref) < 2e-2
            us = _time_graph(run, reps=5)
        except Exception as e:  # a tile config that does not fit: report, keep timing the rest
            if cfg == default_cfg:
                raise
            rows.append(f"extend 1×2048 causal ({tag:14s})  | failed: {type(e).__name__}: {str(e)[:60]}")
            continue
        rows.append(f"extend 1×2048 causal ({tag:14s})  | {us:7.1f} | {flops / mm * 1e6:8.1f} | {flops / us / 1e6:6.1f} TFLOP/s")
    qq = q.transpose(0, 1)[None]
    kk = kc[1:].transpose(0, 1)[None]
    vv = vc[1:].transpose(0, 1)[None]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)  # noqa: E731
    us2 = _time_graph(sdpa, reps=5)
    rows.append(f"extend 1×2048 causal (torch SDPA)    | {us2:7.1f} | {flops / mm * 1e6:8.1f} | {flops / us2 / 1e6:6.1f} TFLOP/s")
    # sampling: 64 rows of a Llama-3 vocabulary, top-k 50 + top-p 0.9
    B, V = 64, 128256
    logits = torch.randn(B, V, device=DEV) * 3
    noise = torch.empty_like(logits).exponential_()
    temp = torch.full((B,), 0.8, device=DEV)
    tk = torch.full((B,), 50, dtype=torch.int32, device=DEV)
    tp = torch.full((B,), 0.9, device=DEV)
    mp = torch.zeros(B, device=DEV)
    us = _time_graph(lambda: filtered_sample(logits, temp, tk, tp, mp, noise), reps=5)
    floor_us = 2 * B * V * 4 / bw * 1e6
    rows.append(f"filtered_sample 64×128256 k50 p0.9   | {us:7.1f} | {floor_us:8.1f} | {floor_us / us:6.2f}")
    print("\n" + "\n".join(rows))
