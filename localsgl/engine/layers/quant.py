"""Quantized weights: one format description and one tensor type that every forward path uses.

A weight [N, K] (out x in) is stored as packed integers or fp8 plus one scale (and, for
asymmetric formats, one float offset) per group of ``group`` consecutive input elements of a
row:

    int8  qweight int8 [N, K]            w = s·q          (symmetric)   w = s·q + m  (asymmetric)
    int4  qweight uint8 [N, K/2]         w = s·(u − 8)    (symmetric)   w = s·u + m  (asymmetric)
          byte j of a row holds u[2j] in its low nibble and u[2j+1] in its high nibble
    fp8   qweight float8_e4m3fn [N, K]   w = s·q          (one scale per row, or per group)

with scales/offsets ``[N, K/group]`` (fp16, or fp32 when fp16 cannot hold them; fp8 keeps
fp32).  ``group == K`` is one scale per output row ("per-channel").  The offset ``m`` is a
float (GGUF's Q4_1/Q4_K "min"; AWQ's integer zero point becomes m = −s·z), so every GGUF
block type this engine keeps quantized maps onto these formats without changing a value
beyond rounding its scales to 16 bits (store/gguf_repack.py).

``QuantizedWeight`` holds the tensors as buffers and knows how to dequantize, multiply and
quantize; a format is added here (and as a branch of the kernels' dequantizing load), not
in the forward paths: the layer path (linear.py), the fused one-token GPU step
(fused_decode.py -> localsgl_kernels.quant_gemv) and the CPU decode step (cpu_decode.py)
all call ``QuantizedWeight.matmul`` or the kernels it dispatches to.  A fused q/k/v whose
parts come in formats that no narrow format joins is a ``RowStack`` of QuantizedWeights
(``row_runs``), which the same three paths take.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("int4", "int8", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP16_MAX = 65504.0
_FP16_MIN_NORMAL = 2.0**-14


@dataclass(frozen=True)
class WeightFormat:
    """How a weight is quantized.  ``group_size`` 0 means one scale per output row."""

    kind: str  # "int4" | "int8" | "fp8"
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown weight format {self.kind!r} (use {', '.join(KINDS)})")
        if self.group_size < 0 or (self.group_size and self.group_size % 2):
            raise ValueError(f"group size must be 0 (per row) or a positive even number, got {self.group_size}")
        if self.kind == "fp8" and not self.symmetric:
            raise ValueError("fp8 weights are symmetric")
        if self.kind == "int4" and self.group_size == 0:
            raise ValueError("int4 needs a group size (e.g. 128)")

    @property
    def bits(self) -> int:
        return 4 if self.kind == "int4" else 8

    def group(self, in_features: int) -> int:
        return self.group_size or in_features

    def label(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-row"
        return f"{self.kind} {g}" + ("" if self.symmetric else " asym")

    def fitted(self, in_features: int) -> "WeightFormat | None":
        """This format for a weight with ``in_features`` inputs: the group shrunk to the largest
        power of two that divides them (at least 32 for int4, 16 otherwise, as the kernels
        tile), e.g. 64 for SmolLM2's 576; None when no group fits (the weight stays dense)."""
        if in_features % 2:
            return None
        if not self.group_size or in_features % self.group_size == 0:
            return self
        g = 1 << (min(self.group_size, in_features).bit_length() - 1)
        while g >= (32 if self.kind == "int4" else 16):
            if in_features % g == 0:
                return WeightFormat(self.kind, g, self.symmetric)
            g //= 2
        return None

    def nbytes(self, out_features: int, in_features: int, scale_bytes: int | None = None) -> int:
        """Bytes of a weight of this shape: packed values + scales (+ offsets)."""
        sb = scale_bytes or (4 if self.kind == "fp8" else 2)
        groups = out_features * (in_features // self.group(in_features))
        return out_features * in_features * self.bits // 8 + groups * sb * (1 if self.symmetric else 2)


def parse_format(method: str, group_size: int | None = None, symmetric: bool | None = None) -> WeightFormat:
    """'int4' / 'int8' / 'fp8' with the defaults of `localsgl quantize`: int4 group 128
    asymmetric (an offset per group is worth its 2 bytes for round-to-nearest), int8 and fp8
    one scale per row, symmetric.  A group the kernels cannot tile is refused."""
    method = str(method).strip().lower()
    if method not in KINDS:
        raise ValueError(f"unknown quantization method {method!r} (use {', '.join(KINDS)})")
    if group_size is None:
        group_size = 128 if method == "int4" else 0
    group_size, least = int(group_size), 32 if method == "int4" else 16
    if group_size and (group_size < least or group_size & (group_size - 1)):
        # the kernels tile groups by powers of two (WeightFormat.fitted shrinks one to fit a layer)
        raise ValueError(f"{method} group size must be a power of two of at least {least} (e.g. 32, 64, 128)"
                         f"{'' if method == 'int4' else ' or 0 for one scale per row'}, got {group_size}")
    if symmetric is None:
        symmetric = method != "int4"
    return WeightFormat(method, group_size, bool(symmetric))


# ----------------------------------------------------------------------------- packing


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/2] uint8, element 2j in the low nibble of byte j."""
    u = u.to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(b: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] uint8 values 0..15 (pack_int4's inverse)."""
    return torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(b.shape[0], b.shape[1] * 2)


