"""Linear layers with fused projections (qkv, gate_up), dense or quantized.

Weights are stored [out, in] like HF checkpoints, so loading is a copy into a
slice; fusing q/k/v and gate/up turns three (two) GEMMs into one per layer.  A layer's
``weight`` is a dense Parameter or a QuantizedWeight (quant.py); ``linear()`` dispatches on
it, so every caller handles both.  Under a deferring weight policy (weight_policy.py) the
weight is created by the first tensor loaded into it; the parts of a fused projection are
joined once all have arrived (parts in different quantized formats share the narrowest
format that holds each exactly).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import weight_policy
from .quant import QuantizedWeight, concat_rows
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
        if isinstance(value, QuantizedWeight):
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
        fmt = p.quantize if p is not None else None
        if fmt is not None and self.in_features % fmt.group(self.in_features) == 0:
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
    """y = x W^T + b.  On the CPU, a weight in the input-major layout (see
    :func:`use_cpu_weight_layout`) is multiplied as x @ W^T with W^T contiguous; a
    row-major weight takes mv for a single row: torch's CPU GEMM path for M == 1 streams
    it markedly slower than its GEMV (measured 1.5-4x here).  A QuantizedWeight multiplies
    through quant.matmul."""
    if isinstance(weight, QuantizedWeight):
        return quant_matmul(x, weight, bias)
    if not x.is_cuda and weight.dim() == 2 and weight.stride(0) == 1 and weight.shape[0] > 1:
        y = torch.matmul(x, weight.t())
        if bias is not None:
            y += bias
        return y
    if x.dim() == 2 and x.shape[0] == 1 and not x.is_cuda:
        y = torch.mv(weight, x[0])
        if bias is not None:
            y = y + bias
        return y[None]
    return F.linear(x, weight, bias)


class MergedLinear(Linear):
    """Several HF projections stored as row blocks of one weight.

    ``shards`` maps a shard name (e.g. "q", "k", "v") to its output size; the
    loader calls ``load_shard(name, tensor)`` for each HF tensor.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool = False, dtype=None, device=None):
        super().__init__(in_features, sum(shards.values()), bias=bias, dtype=dtype, device=device)
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
            self.set_weight(_join_rows(parts, self.weight_policy))


def _join_rows(parts: list, policy) -> torch.Tensor | QuantizedWeight:
    """Row blocks as one weight: quantized parts in their joined format when there is one,
    else everything dense (in the policy's dtype)."""
    if all(isinstance(p, QuantizedWeight) for p in parts) and (policy is None or policy.keep_quantized):
        try:
            return concat_rows(parts)
        except ValueError:
            pass
    dtype = policy.dtype if policy is not None else next(p.dtype for p in parts if isinstance(p, torch.Tensor))
    dev = policy.device if policy is not None else None
    return torch.cat([(p.dequantize(dtype) if isinstance(p, QuantizedWeight) else p.to(dtype)).to(dev) for p in parts])


def use_cpu_weight_layout(model: nn.Module, max_head_copy_bytes: int = 512 << 20) -> None:
    """Store every Linear weight input-major (the [out, in] parameter becomes the transpose
    view of a contiguous [in, out] tensor; shapes and names are unchanged).

    Why: with 2 cores and no AMX, x @ W^T on a contiguous W^T runs 2.5-2.8x faster than
    F.linear on the row-major weight for 32 rows in fp32, and as fast as mv for one row
    (measured on this repo's CPU machine; bench/RESULTS.md).  A tied LM head (the
    embedding table, which lookups need row-major) gets an input-major copy when it is at
    most ``max_head_copy_bytes``: one row of SmolLM2's 49k-vocabulary head then takes
    4.5 instead of 5.1 ms in fp32 and 2.3 instead of 5.2 ms in bf16."""
    for mod in model.modules():
        if isinstance(mod, Linear) and isinstance(mod.weight, torch.Tensor) and mod.weight.shape[0] > 1:
            mod.weight.data = mod.weight.data.t().contiguous().t()
    embed = getattr(model, "embed_tokens", None)
    if getattr(model, "lm_head", 1) is None and embed is not None and isinstance(embed.weight, torch.Tensor):
        w = embed.weight
        if w.numel() * w.element_size() <= max_head_copy_bytes:
            model.lm_head_weight_cpu = w.detach().t().contiguous().t()
