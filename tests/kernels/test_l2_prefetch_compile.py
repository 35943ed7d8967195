"""The decode attention's stage 1 and the quantized GEMVs' activation preparation compile for
sm_90 with L2 prefetches of the next GEMV's weights (kernels/l2_prefetch.py: inline PTX, which
the interpreter cannot run, so CPU tests see these kernels only without them), and without
them when they are off."""
import pytest
import torch
from sm90_compile import can_compile, compile_all

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not can_compile(),
                                reason="a GPU runs the kernels themselves; needs Triton's bundled ptxas")


def _stage1(prefetch: bool, early: bool) -> dict:
    return dict(
        kernel="localsgl_kernels.decode_attention:_decode_stage1",
        pointers=dict(Q="*bf16", K="*bf16", V="*bf16", KS="*fp32", VS="*fp32", ReqToToken="*i32", ReqIdx="*i64",
                      SeqLens="*i32", Start="*i32", PartO="*fp32", PartLse="*fp32", P0="*u8", P1="*u8", P2="*u8"),
        constexprs=dict(G=4, HEAD_DIM=128, BLOCK_H=16, BLOCK_D=128, BLOCK_N=64, NUM_SPLITS=32, MIN_CHUNK=64,
                        HAS_START=False, EARLY_KV=early, KV_FP8=False, PDL=True, PREFETCH=prefetch),
        scalars=dict(sm_scale_log2="fp32"), ptx_needles=["prefetch.global.L2", "griddepcontrol.wait"])


def test_stage1_prefetches_only_when_asked():
    cases = [(p, e) for p in (True, False) for e in (True, False)]
    for (prefetch, early), r in zip(cases, compile_all([_stage1(p, e) for p, e in cases])):
        assert r["ok"], f"prefetch={prefetch} early={early}: {r['error']}"
        assert r["ptx_has"]["prefetch.global.L2"] == prefetch, (prefetch, early, r["ptx_has"])
        assert r["ptx_has"]["griddepcontrol.wait"], (prefetch, early)


def _prep(pf_progs: int) -> dict:
    return dict(
        kernel="localsgl_kernels.quant_words:_prep_act_kernel",
        pointers=dict(X="*bf16", R="*bf16", G="*bf16", ROut="*bf16", XP="*i32", XS="*fp32", XP2="*i32", XS2="*fp32",
                      Z="*fp32", P0="*u8", P1="*u8", P2="*u8"), div16=["K"], scalars=dict(eps="fp32"), num_warps=8,
        constexprs=dict(E=8, HAS_RES=True, NORM=True, BLOCK=4096, PDL=True, ONE_PASS=True, BK=1024, INT8=True,
                        PF_PROGS=pf_progs, PF_LANES=256),
        ptx_needles=["prefetch.global.L2", "griddepcontrol.wait"])


def test_preparation_prefetches_only_with_programs_for_it():
    for pf_progs, r in zip((64, 0), compile_all([_prep(64), _prep(0)])):
        assert r["ok"], f"PF_PROGS={pf_progs}: {r['error']}"
        assert r["ptx_has"] == {"prefetch.global.L2": pf_progs > 0, "griddepcontrol.wait": True}, (pf_progs, r)
