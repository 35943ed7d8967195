"""What a model's weights will take on the device, computed before loading, for loads that
keep or make quantized weights (the memory plan's ``weights_bytes`` and `info`'s format line).

A dense load is what plan.weights_bytes_for says.  Otherwise every weight is listed with
the format it will have: GGUF tensors of a repacked type in their kernel format (the parts
of a fused projection in their joined format or, for q/k/v, in runs of their own formats:
quant.row_runs, as linear.py stores them), tensors of a
quantized checkpoint in theirs, and, with ``quantization``, every linear in that format;
the rest dense in the run dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .layers.quant import WeightFormat, keeps_row_blocks, parse_format, row_runs

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# HF projection -> (the fused layer's name, the part's place in it), in the models' order
_FUSED = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "gate_proj": ("gate_up", 0),
          "up_proj": ("gate_up", 1)}


@dataclass
class WeightsEstimate:
    total_bytes: int
    by_format: dict[str, int] = field(default_factory=dict)  # format label (or dtype) -> bytes

    @property
    def quantized(self) -> bool:
        """Whether any weight stays in a quantized format (dense ones are labelled with their dtype)."""
        return any(label not in _DTYPE_BYTES for label in self.by_format)

    def describe(self) -> str:
        from ..config import format_size

        parts = sorted(self.by_format.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{label} {format_size(b)}" for label, b in parts)


def estimate(source, cfg, dtype: str, device_type: str, weights: str | None = None,
             quantization=None) -> WeightsEstimate | None:
    """The estimate for this load, or None for a dense one (the plan's own estimate holds)."""
    from .layers.weight_policy import default_weights_mode

    keep = (weights or default_weights_mode(device_type)) == "keep"
    fmt = quantization if isinstance(quantization, WeightFormat) or quantization is None else parse_format(quantization)
    dsize = _DTYPE_BYTES[dtype]
    dummy = source.kind == "dummy"
    if keep and not dummy and source.kind == "gguf" and source.has_quantized_weights:
        entries = _gguf_entries(source.path)
    elif keep and not dummy and source.kind == "hf" and source.has_quantized_weights:
        return _checkpoint_estimate(source, dsize, dtype)
    elif fmt is not None:
        entries = _config_entries(cfg)
    else:
        return None
    return _total(entries, fmt, dsize, dtype)


def _total(entries, fmt: WeightFormat | None, dsize: int, dtype: str) -> WeightsEstimate:
    """entries: (HF name, (out, in) or (n,), format or None)."""
    groups: dict[str, list] = {}
    singles = []
    for name, shape, f in entries:
        if f is None and fmt is not None and len(shape) == 2 and _is_linear(name):
            f = fmt.fitted(shape[1])
        mod = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        if mod in _FUSED and len(shape) == 2 and name.endswith(".weight"):
            fused, place = _FUSED[mod]
            groups.setdefault(name.rsplit(".", 2)[0] + "." + fused, []).append((place, mod, shape, f))
        else:
            singles.append((shape, f))
    out = WeightsEstimate(0)
    for parts in groups.values():
        parts.sort(key=lambda p: p[0])  # the checkpoint's order may differ from the layer's
        k = parts[0][2][1]
        sizes = [s[0] for _, _, s, _ in parts]
        fs = [f for _, _, _, f in parts]
        split_ok = keeps_row_blocks(m.removesuffix("_proj") for _, m, _, _ in parts)
        runs = row_runs(fs, sizes, k, split_ok) if all(f is not None for f in fs) else None
        if runs is None:
            _add(out, (sum(sizes), k), None, dsize, dtype)
        for idx, f in runs or ():
            _add(out, (sum(sizes[i] for i in idx), k), f, dsize, dtype)
    for shape, f in singles:
        _add(out, shape, f, dsize, dtype)
    return out


def _add(out: WeightsEstimate, shape, f, dsize: int, dtype: str) -> None:
    if f is not None:
        b, label = f.nbytes(shape[0], shape[1]), f.label()
    else:
        b, label = dsize * _numel(shape), dtype
    out.total_bytes += b
    out.by_format[label] = out.by_format.get(label, 0) + b


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _is_linear(name: str) -> bool:
    """A linear layer's weight (quantized by `quantization`); the embedding and norms are not."""
    return name.endswith(".weight") and "embed_tokens" not in name and "norm" not in name


def _config_entries(cfg):
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    out = [("model.embed_tokens.weight", (cfg.vocab_size, h), None), ("model.norm.weight", (h,), None)]
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", (cfg.vocab_size, h), None))
    for layer in range(cfg.num_layers):
        p = f"model.layers.{layer}."
        out += [(p + "self_attn.q_proj.weight", (q, h), None), (p + "self_attn.k_proj.weight", (kv, h), None),
                (p + "self_attn.v_proj.weight", (kv, h), None), (p + "self_attn.o_proj.weight", (h, q), None),
                (p + "mlp.gate_proj.weight", (i, h), None), (p + "mlp.up_proj.weight", (i, h), None),
                (p + "mlp.down_proj.weight", (h, i), None),
                (p + "input_layernorm.weight", (h,), None), (p + "post_attention_layernorm.weight", (h,), None)]
        if cfg.attention_bias:
            out += [(p + "self_attn.qkv.bias", (q + 2 * kv,), None)]
        if cfg.qk_norm:
            out += [(p + "self_attn.qk_norm", (2 * d,), None)]
    return out


def _gguf_entries(path):
    from ..store.gguf_file import hf_tensor_name
    from ..store.gguf_header import read_header
    from ..store.gguf_repack import REPACKED, can_repack

    out = []
    for t in read_header(path).tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            continue
        shape = tuple(int(x) for x in reversed(t.shape))
        out.append((name, shape, REPACKED[t.type_name][2] if can_repack(t.type_name, shape) else None))
    return out


def _checkpoint_estimate(source, dsize: int, dtype: str) -> WeightsEstimate:
    """Quantized checkpoints: a quantized weight's tensors (values, scales, mins or zero points)
    as stored, under its format (``_checkpoint_labels``; a close bound: AWQ's packed zero points
    become offsets), every other tensor at the run dtype."""
    import json
    import struct

    from ..store import hf

    headers = {}
    for file in hf.safetensors_files(source.path):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            headers.update(json.loads(f.read(n)))
    headers.pop("__metadata__", None)
    labels = _checkpoint_labels(source.config, headers)
    out = WeightsEstimate(0)
    for name, t in headers.items():
        lab = labels.get(name.rpartition(".")[0])
        if lab is None:  # dense: at the run dtype
            b, lab = _numel(t["shape"]) * dsize, dtype
        else:  # a quantized weight's parts stay as stored
            b = int(t["data_offsets"][1]) - int(t["data_offsets"][0])
            if name.endswith(".qzeros"):  # AWQ: 8 packed zero points per int32 become fp32 offsets
                b *= 8
        out.total_bytes += b
        out.by_format[lab] = out.by_format.get(lab, 0) + b
    return out


def _checkpoint_labels(config: dict, headers: dict) -> dict[str, str]:
    """weight prefix -> the label of the format it loads in (quantized_checkpoint.stored_format);
    dense weights have none."""
    from ..store.quantized_checkpoint import STORED_QUANTIZED, scheme_of, stored_format

    scheme = scheme_of(config)
    shape_of = lambda key: headers[key]["shape"] if key in headers else None  # noqa: E731
    labels = {}
    for name, t in headers.items():
        prefix, _, part = name.rpartition(".")
        if (scheme in ("localsgl", "awq", "gptq") and part == "qweight"
                or scheme == "compressed-tensors" and part == "weight_packed"
                or scheme is not None and part == "weight" and t["dtype"] in STORED_QUANTIZED):
            labels[prefix] = stored_format(scheme, prefix, shape_of, config).label()
    return labels
