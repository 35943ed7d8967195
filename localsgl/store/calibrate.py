"""Activation-aware quantization for `localsgl quantize`: GPTQ over a short calibration text.

Round-to-nearest int4 loses much of a small model's quality (SmolLM2-135M: +41% perplexity at
group 128, bench/RESULTS.md); GPTQ keeps the error that a weight's rounding adds to the layer's
*output* small instead of the weight error itself.  For a linear layer with calibration
inputs X [T, K] and H = 2·XᵀX (+ 1% of its mean diagonal), the columns of W are rounded left to
right; each column's rounding error e is spread over the columns not yet rounded, w_j −=
e·[H⁻¹]_{ij}/[H⁻¹]_{ii} (through the upper Cholesky factor of H⁻¹, in blocks of 128 columns),
and a group's scale and offset are fixed, min-max, from its updated values when its first
column is reached.  The values stored are ordinary int4/int8 groups (layers/quant.py), so the
kernels are unchanged.

Layers are calibrated in order: the calibration tokens run through the dense model one
decoder layer at a time; a layer's fused projections (qkv, gate_up) share one H, o_proj and
down_proj have their own; once a layer's weights are rounded, it runs again so that the next
layer sees the quantized layer's outputs.  An untied LM head is rounded to nearest.
"""
from __future__ import annotations

import logging
from importlib import resources
from typing import Callable, Iterator

import torch

from ..engine.layers.quant import QuantizedWeight, WeightFormat, pack_int4

log = logging.getLogger(__name__)

BLOCK = 128
DAMP = 0.01
CALIBRATION_TOKENS = 512


def calibration_text() -> str:
    """The shipped calibration text (varied English prose, dialogue, a recipe, code)."""
    return resources.files("localsgl.store").joinpath("calibration.txt").read_text(encoding="utf-8")


