"""The quantized GEMV / GEMM kernels compile for sm_90 (Hopper) in every format the engine
launches them with at the Llama-3.1-8B shape: int4 group 128 (quantize's default) and group 32
with offsets (GGUF Q4_K), int8 per row and group 16 with offsets (GGUF Q6_K), fp8 per row; the
fused norm + gate/up and norm + qkv + rotary + KV store GEMVs (fp8 also through the dense full-K ones, with their fp16 products); the tile sweep's GEMV variants
(split-K and its sum, int4 / int8 as int32 words, over activations prepared by a kernel first); the GEMM in its three tile configurations,
the sweep's int4 GEMM variants and the swapped tile (the weight the warpgroup MMA's register operand); the
few-row matmul (quant_rows) and its activations' preparation; the int4 x int8-activation GEMM
(quant_a8) and its preparation; decode attention's merge writing a GEMV's int8 activations.  The CPU tests run them under the interpreter only, which type-checks less."""
import pytest
import torch
from sm90_compile import can_compile, compile_all

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not can_compile(),
                                reason="a GPU runs the kernels themselves; needs Triton's bundled ptxas")

INT8, INT4, FP8 = 0, 1, 2
# (label, KIND, qweight type, scale type, GROUP, SYM, ROW_SCALE, BLOCK_K of the GEMV)
FORMATS = [
    ("int4 g128", INT4, "*u8", "*fp16", 128, False, False, 256),
    ("int4 g32 (Q4_K)", INT4, "*u8", "*fp16", 32, False, False, 256),
    ("int8 row", INT8, "*i8", "*fp16", 4096, True, True, 128),
    ("int8 g16 (Q6_K)", INT8, "*i8", "*fp16", 16, False, False, 128),
    ("fp8 row", FP8, "*fp8e4nv", "*fp32", 4096, True, True, 128),
]


def _weight_meta(kind, group, sym, row_scale, block_k, block_r=8, words=False, prep=False):
    return dict(KIND=kind, GROUP=group, SYM=sym, ROW_SCALE=row_scale, BLOCK_R=block_r, BLOCK_K=block_k, PDL=True,
                WORDS=words, LOG2G=group.bit_length() - 1 if words and not row_scale else 0, PREP=prep)


def _gemv(qt, st, meta, split=1, warps=4, ptx_needles=()):
    # prepared activations are fp32 (words == 2) or int8 in int32 words with fp32 scales (3)
    act = {0: "*bf16", 1: "*fp32", 2: "*i32"}[int(meta["PREP"])]
    return dict(kernel="localsgl_kernels.quant_gemv:_qgemv_kernel",
                pointers=dict(X=act, XS="*fp32" if meta["PREP"] else act, Out="*bf16", Part="*fp32", QW=qt, S=st,
                              Mn=st), div16=["K", "N"],
                constexprs=dict(SPLIT=split, **meta), num_warps=warps, num_stages=1, ptx_needles=list(ptx_needles))


