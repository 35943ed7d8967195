"""The lean CPU decode step: every row of the batch appends one token, the torch attention
backend serves it, and the model runs as plain torch calls on prepared per-layer tensors.

Why: each CPU op costs 2-4 us however little it moves, so at batch 1 a small model's step
spends a large share of its time outside the weight stream, in the layer-by-layer path's ~190
aten calls per layer (nn.Module __call__ chains, linear()'s dispatch, the norm's
decomposition, two cats per rotary, index_put_ stores and gathers).  Per layer this path runs
    norm (6 ops), qkv mm (+ bias add), [q/k norm (6)], rotary of q and k in one pass (4),
    K/V store (2 index_copy_), SDPA over a narrow view of the pool when the request's KV
    slots are one ascending run (checked once per step) or over an index_select gather,
    o mm, residual add_, norm, gate_up mm, silu·mul_, down mm, residual add_
about 40 ops instead of ~190, each in its cheaper form (roll instead of the rotary's cat,
index_copy_ instead of index_put_, SDPA over a view of the pool where it can skip the gather;
bench/RESULTS.md, "CPU runs 11–16").  The GEMMs go through linear.cpu_mm, the route the layer
path takes too (cpu_routes.py picks it by what the machine runs natively).  In fp32 every op
computes what the layer-by-layer path computes, in the same order on the same values, so the
logits are the same bits (tests check this).  In bf16/fp16 attention runs in fp32 where the
routes say (without native matmul, or where the probe found torch's bf16 SDPA slower), so the
logits differ from the layer path's by the bf16 roundings attention skips.

Used on the CPU for DECODE steps with the torch backend when the model has a full-width
rotary and the KV pool is not FP8, unless the engine's ``cpu_decode`` debug switch is off (docs/switches.md).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import debug_switches
from ..batch import ForwardBatch, ForwardMode
from .cpu_routes import cpu_routes
from .cpu_quant import cpu_matmul
from .linear import cpu_mm, mm_lowp  # noqa: F401  (mm_lowp: the LM head's widened route, for the model)
from .quant import QuantizedWeight, RowStack, is_quantized


def _mm(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w for a dense [in, out] weight view (cpu_mm) or a quantized weight (cpu_quant's route)."""
    return cpu_matmul(x, w) if is_quantized(w) else cpu_mm(x, w)


class _Layer(NamedTuple):
    ln1: torch.Tensor
    w_qkv: torch.Tensor  # [in, out] (a contiguous view when the weights are input-major)
    b_qkv: torch.Tensor | None
    qk_norm: torch.Tensor | None  # [Hq + Hkv, D]: q_norm's weight per q head, then k_norm's
    w_o: torch.Tensor
    ln2: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor


class _Plan(NamedTuple):
    key: tuple
    layers: list
    final_norm: torch.Tensor
    eps: torch.Tensor  # 0-dim fp32
    n_hidden: torch.Tensor  # 0-dim fp32: the hidden size, the divisor of the norms' mean
    n_head: torch.Tensor  # 0-dim fp32: head_dim (q/k norm)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int


def _key(model) -> tuple:
    """Identifies the weight storage the plan points at (the layout pass or a reload replaces it)."""
    first, last = model.layers[0], model.layers[-1]
    ws = (first.self_attn.qkv_proj.weight, last.mlp.down_proj.weight, model.norm.weight)
    return tuple(_storage(w) for w in ws)


def _storage(w) -> tuple:
    if isinstance(w, RowStack):
        return tuple(_storage(p) for p in w.parts)
    return (w.qweight.data_ptr(), w.qweight.stride()) if isinstance(w, QuantizedWeight) else (w.data_ptr(), w.stride())


