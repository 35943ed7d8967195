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

With a warm cache the dry pass only re-derives what the real pass finds anyway, at the
cost of one Python forward per graph.  ``CompileRecord`` remembers, inside Triton's own
cache directory (so clearing that cache forgets it too), that a code path's variants were
compiled there: a signature of the path (its graph keys, the model's shapes) plus the
Triton and torch versions, the GPU and the source of these kernels and of the caller.  A
recorded path skips its dry pass; a variant missing all the same compiles at its first
launch, as without compile-ahead.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def _triton_cache_dir() -> Path:
    try:
        from triton import knobs

        return Path(knobs.cache.dir)
    except (ImportError, AttributeError):
        d = os.environ.get("TRITON_CACHE_DIR")
        return Path(d) if d else Path(os.path.expanduser("~/.triton/cache"))


_digests: dict[tuple[Path, ...], str] = {}


def _sources_digest(roots: tuple[Path, ...]) -> str:
    """Hash of every .py file under ``roots``: editing any makes earlier records stale."""
    if roots not in _digests:
        h = hashlib.sha256()
        for root in roots:
            for f in sorted(root.rglob("*.py")):
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
        _digests[roots] = h.hexdigest()
    return _digests[roots]


class CompileRecord:
    """Whether the Triton variants of one code path (named by ``signature``) were compiled
    into this Triton cache before.  ``source_dirs``: the code that picks the variants (these
    kernels' own directory is always included)."""

    def __init__(self, signature: str, device=None, source_dirs: tuple = ()):
        import torch
        import triton

        dev = ""
        if device is not None and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(device)
            dev = f"{props.name}/{props.major}.{props.minor}"
        roots = (Path(__file__).resolve().parent,) + tuple(Path(d).resolve() for d in source_dirs)
        key = "\n".join([signature, triton.__version__, torch.__version__, dev, _sources_digest(roots)])
        self.path = _triton_cache_dir() / "localsgl-compiled" / hashlib.sha256(key.encode()).hexdigest()

    def exists(self) -> bool:
        return self.path.is_file()

    def write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        except OSError:  # a read-only cache: compile ahead again next time
            pass
