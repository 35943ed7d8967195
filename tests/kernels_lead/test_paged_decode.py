"""Paged decode attention kernel vs its torch reference (CPU: TRITON_INTERPRET=1)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
from localsgl_kernels.paged_decode import decode_attention, decode_attention_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (6, 2, 32), (3, 3, 16)] if DEV == "cpu" else [(32, 8, 128), (28, 4, 128), (9, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] if DEV == "cpu" else [torch.bfloat16, torch.float16])
def test_decode_matches_reference(hq, hkv, d, dtype):
    g = torch.Generator().manual_seed(hq * 100 + d)
    B = 5 if DEV == "cpu" else 33
    maxlen = 70 if DEV == "cpu" else 3000
    slots = 2000 if DEV == "cpu" else 80000
    k_cache = torch.randn(slots, hkv, d, generator=g).to(dtype).to(DEV)
    v_cache = torch.randn(slots, hkv, d, generator=g).to(dtype).to(DEV)
    table = torch.zeros(B + 1, maxlen, dtype=torch.int32)
    seq = torch.randint(1, maxlen, (B,), generator=g)
    seq[0] = 1
    for b in range(B):
        table[b + 1, : seq[b]] = torch.randperm(slots - 1, generator=g)[: seq[b]].int() + 1
    q = torch.randn(B, hq, d, generator=g).to(dtype).to(DEV)
    rows = torch.arange(1, B + 1).to(DEV)
    table = table.to(DEV)
    seq_d = seq.to(torch.int32).to(DEV)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, table, rows, seq_d, d**-0.5, out=out, num_splits=4 if DEV == "cpu" else 8)
    ref = decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), table, rows, seq, d**-0.5)
    assert not torch.isnan(out).any()
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel
