"""Model building blocks.  Each picks a Triton kernel on CUDA and a torch
composition elsewhere; the torch path is also the reference in tests."""
from __future__ import annotations

import os

import torch

_FORCE_TORCH = os.environ.get("LOCALSGL_DISABLE_KERNELS", "") not in ("", "0")


def kernels_enabled(x: torch.Tensor) -> bool:
    """True when the fused Triton kernels should run for this tensor."""
    return x.is_cuda and not _FORCE_TORCH and _kernels_importable()


_IMPORTABLE: bool | None = None


def _kernels_importable() -> bool:
    global _IMPORTABLE
    if _IMPORTABLE is None:
        try:
            import localsgl_kernels  # noqa: F401
            import triton  # noqa: F401

            _IMPORTABLE = True
        except Exception:  # pragma: no cover - triton missing
            _IMPORTABLE = False
    return _IMPORTABLE


def set_kernels_enabled(enabled: bool) -> None:
    """Tests and --disable-kernels use this to compare the two paths."""
    global _FORCE_TORCH
    _FORCE_TORCH = not enabled
