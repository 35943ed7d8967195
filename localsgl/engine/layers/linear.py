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
    """y = x W^T + b.  A single CPU row goes through mv: torch's CPU GEMM path for
    M == 1 streams the weight markedly slower than its GEMV (measured 1.5-4x here)."""
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
