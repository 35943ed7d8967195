"""Piecewise CUDA graphs (engine/piecewise_graph.py) on a GPU: captured pieces around the
Triton attention give the eager forward's hidden states on mixed prefill+decode batches,
replayed with new batches of the same and other buckets; padded rows write only scratch
slot 0; and an engine with the switch on takes the path and gives the eager engine's tokens.

Tolerances.  Both paths run the same kernels on the same real rows; only the GEMMs see a
different row count (T against the bucket n), and cuBLAS may pick another tiling for it,
which changes the fp32 accumulation order.  In fp32 that moves results by a few units of
2^-24 per dot product: 1e-5 relative leaves a wide margin.  In bf16 each rounded output
(qkv, o_proj, gate_up, SiLU·mul, down, the norms: about six per layer) may then round the
other way, at most one bf16 step (2^-8 relative) on the elements concerned; added over L
layers that bounds the relative error of the hidden states by 6·L·2^-8."""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from model_utils import save_tiny_llama, staggered_requests  # noqa: E402
from localsgl import Engine  # noqa: E402
from localsgl.engine.debug_switches import DebugSwitches  # noqa: E402
from localsgl.engine.kv_pool import KVPool, ReqToTokenPool  # noqa: E402
from localsgl.engine.layers.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from localsgl.engine.piecewise_graph import PiecewiseGraphs  # noqa: E402
from test_piecewise_graph import _mixed_batch, _model  # noqa: E402

DEV = torch.device("cuda")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_pieces_give_the_eager_forward(family, dtype):
    model = _model(family, seed=1, dtype=dtype, device=DEV, max_positions=1024)  # the rotary kernel reads unguarded
    cfg = model.config
    tol = 1e-5 if dtype == torch.float32 else 6 * cfg.num_layers * 2**-8
    pool = KVPool(4000, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, DEV)
    rt = ReqToTokenPool(64, 512, DEV)
    attn = TritonAttentionBackend()
    pw = PiecewiseGraphs(model, attn, pool, DEV, max_tokens=512)
    stream, mem = torch.cuda.Stream(DEV), None
    for n in list(pw.pending):
        mem = pw.capture(n, stream, mem)
    assert not pw.pending and all(len(g) == cfg.num_layers + 1 for g in pw.graphs.values())
    rng = random.Random(0)
    # (decode rows, [(prefix, new tokens)]): two batches of one bucket (448), then others
    for nd, ext in [(37, [(0, 300), (120, 77)]), (20, [(33, 391), (0, 20)]), (0, [(0, 16)]), (5, [(200, 1), (9, 2)])]:
        b = _mixed_batch(model, pool, rt, attn, rng, nd, ext)
        before = [t.clone() for t in pool.k_buffer + pool.v_buffer]
        with torch.inference_mode():
            ref = model(b.input_ids, b.positions, b).clone()
            ref_kv = [t.clone() for t in pool.k_buffer + pool.v_buffer]
            for t, saved in zip(pool.k_buffer + pool.v_buffer, before):
                t.copy_(saved)
            pw.loc.fill_(int(b.out_cache_loc[0]))  # stale slots in the padding: run() must reset them
            got = pw.run(b).clone()
        torch.cuda.synchronize()
        assert torch.isfinite(got).all()
        assert rel_err(got, ref) <= tol, (nd, ext, rel_err(got, ref))
        new = b.out_cache_loc.unique()
        keep = torch.ones(pool.num_slots + 1, dtype=torch.bool, device=DEV)
        keep[new] = False
        keep[0] = False  # scratch: the padded rows' K/V
        for t, r, old in zip(pool.k_buffer + pool.v_buffer, ref_kv, before):
            assert rel_err(t[new], r[new]) <= tol
            assert torch.equal(t[keep], old[keep])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("piecewise"))


def test_engine_with_piecewise_graphs_gives_the_eager_tokens(checkpoint, monkeypatch):
    prompts, params = staggered_requests(2)
    kwargs = dict(model=checkpoint, device="cuda", dtype="float32", kv_memory="64MiB", chunk_size=64)
    with Engine(**kwargs, debug_switches=DebugSwitches(piecewise_graphs=False)) as e:
        assert e.core.runner.graphs.piecewise is None  # forced off
        eager = [o.token_ids for o in e.generate(prompts, params)]

    runs = []
    real = PiecewiseGraphs.run

    def spy(self, batch):
        runs.append(batch.num_tokens)
        return real(self, batch)

    monkeypatch.setattr(PiecewiseGraphs, "run", spy)
    with Engine(**kwargs) as e:  # a tiny model's layers: on by default
        assert e.wait_graphs(300)
        pw = e.core.runner.graphs.piecewise
        assert pw is not None and not pw.pending and pw.graphs
        piecewise = [o.token_ids for o in e.generate(prompts, params)]
    assert runs and max(runs) > 64  # mixed steps: a 64-token chunk plus decode rows
    assert piecewise == eager
