"""Extend (prefill-with-prefix) attention over the paged KV pool: ragged batch, causal, GQA.

Math: request i has P_i cached tokens and E_i new ones (already stored in the pool, so
all P_i + E_i slots are req_to_token[req_pool_indices[i], :P_i + E_i]).  Its new token t
(absolute position P_i + t, flat row extend_start_loc[i] + t of q/o) and query head h of
KV group g = h // G attends to keys 0 .. P_i + t:
    o[row, h] = softmax(scale · q[row, h] · K_i[g][:P_i+t+1]^T) · V_i[g][:P_i+t+1]
(flash-attention online softmax, fp32 accumulation, exp2 with the scale folded in).

Tiling: a work item is (request, block of TOK = BLOCK_M // G new tokens); its BLOCK_M
query rows are the G heads of one KV group for each of those tokens (row r -> token r//G,
head g·G + r%G), so every K/V tile is read once per group instead of once per head, and a
decode-like request (E_i = 1) still fills G rows.  Keys below P_i + t0 + 1 are visible to
every row and run unmasked; only the last few tiles near the diagonal are masked.  Work
items are built on the host (extend steps are never graph-captured), heaviest first.

Floor: FLOPs = Σ_i Σ_t 4·Hq·D·(P_i + t + 1) ≈ 4·Hq·D·Σ_i E_i·(P_i + E_i/2) at the
tensor-core rate; bytes ≈ Σ_i (P_i + E_i)·Hkv·D·2·elem per TOK-token block (K/V re-read
from L2 across blocks) + 2·T·Hq·D·elem for q and o.  Prefill is compute-bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _extend_kernel(
    Q, K, V, O, ReqToToken, ReqIdx, PrefixLens, ExtendLens, ExtendStart, WorkReq, WorkTok,
    sm_scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_r,
    G: tl.constexpr, TOK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
    mask_d = offs_d < HEAD_DIM
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

    for n0 in range(0, full_end, BLOCK_N):
        pos = n0 + offs_n
        slot = tl.load(table + pos).to(tl.int64)
        k = tl.load(K + slot[:, None] * stride_kt + g * stride_kh + offs_d[None, :], mask=mask_d[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * sm_scale_log2
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vt + g * stride_vh + offs_d[None, :], mask=mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    for n0 in range(full_end, kv_end, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < kv_end
        slot = tl.load(table + pos, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(K + slot[:, None] * stride_kt + g * stride_kh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * sm_scale_log2
        visible = mask_n[None, :] & (pos[None, :] <= q_pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vt + g * stride_vh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def extend_config(head_dim: int, group: int, device_type: str):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head_dim / GQA group."""
    if device_type != "cuda":
        block_m, block_n, warps, stages = 32, 16, 4, 1  # interpreter
    elif head_dim <= 64:
        block_m, block_n, warps, stages = 128, 64, 4, 3
    elif head_dim <= 128:
        block_m, block_n, warps, stages = 128, 64, 8, 2
    else:
        block_m, block_n, warps, stages = 64, 32, 4, 2
    block_m = max(block_m, triton.next_power_of_2(group))
    return block_m, block_n, warps, stages


def tokens_per_block(head_dim: int, group: int, device_type: str) -> int:
    return extend_config(head_dim, group, device_type)[0] // group


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


def extend_attention(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens, extend_lens,
                     extend_start_loc, scale, work, out=None):
    """q: [T, Hq, D] new tokens of all requests (unit last stride); k_cache/v_cache:
    [slots, Hkv, D] holding every token's K/V (new ones included); req_pool_indices [B],
    prefix_lens / extend_lens / extend_start_loc [B] int device tensors; ``work`` from
    :func:`build_work` with ``tok = tokens_per_block(D, Hq // Hkv, device)``.
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
    block_m, block_n, warps, stages = extend_config(D, G, q.device.type)
    block_d = max(16, triton.next_power_of_2(D))
    _extend_kernel[(n_items, Hkv)](
        q, k_cache, v_cache, out, req_to_token, req_pool_indices, prefix_lens, extend_lens, extend_start_loc,
        work_req, work_tok,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), req_to_token.stride(0),
        G=G, TOK=block_m // G, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=warps, num_stages=stages,
    )
    return out


def extend_attention_ref(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens, extend_lens, scale):
    """Torch reference (fp64 math, output in q's dtype); host loop over requests."""
    T, Hq, D = q.shape
    G = Hq // k_cache.shape[1]
    out = torch.empty_like(q)
    s0 = 0
    for i in range(len(extend_lens)):
        p, e = int(prefix_lens[i]), int(extend_lens[i])
        slots = req_to_token[int(req_pool_indices[i]), : p + e].long()
        k = k_cache[slots].double().repeat_interleave(G, dim=1)  # [L, Hq, D]
        v = v_cache[slots].double().repeat_interleave(G, dim=1)
        qq = q[s0 : s0 + e].double()
        s = torch.einsum("thd,nhd->htn", qq, k) * scale
        qpos = torch.arange(p, p + e, device=q.device)[:, None]
        kpos = torch.arange(p + e, device=q.device)[None, :]
        s = s.masked_fill(~(kpos <= qpos)[None], float("-inf"))
        out[s0 : s0 + e] = torch.einsum("htn,nhd->thd", s.softmax(-1), v).to(q.dtype)
        s0 += e
    return out
