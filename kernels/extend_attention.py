"""Extend (prefill-with-prefix) attention over the paged KV pool: ragged batch, causal, GQA.

Math: request i has P_i cached tokens and E_i new ones (already stored in the pool, so
all P_i + E_i slots are req_to_token[req_pool_indices[i], :P_i + E_i]).  Its new token t
(absolute position P_i + t, flat row extend_start_loc[i] + t of q/o) and query head h of
KV group g = h // G attends to keys 0 .. P_i + t:
    o[row, h] = softmax(scale · q[row, h] · K_i[g][:P_i+t+1]^T) · V_i[g][:P_i+t+1]
(flash-attention online softmax, fp32 accumulation, exp2 with the scale folded in; with
bf16 q on Hopper the exp2 runs in bf16, two values an instruction, its argument rounded to
bf16: the probabilities feed a bf16 dot either way).

Tiling: a work item is (request, block of TOK = BLOCK_M // G new tokens); its BLOCK_M
query rows are the G heads of one KV group for each of those tokens (row r -> token r//G,
head g·G + r%G), so every K/V tile is read once per group instead of once per head, and a
decode-like request (E_i = 1) still fills G rows.  Keys below P_i + t0 + 1 are visible to
every row and run unmasked; only the last few tiles near the diagonal are masked.  Work
items are built on the host (extend steps are never graph-captured), heaviest first.

FP8 KV (k_scale / v_scale given, e4m3 caches): each K/V tile is read as e4m3 and multiplied
by its rows' (token, head) scales (kv_pool.py has the format) into q's dtype before the
products; the math above runs on the dequantized values.

Floor: FLOPs = Σ_i Σ_t 4·Hq·D·(P_i + t + 1) ≈ 4·Hq·D·Σ_i E_i·(P_i + E_i/2) at the
tensor-core rate; bytes ≈ Σ_i (P_i + E_i)·Hkv·D·2·elem per TOK-token block (K/V re-read
from L2 across blocks) + 2·T·Hq·D·elem for q and o.  Prefill is compute-bound.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .options import FMA

LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, mask, scale_ptrs, scale_mask, DT: tl.constexpr, KV_FP8: tl.constexpr):
    """A K or V tile; an FP8 pool's tile comes back multiplied by its rows' scales, in DT."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if KV_FP8:
        s = tl.load(scale_ptrs, mask=scale_mask, other=0.0)
        x = (x.to(tl.float32) * s[:, None]).to(DT)
    return x


