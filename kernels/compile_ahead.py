"""Compile every Triton kernel of a code path at once, in parallel, before running it.

An engine start with a cold Triton cache spends most of its "ready" time compiling: the
decode graphs of every batch bucket need ~30 kernel variants, and a launch compiles its
variant serially on the spot (~10-17 s on an H200 host, against ~3-5 s for everything
else of the start).  Much of a compile (the MLIR passes, ptxas) runs outside the GIL, so
a thread pool finishes the same variants several times faster.

``compile_only()`` opens a window in which every Triton launch *from this thread* only
submits its variant to Triton's asynchronous compile mode (no kernel runs; torch ops still
run, on whatever the unlaunched kernels left in their outputs); leaving the window waits
for all compiles, which land in the kernel caches as if launched.  A dry pass of a code
path inside the window, then the real pass, compiles once and in parallel.

The dry pass must not let garbage reach a torch op that indexes with it (a device-side
assert kills the context): the decode graphs qualify, their index tensors are static
buffers the host zero-fills.  Without Triton's async compile mode (older Triton) the
window is a no-op and the real pass compiles as before (also with ``enabled=False``: the
engine's ``compile_ahead`` debug switch, for A/B runs).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor

_dry = contextvars.ContextVar("localsgl_compile_only", default=False)
_patch_lock = threading.Lock()
_patched = False


def _install_launch_hook() -> bool:
    """Route ``kernel[grid](...)`` to a compile-only warmup while this context is dry."""
    global _patched
    try:
        from triton.runtime import _async_compile  # noqa: F401  (triton >= 3.5)
        from triton.runtime.jit import KernelInterface
    except ImportError:
        return False
    with _patch_lock:
        if not _patched:
            launch = KernelInterface.__getitem__

            def getitem(self, grid):
                if not _dry.get():
                    return launch(self, grid)
                return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=True, **kwargs)

            KernelInterface.__getitem__ = getitem
            _patched = True
    return True


@contextlib.contextmanager
def compile_only(workers: int | None = None, enabled: bool = True):
    """Yield True inside a compile-only window (False: switched off or not supported, launches
    run normally)."""
    if not enabled or os.environ.get("TRITON_INTERPRET", "0") == "1" or not _install_launch_hook():
        yield False
        return
    from triton.runtime._async_compile import AsyncCompileMode

    workers = workers or max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool:
        with AsyncCompileMode(pool):  # exit: waits for every submitted compile (raises its error)
            token = _dry.set(True)
            try:
                yield True
            finally:
                _dry.reset(token)
