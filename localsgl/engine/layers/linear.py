"""Linear layers with fused projections (qkv, gate_up), dense or quantized.

Weights are stored [out, in] like HF checkpoints, so loading is a copy into a
slice; fusing q/k/v and gate/up turns three (two) GEMMs into one per layer.  A layer's
``weight`` is a dense Parameter, a QuantizedWeight or a RowStack of them (quant.py);
``linear()`` dispatches on it, so every caller handles each.  Under a deferring weight policy
(weight_policy.py) the weight is created by the first tensor loaded into it; the parts of a
fused projection are joined once all have arrived (parts in different quantized formats
share the narrowest format that holds each exactly, or, for q/k/v, stay in their own when
that format would widen them: quant.row_runs).
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import weight_policy
from .cpu_routes import LOWP, blas_mm, cpu_routes, onednn_mm
from .quant import QuantizedWeight, RowStack, concat_rows, is_quantized, keeps_row_blocks, row_runs
from .quant import matmul as quant_matmul


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_policy = weight_policy.current()
        if self.weight_policy is not None and self.weight_policy.defer:
            self.register_parameter("weight", None)  # created by the first loaded tensor (set_weight)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def set_weight(self, tensor) -> None:
        """Load the whole weight (a dense tensor or a QuantizedWeight), as the build policy says:
        copied into an allocated Parameter, or adopted as this layer's weight."""
        value = self.weight_policy.adopt(tensor) if self.weight_policy is not None else tensor
        if tuple(value.shape) != (self.out_features, self.in_features):
            raise ValueError(f"expected {(self.out_features, self.in_features)}, got {tuple(value.shape)}")
        if is_quantized(value):
            self._parameters.pop("weight", None)  # the weight becomes a submodule
            self.weight = value
        elif isinstance(self.weight, nn.Parameter):
            self.weight.data.copy_(value)
        else:
            self.weight = nn.Parameter(value.contiguous(), requires_grad=False)

    def init_random(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Random weights for a layer whose weight the policy deferred (dummy loading): in the
        policy's quantized format when it quantizes, else dense N(0, std)."""
        p = self.weight_policy
        fmt = p.quantize.fitted(self.in_features) if p is not None and p.quantize is not None else None
        if fmt is not None:
            self._parameters.pop("weight", None)
            self.weight = QuantizedWeight.random(fmt, self.out_features, self.in_features, p.device, std)
            return
        w = torch.empty(self.out_features, self.in_features, dtype=p.dtype if p else torch.float32,
                        device=p.device if p is not None else None)
        if w.is_cuda or generator is None:
            w.normal_(0.0, std)
        else:
            w.copy_(torch.randn(w.shape, generator=generator).mul_(std))
        self.weight = nn.Parameter(w, requires_grad=False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b.  On the CPU a dense weight (input-major or row-major, see
    :func:`use_cpu_weight_layout`) multiplies by :func:`cpu_mm`, the route this machine's
    dtype wants.  A QuantizedWeight (or RowStack) multiplies through quant.matmul."""
    if is_quantized(weight):
        return quant_matmul(x, weight, bias)
    if not x.is_cuda and weight.dim() == 2 and weight.dtype == x.dtype:
        y = cpu_mm(x.reshape(-1, x.shape[-1]), weight.t())
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], y.shape[-1])
    return F.linear(x, weight, bias)


def cpu_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [K, N] on the CPU, w a dense weight's [in, out] view (contiguous when the
    weight is input-major, the transpose view of a row-major weight otherwise), in x's dtype
    by the route :func:`cpu_routes` picks for it: widened to fp32 for a low-precision dtype
    without native matmul from a few rows on (:func:`mm_lowp`), oneDNN's matmul on a row-major
    weight where the machine's probe chose it, else torch's BLAS (:func:`blas_mm`).
    The layer path and the lean CPU decode step both multiply here, so they take the same route
    on the same rows."""
    routes = cpu_routes(x.dtype)
    if x.dtype in LOWP and routes.widen(x.shape[0]):
        return mm_lowp(x, w).to(x.dtype)
    if routes.onednn and w.stride(0) == 1 and w.shape[1] > 1:  # a row-major weight
        return onednn_mm(x, w.t())
    return blas_mm(x, w)


_SCRATCH_FLOATS = 2 << 20  # 8 MiB of fp32 weight at a time (a small CPU's L3 holds it)
_scratch = threading.local()  # per thread: two engines in one process must not share it


def mm_lowp(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w for bf16/fp16 x [M, K] and a weight view w [K, N] (either layout, as in
    :func:`cpu_mm`): the weight is widened to fp32 in chunks of an 8 MiB per-thread scratch
    buffer and multiplied by the fp32 GEMM; the result is fp32 (callers round it).

    Why: without native bf16 matmul, torch's bf16 GEMM runs a generic loop: on one AVX2 thread
    a 32-row GEMM takes ~3x the time of widening + the fp32 GEMM on the row-major weight (far
    more on an input-major one); below about 8 rows torch's bf16 GEMV wins, as it streams the
    weight once per row (bench/RESULTS.md, "CPU decode routes").  Every route accumulates in
    fp32."""
    K, N = w.shape
    buf = getattr(_scratch, "buf", None)
    if buf is None:
        with torch.inference_mode(False):  # a normal tensor: written inside inference mode and out
            buf = _scratch.buf = torch.empty(_SCRATCH_FLOATS, dtype=torch.float32)
    xf = x.float()
    row_major = w.stride(0) == 1 and N > 1  # w is the transpose view of a contiguous [N, K]

    def widened(c: int, n: int) -> torch.Tensor:
        if row_major:
            return buf[: n * K].view(n, K).copy_(w.t()[c : c + n]).t()
        return buf[: K * n].view(K, n).copy_(w[:, c : c + n])

    cols = max(1, min(N, _SCRATCH_FLOATS // K))
    if cols >= N:
        return torch.mm(xf, widened(0, N))
    return torch.cat([torch.mm(xf, widened(c, min(cols, N - c))) for c in range(0, N, cols)], dim=1)


class MergedLinear(Linear):
    """Several HF projections stored as row blocks of one weight.

    ``shards`` maps a shard name (e.g. "q", "k", "v") to its output size; the
    loader calls ``load_shard(name, tensor)`` for each HF tensor.  Where the layer's fused
    kernels take a RowStack (quant.keeps_row_blocks: q/k/v), quantized parts whose joined
    format would widen them stay in their own formats (quant.row_runs).
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool = False, dtype=None, device=None):
        super().__init__(in_features, sum(shards.values()), bias=bias, dtype=dtype, device=device)
        self.row_blocks = keeps_row_blocks(shards)
        self.offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for name, size in shards.items():
            self.offsets[name] = (off, size)
            off += size
        self._pending: dict[str, object] = {}  # deferred parts until all have arrived

    def load_shard(self, shard: str, tensor, is_bias: bool = False) -> None:
        off, size = self.offsets[shard]
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard}: expected {size} rows, got {tuple(tensor.shape)}")
        if is_bias:
            self.bias.data[off : off + size].copy_(tensor)
            return
        if isinstance(self.weight, nn.Parameter) and not (self.weight_policy and self.weight_policy.defer):
            if isinstance(tensor, QuantizedWeight):
                tensor = tensor.dequantize(self.weight.dtype)
            self.weight.data[off : off + size].copy_(tensor)
            return
        self._pending[shard] = tensor
        if len(self._pending) == len(self.offsets):
            parts = [self._pending.pop(s) for s in self.offsets]
            self.set_weight(_join_rows(parts, self.weight_policy, self.row_blocks))


def _join_rows(parts: list, policy, row_blocks: bool = False) -> torch.Tensor | QuantizedWeight | RowStack:
    """Row blocks as one weight: quantized parts as quant.row_runs says (one joined format,
    or a RowStack of runs) when a format holds them, else everything dense (in the policy's
    dtype)."""
    if all(isinstance(p, QuantizedWeight) for p in parts) and (policy is None or policy.keep_quantized):
        runs = row_runs([p.fmt for p in parts], [p.out_features for p in parts], parts[0].in_features, row_blocks)
        if runs is not None:
            joined = [concat_rows([parts[i] for i in idx]) if len(idx) > 1 else parts[idx[0]] for idx, _ in runs]
            return joined[0] if len(joined) == 1 else RowStack(joined)
    dtype = policy.dtype if policy is not None else next(p.dtype for p in parts if isinstance(p, torch.Tensor))
    dev = policy.device if policy is not None else None
    return torch.cat([(p.dequantize(dtype) if isinstance(p, QuantizedWeight) else p.to(dtype)).to(dev) for p in parts])


def use_cpu_weight_layout(model: nn.Module, max_head_copy_bytes: int = 512 << 20) -> None:
    """Store every dense Linear weight in the layout its dtype's CPU route wants
    (cpu_routes.py): input-major (the [out, in] parameter becomes the transpose view of a
    contiguous [in, out] tensor) or row-major; shapes and names are unchanged.

    Why: in fp32 the faster layout depends on the CPU's BLAS (by 2-3x at some
    row counts; cpu_routes.py probes it); in bf16/fp16 torch's GEMV on the row-major weight
    is the fast one-row route, natively and emulated alike (bench/RESULTS.md, "CPU decode
    routes").  With input-major weights a tied LM head (the embedding table, which lookups
    need row-major) gets an input-major copy when it is at most ``max_head_copy_bytes``, so
    the head multiplies in the same layout as the layers."""
    for mod in model.modules():
        if isinstance(mod, Linear) and isinstance(mod.weight, torch.Tensor) and mod.weight.shape[0] > 1:
            w = mod.weight.data
            mod.weight.data = w.t().contiguous().t() if cpu_routes(w.dtype).input_major else w.contiguous()
    embed = getattr(model, "embed_tokens", None)
    if getattr(model, "lm_head", 1) is None and embed is not None and isinstance(embed.weight, torch.Tensor):
        w = embed.weight
        copy = cpu_routes(w.dtype).input_major and w.numel() * w.element_size() <= max_head_copy_bytes
        model.lm_head_weight_cpu = w.detach().t().contiguous().t() if copy else None
