"""Model building blocks.  Each picks a Triton kernel on CUDA and a torch
composition elsewhere; the torch path is also the reference in tests.  A layer with a
``use_kernels`` attribute takes the engine's ``kernels`` debug switch
(debug_switches.apply_to_model); False keeps it on the torch path on the GPU too."""
from __future__ import annotations

import torch


def kernels_enabled(x: torch.Tensor, module: str) -> bool:
    """True when the fused Triton kernel module ``localsgl_kernels.<module>`` can run for x."""
    return x.is_cuda and _kernel_importable(module)


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