def _build(model) -> _Plan | None:
    cfg = model.config
    if model.rotary.cos_sin.shape[-1] != cfg.head_dim:  # partial rotary: the layer path
        return None
    dtype = model.dtype
    layers = []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        ws = (a.qkv_proj.weight, a.o_proj.weight, m.gate_up_proj.weight, m.down_proj.weight)
        if any(w.device.type != "cpu" or (not is_quantized(w) and (w.dim() != 2 or w.dtype != dtype))
               for w in ws):
            return None
        qk = None
        if a.q_norm is not None:
            qk = torch.cat([a.q_norm.weight.expand(cfg.num_heads, -1), a.k_norm.weight.expand(cfg.num_kv_heads, -1)])
        t = lambda w: w if is_quantized(w) else w.t()  # noqa: E731 - [in, out] views; quantized as is
        layers.append(_Layer(
            layer.input_layernorm.weight, t(a.qkv_proj.weight), a.qkv_proj.bias, qk, t(a.o_proj.weight),
            layer.post_attention_layernorm.weight, t(m.gate_up_proj.weight), t(m.down_proj.weight),
        ))
    f32 = dict(dtype=torch.float32)
    return _Plan(_key(model), layers, model.norm.weight, torch.tensor(cfg.rms_norm_eps, **f32),
                 torch.tensor(float(cfg.hidden_size), **f32), torch.tensor(float(cfg.head_dim), **f32),
                 cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size)


def cpu_decode_plan(model) -> _Plan | None:
    """The model's prepared per-layer tensors, or None when this path does not serve it."""
    plan = getattr(model, "_cpu_decode_plan", None)
    if plan is not None and (plan is False or plan.key == _key(model)):
        return plan or None
    plan = _build(model)
    model._cpu_decode_plan = plan if plan is not None else False
    return plan


def use_cpu_decode(model, input_ids: torch.Tensor, batch: ForwardBatch) -> bool:
    return (
        debug_switches.of(model).cpu_decode
        and batch.mode == ForwardMode.DECODE
        and not input_ids.is_cuda
        and getattr(batch.attn_backend, "name", None) == "torch"
        and not getattr(batch.kv_pool, "quantized", False)  # an FP8 pool is read through the backend's dequantizing gather
        and cpu_decode_plan(model) is not None
    )


def _rms_norm(x: torch.Tensor, w: torch.Tensor, n: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """rms_norm_ref's values in the same bits with fewer, cheaper ops: mean(x²) + eps is
    addcdiv(eps, sum(x·x), n) (torch's mean is sum / n; value 1 makes addcdiv round the
    quotient and the sum once each, fused or not), and n and eps are 0-dim fp32 tensors (a
    Python scalar operand costs ~2.5 us of wrapping per op on this CPU, a tensor nothing)."""
    xf = x if x.dtype == torch.float32 else x.float()
    r = torch.addcdiv(eps, torch.sum(xf * xf, -1, keepdim=True), n).rsqrt_()  # eps + sum/n: one rounding each
    y = xf * r
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.mul_(w) if y.dtype == w.dtype else y * w


def lowp_logits_on_cpu(hidden: torch.Tensor) -> bool:
    """Whether the LM head of these rows takes mm_lowp: bf16/fp16 on a CPU without native
    matmul for them, from the rows where widening pays (cpu_routes.py); the model's
    ``cpu_decode`` debug switch, checked by the caller, turns this route off."""
    return (not hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) and hidden.dim() == 2
            and cpu_routes(hidden.dtype).widen(hidden.shape[0]))


def _contiguous_run(batch: ForwardBatch) -> int | None:
    """First KV slot when the batch is one request whose slots are one ascending run, else None."""
    rows = batch.attn_meta.slot_index  # [B, L] int64, from the backend's init_forward
    if rows.shape[0] != 1:
        return None
    r = rows[0]
    n = r.shape[0]
    first = int(r[0])
    if n > 1 and (int(r[-1]) - first != n - 1 or not bool((r[1:] - r[:-1]).eq(1).all())):
        return None
    return first