def _specs():
    specs = {}
    for label, kind, qt, st, group, sym, row, bk in FORMATS:
        specs[f"gemv {label}"] = _gemv(qt, st, _weight_meta(kind, group, sym, row, bk))
    # the sweep's variants: split-K (fp32 partials, then their sum), int4 as int32 words
    specs["gemv int8 row split 4"] = _gemv("*i8", "*fp16", _weight_meta(INT8, 4096, True, True, 512, 4), split=4)
    specs["sum of splits"] = dict(kernel="localsgl_kernels.quant_gemv:_sum_splits_kernel",
                                  pointers=dict(Part="*fp32", Out="*bf16"), div16=["N"],
                                  constexprs=dict(SPLIT=4, BLOCK=1024, PDL=True))
    for label, group, sym, r, bk, warps, split in (("g128", 128, False, 32, 512, 4, 1), ("g32 (Q4_K)", 32, False, 16, 1024, 8, 1),
                                                   ("g32 sym", 32, True, 8, 512, 4, 1), ("g128", 128, False, 16, 512, 4, 4)):
        specs[f"gemv int4 {label} words {r}x{bk} split {split}"] = _gemv(
            "*i32", "*fp16", _weight_meta(INT4, group, sym, False, bk, r, words=True), split=split, warps=warps)
    specs["gemv int8 row words"] = _gemv("*i32", "*fp16", _weight_meta(INT8, 4096, True, True, 512, 16, True), warps=8)
    specs["gemv int8 g16 asym words"] = _gemv("*i32", "*fp16", _weight_meta(INT8, 16, False, False, 512, 16, True))
    # words over prepared activations (words == 2): the preparing kernel and the GEMVs reading its output
    for label, e, norm, one_pass, e2 in (("int4, norm + residual", 8, True, False, 0), ("int8, plain", 4, False, False, 0),
                                         ("int4, norm + residual, one pass", 8, True, True, 0),
                                         ("int4 + int8 words, norm + residual, one pass", 8, True, True, 4),
                                         ("int4 + int8 words, norm + residual", 8, True, False, 4)):
        specs[f"prepare activations {label}"] = dict(
            kernel="localsgl_kernels.quant_words:_prep_act_kernel",
            pointers=dict(X="*bf16", R="*bf16", G="*bf16", ROut="*bf16", XP="*fp32", XS="*fp32", XP2="*fp32",
                          XS2="*fp32"), div16=["K"],
            scalars=dict(eps="fp32"), num_warps=8 if one_pass else 4,
            constexprs=dict(E=e, HAS_RES=norm, NORM=norm, BLOCK=4096 if one_pass else 1024, PDL=True, ONE_PASS=one_pass,
                            E2=e2, BK2=512))
    # int8 activations against dp4a (words == 3): their preparation and the GEMVs (inline PTX)
    for label, e, one_pass, e2 in (("int4, one pass", 8, True, 0), ("int8", 4, False, 0),
                                   ("int4 + int8, one pass", 8, True, 4)):
        specs[f"prepare int8 activations {label}"] = dict(
            kernel="localsgl_kernels.quant_words:_prep_act_kernel",
            pointers=dict(X="*bf16", R="*bf16", G="*bf16", ROut="*bf16", XP="*i32", XS="*fp32", XP2="*i32",
                          XS2="*fp32"), div16=["K"], scalars=dict(eps="fp32"), num_warps=8 if one_pass else 4,
            constexprs=dict(E=e, HAS_RES=True, NORM=True, BLOCK=4096 if one_pass else 1024, PDL=True,
                            ONE_PASS=one_pass, BK=1024, INT8=True, E2=e2, BK2=512))
    specs["gemv int4 g128 int8 activations 8x1024"] = _gemv(
        "*i32", "*fp16", _weight_meta(INT4, 128, False, False, 1024, 8, True, 2), ptx_needles=["dp4a.u32.s32"])
    specs["gemv int8 g16 int8 activations"] = _gemv("*i32", "*fp16", _weight_meta(INT8, 16, True, False, 512, 8, True, 2),
                                                     ptx_needles=["dp4a.s32.s32"])
    specs["gemv int4 g128 prepared 8x1024 split 2"] = _gemv(
        "*i32", "*fp16", _weight_meta(INT4, 128, False, False, 1024, 8, True, True), split=2)
    # two K halves added atomically into the fp32 output (fused decode's fp32 sums), which the
    # preparation (programs of 1,024 columns: no norm before o_proj / down_proj) zeroes
    halves = _gemv("*i32", "*fp16", _weight_meta(INT4, 128, False, False, 1024, 8, True, 2), split=2,
                   ptx_needles=["red.global.gpu.relaxed.add.f32"])
    halves["pointers"]["Out"] = "*fp32"
    halves["constexprs"]["ATOMIC"] = True
    specs["gemv int4 g128 int8 activations split 2 atomic"] = halves
    specs["prepare int8 activations, zeroing the GEMV's output"] = dict(
        kernel="localsgl_kernels.quant_words:_prep_act_kernel",
        pointers=dict(X="*fp32", R="*bf16", G="*bf16", ROut="*bf16", XP="*i32", XS="*fp32", XP2="*i32",
                      XS2="*fp32", Z="*fp32"), div16=["K"], scalars=dict(eps="fp32"), num_warps=4,
        constexprs=dict(E=8, HAS_RES=False, NORM=False, BLOCK=1024, PDL=True, BK=1024, INT8=True, ZERO=True))
    specs["gemv int8 g16 asym prepared"] = _gemv("*i32", "*fp16", _weight_meta(INT8, 16, False, False, 512, 8, True, True))
    label, kind, qt, st, group, sym, row, bk = FORMATS[0]
    for words, prep in ((False, False), (True, False), (True, True)):
        w = dict(QW="*i32" if words else qt, S=st, Mn=st)
        act = "*fp32" if prep else "*bf16"
        name = " prepared" if prep else " words" if words else ""
        meta = _weight_meta(kind, group, sym, row, bk, 8 * (1 + 3 * words), words, prep)
        specs[f"norm_gate_up int4 g128{name}"] = dict(
            kernel="localsgl_kernels.quant_gemv:_qnorm_gate_up_kernel",
            pointers=dict(X=act, R=act, G="*bf16", ROut="*bf16", Out="*bf16", **w), div16=["K", "I"],
            scalars=dict(eps="fp32"), constexprs=meta)
        specs[f"norm_qkv int4 g128{name}"] = dict(
            kernel="localsgl_kernels.quant_gemv:_qnorm_qkv_kernel",
            pointers=dict(X=act, R=act, G="*bf16", ROut="*bf16", Bias="*bf16", CS="*fp32", Pos="*i64",
                          Loc="*i64", Q="*bf16", KC="*bf16", VC="*bf16", **w), div16=["K"],
            scalars=dict(eps="fp32"),
            constexprs=dict(HQ=32, HKV=8, D=128, HAS_RES=True, HAS_BIAS=False, **meta))
    # a two-block row stack in one launch (a GGUF Q4_K_M layer whose v is Q6_K): int4 g32 with
    # offsets over prepared activations (fp32 planes or int8), then int8 g16 words over the raw
    # ones or over a second layout of the same preparation
    acts = {0: ("*bf16", "*bf16"), 1: ("*fp32", "*fp32"), 2: ("*i32", "*fp32")}  # (X, R) by preparation
    for label, prep, prep2 in (("prepared + int8 g16 words", 1, 0), ("prepared + int8 g16 words prepared", 1, 1),
                               ("int8 activations + int8 g16 int8 activations", 2, 2)):
        specs[f"norm_qkv row stack int4 g32 {label}"] = dict(
            kernel="localsgl_kernels.quant_gemv:_qnorm_qkv_kernel",
            pointers=dict(X=acts[prep][0], R=acts[prep][1], G="*bf16", ROut="*bf16", Bias="*bf16", CS="*fp32",
                          Pos="*i64", Loc="*i64", Q="*bf16", KC="*bf16", VC="*bf16", QW="*i32", S="*fp16", Mn="*fp16",
                          X2=acts[prep2][0], R2=acts[prep2][1], QW2="*i32", S2="*fp16", Mn2="*fp16"), div16=["K"],
            scalars=dict(eps="fp32"),
            constexprs=dict(HQ=32, HKV=8, D=128, HAS_RES=True, HAS_BIAS=False,
                            **_weight_meta(INT4, 32, False, False, 1024, 8, True, prep), TWO=True, KIND2=INT8,
                            GROUP2=16, SYM2=True, ROW_SCALE2=False, BLOCK_K2=512, WORDS2=True, LOG2G2=4,
                            PREP2=prep2))
    # the weights a step ahead (AHEAD, a words tile of 2 stages; 3: two steps): the plain GEMV in two K halves,
    # norm + gate/up, and the Q4_K_M row stack of q/k/v
    ahead = _gemv("*i32", "*fp16", dict(_weight_meta(INT4, 128, False, False, 1024, 8, True, 2), AHEAD=1), split=2)
    specs["gemv int4 g128 int8 activations, weights a step ahead"] = ahead
    specs["norm_gate_up int4 g128 int8 activations, weights a step ahead"] = dict(
        specs["norm_gate_up int4 g128 prepared"], pointers=dict(specs["norm_gate_up int4 g128 prepared"]["pointers"],
                                                               X="*i32", R="*fp32"),
        constexprs=dict(_weight_meta(INT4, 128, False, False, 1024, 8, True, 2), AHEAD=1))
    specs["gemv int4 g128 int8 activations, weights two steps ahead"] = _gemv(
        "*i32", "*fp16", dict(_weight_meta(INT4, 128, False, False, 1024, 8, True, 2), AHEAD=2), split=2)
    stack = specs["norm_qkv row stack int4 g32 int8 activations + int8 g16 int8 activations"]
    specs["norm_qkv row stack, weights a step ahead"] = dict(stack, constexprs=dict(stack["constexprs"], AHEAD=1))
    # the GEMM's built-in tiles (quant_gemm.builtin_config: <= 16 rows, <= 64, larger), as sm_90
    # gets them and as older GPUs do, the 40-row ones split in two
    from localsgl_kernels.quant_gemm import builtin_config

    for rows in (5, 40, 100):
        for sm90 in (True, False):
            for label, kind, qt, st, group, sym, row, _ in (FORMATS[0], FORMATS[2], FORMATS[3], FORMATS[4]):
                c = builtin_config(rows, {INT4: "int4", INT8: "int8", FP8: "fp8"}[kind], sm90)
                c = c._replace(split_k=2 if rows == 40 and kind != FP8 else 1)  # quant_gemm.fill_split's
                bk = c.block_k if row else max(c.block_k, group)
                specs[f"gemm {label} {c.block_m}x{c.block_n}x{bk} il{c.interleave} swap{c.swap_ab} split{c.split_k}"] = dict(
                    kernel="localsgl_kernels.quant_gemm:_qgemm_kernel",
                    pointers=dict(X="*bf16", QW=qt, S=st, Mn=st, Y="*bf16", XS="*bf16"), div16=["N", "K"],
                    constexprs=dict(KIND=kind, GROUP=group, SYM=sym, ROW_SCALE=row, BLOCK_M=c.block_m,
                                    BLOCK_N=c.block_n, BLOCK_K=bk, GROUP_M=c.group_m, PREC="tf32",
                                    INTERLEAVE=bool(c.interleave), SCALE_AFTER=False, BIAS_BITS=0,
                                    SWAP_AB=bool(c.swap_ab), SPLIT=c.split_k),
                    num_warps=c.num_warps, num_stages=c.num_stages)
    # wide steps (one load and one dot a step, the group scales gathered): a Q4_K_M file's int4 g32
    # and int8 g16 parts, swapped at 64 rows
    for label, kind, qt, st, group, sym, row, _ in (FORMATS[1], FORMATS[3]):
        specs[f"gemm {label} 64x64x128 swap_ab wide"] = dict(
            kernel="localsgl_kernels.quant_gemm:_qgemm_kernel",
            pointers=dict(X="*bf16", QW=qt, S=st, Mn=st, Y="*bf16", XS="*bf16"), div16=["N", "K"],
            constexprs=dict(KIND=kind, GROUP=group, SYM=sym, ROW_SCALE=row, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128,
                            GROUP_M=4, PREC="tf32", INTERLEAVE=kind == INT4, SCALE_AFTER=False, BIAS_BITS=0,
                            SWAP_AB=True, WIDE=True),
            num_warps=4, num_stages=3)
    # the sweep's int4 variants: interleaved nibbles; the nibbles as bf16 128 + u, scaled after the dot
    for bn, warps, scale_after in ((32, 4, False), (128, 8, True)):
        specs[f"gemm int4 g128 16x{bn}x256 {'scale after' if scale_after else 'interleaved'}"] = dict(
            kernel="localsgl_kernels.quant_gemm:_qgemm_kernel",
            pointers=dict(X="*bf16", QW="*u8", S="*fp16", Mn="*fp16", Y="*bf16", XS="*bf16"), div16=["N", "K"],
            constexprs=dict(KIND=INT4, GROUP=128, SYM=False, ROW_SCALE=False, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=256,
                            GROUP_M=1, PREC="tf32", INTERLEAVE=True, SCALE_AFTER=scale_after,
                            BIAS_BITS=0x4300 if scale_after else 0, SWAP_AB=False),
            num_warps=warps, num_stages=2)
    # swap-AB: accᵀ = w·xᵀ, BLOCK_N the dot's M (64 per warpgroup), BLOCK_M its N (16 or 64 rows)
    for (label, kind, qt, st, group, sym, row, _), il, sa in ((FORMATS[0], True, False), (FORMATS[1], False, False),
                                                             (FORMATS[3], False, False), (FORMATS[4], False, False),
                                                             (FORMATS[0], True, True)):
        for bm, bn, bk, warps in ((64, 64, 128, 4), (16, 128, 256, 8)):
            specs[f"gemm {label} {bm}x{bn}x{bk} swap_ab{' scale after' if sa else ''}"] = dict(
                kernel="localsgl_kernels.quant_gemm:_qgemm_kernel",
                pointers=dict(X="*bf16", QW=qt, S=st, Mn=st, Y="*bf16", XS="*bf16"), div16=["N", "K"],
                constexprs=dict(KIND=kind, GROUP=group, SYM=sym, ROW_SCALE=row, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                GROUP_M=4 if bm == 64 else 1, PREC="tf32", INTERLEAVE=il, SCALE_AFTER=sa,
                                BIAS_BITS=0x4300 if sa else 0, SWAP_AB=True),
                num_warps=warps, num_stages=2)
    # int4 read as int32 words, two nibbles to two bf16 per lop3 (inline PTX), plain and swapped
    for bm, bn, bk, warps, swap in ((64, 64, 128, 4, False), (64, 64, 128, 4, True), (16, 128, 256, 8, True)):
        specs[f"gemm int4 g128 {bm}x{bn}x{bk} words{' swap_ab' if swap else ''}"] = dict(
            kernel="localsgl_kernels.quant_gemm:_qgemm_kernel",
            pointers=dict(X="*bf16", QW="*i32", S="*fp16", Mn="*fp16", Y="*bf16", XS="*fp32"), div16=["N", "K"],
            constexprs=dict(KIND=INT4, GROUP=128, SYM=False, ROW_SCALE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                            GROUP_M=4, PREC="tf32", INTERLEAVE=False, SCALE_AFTER=False, BIAS_BITS=0x4300,
                            SWAP_AB=swap, WORDS=True, ASM=True),
            num_warps=warps, num_stages=3, ptx_needles=["lop3.b32"])
    # int4 dequantized in bf16 / fp16 pairs (packed FMA, inline PTX)
    for dt, swap in (("bf16", True), ("fp16", False)):
        specs[f"gemm int4 g128 64x64x128 half math {dt}{' swap_ab' if swap else ''}"] = dict(
            kernel="localsgl_kernels.quant_gemm:_qgemm_kernel",
            pointers=dict(X=f"*{dt}", QW="*u8", S="*fp16", Mn="*fp16", Y=f"*{dt}", XS=f"*{dt}"), div16=["N", "K"],
            constexprs=dict(KIND=INT4, GROUP=128, SYM=False, ROW_SCALE=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128,
                            GROUP_M=4, PREC="tf32", INTERLEAVE=True, SCALE_AFTER=False,
                            BIAS_BITS=0x4300 if dt == "bf16" else 0x6400, SWAP_AB=swap, ASM=True, HALF_MATH=True),
            num_warps=4, num_stages=3, ptx_needles=["fma.rn.bf16x2" if dt == "bf16" else "fma.rn.f16x2"])
    # split-K: fp32 partials per K slice (the 64-row down_proj tile, swapped and scaled after)
    specs["gemm int4 g128 32x64x128 swap_ab scale after split 4"] = dict(
        kernel="localsgl_kernels.quant_gemm:_qgemm_kernel",
        pointers=dict(X="*bf16", QW="*u8", S="*fp16", Mn="*fp16", Y="*fp32", XS="*bf16"), div16=["N", "K"],
        constexprs=dict(KIND=INT4, GROUP=128, SYM=False, ROW_SCALE=False, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128,
                        GROUP_M=4, PREC="tf32", INTERLEAVE=False, SCALE_AFTER=True, BIAS_BITS=0x4300, SWAP_AB=True,
                        SPLIT=4),
        num_warps=4, num_stages=3)
    # fp8 with row scales through the dense GEMVs (gemv.py; quant_gemv._dense_tiles)
    fullk = dict(K=4096, K_PAD=4096, BLOCK_R=4, PDL=True, ROW_SCALE=True)
    specs["fp8 row full-K gate_up"] = dict(
        kernel="localsgl_kernels.gemv:_norm_gate_up_fullk_kernel",
        pointers=dict(X="*bf16", R="*bf16", G="*bf16", ROut="*bf16", W="*fp8e4nv", Out="*bf16", S="*fp32"),
        div16=["I"], scalars=dict(eps="fp32"), constexprs=fullk, num_warps=8)
    specs["fp8 row full-K qkv"] = dict(
        kernel="localsgl_kernels.gemv:_norm_qkv_fullk_kernel",
        pointers=dict(X="*bf16", R="*bf16", G="*bf16", ROut="*bf16", W="*fp8e4nv", Bias="*bf16", CS="*fp32",
                      Pos="*i64", Loc="*i64", Q="*bf16", KC="*bf16", VC="*bf16", S="*fp32"),
        scalars=dict(eps="fp32"), constexprs=dict(HQ=32, HKV=8, D=128, HAS_RES=True, HAS_BIAS=False, **fullk),
        num_warps=8)
    specs["fp8 row full-K gemv"] = dict(
        kernel="localsgl_kernels.gemv:_gemv_fullk_kernel",
        pointers=dict(X="*bf16", W="*fp8e4nv", Out="*bf16", S="*fp32"), constexprs=dict(AHEAD=2, **fullk),
        num_warps=16)
    for key in ("gate_up", "qkv", "gemv"):  # the e4m3 x fp16 products (gemv_tiles.E4M3_FP16)
        spec = specs[f"fp8 row full-K {key}"]
        specs[f"fp8 row full-K {key} fp16 products"] = dict(spec, constexprs=dict(spec["constexprs"], F16=True),
                                                            ptx_needles=["fma.rn.f16x2"], sass_mix=True)
    specs["fp8 row K-loop gemv"] = dict(  # fma.rn.f32: compiled with options.FMA, its products and sums contract
        kernel="localsgl_kernels.gemv:_gemv_kernel", pointers=dict(X="*bf16", W="*fp8e4nv", Out="*bf16", S="*fp32"),
        div16=["K"], constexprs=dict(BLOCK_R=8, BLOCK_K=1024, PDL=True, ROW_SCALE=True), num_warps=8,
        ptx_needles=["fma.rn.f32"])
    # fp8 e4m3 rows for torch._scaled_mm (fp8 prefill and batches): the correctly rounded division
    specs["fp8 rows"] = dict(kernel="localsgl_kernels.fp8_rows:_fp8_rows_kernel",
                             pointers=dict(X="*bf16", Q="*fp8e4nv", S="*fp32"), div16=["K", "stride_x", "stride_q"],
                             constexprs=dict(BLOCK=2048), num_warps=8)
    # the few-row matmul (quant_rows) over its rows' int8 activations, and that preparation
    # (int4 and int8, symmetric and with offsets, grouped and row-scaled)
    rows_formats = [(f[0], f[1], f[4], f[5], f[6]) for f in FORMATS[:4]] + [
        ("int4 g128 sym", INT4, 128, True, False), ("int8 g32 (Q5_K)", INT8, 32, False, False)]
    for (label, kind, group, sym, row_scale), mp in zip(rows_formats, (8, 2, 4, 8, 4, 2)):
        specs[f"rows {label} x{mp}"] = dict(
            kernel="localsgl_kernels.quant_rows:_rows_kernel",
            pointers=dict(XQ="*i32", XS="*fp32", QW="*i32", S="*fp16", Mn="*fp16", Y="*bf16"),
            div16=["K"], constexprs=dict(KIND=kind, LOG2G=0 if row_scale else group.bit_length() - 1, SYM=sym,
                                         ROW_SCALE=row_scale, MP=mp, BLOCK_R=16, BLOCK_K=1024),
            num_warps=4, num_stages=2, ptx_needles=["dp4a"])
    # the weight words one / two steps ahead (a rows tile of 2 / 3 stages)
    for label, mp, ahead in (("int4 g128 asym", 8, 1), ("int4 g128 asym", 4, 2), ("int8 g16", 4, 2)):
        kind, group = (INT4, 128) if label.startswith("int4") else (INT8, 16)
        specs[f"rows {label} x{mp} ahead {ahead}"] = dict(
            kernel="localsgl_kernels.quant_rows:_rows_kernel",
            pointers=dict(XQ="*i32", XS="*fp32", QW="*i32", S="*fp16", Mn="*fp16", Y="*bf16"),
            div16=["K"], constexprs=dict(KIND=kind, LOG2G=group.bit_length() - 1, SYM=False, ROW_SCALE=False, MP=mp,
                                         BLOCK_R=16, BLOCK_K=1024, AHEAD=ahead),
            num_warps=4, num_stages=ahead + 1, ptx_needles=["dp4a"])
    specs["rows preparation"] = dict(kernel="localsgl_kernels.quant_rows:_prep_rows_kernel",
                                     pointers=dict(X="*bf16", XQ="*i32", XS="*fp32"), div16=["K", "stride_x"],
                                     constexprs=dict(E=8, BK=1024, BLOCK=1024), num_warps=4)
    # the int4 x int8-activation GEMM (quant_a8): the H200's tuned tiles' shapes (64 x 64, 64 x 128,
    # swapped 16 x 64 in K slices), int8 warpgroup MMA (IGMMA) with its int32 accumulator
    for bm, bn, sym, swap, split, stages in ((64, 64, False, 1, 4, 3), (64, 128, True, 0, 1, 3),
                                              (16, 64, False, 1, 4, 3), (16, 128, False, 0, 4, 3)):
        specs[f"a8 {bm}x{bn} sym{int(sym)} swap{swap} split{split}"] = dict(
            kernel="localsgl_kernels.quant_a8:_a8_kernel",
            pointers=dict(XQ="*i8", DX="*fp32", XSUM="*fp32", QW="*u8", S="*fp16", Mn="*fp16",
                          Y="*fp32" if split > 1 else "*bf16"),
            div16=["K", "N", "NG"],
            constexprs=dict(GROUP=128, SYM=sym, BLOCK_M=bm, BLOCK_N=bn, SWAP_AB=swap, SPLIT=split),
            num_warps=4, num_stages=stages, ptx_needles=["s32.s8.s8"])
    # decode attention's merge writing o_proj's int8 activations (int4 and int8 words), zeroing its output
    for e in (8, 4):
        specs[f"attention merge into int8 words E={e}"] = dict(
            kernel="localsgl_kernels.decode_attention:_decode_stage2",
            pointers=dict(PartO="*fp32", PartLse="*fp32", SeqLens="*i32", Start="*i32", PrefPos="*i32", PrefO="*fp32",
                          PrefLse="*fp32", Out="*bf16", XQ="*i32", XS="*fp32", Z="*fp32"),
            constexprs=dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64, NUM_SPLITS=16, MIN_CHUNK=64, HAS_PREFIX=False,
                            PREFIX_SPLITS=16, RELEASE_EARLY=True, PDL=True, INT8_E=e, INT8_BK=1024, ZERO=True))
    specs["a8 preparation"] = dict(kernel="localsgl_kernels.quant_a8:_prep_a8_kernel",
                                   pointers=dict(X="*bf16", XQ="*i8", DX="*fp32", XSUM="*fp32"),
                                   div16=["K", "NG", "stride_x"], constexprs=dict(GROUP=128, GB=8), num_warps=4)
    return specs


