"""Tiny random models for engine tests (no tokenizer, no files)."""
from __future__ import annotations

import torch

from localsgl.engine.core import CoreConfig, EngineCore
from localsgl.engine.models.config import ModelConfig
from localsgl.engine.models.llama import LlamaForCausalLM


def tiny_model(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, seed=0, dtype=torch.float32):
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, vocab_size=vocab,
        max_position_embeddings=512, eos_token_ids=[vocab - 1],
    )
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg, dtype, "cpu")
    for name, p in m.named_parameters():
        p.data.copy_(torch.randn(p.shape) * (1.0 if "norm" not in name else 0.1) * (0.3 if "embed" not in name else 1.0))
        if "norm" in name:
            p.data.add_(1.0)
    return m


def tiny_core(kv_tokens=256, max_running=8, chunk_size=32, max_model_len=128, disable_radix_cache=False, model=None, policy="fcfs", overlap=False,
              debug=None):
    m = model or tiny_model()
    return EngineCore(
        m, None, [m.config.vocab_size - 1], torch.device("cpu"),
        CoreConfig(kv_tokens=kv_tokens, max_running=max_running, chunk_size=chunk_size, max_model_len=max_model_len,
                   attention_backend="torch", disable_radix_cache=disable_radix_cache, schedule_policy=policy,
                   **({} if debug is None else {"debug": debug})),
        overlap=overlap,
    )


def run_all(core, prompts, params, tag="r", timeout=120.0):
    """Submit every (prompt, params) pair at once; wait until all finish and the core is idle
    with its invariants intact.  Returns {index: (token ids, finish reason)}."""
    import threading

    from localsgl.engine.request import Request

    got, done = {}, threading.Event()

    def cb_for(i):
        toks = []

        def cb(d):
            toks.extend(d.token_ids)
            if d.finish_reason is not None:
                got[i] = (toks, d.finish_reason)
                if len(got) == len(prompts):
                    done.set()
        return cb

    core.add_many([[Request(f"{tag}{i}", p, sp, 0, cb_for(i))] for i, (p, sp) in enumerate(zip(prompts, params))])
    assert done.wait(timeout)
    assert core.wait_idle(30)
    core.scheduler.check_idle_invariants()
    return got
