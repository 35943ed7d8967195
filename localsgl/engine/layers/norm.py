"""RMSNorm, optionally fused with the residual add: y = x / rms(x) * w, computed in fp32.

On CUDA the fused residual-add + RMSNorm kernel from localsgl_kernels replaces
the torch composition (one pass over the activations instead of four).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels_enabled


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps)).to(x.dtype) * weight


class RMSNorm(nn.Module):
    use_kernels = True  # the engine's kernels switch (debug_switches.apply_to_model)

    def __init__(self, hidden_size: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: return norm(x).  With residual: r = x + residual;
        return (norm(r), r) so the next layer can add onto r."""
        if self.use_kernels and kernels_enabled(x, "rmsnorm"):
            from localsgl_kernels.rmsnorm import fused_add_rmsnorm, rmsnorm

            if residual is None:
                return rmsnorm(x, self.weight, self.eps)
            return fused_add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        r = x + residual
        return self._norm(r), r

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # fp32: torch's fused rms_norm is one op instead of eight (the CPU step is bound by
        # per-op overhead) and gives the same bits as rms_norm_ref (checked in tests); other
        # dtypes keep the reference, which rounds before the weight multiply as HF does.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return rms_norm_ref(x, self.weight, self.eps)
