"""Programmatic dependent launch (PDL) for the decode chain's kernels (Hopper and newer).

A batch-1 decode step is ~200 short kernels in a row; between two of them the GPU drains
the first one's tail, then launches and ramps up the second (~1-2 µs each on an H200).
With PDL a kernel may be launched while its predecessor still runs: its programs become
resident, issue the loads that do not depend on the predecessor (weights), and block in
``gdc_wait`` until the predecessor has finished and its writes are visible.

Rules every PDL kernel here follows (they make the chain safe, also inside CUDA graphs):
  * before ``gdc_wait`` it writes nothing and reads only data no PDL kernel writes: weights,
    and what ordinary launches wrote before the chain began (the step's inputs, the KV of
    earlier tokens; a chain starts after an ordinary launch, which releases its successor
    only when it completes);
  * every program calls ``gdc_wait`` (so a kernel completes only after its predecessor
    did, which makes the ordering transitive along the chain);
  * ``gdc_launch_dependents`` comes right after the wait (``wait_for_predecessor``), so
    one kernel waits ahead of the one running; a short kernel whose successor reads only
    weights before its wait may release it first (``release_successor_then_wait``): the
    attention's merge lets o_proj start its weight loads while the attention runs.
A kernel launched without PDL (torch ops, other kernels) waits for its predecessor as
usual.  Off below compute capability 9.0 (the instructions do not exist there), with a driver
older than CUDA 12.3, under the Triton interpreter, where Triton lacks the launch option, and
in a thread that called ``set_enabled(False)`` (an engine does so on its own thread for its
``pdl`` debug switch; probes do so for A/B timings).
"""
from __future__ import annotations

import contextvars
import ctypes
import os

import torch
import triton
import triton.language as tl

try:  # triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton: the kernels never reach these (PDL off)
    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

_ENABLED = contextvars.ContextVar("localsgl_pdl_enabled", default=True)  # per thread: per engine
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")  # read once: launchers call enabled() per launch
_SUPPORTED: dict = {}


def set_enabled(enabled: bool) -> None:
    """Switch PDL on or off for the launches (and graph captures) of the calling thread that
    follow; other threads keep their own setting (on unless they switched it off)."""
    _ENABLED.set(bool(enabled))


def _triton_has_launch_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def _driver_version() -> int:
    """The CUDA driver's version (e.g. 12030), 0 when it cannot be read."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        return v.value if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 else 0
    except (OSError, AttributeError):
        return 0


MIN_DRIVER = 12030  # CUDA 12.3: PDL launches can be captured into CUDA graphs


def supported(capability_major: int, driver_version: int, triton_has_option: bool) -> bool:
    """PDL needs the griddepcontrol instructions (sm90+), a driver that captures PDL launches
    into graphs, and a Triton with the ``launch_pdl`` option."""
    return capability_major >= 9 and driver_version >= MIN_DRIVER and triton_has_option


def enabled(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` use PDL."""
    if not _ENABLED.get() or _INTERPRETED or device.type != "cuda":
        return False
    key = device.index if device.index is not None else torch.cuda.current_device()
    ok = _SUPPORTED.get(key)
    if ok is None:
        ok = supported(torch.cuda.get_device_capability(key)[0], _driver_version(), _triton_has_launch_pdl())
        _SUPPORTED[key] = ok
    return ok


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a launch: the kernel's ``PDL`` constexpr, plus Triton's
    ``launch_pdl`` option when on."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}


@triton.jit
def release_successor_then_wait(PDL: tl.constexpr):
    """Let the next kernel launch now, then block until the previous kernel's writes are
    visible (both no-ops without PDL).  Only where the next kernel reads nothing but weights
    before its own wait."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """Block until the previous kernel's writes are visible, then let the next kernel
    launch (both no-ops without PDL)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
