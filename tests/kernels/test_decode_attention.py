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


@pytest.mark.parametrize("B", [8, 9])
def test_both_stage1_paths(B):
    """Up to 8 rows stage 1 loads cached K/V before its (PDL) wait; above, after it."""
    g = gen(100 + B)
    q, kc, vc, table, rows, seq = make_case(g, B, 4, 2, 64, torch.float32, 140, 1500)
    ref = decode_attention_ref(q, kc, vc, table, rows, seq, 0.1)
    out = decode_attention(q, kc, vc, table, rows, seq, 0.1, num_splits=4, min_chunk=16)
    assert rel_err(out, ref) < (1e-5 if not ON_GPU else 2e-3)


def make_shared_case(g, groups_spec, singles, hq, hkv, d, dtype, slots):
    """Rows in groups share their first plen slots (as radix-cache paths do); each row has its
    own suffix of 1..suffix_max tokens.  groups_spec: [(plen, members, suffix_max)]; singles:
    seq lens of rows in no group.  Returns the case plus the group list in batch-row indices."""
    lens, shared, groups = [], [], []
    b = 0
    for plen, members, smax in groups_spec:
        prefix = (torch.randperm(slots, generator=g)[:plen] + 1).int()
        rows = []
        for _ in range(members):
            lens.append(plen + int(torch.randint(1, smax + 1, (1,), generator=g)))
            shared.append(prefix)
            rows.append(b)
            b += 1
        groups.append((plen, rows))
    for n in singles:
        lens.append(n)
        shared.append(None)
        b += 1
    B = b
    max_len = max(lens)
    kc = randn(slots + 1, hkv, d, g=g, dtype=dtype)
    vc = randn(slots + 1, hkv, d, g=g, dtype=dtype)
    table = torch.zeros(B + 2, max_len, dtype=torch.int32)
    rows = torch.randperm(B + 1, generator=g)[:B] + 1
    for i in range(B):
        own = (torch.randperm(slots, generator=g)[: lens[i]] + 1).int()
        if shared[i] is not None:
            own[: len(shared[i])] = shared[i]
        table[rows[i], : lens[i]] = own
    q = randn(B, hq, d, g=g, dtype=dtype)
    seq = torch.tensor(lens, dtype=torch.int32)
    return q, kc, vc, table.to(DEV), rows.to(DEV), seq.to(DEV), groups


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(4, 1, 64), (12, 4, 64), (6, 2, 80)])
def test_shared_prefix_groups(dtype, hq, hkv, d):
    """Cascade decoding equals plain attention over each row's whole context: groups of
    several sizes (one full group of max_rows), short and long prefixes (several prefix
    splits, some empty), rows outside any group, unused group slots, suffixes of 1 token."""
    from localsgl_kernels.decode_attention import PrefixGroups, prefix_group_rows

    g = gen(7 * hq + d)
    R = prefix_group_rows(hq // hkv)
    if ON_GPU:
        spec, singles, slots = [(4096, R, 300), (700, 3, 1), (33, 2, 50)], [1, 2000, 4500], 200000
    else:
        spec, singles, slots = [(150, min(R, 5), 40), (20, 2, 1)], [1, 90], 3000
        if R <= 5:
            spec[0] = (150, R, 40)
    q, kc, vc, table, rows, seq, groups = make_shared_case(g, spec, singles, hq, hkv, d, dtype, slots)
    B = q.shape[0]
    ref = decode_attention_ref(q, kc, vc, table, rows, seq, d**-0.5)
    pg = PrefixGroups.build(B, groups, num_groups=len(groups) + 2, max_rows=R, device=DEV)
    for splits in (4, 8):
        out = decode_attention(q, kc, vc, table, rows, seq, d**-0.5, num_splits=splits, groups=pg,
                               min_chunk=16 if not ON_GPU else None)
        assert not torch.isnan(out).any()
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    # the same tensors with no groups (every row attends from 0) agree too
    plain = decode_attention(q, kc, vc, table, rows, seq, d**-0.5, num_splits=4)
    assert rel_err(plain, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_prefix_groups_host_arrays():
    from localsgl_kernels.decode_attention import PrefixGroups

    start, pos, rows = PrefixGroups.host_arrays(6, [(10, [4, 1]), (3, [2])], num_groups=3, max_rows=4)
    assert start.tolist() == [0, 10, 3, 0, 10, 0]
    assert pos.tolist() == [-1, 1, 4, -1, 0, -1]
    assert rows.tolist() == [[4, 1, -1, -1], [2, -1, -1, -1], [-1, -1, -1, -1]]


@pytest.mark.parametrize("kind,E,bk,zero", [("int4", 8, 64, True), ("int4", 8, 128, False), ("int8", 4, 32, True)])
def test_int8_epilogue(kind, E, bk, zero):
    """Batch 1 with a PreparedRow: the merge writes the output unchanged, and also the next GEMV's
    int8 activations exactly as its preparation kernel would from that output, and zeroes the
    GEMV's output when asked; a head dim that is not whole chunks leaves the row unfilled."""
    from types import SimpleNamespace

    from localsgl_kernels.quant_words import PreparedRow, prepare_activations

    dtype = DOT_DTYPES[-1]
    g = gen(77)
    hq, hkv, d = 4, 2, 64
    q, kc, vc, table, rows, seq = make_case(g, 3, hq, hkv, d, dtype, 40, 200)
    q, rows, seq = q[2:], rows[2:], seq[2:]  # batch 1 (the longest request)
    K = hq * d
    plain = decode_attention(q, kc, vc, table, rows, seq, d**-0.5, num_splits=4)
    row = PreparedRow(torch.full((K // 4,), -1, dtype=torch.int32, device=DEV),
                      torch.full((2 * (K // (4 * E)),), -1.0, device=DEV),
                      torch.full((1, 96), 5.0, device=DEV), zero, E, bk)
    out = decode_attention(q, kc, vc, table, rows, seq, d**-0.5, num_splits=4, int8_row=row)
    assert row.filled and torch.equal(out, plain)
    w = SimpleNamespace(fmt=SimpleNamespace(kind=kind))
    xp, xs = prepare_activations(w, out.reshape(K), None, None, 0.0, None, bk, int8=True)
    assert torch.equal(row.xp, xp) and torch.equal(row.xs, xs)
    assert torch.equal(row.out, torch.zeros_like(row.out) if zero else torch.full_like(row.out, 5.0))
    odd = PreparedRow(row.xp, row.xs, row.out, zero, 32, bk)  # 4·32-column chunks do not tile d = 64
    decode_attention(q, kc, vc, table, rows, seq, d**-0.5, num_splits=4, int8_row=odd)
    assert not odd.filled
