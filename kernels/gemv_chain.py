"""Two weight streams of the batch-1 step in one launch, a grid barrier between them:
  * ``o_norm_gate_up``: h = W_o·a, then norm_gate_up over h (o_proj into the MLP);
  * ``down_norm_qkv``: h = W_d·x, then the next layer's norm_qkv over h (down_proj into q/k/v).
The second stream is gemv.py's full-K kernel (same tiles, prologue and epilogue); the first is
o_proj full-K or down_proj in K steps (its K, 14336, is past the full-K tiles).

A batch-1 step is a chain of short weight streams, and each one alone reaches only about half
of DRAM bandwidth: its programs ramp up, and its tail drains while the next kernel waits
(bench/RESULTS.md, "thirty-fourth session": o_proj 10 µs at 50 % of DRAM).  Here the programs
that finish their share of the first stream issue their first tiles of the second at once and wait
at the barrier for the rest of the first, instead of exiting; the second stream starts as the
first one's last rows land, with no launch between.

The barrier: every program adds one to a counter (int64, never reset: a launch of P programs
waits until it reaches the next multiple of P) and spins on it, so every program must be resident
at once.  The launcher sizes the grid from the driver's occupancy for the compiled kernel and
launches it cooperatively (the driver keeps such a grid's programs resident together, whatever
else runs), and runs the streams as two launches where it cannot, under MPS with a share of the
SMs, and under the interpreter (which runs programs one after another).  A counter serves
launches of one grid size in sequence (``new_barrier``).

With PDL the kernel waits for its predecessor before reading its input, and releases its
successor only after the barrier, when all its programs are resident: a successor's programs
never hold the slots it is waiting for.
"""
from __future__ import annotations

import ctypes
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .gemv import (_check_row, _cols, _cos_sin, _dot, _gate_up_blocks, _operand, _qkv_blocks, _qkv_rows, _row_scales,
                   _scaled, _tile, fp16_products)
from .options import FMA
from .pdl import gdc_launch_dependents, gdc_wait, launch_options

# The chains the fused decode step takes where they fit ("o_gate_up", "down_qkv"); the streams of
# the others launch apart.  None until a GPU has run and timed them.
CHAINS = frozenset()


class ChainConfig(NamedTuple):
    """Rows per block of the first stream and of the second, programs per SM, warps, and the first
    stream's K step (0: the whole K at once, full-K)."""

    block_a: int
    block_b: int
    programs_per_sm: int
    num_warps: int
    block_k: int = 0


