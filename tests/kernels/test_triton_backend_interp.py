"""TritonAttentionBackend vs TorchAttentionBackend on the CPU (Triton interpreter; on a GPU
the same test runs natively): ragged extend batches (prefix lens incl. 0, mixed with
extend-of-1 rows), a decode batch, an all-ones extend batch (routed to the decode kernel),
and a padded CUDA-graph-style decode batch (capture/replay hooks; padded rows on request
row 0 / slot 0 must not write outside slot 0)."""
import pytest
import torch
from kutil import DEV, DOT_DTYPES, gen, rel_err

from localsgl.engine.batch import ForwardBatch, ForwardMode
from localsgl.engine.kv_pool import KVPool, ReqToTokenPool
from localsgl.engine.layers.attention.torch_backend import TorchAttentionBackend
from localsgl.engine.layers.attention.triton_backend import TritonAttentionBackend

LAYERS = 2


def make_world(g, hkv, d, dtype, slots=1500, rows=12, ctx=400):
    pool = KVPool(slots, LAYERS, hkv, d, dtype, DEV)
    for l in range(LAYERS):
        pool.k_buffer[l].copy_(torch.randn(pool.k_buffer[l].shape, generator=g).to(dtype))
        pool.v_buffer[l].copy_(torch.randn(pool.v_buffer[l].shape, generator=g).to(dtype))
    return pool, ReqToTokenPool(rows, ctx, DEV)


def make_batch(g, pool, req_pool, prefix, ext, mode, backend, rows=None):
    B = len(prefix)
    if rows is None:
        rows = torch.randperm(req_pool.max_reqs - 1, generator=g)[:B] + 1
    out_loc, starts, pos = [], [], []
    for i in range(B):
        slots = pool.alloc(prefix[i] + ext[i])
        req_pool.write(int(rows[i]), 0, slots)
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
        req_pool_indices=torch.as_tensor(rows, dtype=torch.int64).to(DEV),
        seq_lens=torch.tensor(seq, **i32), prefix_lens=torch.tensor(prefix, **i32),
        extend_lens=torch.tensor(ext, **i32), extend_start_loc=torch.tensor(starts, **i32),
        seq_lens_cpu=seq, prefix_lens_cpu=list(prefix), extend_lens_cpu=list(ext),
        req_to_token=req_pool.table, kv_pool=pool, attn_backend=backend,
    )


def run_both(batch, hq, d, g, dtype):
    """Run both backends on copies of the pool for every layer; return max rel error."""
    import copy

    T = batch.num_tokens
    hkv = batch.kv_pool.num_kv_heads
    errs = []
    tri_pool = batch.kv_pool
    ref_pool = copy.copy(tri_pool)
    ref_pool.k_buffer = [b.clone() for b in tri_pool.k_buffer]
    ref_pool.v_buffer = [b.clone() for b in tri_pool.v_buffer]
    ref_batch = copy.copy(batch)
    ref_batch.kv_pool = ref_pool
    ref_batch.attn_backend = TorchAttentionBackend()
    ref_batch.attn_backend.init_forward(ref_batch)
    batch.attn_backend.init_forward(batch) if batch.attn_meta is None else None
    for layer in range(LAYERS):
        q = torch.randn(T, hq, d, generator=g).to(dtype).to(DEV)
        k = torch.randn(T, hkv, d, generator=g).to(dtype).to(DEV)
        v = torch.randn(T, hkv, d, generator=g).to(dtype).to(DEV)
        out = batch.attn_backend.forward(q, k, v, layer, batch, d**-0.5)
        ref = ref_batch.attn_backend.forward(q.float(), k, v, layer, ref_batch, d**-0.5)
        assert out.shape == (T, hq, d) and not torch.isnan(out).any()
        errs.append(rel_err(out, ref))
        assert torch.equal(tri_pool.k_buffer[layer], ref_pool.k_buffer[layer])
        assert torch.equal(tri_pool.v_buffer[layer], ref_pool.v_buffer[layer])
    return max(errs)


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (3, 3, 128)])
def test_extend_mixed(dtype, hq, hkv, d):
    g = gen(hq + d)
    pool, rp = make_world(g, hkv, d, dtype)
    be = TritonAttentionBackend()
    batch = make_batch(g, pool, rp, [0, 30, 5, 0, 60], [21, 1, 12, 1, 3], ForwardMode.EXTEND, be)
    assert run_both(batch, hq, d, g, dtype) < tol(dtype)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_mixed_step_leading_decodes_use_decode_kernel(dtype):
    """A mixed step as the scheduler builds it: running decodes first (one token each),
    then prefill chunks (one of them a single last token); the leading decodes go to the
    split-KV decode kernel, the rest to the extend kernel, into one output."""
    g = gen(11)
    hq, hkv, d = 8, 2, 64
    pool, rp = make_world(g, hkv, d, dtype)
    be = TritonAttentionBackend()
    batch = make_batch(g, pool, rp, [40, 7, 130, 0, 25, 60], [1, 1, 1, 33, 1, 9], ForwardMode.EXTEND, be)
    be.init_forward(batch)
    assert batch.attn_meta.num_decode == 3
    assert run_both(batch, hq, d, g, dtype) < tol(dtype)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_decode_and_all_ones_extend(dtype):
    g = gen(3)
    hq, hkv, d = 12, 4, 64
    pool, rp = make_world(g, hkv, d, dtype)
    be = TritonAttentionBackend()
    pre = [0, 99, 7, 250, 31]
    batch = make_batch(g, pool, rp, pre, [1] * 5, ForwardMode.DECODE, be)
    assert run_both(batch, hq, d, g, dtype) < tol(dtype)
    batch = make_batch(g, pool, rp, [3, 0, 40], [1, 1, 1], ForwardMode.EXTEND, be)
    be.init_forward(batch)
    assert type(batch.attn_meta).__name__ == "_DecodeMeta"
    assert run_both(batch, hq, d, g, dtype) < tol(dtype)


