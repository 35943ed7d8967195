"""The tiles of kernels/gemv.py's batch-1 GEMVs and how a launch picks one.

Tables per kind of stream (qkv, gate_up, the plain GEMV, the LM head), from scripts/probe_gemv.py's
sweeps (bench/RESULTS.md names each), for two-byte and one-byte (fp8 e4m3) weights.
``E4M3_FP16``, the full-K tiles' e4m3 x fp16 products, is a switch the benchmarks flip.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton


class Config(NamedTuple):
    """Tile of one launch.  K-loop (programs_per_sm == 0): BLOCK_R rows per half-block,
    BLOCK_K columns per step, one program per row block.  Full-K (programs_per_sm > 0):
    BLOCK_R rows per block, the whole K per tile (block_k unused), programs_per_sm × SMs
    programs walking the blocks."""

    block_r: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    programs_per_sm: int = 0
    ahead: int = 1  # full-K plain GEMV: row blocks loaded before the PDL wait (1 or 2)


# Tiles from scripts/probe_gemv.py's sweeps on an H200 (Llama-3.1-8B shapes).  K-loop: (block_r,
# block_k, warps, stages), each at or below cuBLAS's M = 1 time but for the unfused qkv (bench/RESULTS.md,
# "batch-1 decode as fused weight streams").
_CUDA_TILES = {"qkv": (4, 512, 4, 3), "gate_up": (4, 512, 4, 1), "gemv": (8, 1024, 8, 1), "lm_head": (8, 256, 4, 1)}
# Full-K: (block_r, programs per SM, warps, row blocks the plain GEMV loads before its wait), swept with
# PDL on, where the smaller tiles win: a successor's programs find registers free to start their
# first loads ("programmatic dependent launch").  o_proj loads two blocks ahead: the attention's
# merge releases it early ("the step around the weight streams").
_CUDA_FULLK = {"qkv": (4, 2, 8, 1), "gate_up": (4, 16, 8, 1), "gemv": (4, 2, 16, 2), "lm_head": (4, 16, 8, 1)}
# One-byte weights (fp8 e4m3 with row scales): a tile of the same rows holds half the bytes.  Swept on an
# H200 over the e4m3 x fp16 products (``_dot``): gate_up at 4 programs of 4 warps a SM, o_proj at 16 rows,
# 2 a SM; fp8 batch 1 2.444 -> 2.348 ms there ("2026-12-06 (thirty-third session)") and 3.012 -> 2.964 ms
# on an H100 ("2026-12-07 (thirty-fourth session)").  down_proj's K (14336) takes the K-loop, 4 rows.
_CUDA_FULLK_1B = {"qkv": (4, 16, 4, 1), "gate_up": (4, 4, 4, 1), "gemv": (16, 2, 4, 1), "lm_head": (8, 16, 8, 1)}
_CUDA_TILES_1B = {**_CUDA_TILES, "gemv": (4, 1024, 4, 1)}
# The full-K tiles' e4m3 x fp16 products (``_dot``): the route of an fp8 model's batch-1 GEMVs under
# bf16/fp16 activations.  On an H200 it took fp8 batch 1 from 2.547 to 2.452 ms a token
# (bench/RESULTS.md, "2026-12-05 (twenty-second session)").  False: fp32 products everywhere.
E4M3_FP16 = True
# Columns each thread must hold for those products: Triton 3.6 compiled them wrongly where a tile
# gave each thread exactly one column (wrong sums on an H200, right under the interpreter;
# tests/kernels/test_gemv.py sweeps the shapes), so a tile takes the route only when each thread
# holds a whole run of 16.
F16_COLUMNS_PER_THREAD = 16
FULLK_MAX = 16384  # widest K (rounded up to a power of two) the full-K kernels take
# widest K the launcher gives them: down_proj (14336) gained 1% full-K in bf16 (921 vs 931 us), 0.24% of an fp8
# step on an H100 ("thirty-fourth session")
FULLK_DEFAULT_MAX = 8192
_INTERP_SMS = 2  # interpreter runs: two "SMs", so programs walk several blocks


def default_config(rows_per_block: int, K: int, device_type: str, kind: str = "gemv",
                   elem: int = 2) -> Config | None:
    """The tile for a ``kind`` stream whose row blocks come in multiples of ``rows_per_block``,
    over K columns of ``elem``-byte weights; None when the shape does not tile evenly (callers
    take the unfused path)."""
    if triton.next_power_of_2(K) <= FULLK_DEFAULT_MAX:
        if device_type != "cuda":
            return Config(min(4, rows_per_block), 0, 4, 1, 1, 2 if kind == "gemv" else 1)
        r, per_sm, warps, ahead = (_CUDA_FULLK_1B if elem == 1 else _CUDA_FULLK)[kind]
        while elem == 1 and r > 4 and rows_per_block % r:  # a wider one-byte tile that does not divide
            r //= 2
        return Config(min(r, rows_per_block), 0, warps, 1, per_sm, ahead)
    if device_type != "cuda":  # interpreter: small tiles
        for bk in (64, 32, 16):
            if K % bk == 0:
                return Config(min(4, rows_per_block), bk, 4, 1)
        return None
    r, bk, warps, stages = (_CUDA_TILES_1B if elem == 1 else _CUDA_TILES)[kind]
    while bk > 64 and K % bk:
        bk //= 2
    if K % bk:
        return None
    return Config(min(r, rows_per_block), bk, warps, stages)


_SMS: dict = {}


def programs(cfg: Config, blocks: int, device: torch.device) -> int:
    """The full-K grid: programs_per_sm a SM (two "SMs" under the interpreter), at most one a block."""
    if device.type != "cuda":
        return min(blocks, cfg.programs_per_sm * _INTERP_SMS)
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return min(blocks, cfg.programs_per_sm * _SMS[key])


def fits(cfg: Config | None, K: int) -> bool:
    """Whether ``cfg`` takes K columns: full-K up to FULLK_MAX, K-loop in whole steps."""
    if cfg is None:
        return False
    return triton.next_power_of_2(K) <= FULLK_MAX if cfg.programs_per_sm else K % cfg.block_k == 0


def fp16_products(cfg: Config, K: int, w_dtype: torch.dtype, x_dtype: torch.dtype, allowed: bool = True) -> bool:
    """Whether a full-K tile of ``cfg`` over K columns of ``w_dtype`` weights and ``x_dtype``
    activations takes the e4m3 x fp16 products: e4m3 weights, 16-bit activations, 16 columns a
    thread; ``allowed``: the caller's say (the engine's fp16_products debug switch)."""
    threads = 32 * cfg.num_warps
    return (E4M3_FP16 and allowed and w_dtype == torch.float8_e4m3fn and x_dtype in (torch.bfloat16, torch.float16)
            and cfg.block_r * triton.next_power_of_2(K) >= F16_COLUMNS_PER_THREAD * threads)


def row_scaled_fits(rows_per_block: int, K: int, device_type: str, kind: str) -> bool:
    """Whether a weight with one scale per row (fp8 e4m3, quant_gemv routes it here) of this
    shape takes these kernels: the full-K tiles (the fused ones too), or for a plain GEMV also
    the K-loop ones.  They stream bf16 at copy bandwidth; an e4m3 tile widens to fp32 as a bf16
    one does, or in a wide full-K tile multiplies in fp16 (``fp16_products``)."""
    cfg = default_config(rows_per_block, K, device_type, kind, elem=1)  # e4m3: one byte a weight
    if cfg is None or not fits(cfg, K):
        return False
    if cfg.programs_per_sm:
        return rows_per_block % cfg.block_r == 0
    return kind in ("gemv", "lm_head") and rows_per_block % (2 * cfg.block_r) == 0
