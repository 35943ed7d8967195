"""FP8 KV cache kernels: the KV store quantizes to the same bits as the pool's torch
reference (kv_pool.fp8_quantize_rows: zero rows, large and tiny ranges, odd head counts and
head sizes, strided k/v), and decode (both stage-1 paths, shared-prefix groups) and extend
attention over e4m3 caches with per-(token, head) scales match the fp64 references over the
same dequantized values; attention over the FP8 pool stays close to attention over the
unquantized values."""
import pytest
import torch
from kutil import DEV, DOT_DTYPES, ON_GPU, gen, randn, rel_err, scattered_table
from test_decode_attention import make_case, make_shared_case

from localsgl.engine.kv_pool import FP8_KV_DTYPE, KVPool, fp8_quantize_rows
from localsgl_kernels.decode_attention import decode_attention, decode_attention_ref
from localsgl_kernels.extend_attention import build_work, extend_attention, extend_attention_ref, tokens_per_block
from localsgl_kernels.kv_store import store_kv


def quantize_cache(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[slots, H, D] -> (e4m3 cache, head-major [H, slots] fp32 scales), as the pool stores them."""
    q, s = fp8_quantize_rows(cache.cpu())
    return q.to(DEV), s.t().contiguous().to(DEV)


@pytest.mark.parametrize("hkv,d", [(8, 128), (3, 80), (1, 64)])
def test_store_kv_fp8_matches_pool_reference(hkv, d):
    g = gen(hkv * 1000 + d)
    T, slots = 11, 64
    qkv = randn(T, (4 + 2 * hkv) * d, g=g, dtype=torch.bfloat16)  # k/v as strided slices
    k = qkv[:, 4 * d: (4 + hkv) * d].reshape(T, hkv, d)
    v = qkv[:, (4 + hkv) * d:].reshape(T, hkv, d)
    k[0].zero_()  # an all-zero token
    k[1] *= 3000.0  # a range far beyond e4m3's 448
    v[2] *= 1e-5  # a tiny range (far below e4m3's smallest normal)
    k[3, :, 1] = -k[3].abs().amax(-1) * 2.0**-20  # below half the smallest subnormal step: rounds to -0
    loc = (torch.randperm(slots, generator=g)[:T] + 1).to(DEV)
    pool = KVPool(slots, 1, hkv, d, torch.bfloat16, DEV, kv_dtype=FP8_KV_DTYPE)
    ref = KVPool(slots, 1, hkv, d, torch.bfloat16, "cpu", kv_dtype=FP8_KV_DTYPE)
    store_kv(pool.k_buffer[0], pool.v_buffer[0], loc, k, v, pool.k_scale[0], pool.v_scale[0])
    ref.store(0, loc.cpu(), k.cpu(), v.cpu())
    for got, want in ((pool.k_buffer[0], ref.k_buffer[0]), (pool.v_buffer[0], ref.v_buffer[0])):
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(pool.k_scale[0].cpu(), ref.k_scale[0])
    assert torch.equal(pool.v_scale[0].cpu(), ref.v_scale[0])
    kk, vv = pool.gather(0, loc)
    assert not kk[0].any() and not torch.isnan(kk).any()
    for got, want in ((kk[1:], k[1:]), (vv, v)):  # e4m3: 3 mantissa bits, ~2-3% rms
        assert rel_err(got, want) < 0.05
    assert rel_err(vv[2], v[2]) < 0.05


def _fp8_case(q, kc, vc):
    kq, ks = quantize_cache(kc)
    vq, vs = quantize_cache(vc)
    return kq, vq, ks, vs


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("B", [5, 10])  # stage 1 loads K/V before its wait up to 8 rows, after above
def test_decode_fp8(dtype, B):
    g = gen(31 + B)
    hq, hkv, d = (8, 2, 64)
    max_len, slots = (300, 1500) if not ON_GPU else (3000, 100000)
    q, kc, vc, table, rows, seq = make_case(g, B, hq, hkv, d, dtype, max_len, slots)
    kq, vq, ks, vs = _fp8_case(q, kc, vc)
    ref = decode_attention_ref(q, kq, vq, table, rows, seq, d**-0.5, k_scale=ks, v_scale=vs)
    out = decode_attention(q, kq, vq, table, rows, seq, d**-0.5, num_splits=4 if not ON_GPU else 16,
                           k_scale=ks, v_scale=vs)
    assert out.shape == (B, hq, d) and not torch.isnan(out).any()
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    exact = decode_attention_ref(q, kc, vc, table, rows, seq, d**-0.5)  # the unquantized values
    assert rel_err(out, exact) < 0.06


def test_decode_fp8_shared_prefix_groups():
    from localsgl_kernels.decode_attention import PrefixGroups, prefix_group_rows

    g = gen(77)
    hq, hkv, d = 12, 4, 64
    dtype = DOT_DTYPES[-1]
    R = prefix_group_rows(hq // hkv)
    spec, singles, slots = ([(150, min(R, 5), 40), (20, 2, 1)], [1, 90], 3000) if not ON_GPU else (
        [(4096, R, 300), (700, 3, 1)], [1, 2000], 200000)
    q, kc, vc, table, rows, seq, groups = make_shared_case(g, spec, singles, hq, hkv, d, dtype, slots)
    kq, vq, ks, vs = _fp8_case(q, kc, vc)
    ref = decode_attention_ref(q, kq, vq, table, rows, seq, d**-0.5, k_scale=ks, v_scale=vs)
    pg = PrefixGroups.build(q.shape[0], groups, num_groups=len(groups) + 1, max_rows=R, device=DEV)
    out = decode_attention(q, kq, vq, table, rows, seq, d**-0.5, num_splits=4, groups=pg,
                           min_chunk=16 if not ON_GPU else None, k_scale=ks, v_scale=vs)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (3, 3, 80)])
def test_extend_fp8(hq, hkv, d):
    g = gen(hq * 10 + d)
    dtype = DOT_DTYPES[-1]
    if ON_GPU:
        prefix, ext, slots = [0, 1000, 17, 2047], [777, 1, 300, 129], 20000
    else:
        prefix, ext, slots = [0, 40, 17, 3], [23, 1, 19, 9], 300
    B = len(prefix)
    seqs = [p + e for p, e in zip(prefix, ext)]
    kc = randn(slots + 1, hkv, d, g=g, dtype=dtype)
    vc = randn(slots + 1, hkv, d, g=g, dtype=dtype)
    table, rows = scattered_table(g, seqs, slots)
    T = sum(ext)
    q = randn(T, hq, d, g=g, dtype=dtype)
    starts = [sum(ext[:i]) for i in range(B)]
    i32 = dict(dtype=torch.int32, device=DEV)
    table, rows = table.to(DEV), rows.to(DEV)
    work = build_work(ext, prefix, tokens_per_block(d, hq // hkv, DEV), DEV)
    kq, vq, ks, vs = _fp8_case(q, kc, vc)
    out = extend_attention(q, kq, vq, table, rows, torch.tensor(prefix, **i32), torch.tensor(ext, **i32),
                           torch.tensor(starts, **i32), d**-0.5, work, k_scale=ks, v_scale=vs)
    ref = extend_attention_ref(q, kq, vq, table, rows, prefix, ext, d**-0.5, k_scale=ks, v_scale=vs)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    exact = extend_attention_ref(q, kc, vc, table, rows, prefix, ext, d**-0.5)
    assert rel_err(out, exact) < 0.06
