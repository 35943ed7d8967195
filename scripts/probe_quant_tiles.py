"""Tile sweep of the quantized matmul kernels on the GPU: for each weight format, Llama-3.1-8B
shape and row count, the default tile's µs per call, the best tile found and its µs, and the
floor (packed bytes over copy bandwidth; for many rows also the bf16 tensor-core time).

    python scripts/probe_quant_tiles.py [--jobs 14] [--json OUT.json] [--tiles TILES.json]
        [--formats int4g128 int4g32 ...] [--kinds gemv gemm prefill] [--words 0|1|2|3]

``--tiles`` writes the winners that beat the built-in tile by 3 % (for a shape where none does,
the built-in tile itself, so that no timed shape borrows another's) in the format of
kernels/quant_tiles.py (LOCALSGL_QUANT_TILES=TILES.json makes the engine use them; copied to
kernels/tuned/<device name>.json they are the defaults on that GPU model).  Run it with
LOCALSGL_QUANT_TILES unset and no tuned file for the GPU, so "default" is the built-in tile.

The search space holds the kernels' variants, off in their built-in defaults: for the GEMV
split-K (timed on o, down and lm_head only: qkv and gate_up run fused, without it) and int4 /
int8 as int32 words (the activations prepared inside the loop, or by a kernel of their own first,
or quantized to int8 there for dp4a: ``--words 3`` only, as it rounds the activations), the
latter two with one to three stages (the weight words loaded 0-2 steps ahead; 2 stages in the
built-in tile);
for the int4 GEMM the interleaved dot and, for int4 g128, the nibbles in the dot with the scales
applied after it, and for every int4 the same over int32 words (``words``: two nibbles to two
16-bit floats per operation, each group's Σx computed once per call); for the int4 g32 / int8 g16
GEMM wide steps (one load and one dot a step, each column's group scale gathered); for the
int4 / int8 GEMM the swapped tile (accᵀ = w·xᵀ: the dequantized
weight the dot's left operand, Hopper's wgmma then takes it from registers) and split-K (2 or 4
K slices, fp32 partials summed after: more programs for down_proj's long K).

The kernels are compiled first by ``--jobs`` processes at once (Triton's disk cache is shared),
then timed one at a time in CUDA graphs (scripts/probe_quant.py's ``timed``), each over copies
of its weight called in turn that together exceed L2 three times (``cold_copies``: read from
memory as a decode step's distinct layers are; ``--warm``: the weight alone, from L2 where it fits).  Rows of 1 time
quant_gemv.gemv; for qkv and gate_up, which the engine runs through the fused norm kernels,
the fused kernel then times the GEMV's 6 best tiles and its time picks the tile (the row's
gemv_* fields keep the plain GEMV's numbers).  16 and 64 rows time quant_gemm.gemm (and fp8's
``_scaled_mm``, and the dequantize-then-cuBLAS route); 2,048 rows compare the kernel with
dequantize-then-cuBLAS."""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_quant import cold_copies, copy_bandwidth, per_copy, timed  # noqa: E402
from merge_tiles import write, write_json  # noqa: E402

from localsgl.engine.layers.quant import QuantizedWeight, WeightFormat  # noqa: E402
from localsgl_kernels import quant_gemm as QM  # noqa: E402
from localsgl_kernels import quant_gemv as QV  # noqa: E402

FORMATS = {"int4g128": WeightFormat("int4", 128, False), "int4g32": WeightFormat("int4", 32, False),
           "int8": WeightFormat("int8", 0, True), "int8g16": WeightFormat("int8", 16, True),
           "fp8": WeightFormat("fp8", 0, True)}  # int4g32 / int8g16: a Q4_K_M GGUF kept quantized
GEMV_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
               "lm_head": (128256, 4096)}
# every projection of a decode batch's layer path (the fused kernels take batch 1 only)
GEMM_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TENSOR_FLOPS = 790e12  # H200 dense bf16


# plain-gemv shapes: the engine runs qkv and gate_up through the fused norm kernels, which
# take the same tile but not its split_k, so split tiles are timed on these shapes only
SPLIT_SHAPES = ("o", "down", "lm_head")


# int4 keeps only the byte-tile GEMV's tiles that won a shape when it was swept alone, as the
# baseline the words variant has to beat
INT4_GROUP_TILES = {"int4g128": ((8, 1024, 4, 1), (4, 256, 4, 1), (16, 256, 4, 2), (8, 512, 8, 1), (32, 512, 4, 2)),
                    "int4g32": ((8, 1024, 4, 2), (8, 1024, 4, 1), (16, 1024, 4, 2))}


