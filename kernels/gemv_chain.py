"""o_proj and the MLP's first stream in one launch: y = W_o·a, then norm_gate_up over y, with a
grid barrier between them (batch-1 decode, full-K tiles of kernels/gemv.py).

A batch-1 step is a chain of short weight streams, and each one alone reaches only about half
of DRAM bandwidth: its programs ramp up, and its tail drains while the next kernel waits
(bench/RESULTS.md, "thirty-fourth session": o_proj 10 µs at 50 % of DRAM).  Here the programs
that finish their o_proj rows issue their first gate_up tiles at once and wait at a barrier for
the rest of o_proj, instead of exiting; the gate_up stream starts as o_proj's last rows land.

The barrier: every program adds one to a counter (int64, never reset: a launch of P programs
waits until it reaches the next multiple of P) and spins on it.  Every program must therefore be
resident at once: the launcher sizes the grid from the driver's occupancy for the compiled
kernel, and runs the two halves as two launches where it cannot (or under the interpreter,
which runs programs one after another).  A counter serves the launches of one grid size in
sequence (``new_barrier``: one per model).

With PDL the kernel waits for its predecessor (the attention) before reading a, and releases
its successor (down_proj) only after the barrier, when all its programs are resident: a
successor's programs never hold the slots it is waiting for.
"""
from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .gemv import _check_row, _cols, _dot, _operand, _row_scales, _scaled, _silu_mul, _tile, fp16_products
from .options import FMA
from .pdl import gdc_launch_dependents, gdc_wait, launch_options

# Whether the fused decode step takes this kernel where it fits (False: o_proj and norm_gate_up
# launch apart, as before).
O_GATE_UP = True


class ChainConfig(NamedTuple):
    """o_proj's rows per block, gate_up's rows per block, programs per SM, warps."""

    block_ro: int
    block_r: int
    programs_per_sm: int
    num_warps: int


