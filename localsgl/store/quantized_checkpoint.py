"""Quantized safetensors checkpoints -> QuantizedWeights in the kernels' formats.

Schemes (from config.json's ``quantization_config``):
  * localsgl   outputs of `localsgl quantize`: ``X.qweight`` / ``X.scales`` (/ ``X.mins``) in
               layers/quant.py's layout, the format in ``quantization_config.localsgl``
  * awq        AutoAWQ GEMM checkpoints (int4, zero points, usually group 128):
               ``X.qweight`` int32 [K, N/8], ``X.qzeros`` int32 [K/G, N/8], ``X.scales`` [K/G, N];
               eight 4-bit values per int32 in AWQ's order 0 2 4 6 1 3 5 7;
               w = (q − z)·s  ->  int4 asymmetric, u = q, s as stored, m = −z·s in fp32 (exact)
  * gptq       AutoGPTQ / GPTQModel checkpoints, 4-bit, groups of 32-256, no activation order:
               ``X.qweight`` int32 [K/8, N] (eight rows a word, row j at bits 4j), ``X.qzeros``
               int32 [K/G, N/8] (eight columns a word), ``X.scales`` [K/G, N], ``X.g_idx``;
               w = (q − z)·s with z = stored + 1 (format "gptq", v1) or as stored ("gptq_v2")
               ->  int4, u = q, s as stored, m = −z·s in fp32 (exact); symmetric where every z is 8
  * fp8        transformers' fine-grained FP8: ``X.weight`` e4m3 [N, K] and
               ``X.weight_scale_inv`` fp32 per [bn, bk] block -> fp8 group bk (the block's scale
               repeated on its rows); ``fbgemm_fp8``: ``X.weight_scale`` [N, 1] -> fp8 per row
  * compressed-tensors (llm-compressor's checkpoints), one config group:
               float-quantized FP8, channel or tensor strategy: ``X.weight`` e4m3,
               ``X.weight_scale`` [N, 1] or [1] -> fp8 per row;
               pack-quantized int4 (W4A16), group strategy: ``X.weight_packed`` int32 [N, K/8],
               eight values a word from bit 0 up, each stored + 8; ``X.weight_scale`` [N, K/G]
               (``X.weight_zero_point`` int32 [N/8, K/G] packed the same way down the rows when
               asymmetric): w = (u − 8 − zp)·s -> int4, u as stored (the words' bytes are
               quant.py's nibble pairs), s as stored, m = −(8 + zp)·s in fp32 (exact);
               int-/naive-quantized int8 (W8A16, W8A8), channel or group strategy: ``X.weight``
               int8 [N, K], ``X.weight_scale`` [N, 1] or [N, K/G] (``X.weight_zero_point`` int8)
               -> int8 per row or in groups, m = −zp·s in fp32
Every other tensor is read as a dense tensor in the run dtype.  The values a scheme
describes are kept exactly.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Iterator

import torch

from ..engine.layers.quant import QuantizedWeight, WeightFormat
from .hf import CheckpointError, _device_str, safetensors_files

log = logging.getLogger(__name__)

SCHEMES = ("localsgl", "awq", "gptq", "fp8", "fbgemm_fp8", "compressed-tensors")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the k-th nibble of an AWQ int32 holds column AWQ_ORDER[k] of its 8
_FP8 = {torch.float8_e4m3fn}


def scheme_of(config: dict) -> str | None:
    """The checkpoint's quantization scheme, None for a dense checkpoint; an unsupported
    quantization_config raises CheckpointError (its weights are not dense either)."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or not qc:
        return None
    if isinstance(qc.get("localsgl"), dict):
        return "localsgl"
    method = str(qc.get("quant_method") or "").lower()
    if method == "awq":
        if str(qc.get("version", "gemm")).lower() != "gemm" or int(qc.get("bits", qc.get("w_bit", 4))) != 4:
            raise CheckpointError(f"AWQ checkpoints of version {qc.get('version')!r} / {qc.get('bits')} bits are not "
                                  "supported (only 4-bit GEMM)")
        return "awq"
    if method == "gptq":
        _gptq_version(qc)  # raises for what it cannot read
        return "gptq"
    if method in ("fp8", "fbgemm_fp8"):
        return method
    if method == "compressed-tensors":
        _compressed_tensors_weights(qc)  # raises for what it cannot read
        return method
    raise CheckpointError(f"checkpoints quantized with {method or qc!r} are not supported "
                          f"(supported: {', '.join(SCHEMES)})")


def localsgl_format(config: dict) -> WeightFormat:
    q = config["quantization_config"]["localsgl"]
    return WeightFormat(q["format"], int(q.get("group_size", 0)), bool(q.get("symmetric", True)))


