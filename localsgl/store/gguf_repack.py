"""GGUF quantized blocks repacked into the kernels' weight formats (layers/quant.py), not
dequantized.

    Q8_0  (32 x int8, fp16 d)                   -> int8 group 32, symmetric: s = d
    Q4_0  (32 x 4 bit, fp16 d)                  -> int4 group 32, symmetric: s = d (w = d·(u − 8))
    Q4_1  (32 x 4 bit, fp16 d, fp16 m)          -> int4 group 32, asymmetric: s = d, m = m
    Q4_K  (256: 8 x 32 x 4 bit, 6-bit sc/mn)    -> int4 group 32, asymmetric: s = d·sc, m = −dmin·mn
    Q5_K  (256: 8 x 32 x 5 bit, 6-bit sc/mn)    -> int8 group 32, asymmetric: s = d·sc, m = −dmin·mn
    Q6_K  (256: 16 x 16 x 6 bit, int8 sc)       -> int8 group 16, symmetric: s = d·sc
    Q5_0  (32 x 5 bit, fp16 d)                  -> int8 group 32, symmetric: s = d (w = d·(u − 16))
    Q5_1  (32 x 5 bit, fp16 d, fp16 m)          -> int8 group 32, asymmetric: s = d, m = m
    Q3_K  (256: 16 x 16 x 3 bit, 6-bit sc)      -> int8 group 16, symmetric: s = d·(sc − 32)
    Q2_K  (256: 16 x 16 x 2 bit, 4-bit sc/mn)   -> int8 group 16, asymmetric: s = d·sc, m = −dmin·mn
    IQ4_NL (32 x 4-bit index, fp16 d)           -> int8 group 32, symmetric: s = d, q = the codebook value
    IQ4_XS (256: 8 x 32 x 4-bit index, 6-bit sc) -> int8 group 32, symmetric: s = d·(sc − 32), q likewise

The integers are copied as they are (IQ4's 4-bit indices become their codebook's int8
values); the only change to a dequantized value is the rounding of the K-quants' and
IQ4_XS's products d·sc and dmin·mn to fp16 (to fp32 when a tensor's scales do not fit fp16's
normal range).  The kernels have 4- and 8-bit integers only, so every type but the 4-bit
linear ones takes a byte per value: less than half of a dequantized bf16 copy, more than the
file (Q3_K 3.4 bits a value in the file, 9 kept; Q2_K 2.6 and 10).  The dequantized values
equal the gguf package's up to that rounding (tests/quant/test_gguf_repack.py).
"""
from __future__ import annotations

import torch

from ..engine.layers.quant import QuantizedWeight, WeightFormat, scale_dtype_for
from .gguf_dequant import _nibbles, fp16_field

# type name -> (bytes per block, values per block, format)
REPACKED = {
    "Q8_0": (34, 32, WeightFormat("int8", 32, True)),
    "Q4_0": (18, 32, WeightFormat("int4", 32, True)),
    "Q4_1": (20, 32, WeightFormat("int4", 32, False)),
    "Q4_K": (144, 256, WeightFormat("int4", 32, False)),
    "Q5_K": (176, 256, WeightFormat("int8", 32, False)),
    "Q6_K": (210, 256, WeightFormat("int8", 16, True)),
    "Q5_0": (22, 32, WeightFormat("int8", 32, True)),
    "Q5_1": (24, 32, WeightFormat("int8", 32, False)),
    "Q3_K": (110, 256, WeightFormat("int8", 16, True)),
    "Q2_K": (84, 256, WeightFormat("int8", 16, False)),
    "IQ4_NL": (18, 32, WeightFormat("int8", 32, True)),
    "IQ4_XS": (136, 256, WeightFormat("int8", 32, True)),
}
# the IQ4 types' 16 non-uniform levels (ggml's kvalues_iq4nl)
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_CHUNK_BLOCKS = 1 << 18  # blocks repacked at a time (bounds the unpacked temporaries)