# (block_ro, block_r, programs a SM, warps) by weight bytes: gate_up keeps gemv_tiles' one-byte
# tile (4 rows, 4 warps, 4 a SM), o_proj takes as many rows as give each program one block.
_CUDA = {1: ChainConfig(8, 4, 4, 4), 2: ChainConfig(4, 4, 2, 8)}
_INTERP = ChainConfig(4, 4, 1, 4)
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
        if PHASES == 3:
            _grid_barrier(Bar, step)
        elif PDL:
            gdc_wait()
        if PDL:
            gdc_launch_dependents()
        # h through L2 (.cg): other programs wrote it during this launch
        h = tl.load(Hb + offs, mask=mask, other=0.0, cache_modifier=".cg")
        s = (h.to(tl.float32) + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(ROut.dtype.element_ty)
        tl.store(ROut + offs, s, mask=offs < tl.where(pid == 0, K, 0))
        n = s.to(tl.float32)
        n = n * tl.rsqrt(tl.sum(n * n, 0) / K + eps) * tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        n, xs = _operand(n, W, Hb, F16)
        g = _scaled(_dot(wg, n, xs), S, rows, ROW_SCALE)
        tl.store(Out + rows, _silu_mul(g, _scaled(_dot(wu, n, xs), S, rows + I, ROW_SCALE)).to(Out.dtype.element_ty))
        for blk in range(pid + step, NB, step):
            rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
            g = _scaled(_dot(_tile(W, stride_w, rows, offs, mask), n, xs), S, rows, ROW_SCALE)
            u = _scaled(_dot(_tile(W, stride_w, rows + I, offs, mask), n, xs), S, rows + I, ROW_SCALE)
            tl.store(Out + rows, _silu_mul(g, u).to(Out.dtype.element_ty))


def new_barrier(device) -> torch.Tensor:
    """A counter for ``o_norm_gate_up``'s launches (one per model: launches of one grid size in turn)."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def config(o_rows: int, o_k: int, intermediate: int, hidden: int, device_type: str, elem: int) -> ChainConfig | None:
    """The tile for these shapes, or None where the kernel does not take them (K past the full-K
    tiles, rows that do not tile, weights of another width)."""
    if triton.next_power_of_2(max(o_k, hidden)) > 8192 or o_rows != hidden:
        return None
    cfg = _CUDA.get(elem) if device_type == "cuda" else _INTERP
    if cfg is None or hidden % cfg.block_ro or intermediate % cfg.block_r:
        return None
    return cfg


def _occupancy(kernel, num_warps: int) -> int:
    """Blocks of ``kernel`` (a compiled Triton kernel) one SM holds at once, by the driver; 0 if unknown."""
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


def o_norm_gate_up(a, w_o, residual, norm_w, eps, w_gate_up, barrier, h_dtype=None, cfg: ChainConfig | None = None,
                   scales_o=None, scales=None, fp16_o: bool = True, fp16: bool = True):
    """One token: h = W_o·a (in h_dtype, default a's), r = h + residual; returns
    (silu(W_g·n) * (W_u·n) [1, I], r [1, H]), n = rmsnorm(r), as gemv then norm_gate_up would.
    ``scales_o``/``scales``: the weights' per-row scales (fp8 e4m3 rows); ``barrier``: new_barrier's."""
    H, KO = w_o.shape
    I = w_gate_up.shape[0] // 2
    assert w_gate_up.shape == (2 * I, H) and w_o.stride(1) == 1 and w_gate_up.stride(1) == 1
    dev = a.device
    cfg = cfg or config(H, KO, I, H, dev.type, w_gate_up.element_size())
    assert cfg is not None and H % cfg.block_ro == 0 and I % cfg.block_r == 0
    assert barrier.dtype == torch.int64 and barrier.device == dev
    ar = _check_row(a, KO)
    rr = _check_row(residual, H)
    hb = torch.empty(H, dtype=h_dtype or a.dtype, device=dev)
    r_out = torch.empty(H, dtype=residual.dtype, device=dev)
    out = torch.empty((1, I), dtype=residual.dtype, device=dev)
    nbo, nb = H // cfg.block_ro, I // cfg.block_r
    o_scales = {} if scales_o is None else dict(So=scales_o, ROW_SCALE_O=True)
    args = (ar, w_o, hb, rr, norm_w, r_out, w_gate_up, out, barrier, KO, H, I, nbo, nb, eps, w_o.stride(0),
            w_gate_up.stride(0))
    meta = dict(BLOCK_RO=cfg.block_ro, BLOCK_R=cfg.block_r, KO_PAD=triton.next_power_of_2(KO),
                K_PAD=triton.next_power_of_2(H), F16_O=_f16(cfg, cfg.block_ro, KO, w_o, a.dtype, fp16_o),
                F16=_f16(cfg, cfg.block_r, H, w_gate_up, hb.dtype, fp16), num_warps=cfg.num_warps,
                num_stages=1, **o_scales, **_row_scales(scales), **FMA)
    if dev.type != "cuda":
        grid = min(_INTERP_PROGRAMS, nb)
        for phases in (1, 2):
            _o_norm_gate_up_kernel[(grid,)](*args, PHASES=phases, PDL=False, **meta)
        return out, r_out.view(1, H)
    opts = launch_options(dev)
    grid = _resident_grid(args, meta, opts, cfg, nb, dev)
    if grid:
        _o_norm_gate_up_kernel[(grid,)](*args, PHASES=3, **meta, **opts)
    else:  # not all resident at once: the two halves apart
        grid = min(cfg.programs_per_sm * _sms(dev), nb)
        for phases in (1, 2):
            _o_norm_gate_up_kernel[(grid,)](*args, PHASES=phases, **meta, **opts)
    return out, r_out.view(1, H)


def _f16(cfg: ChainConfig, rows: int, K: int, w: torch.Tensor, x_dtype, allowed: bool) -> bool:
    """gemv_tiles.fp16_products for a tile of ``rows`` rows and this config's warps."""
    from .gemv_tiles import Config

    return fp16_products(Config(rows, 0, cfg.num_warps, 1, cfg.programs_per_sm), K, w.dtype, x_dtype, allowed)


_SMS: dict = {}
_GRIDS: dict = {}  # the launch's constants -> its one-launch grid (0: two launches)


def _sms(dev: torch.device) -> int:
    key = dev.index if dev.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def _resident_grid(args, meta, opts, cfg: ChainConfig, nb: int, dev) -> int:
    """The one-launch grid (programs a SM x SMs, at most the gate_up blocks) when the driver says
    each SM holds that many programs of the compiled kernel at once; 0 when it cannot say."""
    key = (dev.index, cfg, nb, *(t.dtype if isinstance(t, torch.Tensor) else t for t in args[:9]),
           *sorted((k, v.dtype if isinstance(v, torch.Tensor) else v) for k, v in {**meta, **opts}.items()))
    grid = _GRIDS.get(key)
    if grid is None:
        kernel = _o_norm_gate_up_kernel.warmup(*args, PHASES=3, **meta, **opts, grid=(1,))
        per_sm = min(cfg.programs_per_sm, _occupancy(kernel, cfg.num_warps))
        grid = min(per_sm * _sms(dev), nb)
        if per_sm:  # a compile-only window (compile_ahead) hands back no kernel to ask: ask at the next launch
            _GRIDS[key] = grid
    return grid


def o_norm_gate_up_ref(a, w_o, residual, norm_w, eps, w_gate_up, h_dtype=None):
    """Torch reference (tests pass fp64): gemv then norm_gate_up's reference."""
    from .gemv import norm_gate_up_ref

    h = (a.float() @ w_o.float().t()).to(h_dtype or a.dtype)
    return norm_gate_up_ref(h, residual, norm_w, eps, w_gate_up)