def scale_dtype_for(*tensors: torch.Tensor) -> torch.dtype:
    """fp16 when every nonzero magnitude is a normal fp16 number, else fp32."""
    for t in tensors:
        a = t.detach().abs().float()
        nz = a[a > 0]
        if nz.numel() and (float(nz.max()) > _FP16_MAX or float(nz.min()) < _FP16_MIN_NORMAL):
            return torch.float32
    return torch.float16


# ----------------------------------------------------------------------------- the tensor


class QuantizedWeight(nn.Module):
    """A quantized [N, K] weight (see the module docstring); buffers ``qweight``, ``scales`` and,
    for asymmetric formats, ``mins``.  A module, so it moves and counts with its model."""

    # whether the batch-1 CUDA GEMVs may round the activations to int8 (quant_gemv words 3);
    # the engine's int8_activations debug switch sets it per weight
    int8_activations = True
    # whether the batch-1 CUDA GEMVs may multiply fp8 e4m3 values by fp16 activations
    # (gemv.fp16_products); the engine's fp16_products debug switch sets it per weight
    fp16_products = True
    # whether the kernel before its batch-1 GEMV may prefetch it into L2 (the l2_prefetch debug switch)
    l2_prefetch = True

    def __init__(self, fmt: WeightFormat, qweight: torch.Tensor, scales: torch.Tensor,
                 mins: torch.Tensor | None = None, in_features: int | None = None):
        super().__init__()
        self.fmt = fmt
        n = qweight.shape[0]
        k = in_features if in_features is not None else qweight.shape[1] * (2 if fmt.kind == "int4" else 1)
        self.out_features, self.in_features = int(n), int(k)
        g = fmt.group(k)
        if k % g:
            raise ValueError(f"{fmt.label()}: {k} input features are not a whole number of groups of {g}")
        expect_q = (n, k // 2) if fmt.kind == "int4" else (n, k)
        if tuple(qweight.shape) != expect_q or tuple(scales.shape) != (n, k // g):
            raise ValueError(f"{fmt.label()} [{n}, {k}]: qweight {tuple(qweight.shape)} / scales "
                             f"{tuple(scales.shape)} do not match")
        if (mins is None) != fmt.symmetric:
            raise ValueError(f"{fmt.label()}: offsets {'missing' if mins is None else 'given'}")
        self.register_buffer("qweight", qweight, persistent=True)
        self.register_buffer("scales", scales, persistent=True)
        self.register_buffer("mins", mins, persistent=True)

    # shape and bytes ---------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def group(self) -> int:
        return self.fmt.group(self.in_features)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins) if t is not None)

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, {self.fmt.label()}"

    # construction --------------------------------------------------------------------
    @classmethod
    def empty(cls, fmt: WeightFormat, out_features: int, in_features: int, device=None,
              scale_dtype: torch.dtype | None = None) -> "QuantizedWeight":
        g = fmt.group(in_features)
        sd = scale_dtype or (torch.float32 if fmt.kind == "fp8" else torch.float16)
        qdt = {"int4": torch.uint8, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[fmt.kind]
        qk = in_features // 2 if fmt.kind == "int4" else in_features
        q = torch.empty(out_features, qk, dtype=qdt, device=device)
        s = torch.empty(out_features, in_features // g, dtype=sd, device=device)
        m = None if fmt.symmetric else torch.empty_like(s)
        return cls(fmt, q, s, m, in_features)

    @classmethod
    def quantize(cls, w: torch.Tensor, fmt: WeightFormat) -> "QuantizedWeight":
        """Round-to-nearest quantization of a dense [N, K] weight (computed in fp32 on w's device)."""
        n, k = w.shape
        g = fmt.group(k)
        if k % g:
            raise ValueError(f"{fmt.label()}: {k} input features are not a multiple of the group size {g}")
        wg = w.detach().float().reshape(n, k // g, g)
        if fmt.kind == "fp8":
            s = (wg.abs().amax(-1) / FP8_MAX).clamp_min(1e-12)
            q = (wg / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            return cls(fmt, q.reshape(n, k), s, None, k)
        qmax = 7 if fmt.kind == "int4" else 127
        if fmt.symmetric:
            s = wg.abs().amax(-1) / qmax
            s = _round_scales(torch.where(s > 0, s, torch.ones_like(s)))
            q = torch.round(wg / s.float()[..., None]).clamp(-qmax - (fmt.kind == "int4"), qmax)
            m = None
        else:
            levels = 15 if fmt.kind == "int4" else 255
            lo, hi = wg.amin(-1), wg.amax(-1)
            s = (hi - lo) / levels
            s = torch.where(s > 0, s, torch.ones_like(s))
            bottom = 0 if fmt.kind == "int4" else -128  # the stored integer of the group's minimum
            m = lo - bottom * s
            sd = scale_dtype_for(s, m)
            s, m = s.to(sd), m.to(sd)
            q = torch.round((wg - m.float()[..., None]) / s.float()[..., None]).clamp(bottom, bottom + levels)
        q = q.reshape(n, k)
        if fmt.kind == "int4":
            q = pack_int4(q + 8 if fmt.symmetric else q)
        else:
            q = q.to(torch.int8)
        return cls(fmt, q, s, m, k)

    @classmethod
    def random(cls, fmt: WeightFormat, out_features: int, in_features: int, device=None, std: float = 0.02,
               generator: torch.Generator | None = None) -> "QuantizedWeight":
        """Random values of about ``std`` (dummy weights for benchmarks)."""
        w = cls.empty(fmt, out_features, in_features, device)
        gen = dict(generator=generator) if generator is not None else {}
        if fmt.kind == "fp8":
            w.qweight.copy_(torch.randn(w.qweight.shape, device=device, **gen).mul_(64).to(torch.float8_e4m3fn))
            w.scales.fill_(std / 64)
            return w
        hi = 256 if fmt.kind == "int4" else 255
        w.qweight.copy_(torch.randint(0, hi, w.qweight.shape, device=device, dtype=torch.int32, **gen)
                        .sub_(0 if fmt.kind == "int4" else 127).to(w.qweight.dtype))
        spread = 4.6 if fmt.kind == "int4" else 73.0  # std of the stored integers
        w.scales.fill_(std / spread)
        if w.mins is not None:
            w.mins.fill_(-7.5 * std / spread if fmt.kind == "int4" else 0.0)
        return w

    # values ----------------------------------------------------------------------------
    def int_values(self) -> torch.Tensor:
        """The stored integers as fp32 [N, K] (int4: u − 8 when symmetric, else u)."""
        if self.fmt.kind == "int4":
            u = unpack_int4(self.qweight).float()
            return u - 8 if self.fmt.symmetric else u
        return self.qweight.float()

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Dense [N, K] (or the selected rows) in ``dtype``; values computed in fp32 as
        s·q (+ m), the same operations and order as the GGUF reference dequantizers."""
        sub = self if rows is None else self._rows(rows)
        n, k, g = sub.qweight.shape[0], self.in_features, self.group
        q = sub.int_values().view(n, k // g, g)
        w = q * sub.scales.float()[..., None]
        if sub.mins is not None:
            w = w + sub.mins.float()[..., None]
        return w.view(n, k).to(dtype)

    def _rows(self, rows) -> "QuantizedWeight":
        m = None if self.mins is None else self.mins[rows]
        return QuantizedWeight(self.fmt, self.qweight[rows], self.scales[rows], m, self.in_features)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` dequantized (an embedding lookup on a quantized table)."""
        flat = ids.reshape(-1)
        return self.dequantize(dtype, flat).view(*ids.shape, self.in_features)

    # conversion --------------------------------------------------------------------------
    def to_format(self, fmt: WeightFormat) -> "QuantizedWeight":
        """The same values in a wider format (int4 -> int8, a finer group, symmetric ->
        asymmetric); exact, raises when ``fmt`` cannot hold the values exactly."""
        if fmt == self.fmt:
            return self
        old, g_old, k = self.fmt, self.group, self.in_features
        g_new = fmt.group(k)
        if old.kind == "fp8" or fmt.kind == "fp8" or (old.kind == "int8" and fmt.kind == "int4"):
            raise ValueError(f"cannot convert {old.label()} to {fmt.label()} exactly")
        if g_old % g_new or (old.symmetric is False and fmt.symmetric):
            raise ValueError(f"cannot convert {old.label()} to {fmt.label()} exactly")
        q = self.int_values()  # u - 8 (sym int4) / u (asym int4) / q (int8)
        rep = g_old // g_new
        s = self.scales.repeat_interleave(rep, dim=1)
        m = None if self.mins is None else self.mins.repeat_interleave(rep, dim=1)
        if not fmt.symmetric and m is None:
            m = torch.zeros_like(s)
        if fmt.kind == "int4":
            qb = pack_int4(q + 8 if fmt.symmetric else q)
        else:
            qb = q.to(torch.int8)
        return QuantizedWeight(fmt, qb, s, m, k)


def join_formats(formats: list[WeightFormat], in_features: int) -> WeightFormat | None:
    """The narrowest format holding every one of ``formats`` exactly (for fused projections
    whose parts come in different formats, e.g. a GGUF q/k in Q4_K and v in Q6_K); None
    when there is none (then the parts are dequantized)."""
    first = formats[0]
    if all(f == first for f in formats):
        return first
    if any(f.kind == "fp8" for f in formats):
        return None
    kind = "int4" if all(f.kind == "int4" for f in formats) else "int8"
    group = 0
    for f in formats:
        group = math.gcd(group, f.group(in_features))
    sym = all(f.symmetric for f in formats)
    if kind == "int4" and len({f.symmetric for f in formats}) > 1:
        sym = False  # u - 8 with an offset of -8s: stored as asym int4
    return WeightFormat(kind, 0 if group == in_features else group, sym)


# A joined format may cost this much more than the parts' own formats before the parts stay
# separate (RowStack): one launch less per step against the bytes every step streams.
_JOIN_OVERHEAD = 1.05

# Fused projections, by their parts' names in order, whose fused one-token kernels take a
# RowStack (quant_gemv.norm_qkv streams each block in its own format); the others join.
_ROW_BLOCK_PARTS = {("q", "k", "v")}


def keeps_row_blocks(part_names) -> bool:
    """Whether a fused projection of these parts may store them as row blocks (row_runs's
    ``split_ok``): the one rule that the layers (MergedLinear) and the weight estimate share."""
    return tuple(part_names) in _ROW_BLOCK_PARTS


def row_runs(formats: list[WeightFormat], sizes: list[int], in_features: int,
             split_ok: bool) -> list[tuple[list[int], WeightFormat]] | None:
    """How a fused projection's parts (formats, row counts) are stored: as runs of consecutive
    parts, each run one weight in one format.  One run in the joined format (join_formats)
    unless that widens the rows by more than _JOIN_OVERHEAD and ``split_ok`` (the layer's
    fused kernels take row blocks: keeps_row_blocks); then the runs are the parts of equal format
    (a GGUF Q4_K_M's q/k in int4 g32 with offsets, its Q6_K v in int8 g16).  None when no
    format holds every part (the parts are dequantized)."""
    joined = join_formats(formats, in_features)
    if joined is None:
        return None
    runs: list[tuple[list[int], WeightFormat]] = []
    for i, f in enumerate(formats):
        if runs and runs[-1][1] == f:
            runs[-1][0].append(i)
        else:
            runs.append(([i], f))
    whole = [(list(range(len(formats))), joined)]
    if len(runs) == 1 or not split_ok:
        return whole
    joined_bytes = joined.nbytes(sum(sizes), in_features)
    split_bytes = sum(f.nbytes(sum(sizes[i] for i in idx), in_features) for idx, f in runs)
    return runs if joined_bytes > _JOIN_OVERHEAD * split_bytes else whole


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Row blocks (e.g. q, k, v) as one weight in their joined format."""
    k = parts[0].in_features
    fmt = join_formats([p.fmt for p in parts], k)
    if fmt is None:
        raise ValueError("no common format")
    conv = [_to_format_with_offsets(p, fmt) for p in parts]
    def widest(ts):
        return torch.float32 if any(t.dtype == torch.float32 for t in ts) else ts[0].dtype

    s = torch.cat([c.scales.to(widest([c.scales for c in conv])) for c in conv])
    m = None if fmt.symmetric else torch.cat([c.mins.to(widest([c.mins for c in conv])) for c in conv])
    return QuantizedWeight(fmt, torch.cat([c.qweight for c in conv]), s, m, k)


class RowStack(nn.Module):
    """A weight [N, K] whose row blocks stay in their own formats (row_runs): ``parts``
    (QuantizedWeights) stacked top to bottom.  Whatever multiplies it multiplies each part
    and places its rows (matmul, cpu_matmul, quant_gemv.norm_qkv); dequantizing gives the
    dense stack."""

    def __init__(self, parts: list[QuantizedWeight]):
        super().__init__()
        k = parts[0].in_features
        if any(p.in_features != k for p in parts):
            raise ValueError("row blocks of different input sizes")
        self.parts = nn.ModuleList(parts)
        self.in_features = int(k)
        self.out_features = int(sum(p.out_features for p in parts))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def labels(self) -> list[str]:
        return [p.fmt.label() for p in self.parts]

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, {' + '.join(self.labels())}"

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Dense [N, K] (or the selected rows) in ``dtype``: a contiguous slice of rows
        dequantizes only the parts it overlaps, other selections the whole stack."""
        if isinstance(rows, slice) and rows.step in (None, 1):
            lo, hi, _ = rows.indices(self.out_features)
            pieces, off = [], 0
            for p in self.parts:
                a, b = max(lo, off), min(hi, off + p.out_features)
                if a < b:
                    pieces.append(p.dequantize(dtype, slice(a - off, b - off)))
                off += p.out_features
            return torch.cat(pieces) if pieces else torch.empty(0, self.in_features, dtype=dtype, device=self.device)
        dense = torch.cat([p.dequantize(dtype) for p in self.parts])
        return dense if rows is None else dense[rows]


def is_quantized(w) -> bool:
    """A weight kept quantized (one QuantizedWeight or a RowStack of them), not a dense tensor."""
    return isinstance(w, (QuantizedWeight, RowStack))


def _to_format_with_offsets(p: QuantizedWeight, fmt: WeightFormat) -> QuantizedWeight:
    """to_format, plus symmetric int4 -> asymmetric int4 (u·s − 8s: the offset is −8s)."""
    if fmt.kind == "int4" and p.fmt.kind == "int4" and p.fmt.symmetric and not fmt.symmetric:
        rep = p.group // fmt.group(p.in_features)
        s = p.scales.repeat_interleave(rep, dim=1)
        m = (-8.0 * s.float()).to(s.dtype)  # exact: a power-of-two multiple
        return QuantizedWeight(fmt, p.qweight, s, m, p.in_features)
    return p.to_format(fmt)


# ----------------------------------------------------------------------------- matmul


def matmul(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ (+ b) for x [..., K] in a float dtype; y in x's dtype.

    CUDA: one-row and few-row inputs stream the packed weight through the dequantizing GEMV
    (localsgl_kernels.quant_gemv), larger ones through the dequantizing GEMM
    (localsgl_kernels.quant_gemm; fp8 through torch._scaled_mm on sm90+).  CPU: the CPU
    routes of cpu_quant.py.  Anything else: the torch reference (dequantize, then multiply)."""
    if isinstance(w, RowStack):
        y = torch.cat([matmul(x, p) for p in w.parts], dim=-1)
        return y + bias if bias is not None else y
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x.is_cuda:
        from . import _kernel_importable

        if _kernel_importable("quant_gemm"):
            from localsgl_kernels import quant_gemm

            y = quant_gemm.matmul(x2, w)
        else:
            y = matmul_ref(x2, w)
    else:
        from .cpu_quant import cpu_matmul

        y = cpu_matmul(x2, w)
    if bias is not None:
        y = y + bias
    return y.view(*shape[:-1], w.out_features)


def matmul_ref(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """The torch reference: dequantize to x's dtype, then x @ Wᵀ (in row chunks, so the
    dense copy of a vocabulary-wide weight stays small)."""
    rows = max(1, (64 << 20) // max(1, w.in_features * 4))
    if rows >= w.out_features:
        return x @ w.dequantize(x.dtype).t()
    return torch.cat([x @ w.dequantize(x.dtype, slice(r, r + rows)).t()
                      for r in range(0, w.out_features, rows)], dim=-1)


def _round_scales(s: torch.Tensor) -> torch.Tensor:
    return s.to(scale_dtype_for(s))


def weight_format_of(weight) -> str:
    """'int4 g128' for a QuantizedWeight ('int4 g32 asym + int8 g16' for a RowStack), the dtype
    name for a dense tensor."""
    if isinstance(weight, QuantizedWeight):
        return weight.fmt.label()
    if isinstance(weight, RowStack):
        return " + ".join(weight.labels())
    return str(weight.dtype).removeprefix("torch.")


def streamed_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter and quantized weight except the
    embedding table, which is looked up, unless it doubles as the LM head (tied)."""
    embed = getattr(model, "embed_tokens", None)
    skip = set()
    if embed is not None and getattr(model, "lm_head", 1) is not None:
        skip = {id(t) for t in list(embed.parameters()) + list(embed.buffers())}
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in skip or id(t) in seen or t.is_meta:
            continue
        seen.add(id(t))
        if t.dtype.is_floating_point or t.dtype in (torch.uint8, torch.int8) or t.dtype == torch.float8_e4m3fn:
            total += t.numel() * t.element_size()
    rotary = getattr(model, "rotary", None)
    if rotary is not None:  # the rotary table is read a row per token, not streamed
        total -= sum(t.numel() * t.element_size() for t in rotary.buffers() if id(t) in seen)
    return total