def forward_decode(model, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    """Final-normed hidden states [B, H] of a decode step (the model's forward contract)."""
    p = cpu_decode_plan(model)
    B = input_ids.shape[0]
    Hq, Hkv, D, I, eps, nh = p.num_heads, p.num_kv_heads, p.head_dim, p.intermediate, p.eps, p.n_hidden
    Hqk = Hq + Hkv
    half = D // 2
    pool = batch.kv_pool
    meta = batch.attn_meta
    scale = D**-0.5
    gqa = Hq != Hkv
    rotary = model.rotary
    rotary.begin_forward()
    cos, sin = rotary._tables(positions)  # [B, 1, D] fp32, as the layer path builds them
    loc = batch.out_cache_loc
    L = meta.slot_index.shape[1]
    start = _contiguous_run(batch)
    upcast = model.dtype != torch.float32 and cpu_routes(model.dtype).attention_fp32
    attn_dtype = torch.float32 if upcast else model.dtype
    mask = meta.mask
    if mask is not None and mask.dtype != attn_dtype:
        mask = mask.to(attn_dtype)
    flat = meta.slot_index.view(-1) if start is None else None
    cast_kv = pool.dtype != model.dtype
    # views by as_strided (one cheap op each) instead of slice/narrow/transpose chains
    q_shape, q_stride = (B, Hq, 1, D), (Hqk * D, D, D, 1)  # rotated q as SDPA's [B, H, 1, D]
    k_shape, k_stride = (B, Hkv, D), (Hqk * D, D, 1)  # rotated k, offset Hq*D
    kv_view = ((1, Hkv, L, D), (0, D, Hkv * D, 1)) if start is not None else None

    emb = model.embed_tokens.weight
    x = model.embed_tokens(input_ids) if isinstance(emb, QuantizedWeight) else F.embedding(input_ids, emb)
    residual = x
    h = _rms_norm(x, p.layers[0].ln1, nh, eps)
    for i, ly in enumerate(p.layers):
        qkv = _mm(h, ly.w_qkv)
        if ly.b_qkv is not None:
            qkv.add_(ly.b_qkv)
        qk = qkv.as_strided((B, Hqk, D), (qkv.stride(0), D, 1))
        v = qkv.as_strided((B, Hkv, D), (qkv.stride(0), D, 1), qkv.storage_offset() + Hqk * D)
        if ly.qk_norm is not None:
            qk = _rms_norm(qk, ly.qk_norm, p.n_head, eps)
        # rotary on q and k together: x·cos + rotate_half(x)·sin in fp32 (roll == the cat)
        qf = qk if qk.dtype == torch.float32 else qk.float()
        rot = qf * cos
        rot.add_(torch.roll(qf, half, -1).mul_(sin))
        if rot.dtype != qk.dtype:
            rot = rot.to(qk.dtype)
        q = rot.as_strided(q_shape, q_stride)
        k = rot.as_strided(k_shape, k_stride, Hq * D)
        k_cache, v_cache = pool.k_buffer[i], pool.v_buffer[i]
        if cast_kv:
            k, v = k.to(pool.dtype), v.to(pool.dtype)
        k_cache.index_copy_(0, loc, k)
        v_cache.index_copy_(0, loc, v)
        if kv_view is not None:  # one request, slots start..start+L-1: attend over the pool itself
            kk = k_cache.as_strided(*kv_view, k_cache.storage_offset() + start * Hkv * D)  # [1, Hkv, L, D]
            vv = v_cache.as_strided(*kv_view, v_cache.storage_offset() + start * Hkv * D)
        else:
            kk = k_cache.index_select(0, flat).view(B, L, Hkv, D).transpose(1, 2)
            vv = v_cache.index_select(0, flat).view(B, L, Hkv, D).transpose(1, 2)
        if upcast:  # attention in fp32 where the routes say: torch's bf16 SDPA is slower there (cpu_routes.py)
            q, kk, vv = q.float(), kk.float(), vv.float()
        elif cast_kv:
            kk, vv = kk.to(q.dtype), vv.to(q.dtype)
        attn = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale, enable_gqa=gqa).view(B, Hq * D)
        if upcast:
            attn = attn.to(model.dtype)
        residual.add_(_mm(attn, ly.w_o))
        h = _rms_norm(residual, ly.ln2, nh, eps)
        gate, up = _mm(h, ly.w_gate_up).view(B, 2, I).unbind(1)
        residual.add_(_mm(F.silu(gate).mul_(up), ly.w_down))
        h = _rms_norm(residual, p.layers[i + 1].ln1 if i + 1 < len(p.layers) else p.final_norm, nh, eps)
    return h
