"""The one-token forward: a decoder layer as three fused weight streams plus attention.

At batch 1 every op between two GEMVs is a kernel launch that moves almost nothing, and
those launches, not the weights, are what keeps a CUDA-graph decode above the bandwidth
floor.  For a step with exactly one new token this path runs each layer as
    norm_qkv      (residual add + RMSNorm + qkv GEMV + bias + rotary + KV store)
    attention     (the backend, over the KV the first kernel already stored)
    gemv          (o_proj)
    norm_gate_up  (residual add + RMSNorm + gate/up GEMV + SiLU·mul)
    gemv          (down_proj)
instead of eleven launches (kernels/gemv.py).  Used when the kernels are enabled, the
backend can attend without storing (``supports_prestored_kv``), the model has no q/k
norm and a full-width rotary, and the shapes tile evenly; otherwise the layer-by-layer
path runs.  The engine's ``fused_decode`` debug switch turns it off (docs/switches.md).
"""
from __future__ import annotations

import torch

from .. import debug_switches
from . import _kernel_importable

_FORCE_ON_CPU = False  # tests: run the kernels under the Triton interpreter


def _one_row_on(model, t: torch.Tensor) -> bool:
    """The path may serve this one-row step: switched on, and on CUDA (or the interpreter in tests)."""
    return debug_switches.of(model).fused_decode and t.shape[0] == 1 and (t.is_cuda or _FORCE_ON_CPU)


def fused_decode_shapes_ok(model) -> bool:
    """Whether ``model``'s config and weights fit the fused kernels (checked once per model)."""
    ok = getattr(model, "_fused_decode_ok", None)
    if ok is None:
        ok = _shapes_ok(model)
        model._fused_decode_ok = ok
    return ok


def _shapes_ok(model) -> bool:
    if not _kernel_importable("gemv"):
        return False
    from localsgl_kernels import gemv as G

    cfg = model.config
    dev = model.embed_tokens.weight.device.type
    attn = model.layers[0].self_attn
    if attn.q_norm is not None:
        return False
    return (
        G.norm_qkv_supported(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size,
                             model.rotary.cos_sin.shape[-1], dev)
        and G.gemv_supported(cfg.hidden_size, cfg.num_heads * cfg.head_dim, dev)
        and G.norm_gate_up_supported(cfg.intermediate_size, cfg.hidden_size, dev)
        and G.gemv_supported(cfg.hidden_size, cfg.intermediate_size, dev)
    )


def use_fused_decode(model, input_ids: torch.Tensor, batch) -> bool:
    if not _one_row_on(model, input_ids):
        return False
    if not getattr(batch.attn_backend, "supports_prestored_kv", False):
        return False
    return fused_decode_shapes_ok(model)


def logits_one_row(model, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """fp32 logits [1, V] of one row by the LM-head GEMV kernel (no separate cast), or None
    when the path is off or the shape does not tile (the caller uses F.linear)."""
    if not _one_row_on(model, hidden):
        return None
    ok = getattr(model, "_fused_logits_ok", None)
    if ok is None:
        ok = _kernel_importable("gemv")
        if ok:
            from localsgl_kernels import gemv as G

            ok = G.gemv_supported(weight.shape[0], weight.shape[1], weight.device.type, "lm_head")
        model._fused_logits_ok = ok
    if not ok:
        return None
    from localsgl_kernels import gemv as G

    return G.gemv(hidden, weight, out_dtype=torch.float32, kind="lm_head")


def forward_one_token(model, input_ids: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
    """The model's forward for one new token; returns the final-normed hidden state [1, H]."""
    from localsgl_kernels import gemv as G

    pool = batch.kv_pool
    backend = batch.attn_backend
    cos_sin = model.rotary.cos_sin
    x = model.embed_tokens(input_ids)
    residual = None
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        q, residual = G.norm_qkv(
            x, residual, ln1.weight, ln1.eps, attn.qkv_proj.weight, attn.qkv_proj.bias, cos_sin, positions,
            batch.out_cache_loc, pool.k_buffer[attn.layer_id], pool.v_buffer[attn.layer_id],
            attn.num_heads, attn.num_kv_heads,
        )
        o = backend.attend(q, attn.layer_id, batch, attn.scale)
        h = G.gemv(o.view(1, attn.q_size), attn.o_proj.weight)
        a, residual = G.norm_gate_up(h, residual, ln2.weight, ln2.eps, mlp.gate_up_proj.weight)
        x = G.gemv(a, mlp.down_proj.weight)
    x, _ = model.norm(x, residual)
    return x
