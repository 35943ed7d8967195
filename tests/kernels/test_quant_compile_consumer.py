"""The quantized kernels as a consumer GPU launches them compile for its architecture and fit its
shared memory: sm_86 (RTX 30xx) and sm_89 (RTX 40xx), 99 KiB a block at most.  Such a GPU has no
tuned file, so it runs the built-in tiles, the plain (unswapped) GEMM tiles, and no PDL (its
``griddepcontrol`` needs sm_90); fp8 needs sm_89.  The specs are test_quant_compile_sm90's, the
Hopper-only ones (swapped tiles, the a8 GEMM, which runs from a tuned entry only) left out."""
import pytest
import torch
from sm90_compile import can_compile, compile_all

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not can_compile(),
                                reason="a GPU runs the kernels themselves; needs Triton's bundled ptxas")

CONSUMER_SMEM = 101376  # cudaDevAttrMaxSharedMemoryPerBlockOptin of sm_86 and sm_89


def _consumer_specs(arch: int) -> dict:
    from test_quant_compile_sm90 import _specs

    out = {}
    for name, spec in _specs().items():
        if name.startswith("a8 ") or "swap_ab" in name or "swap1" in name or ("fp8" in name and arch < 89):
            continue
        consts = dict(spec["constexprs"])
        if "PDL" in consts:
            consts["PDL"] = False
        out[f"sm_{arch} {name}"] = dict(spec, constexprs=consts, arch=arch)
    return out


def test_quant_kernels_compile_for_consumer_gpus():
    specs = {**_consumer_specs(86), **_consumer_specs(89)}
    assert any(" gemm " in n and "il1 swap0" in n for n in specs)  # the built-in int4 GEMM tiles are there
    results = dict(zip(specs, compile_all(list(specs.values()), timeout=900)))
    failed = [f"{name}: {r['error']}" for name, r in results.items() if not r["ok"]]
    assert not failed, "\n".join(failed)
    big = {name: r["shared"] for name, r in results.items() if r["shared"] > CONSUMER_SMEM}
    assert not big, f"more shared memory than a consumer GPU has: {big}"