def gptq(w: torch.Tensor, h: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """w [N, K] quantized in ``fmt`` (int4 / int8, groups) minimising ‖X(W − Q)ᵀ‖ for H = 2XᵀX."""
    assert fmt.kind in ("int4", "int8"), "GPTQ here rounds to integer grids"
    n, k = w.shape
    g = fmt.group(k)
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += DAMP * torch.mean(torch.diag(H)) * torch.eye(k, device=H.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    qmax = 7 if fmt.kind == "int4" else 127
    levels = 15 if fmt.kind == "int4" else 255
    bottom = 0 if fmt.kind == "int4" else -128
    ints = torch.empty(n, k, dtype=torch.float32, device=W.device)
    scales = torch.empty(n, k // g, dtype=torch.float32, device=W.device)
    mins = None if fmt.symmetric else torch.empty_like(scales)
    s = m = None
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # the group's parameters, from its columns as updated so far
                cols = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                s, m = _group_params(cols, fmt, qmax, levels, bottom)
                scales[:, col // g] = s
                if mins is not None:
                    mins[:, col // g] = m
            x = W1[:, i]
            if fmt.symmetric:
                q = torch.round(x / s).clamp(-qmax - (fmt.kind == "int4"), qmax)
                deq = q * s
            else:
                q = torch.round((x - m) / s).clamp(bottom, bottom + levels)
                deq = q * s + m
            ints[:, col] = q
            e = (x - deq) / hinv1[i, i]
            W1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if fmt.kind == "int4":
        qweight = pack_int4(ints + 8 if fmt.symmetric else ints)
    else:
        qweight = ints.to(torch.int8)
    sd = torch.float16  # _group_params rounds the parameters to fp16 (or keeps fp32 when they do not fit)
    if scales.abs().max() > 6e4 or (mins is not None and mins.abs().max() > 6e4):
        sd = torch.float32
    return QuantizedWeight(fmt, qweight, scales.to(sd), None if mins is None else mins.to(sd), k)


def _group_params(cols: torch.Tensor, fmt: WeightFormat, qmax: int, levels: int, bottom: int):
    """Min-max scale (and offset) of one group per row, rounded to fp16 as they are stored."""
    if fmt.symmetric:
        s = cols.abs().amax(-1) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        return _f16(s), None
    lo, hi = cols.amin(-1), cols.amax(-1)
    s = (hi - lo) / levels
    s = torch.where(s > 0, s, torch.ones_like(s))
    return _f16(s), _f16(lo - bottom * s)


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float() if float(t.abs().max()) < 6e4 else t


# ----------------------------------------------------------------------------- the model


def calibrated_weights(source, fmt: WeightFormat, device: torch.device,
                       progress: Callable[[int, int, str], None] | None = None,
                       text: str | None = None) -> Iterator[tuple[str, object]]:
    """(HF name, QuantizedWeight or dense tensor) of ``source`` quantized by GPTQ, layer by layer.
    Linear weights whose inputs no group fits stay dense."""
    from ..engine.batch import ForwardBatch, ForwardMode
    from ..engine.kv_pool import KVPool, ReqToTokenPool
    from ..engine.layers.attention.base import create_backend
    from ..engine.layers.linear import Linear, MergedLinear
    from ..engine.models.loader import load_model
    from ..engine.models.llama import _STACKED

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(source, dtype, device, weights="dequantize")
    tok = source.load_tokenizer()
    if tok is None:
        raise ValueError(f"{source.name}: no tokenizer to encode the calibration text")
    ids = tok.encode(text or calibration_text())[:CALIBRATION_TOKENS]
    cfg = model.config
    t = len(ids)
    pool = KVPool(t + 8, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, device)
    rt = ReqToTokenPool(2, t + 8, device)
    attn = create_backend("torch", device)
    row = rt.alloc()
    slots = pool.alloc(t)
    rt.write(row, 0, slots)
    ids_t = torch.tensor(ids, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    batch = ForwardBatch(
        mode=ForwardMode.EXTEND, batch_size=1, input_ids=ids_t, positions=torch.arange(t, device=device),
        out_cache_loc=slots.to(device), req_pool_indices=torch.tensor([row], device=device),
        seq_lens=torch.tensor([t], **i32), prefix_lens=torch.tensor([0], **i32), extend_lens=torch.tensor([t], **i32),
        extend_start_loc=torch.tensor([0], **i32), seq_lens_cpu=[t], prefix_lens_cpu=[0], extend_lens_cpu=[t],
        req_to_token=rt.table, kv_pool=pool, attn_backend=attn,
    )
    attn.init_forward(batch)
    hf_of = {ours: hf for hf, (ours, _) in _STACKED.items()}  # (for the shard -> HF name mapping)
    total = cfg.num_layers * 4
    done = 0
    with torch.inference_mode():
        model.rotary.begin_forward()
        x = model.embed_tokens(ids_t)
        residual = None
        for li, layer in enumerate(model.layers):
            linears = {n: mod for n, mod in layer.named_modules() if isinstance(mod, Linear)}
            hs = {n: torch.zeros(m.in_features, m.in_features, device=device) for n, m in linears.items()}

            def hook(name):
                def fn(mod, inputs, out):
                    a = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                    hs[name].addmm_(a.t(), a, alpha=2.0)
                return fn

            handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
            layer(x.clone(), None if residual is None else residual.clone(), batch.positions, model.rotary, batch)
            for hd in handles:
                hd.remove()
            for n, mod in linears.items():
                f = fmt.fitted(mod.in_features)
                if f is not None:
                    q = gptq(mod.weight.data, hs[n], f)
                    mod.weight.data.copy_(q.dequantize(dtype))  # the next layer sees the rounded outputs
                    parts = _split(q, mod) if isinstance(mod, MergedLinear) else {None: q}
                else:
                    parts = _split(mod.weight.data, mod) if isinstance(mod, MergedLinear) else {None: mod.weight.data}
                for shard, w in parts.items():
                    yield _hf_name(li, n, shard, hf_of), w
                done += 1
                if progress is not None:
                    progress(done, total, f"layer {li} {n}")
            del hs
            x, residual = layer(x, residual, batch.positions, model.rotary, batch)
    # everything that is not a decoder layer's linear weight: dense as loaded (biases split per shard)
    for name, p in model.named_parameters():
        if name.startswith("layers.") and name.endswith(".weight") and _is_linear_param(model, name):
            continue
        if name.endswith(".bias") and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), MergedLinear):
            mod = model.get_submodule(name.rsplit(".", 1)[0])
            li, n = name.split(".")[1], name.split(".", 2)[2].rsplit(".", 1)[0]
            for shard, b in _split(p.data, mod).items():
                yield _hf_name(int(li), n, shard, hf_of).replace(".weight", ".bias"), b
            continue
        if name == "lm_head.weight":
            continue
        yield ("model." + name), p.data
    if model.lm_head is not None:
        w = model.lm_head.weight.data
        f = fmt.fitted(w.shape[1])
        yield "lm_head.weight", QuantizedWeight.quantize(w, f) if f is not None else w


def _is_linear_param(model, name: str) -> bool:
    from ..engine.layers.linear import Linear

    return isinstance(model.get_submodule(name.rsplit(".", 1)[0]), Linear)


def _split(w, mod) -> dict:
    """A fused projection's rows per shard (a QuantizedWeight's rows stay quantized)."""
    out = {}
    for shard, (off, size) in mod.offsets.items():
        if isinstance(w, QuantizedWeight):
            out[shard] = QuantizedWeight(w.fmt, w.qweight[off:off + size].contiguous(), w.scales[off:off + size].contiguous(),
                                         None if w.mins is None else w.mins[off:off + size].contiguous(), w.in_features)
        else:
            out[shard] = w[off:off + size]
    return out


_SHARD_HF = {("qkv_proj", "q"): "q_proj", ("qkv_proj", "k"): "k_proj", ("qkv_proj", "v"): "v_proj",
             ("gate_up_proj", "gate"): "gate_proj", ("gate_up_proj", "up"): "up_proj"}


def _hf_name(layer: int, module: str, shard: str | None, hf_of: dict) -> str:
    parent, _, leaf = module.rpartition(".")
    if shard is not None:
        leaf = _SHARD_HF[(leaf, shard)]
    return f"model.layers.{layer}.{parent}.{leaf}.weight"