def _gptq_version(qc: dict) -> int:
    """1 for GPTQ's original format (zero points stored minus one), 2 for "gptq_v2"."""
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    bits, group = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
    if fmt not in ("gptq", "gptq_v2") or bits != 4 or group not in (32, 64, 128, 256):
        raise CheckpointError(f"GPTQ checkpoints of format {fmt!r}, {bits} bits, group size {group} are not supported "
                              "(only 4-bit \"gptq\" / \"gptq_v2\" in groups of 32-256)")
    return 2 if fmt == "gptq_v2" else 1


_CT_SUPPORTED = ("only FP8 per channel or per tensor, int4 pack-quantized in groups of 32-256, "
                 "int8 per channel or in groups")


def _compressed_tensors_weights(qc: dict) -> dict:
    """The one config group's weight arguments, with "kind": fp8 / int4 / int8; raises for the rest."""
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise CheckpointError("compressed-tensors checkpoints with several config groups are not supported")
    group = next(iter(groups.values()))
    w = dict(group.get("weights") or {})
    fmt = str(group.get("format") or qc.get("format") or "")
    bits, strategy, kind = int(w.get("num_bits", 0)), w.get("strategy"), None
    if w.get("type") == "float" and bits == 8 and strategy in ("channel", "tensor"):
        kind = "fp8"
    elif w.get("type") == "int" and bits == 4 and fmt == "pack-quantized" and strategy == "group" \
            and int(w.get("group_size") or 0) in (32, 64, 128, 256):
        kind = "int4"
    elif w.get("type") == "int" and bits == 8 and fmt in ("int-quantized", "naive-quantized") \
            and strategy in ("channel", "group"):
        kind = "int8"
    if kind is None:
        raise CheckpointError(f"compressed-tensors weights {w} in format {fmt!r} are not supported ({_CT_SUPPORTED})")
    if str(w.get("actorder") or "").lower() == "group":
        raise CheckpointError("compressed-tensors checkpoints with activation ordering by group (g_idx) are not supported")
    return {**w, "kind": kind}


def iter_weights(path: Path, config: dict, dtype: torch.dtype, device) -> Iterator[tuple[str, object]]:
    """(HF weight name, QuantizedWeight or dense tensor) for every weight of the checkpoint."""
    from safetensors import safe_open

    scheme = scheme_of(config)
    parts = _parts(scheme, config)
    dev = _device_str(device)
    with contextlib.ExitStack() as stack:
        where: dict[str, object] = {}
        for file in safetensors_files(Path(path)):
            f = stack.enter_context(safe_open(str(file), framework="pt", device=dev))
            for key in f.keys():
                where[key] = f
        get = lambda key: where[key].get_tensor(key)  # noqa: E731
        done: set[str] = set()
        for key in list(where):
            if key in done:
                continue
            prefix, _, part = key.rpartition(".")
            if part in parts and f"{prefix}.{parts[0]}" in where and _is_quantized(scheme, prefix, where, get):
                names = [f"{prefix}.{p}" for p in parts if f"{prefix}.{p}" in where]
                done.update(names)
                done.update(k for k in (f"{prefix}.input_scale",) if k in where)
                yield f"{prefix}.weight", _build(scheme, prefix, get, where, config)
                continue
            if part == "input_scale" or key.endswith(".weight_scale") or key.endswith(".weight_scale_inv"):
                continue  # activation scales (computed per call here) and parts of a handled weight
            done.add(key)
            t = get(key)
            if t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            yield key, t


