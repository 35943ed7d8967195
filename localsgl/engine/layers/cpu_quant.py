"""Quantized weights on the CPU: how x @ Wᵀ runs for each weight format."""
from __future__ import annotations

import torch

from .quant import QuantizedWeight, matmul_ref


def cpu_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    return matmul_ref(x, w)
