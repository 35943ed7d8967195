"""Model building blocks.  Each picks a Triton kernel on CUDA and a torch
composition elsewhere; the torch path is also the reference in tests."""
from __future__ import annotations

import os

import torch

_FORCE_TORCH = os.environ.get("LOCALSGL_DISABLE_KERNELS", "") not in ("", "0")


def kernels_enabled(x: torch.Tensor, module: str) -> bool:
    """True when the fused Triton kernel module ``localsgl_kernels.<module>`` should run for x."""
    return x.is_cuda and not _FORCE_TORCH and _kernel_importable(module)


_IMPORTABLE: dict[str, bool] = {}


def _kernel_importable(module: str) -> bool:
    ok = _IMPORTABLE.get(module)
    if ok is None:
        try:
            import importlib

            import triton  # noqa: F401

            importlib.import_module(f"localsgl_kernels.{module}")
            ok = True
        except Exception:  # triton or the kernel missing: torch path
            ok = False
        _IMPORTABLE[module] = ok
    return ok


def set_kernels_enabled(enabled: bool) -> None:
    """Tests and --disable-kernels use this to compare the two paths."""
    global _FORCE_TORCH
    _FORCE_TORCH = not enabled