# the tensors that make up one quantized weight; the first one marks it
_QUANT_PARTS = {
    "localsgl": ("qweight", "scales", "mins"),
    "awq": ("qweight", "qzeros", "scales"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "fp8": ("weight", "weight_scale_inv"),
    "fbgemm_fp8": ("weight", "weight_scale"),
    "compressed-tensors": ("weight", "weight_scale", "weight_zero_point"),
    "compressed-tensors int4": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"),
}
STORED_QUANTIZED = ("F8_E4M3", "F8_E4M3FN", "I8")  # the dtypes of a quantized "weight" (else dense)


def _parts(scheme: str, config: dict) -> tuple[str, ...]:
    if scheme == "compressed-tensors" and _compressed_tensors_weights(config["quantization_config"])["kind"] == "int4":
        return _QUANT_PARTS["compressed-tensors int4"]
    return _QUANT_PARTS[scheme]


def _is_quantized(scheme: str, prefix: str, where: dict, get) -> bool:
    if scheme in ("localsgl", "awq", "gptq") or f"{prefix}.weight_packed" in where:
        return True
    # the other schemes: only weights stored in 8 bits with a scale (others, e.g. lm_head, are dense)
    scale = _QUANT_PARTS[scheme][1]
    return f"{prefix}.{scale}" in where and \
        where[f"{prefix}.weight"].get_slice(f"{prefix}.weight").get_dtype() in STORED_QUANTIZED


def stored_format(scheme: str, prefix: str, shape_of, config: dict) -> WeightFormat:
    """The format the quantized weight ``prefix`` loads in, from its tensors' shapes (``shape_of(name)``:
    the shape, or None where the checkpoint has no such tensor); the memory estimate labels by it
    before loading.  A `localsgl quantize` layer's group may be smaller than the nominal one
    (WeightFormat.fitted)."""
    if scheme == "localsgl":
        nominal = localsgl_format(config)
        k = shape_of(f"{prefix}.qweight")[1] * (2 if nominal.kind == "int4" else 1)
        groups = shape_of(f"{prefix}.scales")[1]
        return WeightFormat(nominal.kind, 0 if groups == 1 and nominal.group_size == 0 else k // groups,
                            shape_of(f"{prefix}.mins") is None)
    if scheme == "awq":  # qweight [K, N/8], scales [K/G, N]
        return WeightFormat("int4", shape_of(f"{prefix}.qweight")[0] // shape_of(f"{prefix}.scales")[0], False)
    if scheme == "gptq":  # qweight [K/8, N], scales [K/G, N]; symmetric as its config says (the zeros decide at load)
        k = shape_of(f"{prefix}.qweight")[0] * 8
        return WeightFormat("int4", k // shape_of(f"{prefix}.scales")[0], bool(config["quantization_config"].get("sym")))
    if scheme == "compressed-tensors" and shape_of(f"{prefix}.weight_packed") is not None:  # int4, [N, K/8] words
        k = shape_of(f"{prefix}.weight_packed")[1] * 8
        return WeightFormat("int4", k // shape_of(f"{prefix}.weight_scale")[1],
                            shape_of(f"{prefix}.weight_zero_point") is None)
    k = shape_of(f"{prefix}.weight")[1]
    if scheme == "fp8":
        bk = int((config["quantization_config"].get("weight_block_size") or [128, 128])[1])
        return WeightFormat("fp8", bk if bk < k else 0, True)
    if scheme == "compressed-tensors" and _compressed_tensors_weights(config["quantization_config"])["kind"] == "int8":
        groups = shape_of(f"{prefix}.weight_scale")[-1]
        return WeightFormat("int8", 0 if groups == 1 else k // groups, shape_of(f"{prefix}.weight_zero_point") is None)
    return WeightFormat("fp8", 0, True)


def _build(scheme: str, prefix: str, get, where: dict, config: dict) -> QuantizedWeight:
    if scheme == "awq":
        return awq_to_quantized(get(f"{prefix}.qweight"), get(f"{prefix}.qzeros"), get(f"{prefix}.scales"))
    if scheme == "gptq":
        g_idx = get(f"{prefix}.g_idx") if f"{prefix}.g_idx" in where else None
        return gptq_to_quantized(prefix, get(f"{prefix}.qweight"), get(f"{prefix}.qzeros"), get(f"{prefix}.scales"),
                                 g_idx, _gptq_version(config["quantization_config"]))
    fmt = stored_format(scheme, prefix, lambda key: tuple(where[key].get_slice(key).get_shape()) if key in where
                        else None, config)
    if scheme == "localsgl":
        mins = get(f"{prefix}.mins") if f"{prefix}.mins" in where else None
        q = get(f"{prefix}.qweight")
        return QuantizedWeight(fmt, q, get(f"{prefix}.scales"), mins, q.shape[1] * (2 if fmt.kind == "int4" else 1))
    if scheme == "compressed-tensors" and fmt.kind != "fp8":
        return _compressed_tensors_int(fmt, prefix, get, where)
    w = get(f"{prefix}.weight")
    n, k = w.shape
    if scheme == "fp8":
        s = get(f"{prefix}.weight_scale_inv").float()
        bn = (config["quantization_config"].get("weight_block_size") or [128, 128])[0]
        s = s.repeat_interleave(bn, dim=0)[:n]
        return QuantizedWeight(fmt, w, s.contiguous(), None, k)
    s = get(f"{prefix}.weight_scale").float().reshape(-1, 1)
    if s.shape[0] == 1:
        s = s.expand(n, 1)
    return QuantizedWeight(fmt, w, s.contiguous(), None, k)


def _compressed_tensors_int(fmt: WeightFormat, prefix: str, get, where: dict) -> QuantizedWeight:
    """compressed-tensors' int4 (pack-quantized) or int8 weight -> the same values in quant.py's
    layout (module docstring): the integers as stored, the scales as stored (in fp16 where that
    is exact), the offsets −(8 + zp)·s (int4) or −zp·s (int8) in fp32."""
    from ..engine.layers.quant import scale_dtype_for

    s = get(f"{prefix}.weight_scale").float()
    zp = get(f"{prefix}.weight_zero_point") if f"{prefix}.weight_zero_point" in where else None
    if fmt.kind == "int4":
        packed = get(f"{prefix}.weight_packed")
        n, k = packed.shape[0], packed.shape[1] * 8
        if f"{prefix}.weight_shape" in where and tuple(int(v) for v in get(f"{prefix}.weight_shape")) != (n, k):
            raise CheckpointError(f"{prefix}: weight_shape {get(f'{prefix}.weight_shape').tolist()} is not the packed "
                                  f"[{n}, {k}] (padded rows are not supported)")
        # little-endian int32 words, value j at bits 4j: byte i holds values 2i (low) and 2i + 1 (high)
        q = packed.contiguous().view(torch.uint8)
        offset = None if zp is None else 8.0 + _unpack_rows_int4(zp, n).float()
    else:
        q = get(f"{prefix}.weight")
        n, k = q.shape
        offset = None if zp is None else zp.float().reshape(s.shape)
    s = s.reshape(n, -1)
    mins = None if offset is None else (-(offset.reshape(n, -1) * s)).contiguous()  # exact in fp32
    return QuantizedWeight(fmt, q.contiguous(), s.to(scale_dtype_for(s)).contiguous(), mins, k)


def _word_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 words [R, C] -> their 4-bit fields [R, 8C] (0..15), field j of a word at bits 4j."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return ((packed[..., None] >> shifts) & 0xF).reshape(packed.shape[0], -1)


def _unpack_rows_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """compressed-tensors' zero points packed down the rows (int32 [ceil(N/8), G], row 8i + j at
    bits 4j of word i, each stored + 8) -> the signed values [N, G]."""
    return _word_nibbles(packed.t()).t()[:n] - 8


def gptq_to_quantized(prefix: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor | None, version: int) -> QuantizedWeight:
    """GPTQ's [K, N]-major int4 (module docstring) -> int4 [N, K]: u = q, s = s, m = −z·s; the
    symmetric format (no offsets) where every zero point is 8."""
    from ..engine.layers.quant import pack_int4, scale_dtype_for

    k, n = qweight.shape[0] * 8, qweight.shape[1]
    groups = scales.shape[0]
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64).cpu(), torch.arange(k) // (k // groups)):
        raise CheckpointError(f"{prefix}: GPTQ with activation order (a permuted g_idx, desc_act) is not supported")
    q = _word_nibbles(qweight.t().contiguous())  # [N, K]
    z = _word_nibbles(qzeros)[:, :n].t().float() + (1 if version == 1 else 0)  # [N, K/G]
    s = scales.t().float()
    s = s.to(scale_dtype_for(s)).contiguous()  # as stored where fp16 holds it exactly (fp16, in-range bf16)
    if bool((z == 8).all()):
        return QuantizedWeight(WeightFormat("int4", k // groups, True), pack_int4(q), s, None, k)
    return QuantizedWeight(WeightFormat("int4", k // groups, False), pack_int4(q), s, (-(z * s.float())).contiguous(), k)


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 [R, C/8] -> int values 0..15 [R, C] in column order."""
    nib = _word_nibbles(packed).reshape(packed.shape[0], -1, 8)  # in packed order
    order = torch.tensor([AWQ_ORDER.index(c) for c in range(8)], device=packed.device)
    return nib[..., order].reshape(packed.shape[0], -1)


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """awq_unpack's inverse (writes test checkpoints): [R, C] 0..15 -> int32 [R, C/8]."""
    v = values.to(torch.int64).reshape(values.shape[0], -1, 8)[..., list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, device=values.device, dtype=torch.int64)
    packed = (v << shifts).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def awq_to_quantized(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    """AWQ's [K, N]-major int4 with zero points -> int4 asymmetric [N, K]: u = q, s = s, m = −z·s."""
    from ..engine.layers.quant import pack_int4

    k = qweight.shape[0]
    q = awq_unpack(qweight).t().contiguous()  # [N, K]
    z = awq_unpack(qzeros).t().float()  # [N, K/G]
    s = scales.t().float()  # [N, K/G]
    g = k // s.shape[1]
    m = -(z * s)  # exact in fp32 (a 4-bit integer times an fp16 scale), so u·s + m == (u − z)·s exactly
    return QuantizedWeight(WeightFormat("int4", g, False), pack_int4(q), scales.t().contiguous(), m.contiguous(), k)


def read_manifest(path: Path) -> dict | None:
    """The quantize manifest of a localsgl output directory (None when absent)."""
    try:
        return json.loads((Path(path) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


MANIFEST_NAME = "localsgl-quantization.json"