def gemv_space(fmt: str):
    if fmt in INT4_GROUP_TILES:
        for t in INT4_GROUP_TILES[fmt]:
            yield QV.Config(*t)
    else:
        for r, bk, (w, st) in itertools.product((4, 8, 16, 32), (128, 256, 512), ((4, 1), (8, 1), (4, 2))):
            yield QV.Config(r, bk, w, st)
    # split-K: more programs for few rows and long K (o, down)
    for r, w, split in itertools.product((4, 8), (4, 8), (2, 4)):
        yield QV.Config(r, 512, w, 1, split)
    if fmt.startswith(("int4", "int8")):  # int32 words; 2: over activations prepared by a kernel first
        splits = (1, 2, 4) if fmt.startswith("int4") else (1, 4)
        for (r, bk, w), split, words in itertools.product(_words_tiles(8 if fmt.startswith("int4") else 4), splits,
                                                          (1, 2, 3)):
            yield QV.Config(r, bk, w, 1, split, words)
            if words >= 2:  # stages 2 / 3: the weight words loaded 1 / 2 steps ahead (_qstream_prepped's AHEAD)
                yield QV.Config(r, bk, w, 2, split, words)
                yield QV.Config(r, bk, w, 3, split, words)


def _words_tiles(per_word: int):
    """(BLOCK_R, BLOCK_K, warps) of the words GEMV with 4 to 16 words per thread and row block:
    fewer and the 4-word chunks do not fill the threads (a layout shuffle per step), more and
    the words of the two row blocks crowd the registers."""
    for w in (4, 8):
        for r, bk in itertools.product((8, 16, 32, 64), (256, 512, 1024, 2048)):
            if 4 * 32 * w <= r * bk // per_word <= 16 * 32 * w:
                yield r, bk, w


def gemm_space(fmt: str, m: int):
    il = (1,) if fmt.startswith("int4") else (0,)  # int4: the interleaved dot won every shape
    if m <= 16:
        for (bn, w), bk, st, i in itertools.product(((32, 4), (64, 4), (128, 8)), (128, 256, 512), (2, 4), il):
            yield QM.Config(16, bn, bk, w, st, 1, i)
        if fmt == "int4g128":  # nibbles into the dot, scaled after: 2·16/128 FMAs per weight for the scales
            for (bn, w), bk, st in itertools.product(((64, 4), (128, 8)), (128, 256, 512), (2, 4)):
                yield QM.Config(16, bn, bk, w, st, 1, 1, 1)
    else:
        for bm, (bn, w), bk, st, i in itertools.product((32, 64), ((64, 4), (128, 8)), (128, 256), (2, 3, 4), il):
            yield QM.Config(bm, bn, bk, w, st, 4, i)
        if fmt == "int4g128":  # scaled after the dot at 64 rows: 2·64/128 FMAs per weight, about a dequantization's
            for bm, (bn, w), bk, st in itertools.product((32, 64), ((64, 4), (128, 8)), (128, 256), (2, 3)):
                yield QM.Config(bm, bn, bk, w, st, 4, 1, 1)
    if fmt.startswith("int4"):  # int32 words, two nibbles to two 16-bit floats per op, Σx precomputed
        for bm, (bn, w), bk, st, sw in itertools.product((16,) if m <= 16 else (32, 64), ((64, 4), (128, 8)), (128, 256),
                                                          (2, 4) if m <= 16 else (2, 3, 4), (0, 1)):
            yield QM.Config(bm, bn, bk, w, st, 1 if m <= 16 else 4, 0, 0, sw, 1)
    if fmt.startswith(("int4", "int8")):  # split-K: fp32 partials per K slice, for long K and few tiles (down_proj)
        sa = 1 if fmt == "int4g128" else 0
        for bm, (bn, w), bk, sw, split in itertools.product((16,) if m <= 16 else (32, 64), ((64, 4), (128, 8)),
                                                            (128, 256), (0, 1), (2, 4)):
            yield QM.Config(bm, bn, bk, w, 3, 1 if m <= 16 else 4, il[0], sa, sw, 0, split)
    if fmt in ("int4g32", "int8g16"):  # wide steps: one load and one dot a step, not one per narrow group
        for bm, (bn, w), bk, sw, split in itertools.product((16,) if m <= 16 else (32, 64), ((64, 4), (128, 8)),
                                                            (128, 256), (0, 1), (1, 2)):
            yield QM.Config(bm, bn, bk, w, 3, 1 if m <= 16 else 4, il[0], 0, sw, 0, split, 1)
    if fmt.startswith(("int4", "int8")):  # swapped: BLOCK_N is wgmma's M (64 per warpgroup), BLOCK_M its N
        for bm, (bn, w), bk, st in itertools.product((16,) if m <= 16 else (32, 64), ((64, 4), (128, 8)), (128, 256), (2, 3, 4)):
            yield QM.Config(bm, bn, bk, w, st, 1 if m <= 16 else 4, il[0], 0, 1)


