"""Piecewise graphs for extend/mixed steps (engine/piecewise_graph.py), on the CPU without
capture: the layer cut at its attention, the padding to a token bucket and the fixed buffers
give the eager forward's hidden states and KV, and padded rows write only scratch slot 0.
(The captured CUDA graphs are checked against the eager path in tests/gpu.)"""
from __future__ import annotations

import random

import pytest
import torch

from localsgl.engine.batch import ForwardBatch, ForwardMode
from localsgl.engine.kv_pool import KVPool, ReqToTokenPool
from localsgl.engine.layers.attention.torch_backend import TorchAttentionBackend
from localsgl.engine.models.config import ModelConfig
from localsgl.engine.models.llama import LlamaForCausalLM
from localsgl.engine.piecewise_graph import PiecewiseGraphs, token_buckets


class PrestoredTorchBackend(TorchAttentionBackend):
    """The torch backend with ``attend``: it reads the new tokens' K/V back from the pool (where
    ``store_kv`` put them) and runs the ordinary forward, which stores the same values again."""

    supports_prestored_kv = True

    def attend(self, q, layer, batch, scale, out=None):
        loc = batch.out_cache_loc
        pool = batch.kv_pool
        o = self.forward(q, pool.k_buffer[layer][loc], pool.v_buffer[layer][loc], layer, batch, scale)
        if out is None:
            return o
        out.copy_(o)
        return out


def _model(family: str, seed: int, dtype=torch.float32, device="cpu", max_positions=256) -> LlamaForCausalLM:
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=16, vocab_size=80, max_position_embeddings=max_positions, rms_norm_eps=1e-6,
        attention_bias=family == "qwen2", qk_norm=family == "qwen3", tie_word_embeddings=family == "qwen2",
    )
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg, dtype, device)
    for name, p in m.named_parameters():
        r = torch.randn(p.shape)
        p.data.copy_(1.0 + 0.1 * r if "norm" in name else r * (0.2 if "embed" not in name else 1.0))
    return m


def _mixed_batch(model, pool, rt, attn, rng: random.Random, num_decode: int, extends: list[tuple[int, int]]):
    """A mixed EXTEND batch on the pool's device: num_decode one-token rows first (random cached
    prefixes), then one row per (prefix, new tokens) of ``extends``.  Prefix K/V are random;
    new slots are fresh."""
    dev = pool.device
    free = list(range(1, pool.num_slots + 1))
    rng.shuffle(free)
    rows = [(rng.randint(3, 40), 1) for _ in range(num_decode)] + list(extends)
    ids, pos, loc, starts = [], [], [], []
    for i, (pre, ext) in enumerate(rows):
        slots = [free.pop() for _ in range(pre + ext)]
        rt.write(i + 1, 0, torch.tensor(slots))
        for layer in range(pool.num_layers):
            for buf in (pool.k_buffer[layer], pool.v_buffer[layer]):
                buf[torch.tensor(slots[:pre], dtype=torch.int64, device=dev)] = torch.randn(
                    pre, pool.num_kv_heads, pool.head_dim).to(dev, buf.dtype)
        starts.append(len(ids))
        ids += [rng.randrange(model.config.vocab_size) for _ in range(ext)]
        pos += list(range(pre, pre + ext))
        loc += slots[pre:]
    i32 = dict(dtype=torch.int32, device=dev)
    b = ForwardBatch(
        mode=ForwardMode.EXTEND, batch_size=len(rows), input_ids=torch.tensor(ids, device=dev),
        positions=torch.tensor(pos, device=dev), out_cache_loc=torch.tensor(loc, device=dev),
        req_pool_indices=torch.arange(1, len(rows) + 1, device=dev),
        seq_lens=torch.tensor([p + e for p, e in rows], **i32), prefix_lens=torch.tensor([p for p, _ in rows], **i32),
        extend_lens=torch.tensor([e for _, e in rows], **i32), extend_start_loc=torch.tensor(starts, **i32),
        seq_lens_cpu=[p + e for p, e in rows], prefix_lens_cpu=[p for p, _ in rows], extend_lens_cpu=[e for _, e in rows],
        req_to_token=rt.table, kv_pool=pool, attn_backend=attn,
    )
    attn.init_forward(b)
    return b


