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

A quantized weight (layers/quant.py) streams through the same fused kernels' quantized twins
(localsgl_kernels.quant_gemv: dequantized in registers, same prologues and epilogues), chosen
per weight, so a model whose layers mix formats (a GGUF Q4_K_M file) still takes this path.
Between quantized kernels that read their activations through a preparation kernel, o_proj and
down_proj hand over fp32 sums (``_fp32_sums``), so a GEMV tile cut in two K halves adds them into
its output instead of summing partials in a launch of its own.  Where o_proj's tile runs over int8
activations, the decode attention's merge writes them (and zeroes o_proj's output) in its epilogue,
one launch fewer a layer (the ``attention_int8_epilogue`` debug switch).  Where
``l2_prefetch.BEFORE_O_PROJ`` is on (off until timed), the decode attention also pulls o_proj's
weights into L2 while it attends (at short contexts it leaves the memory bus idle), so o_proj
reads them from there (the ``l2_prefetch`` debug switch turns it off).

With an FP8 KV pool the qkv kernel writes the token's K and V to a one-slot staging buffer in
the model's dtype and the backend's ``forward`` quantizes them into the pool (its KV store
computes each head's scale over the whole head, which the qkv kernel, splitting a head's rows
across programs, cannot) and attends: one extra small launch per layer.
"""
from __future__ import annotations

import torch

from .. import debug_switches
from . import _kernel_importable
from .quant import QuantizedWeight, is_quantized

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
    rot = model.rotary.cos_sin.shape[-1]
    dense = (
        G.norm_qkv_supported(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, rot, dev)
        and G.gemv_supported(cfg.hidden_size, cfg.num_heads * cfg.head_dim, dev)
        and G.norm_gate_up_supported(cfg.intermediate_size, cfg.hidden_size, dev)
        and G.gemv_supported(cfg.hidden_size, cfg.intermediate_size, dev)
    )
    quantized = [w for layer in model.layers for w in _layer_weights(layer) if is_quantized(w)]
    if not quantized:
        return dense
    if not _kernel_importable("quant_gemv"):
        return False
    from localsgl_kernels import quant_gemv as QG

    for layer in model.layers:
        qkv, o, gate_up, down = _layer_weights(layer)
        checks = [
            (qkv, lambda w: QG.norm_qkv_supported(w, cfg.head_dim, rot, dev)),
            (o, lambda w: QG.gemv_supported(w, dev)), (gate_up, lambda w: QG.norm_gate_up_supported(w, dev)),
            (down, lambda w: QG.gemv_supported(w, dev)),
        ]
        for w, ok in checks:
            if is_quantized(w) and not ok(w):
                return False
        if not dense and not all(is_quantized(w) for w in (qkv, o, gate_up, down)):
            return False
    return True


def _layer_weights(layer) -> tuple:
    a, m = layer.self_attn, layer.mlp
    return a.qkv_proj.weight, a.o_proj.weight, m.gate_up_proj.weight, m.down_proj.weight


def _o_proj_prefetches(model, device: torch.device) -> list | None:
    """Per layer, the spans of o_proj's weights that the attention prefetches this step (an empty
    list for a layer whose weight has none), or None: l2_prefetch.BEFORE_O_PROJ off, the model's
    l2_prefetch debug switch off, or a GPU that does not run the prefetches (below sm_80).  The
    spans are built once per model and device: an eager step reuses them."""
    from localsgl_kernels import l2_prefetch as L2

    if not (debug_switches.of(model).l2_prefetch and L2.BEFORE_O_PROJ and L2.supported(device)):
        return None
    memo = getattr(model, "_fused_o_proj_prefetches", None)
    if memo is None or memo[0] != device:
        memo = (device, [_prefetch_spans(_layer_weights(layer)[1], device) for layer in model.layers])
        model._fused_o_proj_prefetches = memo
    return memo[1]


def _prefetch_spans(w, device: torch.device) -> list:
    """The byte spans of weight ``w`` that the kernel before its GEMV prefetches into L2: its
    tensors (packed values, scales, offsets) up to half the L2; none where ``w`` is not one
    weight (a RowStack) or not contiguous."""
    from localsgl_kernels import l2_prefetch as L2

    tensors = (w.qweight, w.scales, w.mins) if isinstance(w, QuantizedWeight) else (w,) if isinstance(w, torch.Tensor) else ()
    if not tensors or not all(t is None or t.is_contiguous() for t in tensors):
        return []
    return L2.spans(tensors, L2.span_bytes(device))


def _kernels_for(w):
    """The kernel module streaming weight ``w``: gemv (dense) or quant_gemv (quantized)."""
    if is_quantized(w):
        from localsgl_kernels import quant_gemv

        return quant_gemv
    from localsgl_kernels import gemv

    return gemv


def _fp32_sums(model, device_type: str) -> list[tuple[bool, bool]]:
    """Per layer, whether o_proj's and down_proj's GEMVs hand their sums over in fp32: where the
    next fused kernel reads them only through its activations' preparation (quant_gemv.reads_prepared),
    a quantized GEMV cut in two K halves then adds them into its output, with no launch to sum them
    (the last layer's down_proj feeds the final norm: in the model's dtype).  Checked once per model."""
    on = debug_switches.of(model).fp32_sums
    memo = getattr(model, "_fused_fp32_sums", None)
    if memo is None or memo[0] != (device_type, on):
        from localsgl_kernels import quant_gemv as QG

        cfg = model.config
        reads = [(QG.reads_prepared(m.gate_up_proj.weight, cfg.intermediate_size, device_type),
                  QG.reads_prepared(a.qkv_proj.weight, cfg.head_dim // 2, device_type))
                 for a, m in ((layer.self_attn, layer.mlp) for layer in model.layers)]
        flags = [(gate_up, i + 1 < len(reads) and reads[i + 1][1]) for i, (gate_up, _) in enumerate(reads)]
        flags = [(on and o and is_quantized(w_o), on and d and is_quantized(w_d))
                 for (o, d), (_, w_o, _, w_d) in zip(flags, (_layer_weights(layer) for layer in model.layers))]
        memo = ((device_type, on), flags)
        model._fused_fp32_sums = memo
    return memo[1]


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
        if ok and isinstance(weight, QuantizedWeight):
            from localsgl_kernels import quant_gemv as QG

            ok = QG.gemv_supported(weight, weight.device.type)
        elif ok:
            from localsgl_kernels import gemv as G

            ok = G.gemv_supported(weight.shape[0], weight.shape[1], weight.device.type, "lm_head")
        model._fused_logits_ok = ok
    if not ok:
        return None
    if isinstance(weight, QuantizedWeight):
        from localsgl_kernels import quant_gemv as QG

        return QG.gemv(hidden, weight, out_dtype=torch.float32, kind="lm_head")
    from localsgl_kernels import gemv as G

    return G.gemv(hidden, weight, out_dtype=torch.float32, kind="lm_head")


def forward_one_token(model, input_ids: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
    """The model's forward for one new token; returns the final-normed hidden state [1, H]."""
    pool = batch.kv_pool
    backend = batch.attn_backend
    cos_sin = model.rotary.cos_sin
    x = model.embed_tokens(input_ids)
    residual = None
    staged = pool.quantized  # K/V go through a staging slot, then the backend's quantizing store
    if staged:
        cfg = model.config
        stage = torch.empty((2, 1, cfg.num_kv_heads, cfg.head_dim), dtype=model.dtype, device=input_ids.device)
        stage_loc = torch.zeros(1, dtype=batch.out_cache_loc.dtype, device=input_ids.device)
    fp32_sums = _fp32_sums(model, input_ids.device.type)
    epilogue = debug_switches.of(model).attention_int8_epilogue and not staged
    prefetches = _o_proj_prefetches(model, input_ids.device)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        w_qkv, w_o, w_gu, w_down = _layer_weights(layer)
        if staged:
            loc, k_cache, v_cache = stage_loc, stage[0], stage[1]
        else:
            loc, k_cache, v_cache = batch.out_cache_loc, pool.k_buffer[attn.layer_id], pool.v_buffer[attn.layer_id]
        q, residual = _kernels_for(w_qkv).norm_qkv(
            x, residual, ln1.weight, ln1.eps, w_qkv, attn.qkv_proj.bias, cos_sin, positions,
            loc, k_cache, v_cache, attn.num_heads, attn.num_kv_heads,
        )
        kernels_o, o_dtype = _kernels_for(w_o), torch.float32 if fp32_sums[i][0] else None
        if staged:
            o = backend.forward(q, stage[0], stage[1], attn.layer_id, batch, attn.scale)
            h = kernels_o.gemv(o.view(1, attn.q_size), w_o, out_dtype=o_dtype)
        else:  # o_proj's int8 activations (and its zeroed output) from the attention's merge, where it takes them
            row = kernels_o.prepared_row(w_o, q.dtype, o_dtype, q.device) if epilogue and is_quantized(w_o) else None
            spans = prefetches[i] if prefetches is not None else []
            o = backend.attend(q, attn.layer_id, batch, attn.scale, int8_row=row, prefetch=spans)
            h = kernels_o.gemv(o.view(1, attn.q_size), w_o, out_dtype=o_dtype, **({"prepared": row} if row else {}))
        a, residual = _kernels_for(w_gu).norm_gate_up(h, residual, ln2.weight, ln2.eps, w_gu)
        x = _kernels_for(w_down).gemv(a, w_down, out_dtype=torch.float32 if fp32_sums[i][1] else None)
    x, _ = model.norm(x, residual)
    return x
