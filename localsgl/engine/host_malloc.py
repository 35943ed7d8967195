"""The host allocator's settings for a CPU engine.

glibc gives the memory of a large freed block back to the system (an mmap'd block is
unmapped; a thread arena's heap is trimmed), so the next step's tensors of the same size
fault in fresh zeroed pages: in a batch-64 decode step of the embedded model on a 2-core box
the grammar mask alone then takes 2-3x its time (bench/RESULTS.md, structured decoding).
Keeping freed blocks in the process, up to the limits below, lets every step reuse the last
step's pages.  The price: up to TRIM_THRESHOLD of freed memory stays with each malloc arena
(a few per thread that allocates), where glibc would have returned it."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks under this come from the heap, not mmap
TRIM_THRESHOLD = 1 << 30  # free memory kept at a heap's top before it is given back
# a heap grows by this much more than asked: without it a thread's arena still faults
# ~1,000 pages a step
TOP_PAD = 64 << 20

_done = False


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process; False where there is no glibc (macOS,
    musl) or it refused.  Process-wide: call it only where this process is the engine's."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    if not ok:
        log.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    _done = ok
    return ok
