"""SiLU-and-mul: out = silu(x[..., :I]) * x[..., I:], the gated MLP's activation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels_enabled


def silu_and_mul(x: torch.Tensor, use_kernels: bool = True) -> torch.Tensor:
    if use_kernels and kernels_enabled(x, "activation"):
        from localsgl_kernels.activation import silu_and_mul as k

        return k(x)
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