def variants(formats=tuple(FORMATS), kinds=("gemv", "gemm")):
    """(kind, fmt, rows, config) of every variant to compile and time."""
    out = []
    for fmt in formats:
        if "gemv" in kinds:
            out += [("gemv", fmt, 1, c) for c in gemv_space(fmt)]
        for m in (16, 64) if "gemm" in kinds else ():
            if fmt == "fp8" and m > QM.FP8_SCALED_MM_MIN_ROWS:
                continue
            out += [("gemm", fmt, m, c) for c in gemm_space(fmt, m)]
    return out


def _weight(fmt: str, n: int, k: int) -> QuantizedWeight:
    g = torch.Generator(device="cuda").manual_seed(n + k)
    dense = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).to(torch.bfloat16)
    return QuantizedWeight.quantize(dense, FORMATS[fmt])


def _call(kind, w, x, cfg, shape=None):
    if kind == "gemv":
        if not QV.gemv_supported(w, "cuda") or w.out_features % (2 * cfg.block_r) \
                or w.in_features % (cfg.block_k * cfg.split_k) or (QV.block_k(w, cfg.block_k) != cfg.block_k) \
                or (cfg.split_k > 1 and shape is not None and shape not in SPLIT_SHAPES):
            return None
        return lambda: QV.gemv(x, w, config=cfg)
    return lambda: QM.gemm(x, w, cfg)


FUSED_SHAPES = {"qkv": (32, 8, 128), "gate_up": None}  # (query heads, KV heads, head dim) of Llama-3.1-8B
FUSED_CANDIDATES = 6


def _winner(row: dict) -> tuple | None:
    """The tile a tuned file gets for a timed shape: the best one where it beats the default by
    3 %, else the default tile itself (a shape without an entry would borrow its nearest shape's
    tile, quant_tiles.lookup, never timed there; bench/RESULTS.md, "twenty-seventh session")."""
    if row["best"] and row["best_us"] < 0.97 * row["default_us"]:
        return tuple(row["best"])
    return tuple(row["default_tile"]) if row.get("default_tile") else None


