"""Ragged extend attention (cached prefix + causal new tokens) vs an fp64 torch reference:
prefix lens incl. 0, extend lens 1 .. several token blocks, requests in shuffled pool rows
with scattered slots, GQA ratios 1/3/4, head_dim 64/128 (and 80), q as a strided view."""
import pytest
import torch
from kutil import DEV, DOT_DTYPES, ON_GPU, gen, randn, rel_err

from localsgl_kernels.extend_attention import build_work, extend_attention, extend_attention_ref, tokens_per_block


def run_case(g, prefix, ext, hq, hkv, d, dtype, slots):
    B = len(prefix)
    seqs = [p + e for p, e in zip(prefix, ext)]
    kc = randn(slots + 1, hkv, d, g=g, dtype=dtype)
    vc = randn(slots + 1, hkv, d, g=g, dtype=dtype)
    table = torch.zeros(B + 2, max(seqs) + 7, dtype=torch.int32)
    rows = torch.randperm(B + 2, generator=g)[:B]
    perm = torch.randperm(slots, generator=g) + 1
    used = 0
    for i in range(B):
        table[rows[i], : seqs[i]] = perm[used : used + seqs[i]].int()
        used += seqs[i]
    T = sum(ext)
    qkv = randn(T, (hq + 2 * hkv) * d, g=g, dtype=dtype)
    q = qkv[:, : hq * d].reshape(T, hq, d)
    starts = [0]
    for e in ext[:-1]:
        starts.append(starts[-1] + e)
    i32 = dict(dtype=torch.int32, device=DEV)
    table, rows = table.to(DEV), rows.to(DEV)
    work = build_work(ext, prefix, tokens_per_block(d, hq // hkv, DEV), DEV)
    out = extend_attention(q, kc, vc, table, rows, torch.tensor(prefix, **i32), torch.tensor(ext, **i32),
                           torch.tensor(starts, **i32), d**-0.5, work)
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