def test_token_buckets_cover_every_size_with_little_padding():
    for max_tokens in (1, 17, 300, 2560, 4096):
        b = token_buckets(max_tokens)
        assert b == sorted(set(b)) and b[-1] >= max_tokens and b[-1] - max_tokens < 128
        assert all(n % 16 == 0 for n in b)  # one kernel specialization for every bucket
        for t in range(1, max_tokens + 1):
            n = next(x for x in b if x >= t)
            assert n - t < max(16, t // 4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("num_decode, extends", [(5, [(0, 9), (7, 6)]), (0, [(0, 16)]), (3, []), (0, [(12, 1), (0, 2)])])
def test_piecewise_pieces_give_the_eager_forward(family, num_decode, extends):
    model = _model(family, seed=num_decode + len(extends))
    cfg = model.config
    pool = KVPool(400, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    rt = ReqToTokenPool(8, 64, "cpu")
    attn = PrestoredTorchBackend()
    b = _mixed_batch(model, pool, rt, attn, random.Random(num_decode), num_decode, extends)
    T = b.num_tokens
    before = [t.clone() for t in pool.k_buffer + pool.v_buffer]

    with torch.inference_mode():
        eager = model(b.input_ids, b.positions, b).clone()
        eager_kv = [t.clone() for t in pool.k_buffer + pool.v_buffer]
        for t, saved in zip(pool.k_buffer + pool.v_buffer, before):  # the new tokens' K/V written again below
            t.copy_(saved)
        pw = PiecewiseGraphs(model, attn, pool, torch.device("cpu"), max_tokens=64, capture=False)
        assert pw.bucket_for(T) is None and not pw.applies(b)
        n = pw.planned_bucket(T)
        pw.capture(n)
        assert pw.applies(b) and pw.bucket_for(T) == n >= T
        pw.ids.fill_(cfg.vocab_size - 1)  # stale padded rows from an earlier step: any valid token
        pw.positions.fill_(3)
        pw.loc.fill_(int(b.out_cache_loc[0]))  # a live slot: run() must point the padding at slot 0
        got = pw.run(b)

    assert got.shape == eager.shape
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    new = set(b.out_cache_loc.tolist())
    for t, ref, old in zip(pool.k_buffer + pool.v_buffer, eager_kv, before):
        torch.testing.assert_close(t[sorted(new)], ref[sorted(new)], rtol=1e-5, atol=1e-5)
        untouched = [s for s in range(1, pool.num_slots + 1) if s not in new]
        assert torch.equal(t[untouched], old[untouched])  # padded rows wrote slot 0 alone


def test_piecewise_runs_every_step_size_up_to_its_largest_bucket():
    model = _model("llama", seed=3)
    cfg = model.config
    pool = KVPool(1200, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    rt = ReqToTokenPool(8, 400, "cpu")
    attn = PrestoredTorchBackend()
    pw = PiecewiseGraphs(model, attn, pool, torch.device("cpu"), max_tokens=300, capture=False)
    assert pw.buckets[-3:] == [224, 256, 320] and pw.pending == sorted(pw.buckets, reverse=True)
    pw.capture(pw.pending[0])  # the largest first, as the engine does
    assert pw.bucket_for(300) == 320 and pw.bucket_for(250) == 320  # 256's bucket padded by 64 at most
    assert pw.bucket_for(100) is None  # 320 rows for 100 tokens: eager until 112 is captured
    for n in list(pw.pending):
        pw.capture(n)
    assert not pw.pending and pw.bucket_for(100) == 112 and pw.bucket_for(321) is None
    rng = random.Random(7)
    for T in (1, 16, 17, 33, 130, 240):  # positions stay below the model's 256
        nd = 1 if T == 1 else 3
        b = _mixed_batch(model, pool, rt, attn, rng, nd, [(rng.randint(0, 9), T - nd)] if T > nd else [])
        assert b.num_tokens == T
        with torch.inference_mode():
            got = pw.run(b).clone()
            ref = model(b.input_ids, b.positions, b)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
