"""compile_only(): inside the window a launch from this thread compiles its variant but does not
run; leaving the window finishes the compiles, and the next launch runs without compiling again.
Launches from other threads run normally meanwhile.  Under the interpreter (CPU) the window is
a no-op: launches run."""
import threading

import pytest
import torch
import triton
import triton.language as tl
from kutil import DEV

from localsgl_kernels.compile_ahead import compile_only


@triton.jit
def _fill_kernel(X, value, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, value, mask=offs < n)


def _fill(x, value, block):
    _fill_kernel[(triton.cdiv(x.numel(), block),)](x, value, x.numel(), BLOCK=block)


def _variants(kernel) -> int:
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


def test_interpreter_window_runs_launches():
    if DEV == "cuda":
        pytest.skip("the GPU test below covers compile-only launches")
    x = torch.zeros(10, device=DEV)
    with compile_only() as dry:
        _fill(x, 3.0, 16)
    assert not dry
    assert torch.equal(x, torch.full_like(x, 3.0))


def test_window_compiles_without_running():
    if DEV != "cuda":
        pytest.skip("needs a GPU (the interpreter has no compile step)")
    x = torch.zeros(1000, device=DEV)
    other = torch.zeros(1000, device=DEV)
    before = _variants(_fill_kernel)
    with compile_only(workers=4) as dry:
        assert dry
        for block in (64, 128, 256):  # three fresh variants
            _fill(x, 5.0, block)
        t = threading.Thread(target=_fill, args=(other, 2.0, 512))  # not dry: runs
        t.start()
        t.join()
        torch.cuda.synchronize()
        assert torch.count_nonzero(x).item() == 0  # nothing of this thread ran
    assert torch.equal(other, torch.full_like(other, 2.0))
    compiled = _variants(_fill_kernel)
    assert compiled == before + 4
    for block in (64, 128, 256):
        x.zero_()
        _fill(x, float(block), block)
        torch.cuda.synchronize()
        assert torch.equal(x, torch.full_like(x, float(block)))
    assert _variants(_fill_kernel) == compiled  # the window's compiles were used, none added