def can_repack(type_name: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of this GGUF type and HF shape [out, in] stays quantized."""
    return type_name in REPACKED and len(shape) == 2 and shape[1] % REPACKED[type_name][1] == 0


def repack(type_name: str, data: torch.Tensor, shape: tuple[int, int]) -> QuantizedWeight:
    """The bytes of one tensor (uint8, [rows, bytes per row] or flat, on the target device)
    -> a QuantizedWeight of HF shape [out, in] on the same device."""
    size, per_block, fmt = REPACKED[type_name]
    n, k = shape
    blocks = data.reshape(-1, size)
    nb_row = k // per_block
    if blocks.shape[0] != n * nb_row:
        raise ValueError(f"{type_name} tensor of shape {shape}: {blocks.shape[0]} blocks, expected {n * nb_row}")
    g = fmt.group(k)
    vals = torch.empty((n, k // 2 if fmt.kind == "int4" else k), dtype=torch.uint8 if fmt.kind == "int4" else torch.int8,
                       device=data.device)
    s32 = torch.empty((n, k // g), dtype=torch.float32, device=data.device)
    m32 = None if fmt.symmetric else torch.empty_like(s32)
    fn = _UNPACK[type_name]
    rows_per_chunk = max(1, _CHUNK_BLOCKS // nb_row)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        q, s, m = fn(blocks[r0 * nb_row : r1 * nb_row])
        vals[r0:r1] = q.reshape(r1 - r0, vals.shape[1])
        s32[r0:r1] = s.reshape(r1 - r0, k // g)
        if m32 is not None:
            m32[r0:r1] = m.reshape(r1 - r0, k // g)
    sd = scale_dtype_for(s32) if m32 is None else scale_dtype_for(s32, m32)
    return QuantizedWeight(fmt, vals, s32.to(sd), None if m32 is None else m32.to(sd), k)


def _to_pairs(qs: torch.Tensor, chunk: int) -> torch.Tensor:
    """ggml's nibble order -> quant.py's: in each run of ``chunk`` bytes, byte j holds value j
    (low nibble) and value j + chunk (high); out byte i holds values 2i and 2i + 1.  Values
    2i, 2i+1 < chunk are the low nibbles of bytes 2i, 2i+1; the rest the high nibbles of
    bytes 2i − chunk, 2i − chunk + 1."""
    n = qs.shape[0]
    q = qs.reshape(-1, chunk)
    even, odd = q[:, 0::2], q[:, 1::2]
    out = torch.empty_like(q)
    h = chunk // 2
    torch.bitwise_or(even & 0x0F, (odd & 0x0F) << 4, out=out[:, :h])
    torch.bitwise_or(even >> 4, odd & 0xF0, out=out[:, h:])
    return out.reshape(n, -1)


def k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes -> 8 six-bit scales and 8 six-bit mins per super-block (Q4_K, Q5_K)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def unpacked(type_name: str, blocks: torch.Tensor):
    """(integers, scales [n, groups], mins or None) of ``blocks`` [n, bytes]: the integers one a
    value ([n, values a block]) for the int8 types, two a byte in quant.py's order for int4's."""
    return _UNPACK[type_name](blocks)


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8), fp16_field(b[:, :2]), None


def _q4_0(b):
    return _to_pairs(b[:, 2:], 16), fp16_field(b[:, :2]), None


def _q4_1(b):
    return _to_pairs(b[:, 4:], 16), fp16_field(b[:, :2]), fp16_field(b[:, 2:4])


def _q4_k(b):
    d, dmin = fp16_field(b[:, 0:2]), fp16_field(b[:, 2:4])
    sc, mn = k_scales(b[:, 4:16])
    # sub-block 2i: low nibbles of bytes 32i..32i+31, sub-block 2i+1: their high nibbles
    return _to_pairs(b[:, 16:144], 32), d * sc, -(dmin * mn)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = fp16_field(b[:, 0:2]), fp16_field(b[:, 2:4])
    sc, mn = k_scales(b[:, 4:16])
    qh = b[:, 16:48].reshape(n, 1, 32)
    qs = b[:, 48:176].reshape(n, 4, 1, 32)
    lo = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)
    hi = torch.cat([(qh >> i) & 1 for i in range(8)], dim=1)  # sub-block j: bit j of qh
    q = (lo | (hi << 4)).to(torch.int8).reshape(n, 256)
    return q, d * sc, -(dmin * mn)


def _q6_k(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Q6_K blocks [n, 210] -> int8 values [n, 256] (centred), their 16 scales per block, no mins."""
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    d = fp16_field(b[:, 208:210])
    lo = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 2, 4, 32)
    hi = torch.cat([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], dim=2)
    q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(n, 256)
    return q, d * sc, None


