"""GGUF quantized blocks -> dense tensors, on the target device.

The types gguf_repack.py keeps quantized (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q5_0, Q5_1,
Q3_K, Q2_K, IQ4_NL, IQ4_XS) have torch implementations that run on
the target device in row chunks, so an 8B Q4_K model dequantizes on the GPU in seconds and
host memory never holds a dense copy; every other type goes through
``gguf.quants.dequantize`` (numpy). Both give bit-identical fp32 values (tests/test_gguf.py).
``--weights keep`` skips this for the types gguf_repack.py repacks.
"""
from __future__ import annotations

import numpy as np
import torch


_CHUNK_ELEMS = 1 << 24  # elements per dequantization chunk (64 MiB of fp32)


def gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # noqa: BLE001
        return "?"


def can_dequantize(qtype) -> bool:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype in (Q.F32, Q.F16, Q.BF16) or qtype.name in _TORCH_DEQUANT:
        return True
    traits = getattr(quants, "_type_traits", None)
    return traits is None or qtype in traits


def dequantize_tensor(t, dtype: torch.dtype, device) -> torch.Tensor:
    """A GGUF ReaderTensor -> dense tensor in HF layout [out, in], dtype, on device."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
    qtype = t.tensor_type
    data = t.data
    device = torch.device(device)
    if qtype in (Q.F32, Q.F16, Q.BF16):
        arr = np.array(data, copy=True)  # own the memory: the memmap is read-only
        if qtype == Q.BF16:
            src = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        else:
            src = torch.from_numpy(arr)
        return src.reshape(shape).to(device=device, dtype=dtype)
    fn = _TORCH_DEQUANT.get(qtype.name)
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1)
    rows = data.reshape(-1, data.shape[-1])  # [rows, bytes per row]
    row_elems = shape[-1] if len(shape) > 1 else int(np.prod(shape))
    if rows.shape[0] * row_elems != flat.numel():  # 1-D quantized tensors: one "row"
        rows = data.reshape(1, -1)
        row_elems = flat.numel()
    step = max(1, _CHUNK_ELEMS // max(row_elems, 1))
    for r0 in range(0, rows.shape[0], step):
        chunk = np.array(rows[r0 : r0 + step], copy=True)  # small (quantized bytes); the memmap is read-only
        if fn is not None:
            blocks = torch.from_numpy(chunk).to(device)
            vals = fn(blocks.view(-1, GGML_QUANT_SIZES[qtype][1]))  # (values, bytes) a block
        else:
            from gguf.quants import dequantize

            vals = torch.from_numpy(np.ascontiguousarray(dequantize(chunk, qtype))).to(device)
        n = chunk.shape[0] * row_elems
        flat[r0 * row_elems : r0 * row_elems + n].copy_(vals.reshape(-1))
    return out


def fp16_field(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32 (little-endian fp16): a block's d or dmin."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] packed bytes -> [n, 32]: low nibbles first, then high nibbles (ggml order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = fp16_field(b[:, :2])
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return d * q.float()


def _dq_q4_1(b: torch.Tensor) -> torch.Tensor:
    d = fp16_field(b[:, :2])
    m = fp16_field(b[:, 2:4])
    q = _nibbles(b[:, 4:]).float()
    return d * q + m


def _dq_q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = fp16_field(b[:, 0:2])
    dmin = fp16_field(b[:, 2:4])
    from .gguf_repack import k_scales  # lazily: it imports the engine's quant layer

    sc, mn = k_scales(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 1, 32)  # 4 groups of 32 bytes -> 64 values each
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32).float()
    dl = (d * sc).reshape(n, 8, 1)
    ml = (dmin * mn).reshape(n, 8, 1)
    return (dl * q - ml).reshape(n, 256)


def _dq_unpacked(type_name: str):
    """Dequantization through gguf_repack's unpacker of ``type_name``: each group's scale times
    its integers (plus its min), the products in gguf-py's order, so the values are bit-identical."""
    def dq(b: torch.Tensor) -> torch.Tensor:
        from .gguf_repack import unpacked  # lazily: it imports the engine's quant layer

        q, s, m = unpacked(type_name, b)
        groups = s.shape[1]
        y = s.reshape(-1, groups, 1) * q.float().reshape(-1, groups, q.shape[1] // groups)
        if m is not None:
            y = y + m.reshape(-1, groups, 1)
        return y.reshape(q.shape)
    return dq


# the types gguf_repack keeps as int8 (one integer a value from its unpacker)
_UNPACKED = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS")
_TORCH_DEQUANT = {"Q4_0": _dq_q4_0, "Q4_1": _dq_q4_1, "Q4_K": _dq_q4_k, **{name: _dq_unpacked(name) for name in _UNPACKED}}