def test_graph_hooks_padded_decode():
    g = gen(4)
    dtype = DOT_DTYPES[0]
    hq, hkv, d = 8, 2, 64
    pool, rp = make_world(g, hkv, d, dtype)
    be = TritonAttentionBackend()
    be.init_cuda_graph_state(8, rp.max_context)
    real = make_batch(g, pool, rp, [17, 64, 2], [1, 1, 1], ForwardMode.DECODE, be)
    # pad to a bucket of 5 the way CudaGraphRunner does: row 0, slot 0, seq_len 1
    pad = 2
    z = lambda t, v: torch.cat([t, torch.full((pad,), v, dtype=t.dtype, device=DEV)])  # noqa: E731
    batch = ForwardBatch(
        mode=ForwardMode.DECODE, batch_size=5, input_ids=z(real.input_ids, 0), positions=z(real.positions, 0),
        out_cache_loc=z(real.out_cache_loc, 0), req_pool_indices=z(real.req_pool_indices, 0),
        seq_lens=z(real.seq_lens, 1), prefix_lens=z(real.prefix_lens, 0), extend_lens=z(real.extend_lens, 1),
        extend_start_loc=torch.arange(5, dtype=torch.int32, device=DEV),
        seq_lens_cpu=real.seq_lens_cpu + [1] * pad, prefix_lens_cpu=real.prefix_lens_cpu + [0] * pad,
        extend_lens_cpu=[1] * 5, req_to_token=rp.table, kv_pool=pool, attn_backend=be,
    )
    be.init_forward_for_capture(batch)
    meta = batch.attn_meta
    be.init_forward_for_replay(batch)
    assert batch.attn_meta is meta  # replay keeps the captured split count / workspace
    before = [b.clone() for b in pool.k_buffer]
    q = torch.randn(5, hq, d, generator=g).to(dtype).to(DEV)
    k = torch.randn(5, hkv, d, generator=g).to(dtype).to(DEV)
    v = torch.randn(5, hkv, d, generator=g).to(dtype).to(DEV)
    out = be.forward(q, k, v, 0, batch, d**-0.5)
    changed = (pool.k_buffer[0] != before[0]).any(-1).any(-1).nonzero().view(-1).tolist()
    assert set(changed) <= set(real.out_cache_loc.tolist()) | {0}
    # the real rows equal the unpadded torch result (the pool already holds their new K/V)
    ref_be = TorchAttentionBackend()
    real.attn_backend = ref_be
    ref_be.init_forward(real)
    ref = ref_be.forward(q[:3].float(), k[:3], v[:3], 0, real, d**-0.5)
    assert rel_err(out[:3], ref) < tol(dtype)
    # every captured step's workspace is a view of one scratch buffer (not one buffer a graph)
    other = make_batch(g, pool, rp, [5, 9], [1, 1], ForwardMode.DECODE, be)
    be.init_forward_for_capture(other)
    be.forward(q[:2], k[:2], v[:2], 0, other, d**-0.5)
    mine, theirs = meta.workspace, other.attn_meta.workspace
    assert mine[0].data_ptr() == theirs[0].data_ptr() == be._graph_scratch["decode"].data_ptr()
    assert mine[0].is_contiguous() and mine[1].is_contiguous() and mine[0].shape[:3] == mine[1].shape
    # an eager step keeps its own
    be.init_forward(real)
    be.forward(q[:3], k[:3], v[:3], 0, real, d**-0.5)
    assert real.attn_meta.workspace[0].data_ptr() != mine[0].data_ptr()