# By weight bytes.  o_proj -> gate_up: gate_up keeps gemv_tiles' one-byte tile (4 rows, 4 warps),
# o_proj as many rows as give each program about one block.  down_proj -> qkv: down_proj's K-loop
# over 1,024 columns, qkv gemv_tiles' one-byte full-K rows.
_O_GATE_UP = {1: ChainConfig(8, 4, 4, 4), 2: ChainConfig(4, 4, 2, 8)}
_DOWN_QKV = {1: ChainConfig(8, 4, 4, 4, 1024), 2: ChainConfig(8, 4, 2, 8, 512)}
# One-launch chains go out as cooperative launches: the driver then keeps a grid's programs resident
# together (none waits at the barrier for one that a concurrent kernel keeps off the GPU) and refuses
# a grid too large for that.
COOPERATIVE = True
# Under MPS with a share of the SMs (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) the SM count overstates what a
# grid may hold: two launches there.
_MPS_LIMITED = bool(os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"))
_INTERP = {"o_gate_up": ChainConfig(4, 4, 1, 4), "down_qkv": ChainConfig(4, 4, 1, 4, 16)}
_INTERP_PROGRAMS = 3  # interpreter: programs walk several blocks of each stream


@triton.jit
def _grid_barrier(Bar, P):
    """Wait until all P programs of this launch have arrived (the counter's next multiple of P)."""
    tl.debug_barrier()  # this program's stores before its arrival
    old = tl.atomic_add(Bar, 1, sem="release")
    target = (old // P + 1) * P
    while tl.load(Bar, volatile=True) < target:
        pass
    tl.atomic_add(Bar, 0, sem="acquire")  # the other programs' stores before the loads that follow
    tl.debug_barrier()


@triton.jit
def _after_first_stream(Bar, PHASES: tl.constexpr, PDL: tl.constexpr):
    """Between the streams: the grid barrier (one launch) or the PDL wait (the second of two), then
    the successor released (every program is resident by now)."""
    if PHASES == 3:
        _grid_barrier(Bar, tl.num_programs(0))
    elif PDL:
        gdc_wait()
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _normed_h(Hb, R, G, ROut, K, write_res, eps, offs, mask):
    """n [K_PAD] fp32 = rmsnorm(s)·g, s = h + r in the residual's dtype, written to ROut where
    offs < write_res.  h is read through L2 (.cg): other programs wrote it during this launch."""
    h = tl.load(Hb + offs, mask=mask, other=0.0, cache_modifier=".cg")
    s = (h.to(tl.float32) + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(ROut.dtype.element_ty)
    tl.store(ROut + offs, s, mask=offs < write_res)
    n = s.to(tl.float32)
    return n * tl.rsqrt(tl.sum(n * n, 0) / K + eps) * tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _o_norm_gate_up_kernel(
    A, Wo, Hb, R, G, ROut, W, Out, Bar,
    KO: tl.constexpr, K: tl.constexpr, I, NBO, NB, eps, stride_wo, stride_w,
    BLOCK_RO: tl.constexpr, BLOCK_R: tl.constexpr, KO_PAD: tl.constexpr, K_PAD: tl.constexpr,
    PHASES: tl.constexpr, PDL: tl.constexpr,
    So=None, S=None, ROW_SCALE_O: tl.constexpr = False, ROW_SCALE: tl.constexpr = False,
    F16_O: tl.constexpr = False, F16: tl.constexpr = False,
):
    """PHASES 3: both streams, the barrier between; 1: o_proj alone (h = W_o·a into Hb); 2: gate_up
    alone, over Hb (the two-launch route)."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    if PHASES & 1:
        offs, mask = _cols(KO, KO_PAD)
        rows = pid * BLOCK_RO + tl.arange(0, BLOCK_RO)
        own = rows < tl.where(pid < NBO, NBO * BLOCK_RO, 0)  # programs past the last block load nothing
        w = tl.load(Wo + rows.to(tl.int64)[:, None] * stride_wo + offs[None, :], mask=own[:, None] & mask[None, :],
                    other=0.0)
        if PDL:
            gdc_wait()
        n = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        n, xs = _operand(n, Wo, A, F16_O)
        tl.store(Hb + rows, _scaled(_dot(w, n, xs), So, rows, ROW_SCALE_O).to(Hb.dtype.element_ty), mask=own)
        for blk in range(pid + step, NBO, step):
            rows = blk * BLOCK_RO + tl.arange(0, BLOCK_RO)
            w = _tile(Wo, stride_wo, rows, offs, mask)
            tl.store(Hb + rows, _scaled(_dot(w, n, xs), So, rows, ROW_SCALE_O).to(Hb.dtype.element_ty))
    if PHASES & 2:
        offs, mask = _cols(K, K_PAD)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        wg = _tile(W, stride_w, rows, offs, mask)
        wu = _tile(W, stride_w, rows + I, offs, mask)
        _after_first_stream(Bar, PHASES, PDL)
        n, xs = _operand(_normed_h(Hb, R, G, ROut, K, tl.where(pid == 0, K, 0), eps, offs, mask), W, Hb, F16)
        _gate_up_blocks(wg, wu, n, xs, pid, NB, W, S, stride_w, offs, mask, I, Out, BLOCK_R, ROW_SCALE)


@triton.jit
def _down_norm_qkv_kernel(
    Xd, Wd, Hb, R, G, ROut, W, Bias, CS, Pos, Loc, Q, KC, VC, Bar,
    KD, K: tl.constexpr, NBD, NB, eps, stride_wd, stride_w, stride_cs, stride_kct, stride_kch, stride_vct, stride_vch,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_RD: tl.constexpr, BLOCK_KD: tl.constexpr, BLOCK_R: tl.constexpr, K_PAD: tl.constexpr,
    PHASES: tl.constexpr, PDL: tl.constexpr,
    Sd=None, S=None, ROW_SCALE_D: tl.constexpr = False, ROW_SCALE: tl.constexpr = False, F16: tl.constexpr = False,
):
    """down_proj (h = W_d·x, K-loop: its K is past the full-K tiles) then the next layer's norm_qkv
    over h (+ residual): PHASES as in _o_norm_gate_up_kernel."""
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    if PHASES & 1:
        if PDL:
            gdc_wait()
        offs_k = tl.arange(0, BLOCK_KD)
        for blk in range(pid, NBD, step):
            rows = blk * BLOCK_RD + tl.arange(0, BLOCK_RD)
            wp = Wd + rows.to(tl.int64)[:, None] * stride_wd + offs_k[None, :]
            acc = tl.zeros([BLOCK_RD, BLOCK_KD], tl.float32)
            for k0 in range(0, KD, BLOCK_KD):
                acc += tl.load(wp + k0).to(tl.float32) * tl.load(Xd + k0 + offs_k).to(tl.float32)[None, :]
            tl.store(Hb + rows, _scaled(tl.sum(acc, 1), Sd, rows, ROW_SCALE_D).to(Hb.dtype.element_ty))
    if PHASES & 2:
        HALF: tl.constexpr = D // 2
        PER_HEAD: tl.constexpr = HALF // BLOCK_R
        offs, mask = _cols(K, K_PAD)
        head, d, rows_a = _qkv_rows(pid, PER_HEAD, D, BLOCK_R)
        wa = _tile(W, stride_w, rows_a, offs, mask)
        wb = _tile(W, stride_w, rows_a + HALF, offs, mask)
        _after_first_stream(Bar, PHASES, PDL)
        p = tl.load(Pos).to(tl.int64)
        slot = tl.load(Loc).to(tl.int64)
        c, s = _cos_sin(CS, p, stride_cs, head, d, HQ, HKV, HALF)
        n, xs = _operand(_normed_h(Hb, R, G, ROut, K, tl.where(pid == 0, K, 0), eps, offs, mask), W, Hb, F16)
        _qkv_blocks(wa, wb, c, s, n, xs, pid, NB, W, S, stride_w, offs, mask, CS, p, slot, stride_cs, Bias, Q,
                    KC, VC, stride_kct, stride_kch, stride_vct, stride_vch, HQ, HKV, D, BLOCK_R, HAS_BIAS, ROW_SCALE)


def new_barrier(device) -> torch.Tensor:
    """A counter for one chain's launches: launches of one grid size in turn (the engine keeps one per
    layer and chain)."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def config(chain: str, first: tuple, second_rows: int, hidden: int, device_type: str, elem: int) -> ChainConfig | None:
    """The tile of ``chain`` ("o_gate_up" or "down_qkv") for a first weight of shape ``first`` (rows,
    K) and a second whose row blocks come in multiples of ``second_rows``, over ``elem``-byte
    weights; None where the kernels do not take them (K past the full-K tiles, rows that do not
    tile, another weight width)."""
    rows, k = first
    if rows != hidden or triton.next_power_of_2(hidden) > 8192:
        return None
    if chain == "o_gate_up" and triton.next_power_of_2(k) > 8192:
        return None
    cfg = _INTERP[chain] if device_type != "cuda" else (_O_GATE_UP if chain == "o_gate_up" else _DOWN_QKV).get(elem)
    if cfg is None or rows % cfg.block_a or second_rows % cfg.block_b or (cfg.block_k and k % cfg.block_k):
        return None
    return cfg


def o_norm_gate_up(a, w_o, residual, norm_w, eps, w_gate_up, barrier, h_dtype=None, cfg: ChainConfig | None = None,
                   scales_o=None, scales=None, fp16_o: bool = True, fp16: bool = True):
    """One token: h = W_o·a (in h_dtype, default a's), r = h + residual; returns
    (silu(W_g·n) * (W_u·n) [1, I], r [1, H]), n = rmsnorm(r), as gemv then norm_gate_up would.
    ``scales_o``/``scales``: the weights' per-row scales (fp8 e4m3 rows); ``barrier``: new_barrier's."""
    H, KO = w_o.shape
    I = w_gate_up.shape[0] // 2
    assert w_gate_up.shape == (2 * I, H) and w_o.stride(1) == 1 and w_gate_up.stride(1) == 1
    dev = a.device
    cfg = cfg or config("o_gate_up", (H, KO), I, H, dev.type, w_gate_up.element_size())
    assert cfg is not None and H % cfg.block_a == 0 and I % cfg.block_b == 0
    ar, rr = _check_row(a, KO), _check_row(residual, H)
    hb = torch.empty(H, dtype=h_dtype or a.dtype, device=dev)
    r_out = torch.empty(H, dtype=residual.dtype, device=dev)
    out = torch.empty((1, I), dtype=residual.dtype, device=dev)
    nb = I // cfg.block_b
    args = (ar, w_o, hb, rr, norm_w, r_out, w_gate_up, out, barrier, KO, H, I, H // cfg.block_a, nb, eps,
            w_o.stride(0), w_gate_up.stride(0))
    meta = dict(BLOCK_RO=cfg.block_a, BLOCK_R=cfg.block_b, KO_PAD=triton.next_power_of_2(KO),
                K_PAD=triton.next_power_of_2(H), F16_O=_f16(cfg, cfg.block_a, KO, w_o, a.dtype, fp16_o),
                F16=_f16(cfg, cfg.block_b, H, w_gate_up, hb.dtype, fp16),
                **({} if scales_o is None else dict(So=scales_o, ROW_SCALE_O=True)), **_row_scales(scales))
    _launch(_o_norm_gate_up_kernel, args, meta, cfg, nb, barrier, dev)
    return out, r_out.view(1, H)


def down_norm_qkv(x, w_down, residual, norm_w, eps, w_qkv, bias, cos_sin, positions, loc, k_cache, v_cache,
                  num_heads: int, num_kv_heads: int, barrier, h_dtype=None, cfg: ChainConfig | None = None,
                  scales_d=None, scales=None, fp16: bool = True):
    """One token: h = W_d·x (in h_dtype, default x's), then the next layer's norm_qkv over h and
    ``residual`` (gemv.norm_qkv's arguments and result: (q [1, Hq, D], r [1, H]), k and v stored)."""
    H, KD = w_down.shape
    D = k_cache.shape[-1]
    N = w_qkv.shape[0]
    assert N == (num_heads + 2 * num_kv_heads) * D and w_qkv.shape[1] == H
    assert w_down.stride(1) == 1 and w_qkv.stride(1) == 1 and cos_sin.dtype == torch.float32
    assert cos_sin.shape[-1] == D and cos_sin.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    dev = x.device
    cfg = cfg or config("down_qkv", (H, KD), D // 2, H, dev.type, w_qkv.element_size())
    assert cfg is not None and H % cfg.block_a == 0 and (D // 2) % cfg.block_b == 0 and KD % cfg.block_k == 0
    xr, rr = _check_row(x, KD), _check_row(residual, H)
    hb = torch.empty(H, dtype=h_dtype or x.dtype, device=dev)
    r_out = torch.empty(H, dtype=residual.dtype, device=dev)
    q = torch.empty((1, num_heads, D), dtype=residual.dtype, device=dev)
    nb = N // cfg.block_b // 2
    args = (xr, w_down, hb, rr, norm_w, r_out, w_qkv, bias if bias is not None else w_qkv, cos_sin, positions, loc,
            q, k_cache, v_cache, barrier, KD, H, H // cfg.block_a, nb, eps, w_down.stride(0), w_qkv.stride(0),
            cos_sin.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1))
    meta = dict(HQ=num_heads, HKV=num_kv_heads, D=D, HAS_BIAS=bias is not None, BLOCK_RD=cfg.block_a,
                BLOCK_KD=cfg.block_k, BLOCK_R=cfg.block_b, K_PAD=triton.next_power_of_2(H),
                F16=_f16(cfg, cfg.block_b, H, w_qkv, hb.dtype, fp16),
                **({} if scales_d is None else dict(Sd=scales_d, ROW_SCALE_D=True)), **_row_scales(scales))
    _launch(_down_norm_qkv_kernel, args, meta, cfg, nb, barrier, dev)
    return q, r_out.view(1, H)


def _launch(kernel, args, meta, cfg: ChainConfig, nb: int, barrier, dev) -> None:
    """One launch with the grid barrier where every program fits on the GPU at once, else the two
    streams as two launches (always under the interpreter)."""
    assert barrier.dtype == torch.int64 and barrier.device == dev
    meta = dict(meta, num_warps=cfg.num_warps, num_stages=1)
    if dev.type != "cuda":
        for phases in (1, 2):
            kernel[(min(_INTERP_PROGRAMS, nb),)](*args, PHASES=phases, PDL=False, **meta, **FMA)
        return
    opts = {**launch_options(dev), **_cooperative()}
    grid = _resident_grid(kernel, args, meta, opts, cfg, nb, dev) if not _MPS_LIMITED else 0
    if grid:
        kernel[(grid,)](*args, PHASES=3, **meta, **opts, **FMA)
    else:  # not all resident at once: the two streams apart
        opts.pop("launch_cooperative_grid", None)
        for phases in (1, 2):
            kernel[(min(cfg.programs_per_sm * _sms(dev), nb),)](*args, PHASES=phases, **meta, **opts, **FMA)


def _cooperative() -> dict:
    """Triton's option for a cooperative launch (COOPERATIVE, where this Triton has it)."""
    if not COOPERATIVE:
        return {}
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return {}
    has = "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})
    return {"launch_cooperative_grid": True} if has else {}


def _f16(cfg: ChainConfig, rows: int, K: int, w: torch.Tensor, x_dtype, allowed: bool) -> bool:
    """gemv_tiles.fp16_products for a full-K tile of ``rows`` rows and this config's warps."""
    from .gemv_tiles import Config

    return fp16_products(Config(rows, 0, cfg.num_warps, 1, cfg.programs_per_sm), K, w.dtype, x_dtype, allowed)


def _occupancy(kernel, num_warps: int) -> int:
    """Programs of ``kernel`` (a compiled Triton kernel) one SM holds at once, by the driver; 0 if unknown."""
    try:
        kernel._init_handles()
        lib = ctypes.CDLL("libcuda.so.1")
        n = ctypes.c_int()
        rc = lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(n), ctypes.c_void_p(kernel.function), ctypes.c_int(32 * num_warps),
            ctypes.c_size_t(kernel.metadata.shared))
        return n.value if rc == 0 else 0
    except (OSError, AttributeError, TypeError):
        return 0


_SMS: dict = {}
_GRIDS: dict = {}  # (kernel, its launch's constants) -> its one-launch grid (0: two launches)


def _sms(dev: torch.device) -> int:
    key = dev.index if dev.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def _resident_grid(kernel, args, meta, opts, cfg: ChainConfig, nb: int, dev) -> int:
    """The one-launch grid (programs a SM x SMs, at most the second stream's blocks) where the driver
    says each SM holds that many programs of the compiled kernel at once (fewer a SM where it holds
    fewer); 0 where it holds none or cannot say."""
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), dev.index, cfg, nb,
           *(t.dtype if isinstance(t, torch.Tensor) else t for t in args),
           *sorted((k, v.dtype if isinstance(v, torch.Tensor) else v) for k, v in {**meta, **opts}.items()))
    grid = _GRIDS.get(key)
    if grid is None:
        compiled = kernel.warmup(*args, PHASES=3, **meta, **opts, **FMA, grid=(1,))
        per_sm = min(cfg.programs_per_sm, _occupancy(compiled, cfg.num_warps))
        grid = min(per_sm * _sms(dev), nb)
        if per_sm:  # a compile-only window (compile_ahead) hands back no kernel to ask: ask at the next launch
            _GRIDS[key] = grid
    return grid


def o_norm_gate_up_ref(a, w_o, residual, norm_w, eps, w_gate_up, h_dtype=None):
    """Torch reference (tests pass fp64): gemv then norm_gate_up's reference."""
    from .gemv import norm_gate_up_ref

    h = (a.float() @ w_o.float().t()).to(h_dtype or a.dtype)
    return norm_gate_up_ref(h, residual, norm_w, eps, w_gate_up)