def test_quant_kernels_compile_for_sm90():
    # ftz forms of the f32 multiply / FMA: the words loop reads nibbles as subnormal floats,
    # which a flush-to-zero build would turn into zeros
    ftz = ["mul.ftz.f32", "mul.rn.ftz.f32", "fma.rn.ftz.f32"]
    # "}, {%r": a wgmma whose A operand is registers ({acc}, {a regs}, b descriptor), not a descriptor
    reg_a = "}, {%r"
    own = {name: s.get("ptx_needles", []) for name, s in _specs().items()}  # what a spec must hold
    specs = {name: dict(s, sass_needles=["HGMMA", "IGMMA"], ptx_needles=own[name] + ftz + [reg_a, "div.rn.f32"])
             for name, s in _specs().items()}
    results = dict(zip(specs, compile_all(list(specs.values()), timeout=900)))
    failed = [f"{name}: {r['error']}" for name, r in results.items() if not r["ok"]]
    assert not failed, "\n".join(failed)
    # the prefill / large-batch tile runs on Hopper's warpgroup MMA (the smaller tiles are below
    # its 64-row minimum and use the older MMA)
    for name, r in results.items():
        if name == "fp8 rows":  # the reference's division, not div.full's approximation
            assert r["ptx_has"]["div.rn.f32"], r["ptx_has"]
        if "words" in name:
            assert not any(r["ptx_has"][n] for n in ftz), f"{name}: flush-to-zero arithmetic {r['ptx_has']}"
        assert all(r["ptx_has"][n] for n in own[name]), f"{name}: {r['ptx_has']}"  # e.g. dp4a
        if name.startswith("gemm") and specs[name]["constexprs"]["BLOCK_M"] >= 64:
            assert r["sass_has"]["HGMMA"], f"{name}: no HGMMA in its SASS"
        if name.startswith("a8 ") and "preparation" not in name and 64 in (specs[name]["constexprs"]["BLOCK_M"],
                                                                           specs[name]["constexprs"]["BLOCK_N"]):
            assert r["sass_has"]["IGMMA"], f"{name}: no int8 warpgroup MMA in its SASS"
        # swapped: the warpgroup MMA at 16 rows too, the dequantized weight its register operand
        if "swap_ab" in name:
            assert r["sass_has"]["HGMMA"] and r["ptx_has"][reg_a], f"{name}: no register-A wgmma"
        # the fp16 products as packed FMAs in the SASS too (counted as scripts/sass_mix.py counts them)
        if name.endswith("fp16 products"):
            assert r["sass_mix"].get("HFMA2", 0) >= 32, f"{name}: {r['sass_mix']}"
        # no register spills (a stack frame): a kernel held under its register need ran 1.4-2x slower
        # (bench/RESULTS.md, "2026-12-04 (twentieth session)")
        if r["resources"] is not None:
            assert "STACK:0 " in r["resources"] + " ", f"{name}: spills registers ({r['resources']})"
