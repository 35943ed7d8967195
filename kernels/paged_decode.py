"""Paged decode attention over the token-level KV pool (flash-decoding, GQA-aware).

Math: for request b and query head h (kv head g = h // G),
    o[b,h] = softmax(q[b,h] · K[b,g]^T · scale) · V[b,g],
where K/V rows are gathered through req_to_token[req_pool_indices[b], :seq_lens[b]].
Stage 1 splits each sequence into NUM_SPLITS ranges (so one long request still
fills the GPU) and writes a partial output and its log-sum-exp per range; stage 2
merges them.  All G query heads of a KV head share one program, so each K/V row is
read once per request (GQA).
Floor: bytes = B·L·Hkv·D·2·elem (every cached K and V read once) over copy bandwidth;
FLOPs (4·B·L·Hq·D) are negligible.  No host sync: CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_stage1(
    Q, K, V, ReqToToken, ReqIdx, SeqLens, PartO, PartLse,
    scale,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_rt,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    row = tl.load(ReqIdx + b)
    chunk = tl.cdiv(seq_len, NUM_SPLITS)
    start = s * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_h = offs_h < G
    mask_d = offs_d < HEAD_DIM
    heads = g * G + offs_h
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < end
        slot = tl.load(ReqToToken + row * stride_rt + pos, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(K + slot[:, None] * stride_kt + g * stride_kh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vt + g * stride_vh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new

    empty = end <= start
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)))
    tl.store(PartO + b * stride_pb + heads[:, None] * stride_ph + s * stride_ps + offs_d[None, :], out,
             mask=mask_h[:, None] & mask_d[None, :])
    tl.store(PartLse + b * stride_lb + heads * stride_lh + s, lse, mask=mask_h)


@triton.jit
def _decode_stage2(
    PartO, PartLse, Out,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(PartLse + b * stride_lb + h * stride_lh + offs_s)
    m = tl.max(lse, 0)
    w = tl.exp(lse - m)
    w = tl.where(lse == float("-inf"), 0.0, w)
    o = tl.load(PartO + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                mask=mask_d[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)


def decode_attention(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale,
                     out=None, num_splits: int = 8, workspace=None):
    """q: [B, Hq, D]; k_cache/v_cache: [slots, Hkv, D]; returns [B, Hq, D].

    ``workspace`` = (partial_out [>=B, Hq, S, D] fp32, partial_lse [>=B, Hq, S] fp32) lets
    CUDA graphs reuse fixed buffers."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    if out is None:
        out = torch.empty_like(q)
    if workspace is None:
        part_o = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o, part_lse = workspace
    BLOCK_H = max(16, triton.next_power_of_2(G))
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_N = 64 if BLOCK_D <= 64 else 32
    if q.device.type == "cpu":  # interpreter: fewer, larger steps
        BLOCK_N = 16
    _decode_stage1[(B, Hkv, num_splits)](
        q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, part_o, part_lse,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        req_to_token.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        G=G, HEAD_DIM=D, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, NUM_SPLITS=num_splits,
        num_warps=4, num_stages=2,
    )
    _decode_stage2[(B, Hq)](
        part_o, part_lse, out,
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, BLOCK_D=BLOCK_D, NUM_SPLITS=num_splits,
        num_warps=4,
    )
    return out


def decode_attention_ref(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale):
    """Torch reference in fp32."""
    out = torch.empty_like(q)
    G = q.shape[1] // k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        slots = req_to_token[int(req_pool_indices[b]), :n].long()
        k = k_cache[slots].float().repeat_interleave(G, dim=1)  # [n, Hq, D]
        v = v_cache[slots].float().repeat_interleave(G, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out
