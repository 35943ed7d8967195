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


def test_triton_backend_matches_torch_on_mixed_batches():
    """Prefill chunks mixed with decodes, then a decode-only step: same logits as torch."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tiny import tiny_model

    from localsgl.engine.batch import ForwardBatch, ForwardMode
    from localsgl.engine.kv_pool import KVPool, ReqToTokenPool
    from localsgl.engine.layers.attention.torch_backend import TorchAttentionBackend
    from localsgl.engine.layers.attention.triton_decode import TritonDecodeAttentionBackend

    model = tiny_model(hidden=64, heads=4, kv_heads=2).to(DEV)
    cfg = model.config
    g = torch.Generator().manual_seed(3)

    def run(backend):
        pool = KVPool(400, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32, DEV)
        rt = ReqToTokenPool(8, 128, DEV)
        toks = torch.randint(0, cfg.vocab_size, (4, 60), generator=g.manual_seed(5))
        lens = [0, 0, 0, 0]
        outs = []
        for step in [[20, 1, 30, 5], [1, 1, 1, 1], [1, 17, 1, 1], [1, 1, 1, 1]]:
            rows = [i + 1 for i in range(4)]
            ids, pos, loc = [], [], []
            for i, n in enumerate(step):
                sl = pool.alloc(n)
                rt.write(rows[i], lens[i], sl)
                ids += toks[i, lens[i]:lens[i] + n].tolist()
                pos += list(range(lens[i], lens[i] + n))
                loc.append(sl)
            starts = [sum(step[:i]) for i in range(4)]
            b = ForwardBatch(
                mode=ForwardMode.DECODE if all(n == 1 for n in step) else ForwardMode.EXTEND, batch_size=4,
                input_ids=torch.tensor(ids, device=DEV), positions=torch.tensor(pos, device=DEV),
                out_cache_loc=torch.cat(loc).to(DEV), req_pool_indices=torch.tensor(rows, device=DEV),
                seq_lens=torch.tensor([l + n for l, n in zip(lens, step)], dtype=torch.int32, device=DEV),
                prefix_lens=torch.tensor(lens, dtype=torch.int32, device=DEV),
                extend_lens=torch.tensor(step, dtype=torch.int32, device=DEV),
                extend_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEV),
                seq_lens_cpu=[l + n for l, n in zip(lens, step)], prefix_lens_cpu=list(lens), extend_lens_cpu=list(step),
                req_to_token=rt.table, kv_pool=pool, attn_backend=backend,
            )
            backend.init_forward(b)
            outs.append(model(b.input_ids, b.positions, b))
            lens = [l + n for l, n in zip(lens, step)]
        return outs

    ref = run(TorchAttentionBackend())
    got = run(TritonDecodeAttentionBackend(num_splits=4))
    for a, b in zip(got, ref):
        assert (a - b).abs().max() < (1e-4 if DEV == "cpu" else 2e-2)  # tf32 dots on GPU
