"""Piecewise graphs (engine/piecewise_graph.py) with the Triton attention backend: its
``store_kv`` inside the pieces and ``attend(out=...)`` between them (the split-KV decode
kernel on the leading one-token rows, the extend kernel on the rest) give the eager
forward's hidden states.  On a GPU the pieces are captured CUDA graphs; on the CPU they run
uncaptured, with the kernels under Triton's interpreter."""
import random
import sys

import torch
from kutil import DEV, ON_GPU, rel_err

from localsgl.engine.kv_pool import KVPool, ReqToTokenPool
from localsgl.engine.layers.attention.triton_backend import TritonAttentionBackend
from localsgl.engine.piecewise_graph import PiecewiseGraphs

sys.path.insert(0, "tests")
from test_piecewise_graph import _mixed_batch, _model  # noqa: E402


def test_piecewise_with_triton_attention_gives_the_eager_forward():
    model = _model("llama", seed=4, device=DEV)
    cfg = model.config
    pool = KVPool(300, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32, DEV)
    rt = ReqToTokenPool(8, 64, DEV)
    attn = TritonAttentionBackend()
    pw = PiecewiseGraphs(model, attn, pool, torch.device(DEV), max_tokens=20, capture=ON_GPU)
    stream = torch.cuda.Stream() if ON_GPU else None
    mem = None
    for n in list(pw.pending):
        mem = pw.capture(n, stream, mem)
    rng = random.Random(1)
    for nd, ext in [(3, [(5, 6)]), (0, [(0, 17), (2, 3)])]:
        b = _mixed_batch(model, pool, rt, attn, rng, nd, ext)
        before = [t.clone() for t in pool.k_buffer + pool.v_buffer]
        with torch.inference_mode():
            ref = model(b.input_ids, b.positions, b).clone()
            for t, saved in zip(pool.k_buffer + pool.v_buffer, before):
                t.copy_(saved)
            got = pw.run(b).clone()
        assert rel_err(got, ref) <= 1e-5