def _bits(b: torch.Tensor, count: int) -> torch.Tensor:
    """Little-endian bytes [n, count/8] -> their bits [n, count] (0/1, uint8), bit i first."""
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8)
    return ((b[:, :, None] >> shifts) & 1).reshape(b.shape[0], count)


def _q5_0(b):
    q = _nibbles(b[:, 6:22]) | (_bits(b[:, 2:6], 32) << 4)
    return (q.to(torch.int8) - 16), fp16_field(b[:, :2]), None


def _q5_1(b):
    q = _nibbles(b[:, 8:24]) | (_bits(b[:, 4:8], 32) << 4)
    return q.to(torch.int8), fp16_field(b[:, :2]), fp16_field(b[:, 2:4])


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """The 2-bit fields of Q2_K / Q3_K's 64 bytes in value order: half h (bytes 32h..32h+31),
    then shift 2j, then the 32 bytes in order -> [n, 256]."""
    n = qs.shape[0]
    halves = qs.reshape(n, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], device=qs.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    return ((halves >> shifts) & 3).reshape(n, 256)


def _q2_k(b):
    sc = b[:, 0:16]
    d, dmin = fp16_field(b[:, 80:82]), fp16_field(b[:, 82:84])
    return _crumbs(b[:, 16:80]).to(torch.int8), d * (sc & 0x0F).float(), -(dmin * (sc >> 4).float())


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """12 packed bytes -> 16 six-bit scales (ggml stores each scale's low 4 bits in bytes 0..7,
    its high 2 bits in bytes 8..11)."""
    lo, hi = s[:, 0:8], s[:, 8:12]
    low4 = torch.cat([lo & 0x0F, lo >> 4], dim=-1)  # scales 0..7, then 8..15
    high2 = torch.cat([(hi >> sh) & 3 for sh in (0, 2, 4, 6)], dim=-1)  # 4 bytes a shift
    return (low4 | (high2 << 4)).float() - 32


def _q3_k(b):
    n = b.shape[0]
    hmask = _bits(b[:, 0:32], 256).reshape(n, 32, 8)  # [byte l, bit i]; value (h, j, l) takes bit 4h + j
    high = hmask.permute(0, 2, 1).reshape(n, 256)  # bit i = 4h + j major, byte l minor: value order
    q = _crumbs(b[:, 32:96]).to(torch.int8) - 4 * (1 - high.to(torch.int8))
    return q, fp16_field(b[:, 108:110]) * _q3_k_scales(b[:, 96:108]), None


def _iq4_values(qs: torch.Tensor) -> torch.Tensor:
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.int8, device=qs.device)
    return levels[_nibbles(qs).long()]


def _iq4_nl(b):
    return _iq4_values(b[:, 2:18]), fp16_field(b[:, :2]), None


def _iq4_xs(b):
    n = b.shape[0]
    d = fp16_field(b[:, 0:2])
    sl = b[:, 4:8]
    low4 = torch.stack([sl & 0x0F, sl >> 4], dim=-1).reshape(n, 8)  # sub-block 2i: byte i's low nibble
    sh = b[:, 2].long() | (b[:, 3].long() << 8)
    high2 = (sh[:, None] >> (2 * torch.arange(8, device=b.device))) & 3
    ls = (low4.long() | (high2 << 4)).float() - 32
    q = _iq4_values(b[:, 8:136].reshape(n * 8, 16)).reshape(n, 256)
    return q, d * ls, None


_UNPACK = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
           "Q5_0": _q5_0, "Q5_1": _q5_1, "Q3_K": _q3_k, "Q2_K": _q2_k, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs}
