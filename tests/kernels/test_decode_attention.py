"""Paged split-KV decode attention vs an fp64 torch reference on fresh random pools:
ragged seq lens (1 .. ~300, incl. 1), scattered slots, GQA ratios 1/3/4, head_dim
64/128 (and 80), a padded CUDA-graph-style row (request row 0, seq_len 1), q as a strided
view, several split counts (so some chunks are empty) and a reused oversized workspace."""
import pytest
import torch
from kutil import DEV, DOT_DTYPES, ON_GPU, gen, randn, rel_err

from localsgl_kernels.decode_attention import alloc_workspace, decode_attention, decode_attention_ref


def make_case(g, B, hq, hkv, d, dtype, max_len, slots):
    kc = randn(slots + 1, hkv, d, g=g, dtype=dtype)
    vc = randn(slots + 1, hkv, d, g=g, dtype=dtype)
    table = torch.zeros(B + 3, max_len, dtype=torch.int32)
    seq = torch.randint(1, max_len + 1, (B,), generator=g)
    seq[0] = 1
    seq[-1] = max_len
    rows = torch.randperm(B + 2, generator=g)[:B] + 1
    for b in range(B):
        table[rows[b], : seq[b]] = (torch.randperm(slots, generator=g)[: seq[b]] + 1).int()
    rows[1] = 0  # a padded graph row: request row 0 (all zeros: slot 0), seq_len 1
    seq[1] = 1
    qkv = randn(B, (hq + 2 * hkv) * d, g=g, dtype=dtype)
    q = qkv[:, : hq * d].reshape(B, hq, d)  # strided view, as the model passes it
    return q, kc, vc, table.to(DEV), rows.to(DEV), seq.to(torch.int32).to(DEV)


CASES = [(4, 1, 64), (6, 2, 128), (12, 4, 64), (3, 3, 80)]


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("hq,hkv,d", CASES)
def test_decode(dtype, hq, hkv, d):
    g = gen(hq * 1000 + d)
    B, max_len, slots = (6, 300, 2000) if not ON_GPU else (37, 3000, 100000)
    q, kc, vc, table, rows, seq = make_case(g, B, hq, hkv, d, dtype, max_len, slots)
    ref = decode_attention_ref(q, kc, vc, table, rows, seq, d**-0.5)
    out = decode_attention(q, kc, vc, table, rows, seq, d**-0.5, num_splits=4 if not ON_GPU else 16)
    assert out.shape == (B, hq, d) and not torch.isnan(out).any()
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("num_splits", [1, 2, 8])
def test_split_counts_and_workspace(num_splits):
    g = gen(num_splits)
    B, hq, hkv, d = 4, 4, 2, 64
    q, kc, vc, table, rows, seq = make_case(g, B, hq, hkv, d, torch.float32, 130, 600)
    ws = alloc_workspace(B + 5, hq, d, num_splits, DEV)  # larger than needed, reused
    ref = decode_attention_ref(q, kc, vc, table, rows, seq, 0.1)
    for _ in range(2):
        out = decode_attention(q, kc, vc, table, rows, seq, 0.1, num_splits=num_splits, workspace=ws,
                               min_chunk=16)
        assert rel_err(out, ref) < (1e-5 if not ON_GPU else 2e-3)  # fp32 tl.dot is TF32 on GPUs
