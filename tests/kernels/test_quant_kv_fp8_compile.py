"""The FP8-KV kernels compile for sm_90 (Hopper) with e4m3 conversions in their PTX: the KV
store, both decode stage-1 paths (and their bf16-pool variants, which share the helpers), the
shared-prefix stage and the extend kernel (the CPU tests
run them under the interpreter only, which type-checks less than the compiler)."""
import pytest
import torch
from sm90_compile import can_compile, compile_all

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not can_compile(),
                                reason="a GPU runs the kernels themselves; needs Triton's bundled ptxas")

FP8 = "*fp8e4nv"
SCALES = dict(KS="*fp32", VS="*fp32")
SPECS = {
    "store": dict(kernel="localsgl_kernels.kv_store:_store_kv_kernel",
                  pointers=dict(KC=FP8, VC=FP8, Loc="*i64", K="*bf16", V="*bf16", **SCALES),
                  constexprs=dict(BLOCK_H=8, BLOCK_D=128, FP8=True)),
    **{f"decode_early_{e}_fp8_{f}": dict(
        kernel="localsgl_kernels.decode_attention:_decode_stage1",
        pointers=dict(Q="*bf16", K=FP8 if f else "*bf16", V=FP8 if f else "*bf16", ReqToToken="*i32", ReqIdx="*i64",
                      SeqLens="*i32", Start="*i32", PartO="*fp32", PartLse="*fp32", **SCALES),
        constexprs=dict(G=4, HEAD_DIM=128, BLOCK_H=16, BLOCK_D=128, BLOCK_N=64, NUM_SPLITS=16, MIN_CHUNK=64,
                        HAS_START=not e, EARLY_KV=e, KV_FP8=f, PDL=True),
        scalars=dict(sm_scale_log2="fp32")) for e in (True, False) for f in (True, False)},
    "prefix": dict(kernel="localsgl_kernels.decode_attention:_prefix_stage",
                   pointers=dict(Q="*bf16", K=FP8, V=FP8, ReqToToken="*i32", ReqIdx="*i64", Start="*i32",
                                 GroupRows="*i32", PrefO="*fp32", PrefLse="*fp32", **SCALES),
                   constexprs=dict(G=4, HEAD_DIM=128, MAX_ROWS=16, BLOCK_M=64, BLOCK_D=128, BLOCK_N=64,
                                   PREFIX_SPLITS=16, MIN_CHUNK=64, KV_FP8=True, PDL=True),
                   scalars=dict(sm_scale_log2="fp32")),
    "extend": dict(kernel="localsgl_kernels.extend_attention:_extend_kernel",
                   pointers=dict(Q="*bf16", K=FP8, V=FP8, O="*bf16", ReqToToken="*i32", ReqIdx="*i64",
                                 PrefixLens="*i32", ExtendLens="*i32", ExtendStart="*i32", WorkReq="*i32",
                                 WorkTok="*i32", **SCALES),
                   constexprs=dict(G=4, TOK=64, HEAD_DIM=128, BLOCK_M=256, BLOCK_N=64, BLOCK_D=128, V_EARLY=False,
                                   KV_FP8=True, EXP16=True),
                   scalars=dict(qk_scale="fp32"), num_warps=8, num_stages=3),
}


def test_fp8_kv_kernels_compile_for_sm90():
    """Both variants of the decode stage (the bf16 pool's too: the FP8 code shares its helpers)."""
    widen = "cvt.rn.f16x2.e4m3x2"  # e4m3 -> fp16, two values an instruction
    specs = [dict(s, ptx_needles=["e4m3", widen, "cvt.rn.bf16"]) for s in SPECS.values()]
    for name, r in zip(SPECS, compile_all(specs)):
        assert r["ok"], f"{name}: {r['error']}"
        fp8 = SPECS[name]["constexprs"].get("KV_FP8", SPECS[name]["constexprs"].get("FP8"))
        assert r["ptx_has"]["e4m3"] == fp8, f"{name}: e4m3 conversions {'missing' if fp8 else 'present'}"
        if fp8 and name.startswith("decode"):  # the keys and values widened to fp16, not on to bf16
            assert r["ptx_has"][widen] and not r["ptx_has"]["cvt.rn.bf16"], f"{name}: {r['ptx_has']}"
    # the store divides IEEE-rounded, as torch does, so the GPU writes the reference's bits
    store = compile_all([dict(SPECS["store"], ptx_needles=["div.rn.f32", "div.full.f32", "div.approx"])])[0]
    assert store["ptx_has"] == {"div.rn.f32": True, "div.full.f32": False, "div.approx": False}
