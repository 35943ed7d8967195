"""Dense linear layers with fused projections (qkv, gate_up).

Weights are stored [out, in] like HF checkpoints, so loading is a copy into a
slice; fusing q/k/v and gate/up turns three (two) GEMMs into one per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b.  On the CPU, a weight in the input-major layout (see
    :func:`use_cpu_weight_layout`) is multiplied as x @ W^T with W^T contiguous; a
    row-major weight takes mv for a single row: torch's CPU GEMM path for M == 1 streams
    it markedly slower than its GEMV (measured 1.5-4x here)."""
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

    def load_shard(self, shard: str, tensor: torch.Tensor, is_bias: bool = False) -> None:
        off, size = self.offsets[shard]
        target = self.bias if is_bias else self.weight
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard}: expected {size} rows, got {tuple(tensor.shape)}")
        target.data[off : off + size].copy_(tensor)


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
        if isinstance(mod, Linear) and mod.weight.shape[0] > 1:
            mod.weight.data = mod.weight.data.t().contiguous().t()
    embed = getattr(model, "embed_tokens", None)
    if getattr(model, "lm_head", 1) is None and embed is not None:
        w = embed.weight
        if w.numel() * w.element_size() <= max_head_copy_bytes:
            model.lm_head_weight_cpu = w.detach().t().contiguous().t()
