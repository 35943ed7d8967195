"""Ragged extend attention (cached prefix + causal new tokens) vs an fp64 torch reference:
prefix lens incl. 0, extend lens 1 .. several token blocks, requests in shuffled pool rows
with scattered slots, GQA ratios 1/3/4/8, head_dim 64/128 (and 80), q as a strided view;
explicit tile configurations (small and GPU-shaped tiles, V loaded early or late) over
prefixes many key tiles long, with masked tails at every boundary; the per-device choice
of configuration by shared memory."""
import pytest
import torch
from kutil import DEV, DOT_DTYPES, ON_GPU, gen, randn, rel_err, scattered_table

from localsgl_kernels.extend_attention import (
    ExtendConfig,
    build_work,
    choose_config,
    extend_attention,
    extend_attention_ref,
    smem_bytes,
    tokens_per_block,
)


def run_case(g, prefix, ext, hq, hkv, d, dtype, slots, config=None):
    B = len(prefix)
    seqs = [p + e for p, e in zip(prefix, ext)]
    kc = randn(slots + 1, hkv, d, g=g, dtype=dtype)
    vc = randn(slots + 1, hkv, d, g=g, dtype=dtype)
    table, rows = scattered_table(g, seqs, slots)
    T = sum(ext)
    qkv = randn(T, (hq + 2 * hkv) * d, g=g, dtype=dtype)
    q = qkv[:, : hq * d].reshape(T, hq, d)
    starts = [0]
    for e in ext[:-1]:
        starts.append(starts[-1] + e)
    i32 = dict(dtype=torch.int32, device=DEV)
    table, rows = table.to(DEV), rows.to(DEV)
    tok = config.block_m // (hq // hkv) if config else tokens_per_block(d, hq // hkv, DEV)
    work = build_work(ext, prefix, tok, DEV)
    out = extend_attention(q, kc, vc, table, rows, torch.tensor(prefix, **i32), torch.tensor(ext, **i32),
                           torch.tensor(starts, **i32), d**-0.5, work, config=config)
    ref = extend_attention_ref(q, kc, vc, table, rows, prefix, ext, d**-0.5)
    assert out.shape == q.shape and not torch.isnan(out).any()
    return rel_err(out, ref)


CASES = [(4, 1, 64), (6, 2, 128), (12, 4, 64), (3, 3, 80)]


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("hq,hkv,d", CASES)
def test_extend(dtype, hq, hkv, d):
    g = gen(hq * 100 + d)
    if ON_GPU:
        prefix = [0, 1000, 17, 0, 300, 2047, 5]
        ext = [777, 1, 300, 1, 64, 129, 1]
        slots = 20000
    else:
        prefix = [0, 40, 17, 0, 3]
        ext = [23, 1, 19, 1, 9]
        slots = 300
    err = run_case(g, prefix, ext, hq, hkv, d, dtype, slots)
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


def test_single_prompt_no_prefix():
    g = gen(99)
    n = 2048 if ON_GPU else 45
    err = run_case(g, [0], [n], 8, 2, 64, DOT_DTYPES[-1], n + 10)
    assert err < 1e-2


# (BLOCK_M, BLOCK_N, warps, stages, v_early, exp16[, offs32]): the interpreter runs any tile (exp16 is
# inline PTX, off there); on a GPU these include the shapes the CUDA configurations use
TILES = [(16, 16, 4, 1, True), (64, 32, 4, 1, False), (16, 16, 4, 1, False, False, False)] if not ON_GPU else [
    (256, 64, 8, 3, False, True), (256, 64, 8, 3, False), (128, 64, 8, 2, True), (64, 64, 4, 3, False),
    (256, 64, 8, 3, False, True, False)]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (16, 2, 32)])
def test_extend_tiles_long_prefix(tile, hq, hkv, d):
    """Prefixes spanning many key tiles (shuffled slots), extends that end mid-tile and
    mid-token-block, a request whose diagonal starts exactly on a tile boundary."""
    cfg = ExtendConfig(*tile)
    g = gen(hq + d + tile[0])
    n = cfg.block_n
    if ON_GPU:
        prefix, ext = [20000, 0, 3 * n - 1, 5000], [1024, 777, 2 * n + 3, 1]
    else:
        prefix, ext = [13 * n + 5, 0, 3 * n - 1, 7 * n], [2 * cfg.block_m // (hq // hkv) + 3, 29, n + 3, 1]
    slots = sum(prefix) + sum(ext) + 17
    dtype = DOT_DTYPES[-1]
    err = run_case(g, prefix, ext, hq, hkv, d, dtype, slots, config=cfg)
    assert err < (1e-5 if dtype == torch.float32 else 1.6e-2), err


def test_choose_config_by_shared_memory():
    """The large Hopper tile only where its shared memory fits (with margin); every
    choice's tile holds one whole KV group."""
    hopper = choose_config(128, 4, 227 * 1024)
    assert smem_bytes(hopper, 128) + 8 * 1024 <= 227 * 1024 and hopper.exp16
    for limit in (99 * 1024, 163 * 1024):  # consumer cards, A100
        cfg = choose_config(128, 4, limit)
        assert smem_bytes(cfg, 128) <= limit
        assert smem_bytes(cfg, 128) < smem_bytes(hopper, 128)
    assert smem_bytes(ExtendConfig(256, 64, 8, 3), 128) == 2 * 128 * (256 + 2 * 3 * 64)
    for d, group in ((64, 16), (128, 8), (256, 64)):
        cfg = choose_config(d, group, 227 * 1024)
        assert cfg.block_m >= group and cfg.block_m % group == 0


@pytest.mark.skipif(ON_GPU, reason="a GPU runs the kernel itself (test_extend_tiles_long_prefix)")
def test_bf16_exp2_compiles_for_sm90():
    """The bf16 exp2 (inline PTX the interpreter cannot run) compiles for sm_90 as the packed
    bf16 instruction, and only where asked for."""
    from sm90_compile import can_compile, compile_all

    if not can_compile():
        pytest.skip("needs Triton's bundled ptxas")
    base = dict(kernel="localsgl_kernels.extend_attention:_extend_kernel",
                pointers=dict(Q="*bf16", K="*bf16", V="*bf16", KS="*fp32", VS="*fp32", O="*bf16", ReqToToken="*i32",
                              ReqIdx="*i64", PrefixLens="*i32", ExtendLens="*i32", ExtendStart="*i32",
                              WorkReq="*i32", WorkTok="*i32"),
                scalars=dict(qk_scale="fp32"), num_warps=8, num_stages=3, ptx_needles=["ex2.approx.ftz.bf16x2"])
    consts = dict(G=4, TOK=64, HEAD_DIM=128, BLOCK_M=256, BLOCK_N=64, BLOCK_D=128, V_EARLY=False, KV_FP8=False)
    for exp16, r in zip((True, False), compile_all([dict(base, constexprs=dict(consts, EXP16=e)) for e in (True, False)])):
        assert r["ok"], f"EXP16={exp16}: {r['error']}"
        assert r["ptx_has"]["ex2.approx.ftz.bf16x2"] == exp16