def _fused_call(shape, w, x, cfg):
    """The fused kernel the engine runs one token of ``shape`` through (norm + qkv + rotary +
    KV store, norm + gate/up + SiLU·mul), with tile ``cfg`` (None: its default); None when
    the tile does not fit its row blocks.  split_k does not apply there."""
    K, dev = w.in_features, x.device
    res = torch.randn_like(x)
    nw = torch.ones(K, dtype=x.dtype, device=dev)
    fits = cfg is None or (K % cfg.block_k == 0 and QV.block_k(w, cfg.block_k) == cfg.block_k)
    if shape == "gate_up":
        if not fits or (cfg is not None and (w.out_features // 2) % cfg.block_r):
            return None
        return lambda: QV.norm_gate_up(x, res, nw, 1e-5, w, config=cfg)
    hq, hkv, d = FUSED_SHAPES[shape]
    if not fits or (cfg is not None and (d // 2) % cfg.block_r):
        return None
    cos_sin = torch.randn(64, d, dtype=torch.float32, device=dev)
    pos, loc = torch.tensor([5], device=dev), torch.tensor([1], device=dev)
    kc, vc = (torch.zeros(4, hkv, d, dtype=x.dtype, device=dev) for _ in range(2))
    return lambda: QV.norm_qkv(x, res, nw, 1e-5, w, None, cos_sin, pos, loc, kc, vc, hq, hkv, config=cfg)


def _time_fused(shape, ws, x, timings):
    """(default µs, best µs, best tile) of the fused kernel over the plain GEMV's best tiles
    (``ws``: the weight's copies, timed in turn)."""
    default_call = [_fused_call(shape, w, x, None) for w in ws]
    default = timed(default_call, 10)
    best, seen = (float("inf"), None), 0
    for _, cfg in sorted(timings, key=lambda t: t[0]):
        fns = [_fused_call(shape, w, x, cfg) for w in ws]
        if fns[0] is None:
            continue
        try:
            best = min(best, (timed(fns, 10), cfg), key=lambda t: t[0])
        except Exception:
            pass
        seen += 1
        if seen == FUSED_CANDIDATES:
            break
    return min(default, timed(default_call, 10)), best[0], best[1]  # the default before and after, as the GEMVs


def _torch_int4pack_us(n: int, k: int, group: int, copies: int = 1):
    """torch's own int4 GEMV (tinygemm, ``_weight_int4pack_mm``) on random packed weights of the
    same shape and group (``copies`` of them, timed in turn as the kernels' are): a reference for
    the kernels' times (a message where torch lacks it)."""
    try:
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        calls = []
        for _ in range(copies):
            packed = torch._convert_weight_to_int4pack(
                torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda"), 8)
            sz = torch.randn(k // group, n, 2, device="cuda", dtype=torch.bfloat16)
            calls.append(lambda packed=packed, sz=sz: torch._weight_int4pack_mm(x, packed, group, sz))
        return timed(calls, 10)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:100]}"


def _close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within bf16 rounding of the fp32 reference (relative Frobenius error < 1 %)."""
    return bool(torch.isfinite(y).all()) and float((y.float() - ref).norm() / ref.norm()) < 1e-2


def _compile(batch):
    """Compile a share of the variants (one call each on a small weight of the same constexprs)."""
    ok = 0
    for kind, fmt, m, cfg in batch:
        w = _weight(fmt, 512, 4096)
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        fn = _call(kind, w, x, cfg)
        try:
            if fn is not None:
                fn()
                ok += 1
        except Exception as e:  # out of resources etc.: that tile is skipped when timed
            print(f"compile {kind} {fmt} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
    torch.cuda.synchronize()
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiles", default=None)
    ap.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--kinds", nargs="*", default=["gemv", "gemm", "prefill"], choices=["gemv", "gemm", "prefill"])
    ap.add_argument("--warm", action="store_true",
                    help="time each weight alone, from L2 where it fits; by default copies of it are called in "
                         "turn (probe_quant.cold_copies)")
    ap.add_argument("--words", type=int, choices=[0, 1, 2, 3], default=None,
                    help="time only the GEMV tiles of this words variant (the default tile is timed anyway); "
                         "3 (int8 activations) only when asked for: it rounds the activations")
    ap.add_argument("--ab", nargs="*", default=None, metavar="FIELD=V[,FIELD=V]",
                    help="GEMM only: instead of the sweep, each shape's default tile against the same tile with "
                         "these Config fields replaced (one variant per argument)")
    ap.add_argument("--ab-tiles", default=None, help="with --ab: write this GPU's tuned file with the first "
                                                     "variant's fields applied to its int4 GEMM entries, here")
    ap.add_argument("--ab-rows", nargs="*", type=int, default=[16, 64], help="with --ab: the row counts timed")
    ap.add_argument("--ab-best", default=None, help="with --ab: write this GPU's tuned file with each timed shape's "
                                                    "fastest correct tile (default or variant, 3 %% margin), here")
    args = ap.parse_args()
    if args.ab is not None:
        return ab(args)
    todo = [v for v in variants(args.formats, args.kinds)
            if v[0] != "gemv" or (v[3].words != 3 if args.words is None else v[3].words == args.words)]
    t0 = time.time()
    if args.jobs > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs) as pool:
            n = sum(pool.map(_compile, [todo[i::args.jobs] for i in range(args.jobs)]))
        print(f"compiled {n} of {len(todo)} variants in {time.time() - t0:.0f} s", flush=True)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for fmt in args.formats:
        for kind, shapes, ms in (("gemv", GEMV_SHAPES, (1,)), ("gemm", GEMM_SHAPES, (16, 64))):
            if kind not in args.kinds:
                continue
            for (name, (n, k)), m in itertools.product(shapes.items(), ms):
                if kind == "gemm" and fmt == "fp8" and m > QM.FP8_SCALED_MM_MIN_ROWS:
                    continue
                w = _weight(fmt, n, k)
                ws = cold_copies(w, not args.warm)
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                floor = max(w.nbytes / bw, 2 * m * n * k / TENSOR_FLOPS) * 1e6
                default_calls = per_copy(ws, lambda wi: QM.matmul(x, wi))
                default = timed(default_calls, 10)
                ref = QM.dequant_matmul(x.float(), w)  # fp32: what every tile must reproduce
                timings, wrong = [], []
                for kd, f, mm, cfg in todo:
                    if (kd, f, mm) != (kind, fmt, m):
                        continue
                    fns = [_call(kind, wi, x, cfg, name) for wi in ws]
                    if fns[0] is None:
                        continue
                    try:
                        if not _close(fns[0](), ref):  # a fast wrong tile must never be chosen
                            wrong.append(tuple(cfg))
                            continue
                        timings.append((timed(fns, 10), cfg))
                    except Exception:
                        continue
                if wrong:
                    print(f"WRONG RESULTS {fmt} {kind} {name} M={m}: {wrong}", flush=True)
                best = min(timings, key=lambda t: t[0], default=(float("inf"), None))
                # the default again, after the candidates: timed first only, right after the weight's
                # creation, it read 14-16 % slower than the same tile given explicitly on an H100's
                # LM head (bench/RESULTS.md, twenty-sixth session)
                default = min(default, timed(default_calls, 10))
                deq = timed(per_copy(ws, lambda wi: QM.dequant_matmul(x, wi)), 10)
                row = dict(fmt=fmt, label=FORMATS[fmt].label(), n=n, k=k, kind=kind, shape=name, m=m, floor_us=floor, default_us=default,
                           best_us=best[0], best=tuple(best[1]) if best[1] else None, dequant_cublas_us=deq, wrong=wrong)
                if kind == "gemv" and name in FUSED_SHAPES:  # the tile is chosen by the fused kernel's time
                    fd, fb, fcfg = _time_fused(name, ws, x, timings)
                    row.update(gemv_default_us=default, gemv_best_us=best[0], gemv_best=row["best"], default_us=fd,
                               best_us=fb, best=tuple(fcfg) if fcfg else None)
                # the tile "default" timed: written where it wins, so no shape borrows another's
                row["default_tile"] = tuple(QV.default_config(w, n, "cuda") if kind == "gemv"
                                            else QM.default_config(m, "cuda", w))
                if kind == "gemv" and fmt.startswith("int4"):
                    row["torch_int4pack_us"] = _torch_int4pack_us(n, k, FORMATS[fmt].group_size, len(ws))
                if kind == "gemv":  # the tensor-core GEMM's 16-row tile (tuned or built-in) on this one row
                    row["gemm_one_row_us"] = timed(per_copy(ws, lambda wi: QM.gemm(x, wi)), 10)
                if fmt == "fp8" and QM.fp8_native(x.device) and m > 1:
                    row["scaled_mm_us"] = timed(per_copy(ws, lambda wi: QM.scaled_mm_fp8(x, wi)), 10)
                row["copies"] = len(ws)
                rows.append(row)
                print(json.dumps(row), flush=True)
                _write_outputs(args, rows)
                del w, ws, default_calls
    # prefill-sized: the kernel's default tile vs dequantize-then-cuBLAS vs bf16 cuBLAS
    for fmt, (name, (n, k)) in itertools.product(args.formats if "prefill" in args.kinds else (), GEMM_SHAPES.items()):
        w = _weight(fmt, n, k)
        x = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16)
        dense = w.dequantize(torch.bfloat16)
        row = dict(fmt=fmt, kind="prefill", shape=name, m=2048, cublas_bf16_us=timed(lambda: x @ dense.t(), 5),
                   kernel_us=timed(lambda: QM.gemm(x, w), 5), dequant_cublas_us=timed(lambda: QM.dequant_matmul(x, w), 5),
                   dequant_only_us=timed(lambda: QM.dequantize(w, torch.bfloat16), 5))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del w, dense
    print(f"\n{'fmt':9s} {'kind':5s} {'shape':8s} {'M':>4s} {'floor':>7s} {'default':>8s} {'best':>8s} {'deq+cuBLAS':>10s}  best tile")
    for r in rows:
        if r["kind"] == "prefill":
            print(f"{r['fmt']:9s} pf    {r['shape']:8s} 2048 bf16 {r['cublas_bf16_us']:7.0f} kernel {r['kernel_us']:7.0f} "
                  f"deq+cuBLAS {r['dequant_cublas_us']:7.0f} (deq {r['dequant_only_us']:.0f})")
        else:
            print(f"{r['fmt']:9s} {r['kind']:5s} {r['shape']:8s} {r['m']:4d} {r['floor_us']:7.1f} {r['default_us']:8.1f} "
                  f"{r['best_us']:8.1f} {r['dequant_cublas_us']:10.1f}  {r['best']}"
                  + (f" scaled_mm {r['scaled_mm_us']:.1f}" if "scaled_mm_us" in r else "")
                  + (f" torch int4pack {r['torch_int4pack_us']}" if "torch_int4pack_us" in r else "")
                  + (f" gemm 1 row {r['gemm_one_row_us']:.1f}" if "gemm_one_row_us" in r else ""))
    n_tiles = _write_outputs(args, rows)
    if args.tiles:
        print(f"{n_tiles} tuned tiles -> {args.tiles}")


def _write_outputs(args, rows: list[dict]) -> int:
    """--json (every row) and --tiles (the winners), each whole or not at all; called after every
    shape, so a sweep stopped by its time limit leaves the shapes it finished to merge_tiles.py."""
    tiles = [dict(kind=r["kind"], fmt=r["label"], n=r["n"], k=r["k"], m=r["m"], tile=list(_winner(r)))
             for r in rows if r["kind"] in ("gemv", "gemm") and _winner(r)]
    if args.tiles:  # first: the rows name the shapes merged, so a stop between the two loses no entry
        write_json(args.tiles, json.dumps(tiles, indent=1))
    if args.json:
        write_json(args.json, json.dumps(rows, indent=1))
    return len(tiles)


def _fields(spec: str) -> dict:
    return {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}


def ab(args) -> None:
    """Each GEMM shape's default tile (tuned or built-in, as the engine picks it) against the same
    tile with fields replaced: µs per call of each, and whether each reproduces the fp32 result."""
    variants_ = [_fields(v) for v in args.ab]
    best = {}  # (fmt label, n, k, rows) -> the fastest correct tile
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s", flush=True)
    print(f"{'fmt':9s} {'shape':8s} {'M':>3s} {'floor':>6s} {'default':>8s} " + " ".join(f"{v:>24s}" for v in args.ab)
          + "  default tile")
    for fmt, (name, (n, k)), m in itertools.product(args.formats, GEMM_SHAPES.items(), args.ab_rows):
        w = _weight(fmt, n, k)
        ws = cold_copies(w, not args.warm)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = QM.dequant_matmul(x.float(), w)
        cfg = QM.default_config(m, "cuda", w)
        cells = []
        timings = []
        for c in [cfg] + [cfg._replace(**v) for v in variants_]:
            fns = [_call("gemm", wi, x, c) for wi in ws]
            ok = _close(fns[0](), ref)
            us = min(timed(fns, 10), timed(fns, 10))
            cells.append(f"{us:7.1f}{'' if ok else ' WRONG'}")
            if ok:
                timings.append((us, c))
        if timings:
            us, c = min(timings, key=lambda t: t[0])
            base = [t for t, tc in timings if tc is cfg]
            best[(w.fmt.label(), n, k, m)] = c if not base or us < 0.97 * base[0] else cfg
        floor = max(w.nbytes / bw, 2 * m * n * k / TENSOR_FLOPS) * 1e6
        print(f"{fmt:9s} {name:8s} {m:3d} {floor:6.1f} {cells[0]:>8s} " + " ".join(f"{c:>24s}" for c in cells[1:])
              + f"  {tuple(cfg)}", flush=True)
        del w, ws
    if args.ab_tiles:
        from localsgl_kernels.quant_tiles import _entries

        entries = [dict(e) for e in _entries(torch.cuda.current_device(), None)]
        for e in entries:
            if e["kind"] == "gemm" and e["fmt"].startswith("int4"):
                e["tile"] = list(QM.Config(*e["tile"])._replace(**variants_[0]))
        write(args.ab_tiles, entries)
        print(f"{args.ab[0]} applied to the int4 GEMM entries -> {args.ab_tiles}")
    if args.ab_best:
        from localsgl_kernels.quant_tiles import _entries

        entries = [dict(e) for e in _entries(torch.cuda.current_device(), None)]
        keyed = {(e["fmt"], e["n"], e["k"], e["m"]): e for e in entries if e["kind"] == "gemm"}
        for (fmt, n, k, m), c in best.items():
            if (fmt, n, k, m) in keyed:
                keyed[(fmt, n, k, m)]["tile"] = list(c)
            else:
                entries.append(dict(kind="gemm", fmt=fmt, n=n, k=k, m=m, tile=list(c)))
        write(args.ab_best, entries)
        print(f"each shape's fastest tile -> {args.ab_best}")


if __name__ == "__main__":
    main()