@triton.jit
def _exp2_bf16(x):
    """2^x of fp32 x as bf16, two values per instruction (sm_90+); x rounds to bf16 first.
    Next to the tensor cores the special-function unit's exp2 rate bounds the softmax (one
    exp per 512 FLOPs of the two dots at head_dim 128), and the probabilities go into a bf16
    dot anyway."""
    return tl.inline_asm_elementwise("ex2.approx.ftz.bf16x2 $0, $1;", "=r,r", [x.to(tl.bfloat16)],
                                     dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _softmax_tile(qk, m_i, l_i, qk_scale, visible, MASKED: tl.constexpr, EXP16: tl.constexpr):
    """The online-softmax update for one tile of scores qk, left unscaled until the exp2 so
    that the scale and the running max fold into one multiply-add per score.  Returns the
    probabilities p, the accumulator's rescale alpha, the new max and the new row sums."""
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    if EXP16:
        p = _exp2_bf16(qk * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    else:
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _online_step(q, k, v_ptrs, v_mask, vs_ptrs, vs_mask, acc, m_i, l_i, qk_scale, visible,
                 MASKED: tl.constexpr, V_EARLY: tl.constexpr, KV_FP8: tl.constexpr, EXP16: tl.constexpr):
    """One key tile: scores, softmax, PV.  V_EARLY issues the V load before the score matmul
    instead of after the softmax (which order overlaps better depends on the pipelining depth)."""
    if V_EARLY:
        v = _load_tile(v_ptrs, v_mask, vs_ptrs, vs_mask, q.dtype, KV_FP8)
    qk = tl.dot(q, tl.trans(k))
    p, alpha, m_i, l_i = _softmax_tile(qk, m_i, l_i, qk_scale, visible, MASKED, EXP16)
    if not V_EARLY:
        v = _load_tile(v_ptrs, v_mask, vs_ptrs, vs_mask, q.dtype, KV_FP8)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # compiles like tl.dot(p, v, acc * alpha)
    return acc, m_i, l_i


@triton.jit
def _extend_kernel(
    Q, K, V, KS, VS, O, ReqToToken, ReqIdx, PrefixLens, ExtendLens, ExtendStart, WorkReq, WorkTok,
    qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ksh, stride_vsh,
    stride_ot, stride_oh, stride_r,
    G: tl.constexpr, TOK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, V_EARLY: tl.constexpr,
    KV_FP8: tl.constexpr, EXP16: tl.constexpr = False, OFFS32: tl.constexpr = False,
):
    w = tl.program_id(0)
    g = tl.program_id(1)
    i = tl.load(WorkReq + w)
    t0 = tl.load(WorkTok + w).to(tl.int32)
    prefix = tl.load(PrefixLens + i).to(tl.int32)
    ext = tl.load(ExtendLens + i).to(tl.int32)
    q_start = tl.load(ExtendStart + i).to(tl.int64)
    row = tl.load(ReqIdx + i).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    tok = t0 + offs_m // G
    head = g * G + offs_m % G
    mask_m = (offs_m < TOK * G) & (tok < ext)
    mask_d = offs_d < HEAD_DIM  # all true unless head_dim is not a power of two
    q_rows = q_start + tok.to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q_pos = prefix + tok  # absolute position of each row's token

    t_end = tl.minimum(t0 + TOK, ext)
    kv_end = prefix + t_end  # keys [0, kv_end) are touched by this item
    full_end = ((prefix + t0 + 1) // BLOCK_N) * BLOCK_N  # keys below are visible to all rows

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = ReqToToken + row * stride_r
    k_head = K + g * stride_kh + offs_d[None, :]
    v_head = V + g * stride_vh + offs_d[None, :]
    ks_head = KS + g * stride_ksh
    vs_head = VS + g * stride_vsh

    # Main loop: every row sees every key, no masks; one slot load serves K and V.
    all_n = offs_n < BLOCK_N  # (the FP8 scales' loads take a mask)
    for n0 in range(0, full_end, BLOCK_N):
        slot = tl.load(table + n0 + offs_n)
        if not OFFS32:
            slot = slot.to(tl.int64)
        k = _load_tile(k_head + slot[:, None] * stride_kt, mask_d[None, :], ks_head + slot, all_n, q.dtype, KV_FP8)
        acc, m_i, l_i = _online_step(q, k, v_head + slot[:, None] * stride_vt, mask_d[None, :], vs_head + slot, all_n,
                                     acc, m_i, l_i, qk_scale, None, MASKED=False, V_EARLY=V_EARLY, KV_FP8=KV_FP8,
                                     EXP16=EXP16)

    # Diagonal tail: the few tiles that cross some row's causal boundary or kv_end.
    for n0 in range(full_end, kv_end, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < kv_end
        slot = tl.load(table + pos, mask=mask_n, other=0)
        if not OFFS32:
            slot = slot.to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = _load_tile(k_head + slot[:, None] * stride_kt, kv_mask, ks_head + slot, mask_n, q.dtype, KV_FP8)
        visible = mask_n[None, :] & (pos[None, :] <= q_pos[:, None])
        acc, m_i, l_i = _online_step(q, k, v_head + slot[:, None] * stride_vt, kv_mask, vs_head + slot, mask_n,
                                     acc, m_i, l_i, qk_scale, visible, MASKED=True, V_EARLY=V_EARLY, KV_FP8=KV_FP8,
                                     EXP16=EXP16)

    out = acc / l_i[:, None]
    tl.store(O + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


class ExtendConfig(NamedTuple):
    """Tile shape and launch parameters of the extend kernel (BLOCK_M query rows =
    BLOCK_M // G tokens x G heads; BLOCK_N keys per tile)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    v_early: bool = False
    # probabilities by a bf16 exp2, two per instruction: bf16 q on sm_90+ only (elsewhere, and
    # under the interpreter, which runs no inline PTX, the fp32 exp2)
    exp16: bool = False
    # K/V row offsets in 32 bits where every offset into the caches fits (fewer registers
    # than 64-bit address math; ~1 % at 118k-token prefixes on an H200)
    offs32: bool = True


# Preferred CUDA configurations per head_dim bound, best first; the first whose shared
# memory fits the device is used.  On an H200 at Llama-3.1-8B's shape (G = 4, D = 128)
# the 256-row tile with a 3-deep K/V pipeline runs 2,048-token chunks behind a long prefix
# 1.5-1.6x faster than 128 x 64 with 2 stages (bench/RESULTS.md, "Long-prompt extend
# attention", has the sweep).
_CUDA_CONFIGS = (
    (64, (ExtendConfig(128, 64, 4, 3),)),
    (128, (ExtendConfig(256, 64, 8, 3, exp16=True), ExtendConfig(128, 64, 8, 2))),
    (1 << 30, (ExtendConfig(64, 32, 4, 2),)),
)


def smem_bytes(cfg: ExtendConfig, head_dim: int, elem: int = 2) -> int:
    """Shared memory a launch needs at most: the Q tile plus num_stages buffers of one K and
    one V tile (an upper bound: Triton 3.6 on Hopper keeps num_stages - 1 buffers)."""
    d = max(16, triton.next_power_of_2(head_dim))
    return elem * d * (cfg.block_m + 2 * cfg.num_stages * cfg.block_n)


@functools.lru_cache(maxsize=None)
def _device_smem(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


# Shared memory Triton may add to the tiles (layout conversions, reductions) on top of
# smem_bytes; a configuration is chosen only if it fits with this to spare.
SMEM_MARGIN = 8 * 1024


def choose_config(head_dim: int, group: int, smem_limit: int) -> ExtendConfig:
    """The first preferred CUDA configuration whose shared memory fits ``smem_limit``."""
    choices = next(c for bound, c in _CUDA_CONFIGS if head_dim <= bound)
    cfg = next((c for c in choices if smem_bytes(c, head_dim) + SMEM_MARGIN <= smem_limit), choices[-1])
    return cfg._replace(block_m=max(cfg.block_m, triton.next_power_of_2(group)))


def extend_config(head_dim: int, group: int, device) -> ExtendConfig:
    """The launch configuration for this head_dim / GQA group on ``device`` (a torch
    device or its type name; the interpreter gets a small tile)."""
    device = torch.device(device)
    if device.type != "cuda":
        return ExtendConfig(max(32, triton.next_power_of_2(group)), 16, 4, 1)
    return choose_config(head_dim, group, _device_smem(device.index if device.index is not None
                                                       else torch.cuda.current_device()))


def tokens_per_block(head_dim: int, group: int, device) -> int:
    return extend_config(head_dim, group, device).block_m // group


def build_work(extend_lens: list[int], prefix_lens: list[int], tok: int, device,
               first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-side work list: (request index, first new token) per block of ``tok`` new tokens,
    heaviest (most keys) first, for requests ``first``.. (rows before it are left to another
    kernel: their outputs are not written).  Returns two int32 device tensors."""
    items = []
    for i in range(first, len(extend_lens)):
        e, p = extend_lens[i], prefix_lens[i]
        for t0 in range(0, e, tok):
            items.append((p + min(t0 + tok, e), i, t0))
    items.sort(key=lambda x: -x[0])
    reqs = torch.tensor([x[1] for x in items], dtype=torch.int32)
    toks = torch.tensor([x[2] for x in items], dtype=torch.int32)
    if torch.device(device).type == "cuda":
        reqs = reqs.pin_memory().to(device, non_blocking=True)
        toks = toks.pin_memory().to(device, non_blocking=True)
    return reqs, toks


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def exp16_applies(cfg: ExtendConfig, q: torch.Tensor) -> bool:
    """Whether the kernel takes the bf16 exp2 for this config and q (bf16 q on sm_90+)."""
    return (bool(cfg.exp16) and q.device.type == "cuda" and q.dtype == torch.bfloat16
            and _sm90(q.device.index if q.device.index is not None else torch.cuda.current_device()))


def _fits_int32(*caches) -> bool:
    """Whether every element offset into these caches fits a signed 32-bit integer."""
    return all(c.numel() < (1 << 31) for c in caches)


def extend_attention(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens, extend_lens,
                     extend_start_loc, scale, work, out=None, config: ExtendConfig | None = None,
                     k_scale=None, v_scale=None):
    """q: [T, Hq, D] new tokens of all requests (unit last stride); k_cache/v_cache:
    [slots, Hkv, D] holding every token's K/V (new ones included); req_pool_indices [B],
    prefix_lens / extend_lens / extend_start_loc [B] int device tensors; ``work`` from
    :func:`build_work` with ``tok = tokens_per_block(D, Hq // Hkv, device)`` (with an
    explicit ``config``: ``tok = config.block_m // G``).  ``k_scale``/``v_scale`` ([Hkv, slots]
    fp32, unit last stride): the caches are e4m3 with these per-(token, head) scales.
    Returns out [T, Hq, D]."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    assert Hq % Hkv == 0, "query heads must be a multiple of KV heads"
    G = Hq // Hkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    work_req, work_tok = work
    n_items = work_req.shape[0]
    if T == 0 or n_items == 0:
        return out
    cfg = config or extend_config(D, G, q.device)
    assert cfg.block_m >= G, "a tile must hold all heads of one KV group"
    block_d = max(16, triton.next_power_of_2(D))
    kv_fp8 = k_scale is not None
    if kv_fp8:
        assert v_scale is not None and k_scale.stride(-1) == 1 and v_scale.stride(-1) == 1
        assert k_cache.dtype == torch.float8_e4m3fn, "scales come with e4m3 caches"
        scale_strides = (k_scale.stride(0), v_scale.stride(0))
    else:
        k_scale = v_scale = k_cache  # unused
        scale_strides = (0, 0)
    _extend_kernel[(n_items, Hkv)](
        q, k_cache, v_cache, k_scale, v_scale, out, req_to_token, req_pool_indices, prefix_lens, extend_lens,
        extend_start_loc, work_req, work_tok,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        *scale_strides, out.stride(0), out.stride(1), req_to_token.stride(0),
        G=G, TOK=cfg.block_m // G, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        V_EARLY=cfg.v_early, KV_FP8=kv_fp8, EXP16=exp16_applies(cfg, q),
        OFFS32=cfg.offs32 and _fits_int32(k_cache, v_cache, k_scale, v_scale), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **FMA,
    )
    return out


def extend_attention_ref(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens, extend_lens, scale,
                         k_scale=None, v_scale=None):
    """Torch reference (fp64 math, output in q's dtype); host loop over requests."""
    from .decode_attention import dequantized_rows

    T, Hq, D = q.shape
    G = Hq // k_cache.shape[1]
    out = torch.empty_like(q)
    s0 = 0
    for i in range(len(extend_lens)):
        p, e = int(prefix_lens[i]), int(extend_lens[i])
        slots = req_to_token[int(req_pool_indices[i]), : p + e].long()
        k = dequantized_rows(k_cache, k_scale, slots).repeat_interleave(G, dim=1)  # [L, Hq, D]
        v = dequantized_rows(v_cache, v_scale, slots).repeat_interleave(G, dim=1)
        qq = q[s0 : s0 + e].double()
        s = torch.einsum("thd,nhd->htn", qq, k) * scale
        qpos = torch.arange(p, p + e, device=q.device)[:, None]
        kpos = torch.arange(p + e, device=q.device)[None, :]
        s = s.masked_fill(~(kpos <= qpos)[None], float("-inf"))
        out[s0 : s0 + e] = torch.einsum("htn,nhd->thd", s.softmax(-1), v).to(q.dtype)
        s0 += e
    return out
