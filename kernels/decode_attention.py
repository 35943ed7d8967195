"""Paged decode attention: split-KV (flash-decoding), GQA-aware, CUDA-graph safe.

Math: for request b with L = seq_lens[b] cached tokens (the new one included) whose KV slots
are req_to_token[req_pool_indices[b], :L], and query head h of KV group g = h // G (G = Hq / Hkv):
    o[b, h] = softmax(scale · q[b, h] · K[b, g]^T) · V[b, g]            (fp32 accumulation)
Stage 1 (grid B × Hkv × S): the sequence is cut into at most S chunks of
    chunk = roundup(max(cdiv(L, S), MIN_CHUNK), BLOCK_N)
tokens (so short requests use fewer, larger chunks; the effective split count cdiv(L, chunk) is
computed on the device).  Program (b, g, s) streams its chunk's K/V rows once for all G query
heads of group g (a [G, D] × [D, BLOCK_N] tensor-core product) and writes the chunk's normalised
partial output and its log2-sum-exp.  Programs whose chunk is empty write nothing.  Stage 2
(grid B × Hq) merges the valid chunks:
    o = Σ_s 2^(lse_s − M) · o_s / Σ_s 2^(lse_s − M).
The merge is a launch of its own: merging in the last stage-1 program of each (b, KV head),
found by an arrival counter, is slower (bench/RESULTS.md, "the step around the weight streams").
Under PDL, for batches of at most 8 rows, stage 1 loads the slot table and the first block of
cached K/V (all but the newest token, which this step's KV store writes) before waiting for its
predecessor, and stage 2 lets its successor launch before it waits (at batch 1 that is o_proj,
which loads only weights before its own wait); both shorten the batch-1 step.  Larger batches
wait first: there the early loads cost the mixed throughput workload 7% (same section).
S is a host-side constant per batch size (more splits for small batches so one long request still
fills the GPU), so a captured CUDA graph keeps a fixed grid; nothing here syncs with the host.

Shared prefixes (cascade decoding): when rows of the batch share their first Lp cached tokens
(the same KV slots, from one radix-cache path), reading that prefix once per row costs R·Lp rows
of K/V for R rows.  With ``groups`` given, a prefix stage (grid NG × Hkv × SP) streams the
group's prefix once for all R·G query rows of a KV head (an [R·G, D] × [D, BLOCK_N] product) and
writes per-row partials; stage 1 then covers only each row's suffix [start_b, L_b) and stage 2
merges the suffix and prefix partials with the same log-sum-exp rule.  Prefix floor:
Lp · Hkv · D · 2 · elem per group instead of per row.

FP8 KV (k_scale / v_scale given, e4m3 caches; kv_pool.py has the format): K/V rows are read
as e4m3 and widened to fp16 (exact: every e4m3 value is an fp16 value; one conversion per two
values, where bf16 takes several), against q pre-scaled by the softmax scale in fp16, and each
row's scale is applied where it costs least, to that key's scores and to the probabilities
that weight its value row: q·(s_k·k) = s_k·(q·k) and Σ p·(s_v·v) = Σ (p·s_v)·v, a multiply per
[rows, BLOCK_N] score tile instead of per [BLOCK_N, D] K/V tile.  A row costs D + 4 bytes
instead of D · elem.

Floor: bytes = Σ_b L_b · Hkv · D · 2 · elem (every cached K and V row read once) plus
B·Hq·D·elem for q and o, over copy bandwidth.  FLOPs (4 · Σ_b L_b · Hq · D) are far below
the tensor-core rate; the split partials add B·Hq·S·(D+1)·4·2 bytes (small for S ≤ 32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .l2_prefetch import kernel_args as prefetch_args, max_tokens, prefetch_spans
from .options import FMA
from .pdl import launch_options, release_successor_then_wait, wait_for_predecessor
from .quant_words import _store_int8, zero_share

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv(Ptr, slot, g, stride_t, stride_h, offs_d, rows, mask_d, DT: tl.constexpr):
    """Rows ``slot`` [BLOCK_N] of KV head g as [BLOCK_N, BLOCK_D] in DT (0 outside ``rows`` /
    mask_d); an FP8 pool's e4m3 values are widened exactly, their scales not applied."""
    return tl.load(Ptr + slot[:, None] * stride_t + g * stride_h + offs_d[None, :],
                   mask=rows[:, None] & mask_d[None, :], other=0.0).to(DT)


@triton.jit
def _load_scale(Scale, slot, g, stride_sh, rows, KV_FP8: tl.constexpr):
    """The FP8 scales [BLOCK_N] of rows ``slot`` of KV head g (0 outside ``rows``); None unless FP8."""
    if KV_FP8:
        s = tl.load(Scale + g * stride_sh + slot, mask=rows, other=0.0)
    else:
        s = None
    return s


@triton.jit
def _fp8_query(q, sm_scale_log2, KV_FP8: tl.constexpr):
    """(q, the scale its scores still need): with an FP8 pool and a 16-bit q, q pre-scaled by
    sm_scale_log2 in fp16 (K and V are widened to fp16 too); else q and sm_scale_log2 unchanged."""
    if KV_FP8 and q.dtype != tl.float32:
        return (q.to(tl.float32) * sm_scale_log2).to(tl.float16), 1.0
    else:
        return q, sm_scale_log2


@triton.jit
def _softmax_step(q, k, ks, mask_n, m_i, l_i, sm_scale_log2, KV_FP8: tl.constexpr):
    """Scores of q [ROWS, D] against one key block k [BLOCK_N, D] (keys outside mask_n
    ignored; ks: the keys' FP8 scales), folded into the running max and sum: returns (p,
    alpha, m_new, l_new); the caller updates acc = acc * alpha + p @ v, with v loaded where
    its order suits it."""
    qk = tl.dot(q, tl.trans(k)) * sm_scale_log2
    if KV_FP8:
        qk = qk * ks[None, :]
    qk = tl.where(mask_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _pv(p, v, vs, KV_FP8: tl.constexpr):
    """p [ROWS, BLOCK_N] @ v [BLOCK_N, D], each value row weighted by its FP8 scale vs."""
    if KV_FP8:
        p = p * vs[None, :]
    return tl.dot(p.to(v.dtype), v)


@triton.jit
def _attend_block(q, k, ks, v, vs, mask_n, m_i, l_i, acc, sm_scale_log2, KV_FP8: tl.constexpr):
    """One block of the online softmax with v already loaded; returns (acc, m_i, l_i)."""
    p, alpha, m_i, l_i = _softmax_step(q, k, ks, mask_n, m_i, l_i, sm_scale_log2, KV_FP8)
    return acc * alpha[:, None] + _pv(p, v, vs, KV_FP8), m_i, l_i


@triton.jit
def _attend_range(q, K, V, KS, VS, table, start, end, g, sm_scale_log2,
                  stride_kt, stride_kh, stride_vt, stride_vh, stride_ksh, stride_vsh,
                  ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  KV_FP8: tl.constexpr):
    """Online softmax of the query rows q [ROWS, D] over the keys at table[start:end] of KV
    head g: returns (acc [ROWS, D] unnormalised, running max m (log2 units), sum l).

    V is loaded after the scores: at large batches loading K and V together costs 7% of the
    mixed throughput (bench/RESULTS.md, "the step around the weight streams")."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < HEAD_DIM
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < end
        slot = tl.load(table + pos, mask=mask_n, other=0).to(tl.int64)
        k = _load_kv(K, slot, g, stride_kt, stride_kh, offs_d, mask_n, mask_d, q.dtype)
        ks = _load_scale(KS, slot, g, stride_ksh, mask_n, KV_FP8)
        p, alpha, m_i, l_i = _softmax_step(q, k, ks, mask_n, m_i, l_i, sm_scale_log2, KV_FP8)
        v = _load_kv(V, slot, g, stride_vt, stride_vh, offs_d, mask_n, mask_d, q.dtype)
        vs = _load_scale(VS, slot, g, stride_vsh, mask_n, KV_FP8)
        acc = acc * alpha[:, None] + _pv(p, v, vs, KV_FP8)
    return acc, m_i, l_i


@triton.jit
def _merge_head(
    b, h, seq_len, s0, PartO, PartLse, PrefPos, PrefO, PrefLse, Out,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_fb, stride_fh, stride_fs,
    stride_gb, stride_gh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr,
    HAS_PREFIX: tl.constexpr, PREFIX_SPLITS: tl.constexpr,
):
    """o[b, h] from the valid split partials (and the prefix partials): the log-sum-exp rule."""
    chunk = tl.maximum(tl.cdiv(seq_len - s0, NUM_SPLITS), MIN_CHUNK)
    chunk = tl.cdiv(chunk, BLOCK_N) * BLOCK_N
    n_splits = tl.cdiv(seq_len - s0, chunk)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < n_splits
    mask_d = offs_d < HEAD_DIM
    bb = b.to(tl.int64)
    lse = tl.load(PartLse + bb * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    if HAS_PREFIX:
        pos = tl.load(PrefPos + b).to(tl.int32)
        chunk_p = tl.maximum(tl.cdiv(s0, PREFIX_SPLITS), MIN_CHUNK)
        chunk_p = tl.cdiv(chunk_p, BLOCK_N) * BLOCK_N
        offs_p = tl.arange(0, PREFIX_SPLITS)
        n_p = tl.where(pos >= 0, tl.cdiv(s0, chunk_p), 0)  # rows outside any group have start 0 too
        mask_p = offs_p < n_p
        pp = tl.maximum(pos, 0).to(tl.int64)
        lse_p = tl.load(PrefLse + pp * stride_gb + h * stride_gh + offs_p, mask=mask_p, other=float("-inf"))
        m = tl.maximum(m, tl.max(lse_p, 0))
    w = tl.where(mask_s, tl.exp2(lse - m), 0.0)
    o = tl.load(PartO + bb * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    num = tl.sum(o * w[:, None], 0)
    den = tl.sum(w, 0)
    if HAS_PREFIX:
        w_p = tl.where(mask_p, tl.exp2(lse_p - m), 0.0)
        o_p = tl.load(PrefO + pp * stride_fb + h * stride_fh + offs_p[:, None] * stride_fs + offs_d[None, :],
                      mask=mask_p[:, None] & mask_d[None, :], other=0.0)
        num += tl.sum(o_p * w_p[:, None], 0)
        den += tl.sum(w_p, 0)
    o = (num / den).to(Out.dtype.element_ty)
    tl.store(Out + bb * stride_ob + h * stride_oh + offs_d, o, mask=mask_d)
    return o.to(tl.float32)


@triton.jit
def _chunk_of(SeqLens, Start, b, s, NUM_SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_START: tl.constexpr):
    """(seq_len, first key, chunk length) of split s of row b; start >= seq_len: empty split."""
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    s0 = 0
    if HAS_START:  # keys before start_b are covered by the shared-prefix stage
        s0 = tl.load(Start + b).to(tl.int32)
    chunk = tl.maximum(tl.cdiv(seq_len - s0, NUM_SPLITS), MIN_CHUNK)
    chunk = tl.cdiv(chunk, BLOCK_N) * BLOCK_N
    return seq_len, s0 + s * chunk, chunk


@triton.jit
def _store_partial(acc, m_i, l_i, PartO, PartLse, b, s, heads, offs_d, mask_h, mask_d,
                   stride_pb, stride_ph, stride_ps, stride_lb, stride_lh):
    """Split s's normalised output and log2-sum-exp for the query heads ``heads`` of row b."""
    out = acc / l_i[:, None]
    lse = m_i + tl.log2(l_i)
    bb = b.to(tl.int64)
    tl.store(PartO + bb * stride_pb + heads[:, None] * stride_ph + s * stride_ps + offs_d[None, :], out,
             mask=mask_h[:, None] & mask_d[None, :])
    tl.store(PartLse + bb * stride_lb + heads * stride_lh + s, lse, mask=mask_h)


@triton.jit
def _decode_stage1(
    Q, K, V, KS, VS, ReqToToken, ReqIdx, SeqLens, Start, PartO, PartLse,
    sm_scale_log2,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ksh, stride_vsh,
    stride_r,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr, HAS_START: tl.constexpr,
    EARLY_KV: tl.constexpr, KV_FP8: tl.constexpr, PDL: tl.constexpr,
    P0=None, N0=0, P1=None, N1=0, P2=None, N2=0, PF_MAX_LEN=0, PREFETCH: tl.constexpr = False,
):
    """Program (b, g, s): chunk s of row b's keys for the G query heads of KV head g.

    PREFETCH: first, each program issues L2 prefetches for its share of the spans P0..P2 (the
    next GEMV's weights, kernels/l2_prefetch.py), before any wait, where row b's length is at
    most PF_MAX_LEN (batch 1; longer contexts stream enough K/V to evict the lines).

    EARLY_KV (small batches): before the PDL wait it reads only what this step's earlier kernels
    do not write: the lengths, the slot table and the first block of *cached* keys and values
    (every position but the newest, whose K/V the step's own KV store writes).  Otherwise
    everything comes after the wait (larger batches: module docstring)."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    if PREFETCH and tl.load(SeqLens + b) <= PF_MAX_LEN:
        prefetch_spans(P0, N0, P1, N1, P2, N2, (b * tl.num_programs(1) + g) * tl.num_programs(2) + s,
                       tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2), 128)
    if not EARLY_KV:
        wait_for_predecessor(PDL)
    seq_len, start, chunk = _chunk_of(SeqLens, Start, b, s, NUM_SPLITS, MIN_CHUNK, BLOCK_N, HAS_START)
    end = tl.minimum(start + chunk, seq_len)
    table = ReqToToken + tl.load(ReqIdx + b).to(tl.int64) * stride_r
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    DT: tl.constexpr = tl.float16 if KV_FP8 and Q.dtype.element_ty != tl.float32 else Q.dtype.element_ty  # _fp8_query
    if EARLY_KV:
        offs_n = tl.arange(0, BLOCK_N)
        pos = start + offs_n
        mask_n = pos < end
        slot = tl.load(table + pos, mask=mask_n, other=0).to(tl.int64)
        cached = pos < seq_len - 1
        k = _load_kv(K, slot, g, stride_kt, stride_kh, offs_d, cached, mask_d, DT)
        v = _load_kv(V, slot, g, stride_vt, stride_vh, offs_d, cached, mask_d, DT)
        ks = _load_scale(KS, slot, g, stride_ksh, cached, KV_FP8)
        vs = _load_scale(VS, slot, g, stride_vsh, cached, KV_FP8)
        wait_for_predecessor(PDL)
    if start < seq_len:
        offs_h = tl.arange(0, BLOCK_H)
        mask_h = offs_h < G
        heads = g * G + offs_h
        q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_h[:, None] & mask_d[None, :], other=0.0)
        q, sm_scale_log2 = _fp8_query(q, sm_scale_log2, KV_FP8)
        if EARLY_KV:
            last = pos == seq_len - 1
            newest = last[:, None] & mask_d[None, :]
            k = tl.where(newest, _load_kv(K, slot, g, stride_kt, stride_kh, offs_d, last, mask_d, DT), k)
            v = tl.where(newest, _load_kv(V, slot, g, stride_vt, stride_vh, offs_d, last, mask_d, DT), v)
            if KV_FP8:
                ks = tl.where(last, _load_scale(KS, slot, g, stride_ksh, last, KV_FP8), ks)
                vs = tl.where(last, _load_scale(VS, slot, g, stride_vsh, last, KV_FP8), vs)
            acc, m_i, l_i = _attend_block(q, k, ks, v, vs, mask_n, tl.full([BLOCK_H], float("-inf"), tl.float32),
                                          tl.zeros([BLOCK_H], tl.float32), tl.zeros([BLOCK_H, BLOCK_D], tl.float32),
                                          sm_scale_log2, KV_FP8)
            for n0 in range(start + BLOCK_N, end, BLOCK_N):  # chunks longer than one block
                pos_i = n0 + offs_n
                mask_i = pos_i < end
                slot_i = tl.load(table + pos_i, mask=mask_i, other=0).to(tl.int64)
                k_i = _load_kv(K, slot_i, g, stride_kt, stride_kh, offs_d, mask_i, mask_d, DT)
                v_i = _load_kv(V, slot_i, g, stride_vt, stride_vh, offs_d, mask_i, mask_d, DT)
                ks_i = _load_scale(KS, slot_i, g, stride_ksh, mask_i, KV_FP8)
                vs_i = _load_scale(VS, slot_i, g, stride_vsh, mask_i, KV_FP8)
                acc, m_i, l_i = _attend_block(q, k_i, ks_i, v_i, vs_i, mask_i, m_i, l_i, acc, sm_scale_log2, KV_FP8)
        else:
            acc, m_i, l_i = _attend_range(q, K, V, KS, VS, table, start, end, g, sm_scale_log2,
                                          stride_kt, stride_kh, stride_vt, stride_vh, stride_ksh, stride_vsh,
                                          BLOCK_H, HEAD_DIM, BLOCK_D, BLOCK_N, KV_FP8)
        _store_partial(acc, m_i, l_i, PartO, PartLse, b, s, heads, offs_d, mask_h, mask_d,
                       stride_pb, stride_ph, stride_ps, stride_lb, stride_lh)


@triton.jit
def _decode_stage2(
    PartO, PartLse, SeqLens, Start, PrefPos, PrefO, PrefLse, Out,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_fb, stride_fh, stride_fs,
    stride_gb, stride_gh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr,
    HAS_PREFIX: tl.constexpr, PREFIX_SPLITS: tl.constexpr, RELEASE_EARLY: tl.constexpr, PDL: tl.constexpr,
    XQ=None, XS=None, Z=None, NZ=0, INT8_E: tl.constexpr = 0, INT8_BK: tl.constexpr = 1024, ZERO: tl.constexpr = False,
):
    """RELEASE_EARLY: the next kernel (at batch 1 the o_proj GEMV, which loads only weights
    before its wait) launches as this one starts, so its loads overlap stage 1's tail too.
    INT8_E > 0 (batch 1): the row is also written as that GEMV's int8 activations (XQ / XS, as
    quant_words._store_int8 lays them out for words of INT8_E values), and with ZERO the NZ fp32
    of Z (its output) are set to 0: the GEMV then needs no preparation launch."""
    if RELEASE_EARLY:
        release_successor_then_wait(PDL)
    else:
        wait_for_predecessor(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    s0 = 0
    if HAS_PREFIX:
        s0 = tl.load(Start + b).to(tl.int32)
    o = _merge_head(b, h, seq_len, s0, PartO, PartLse, PrefPos, PrefO, PrefLse, Out,
                    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                    stride_fb, stride_fh, stride_fs, stride_gb, stride_gh, stride_ob, stride_oh,
                    HEAD_DIM, BLOCK_D, BLOCK_N, NUM_SPLITS, MIN_CHUNK, HAS_PREFIX, PREFIX_SPLITS)
    if INT8_E > 0:
        _store_int8(XQ, XS, o, h * HEAD_DIM, tl.num_programs(1) * HEAD_DIM, INT8_E, INT8_BK, BLOCK_D)
        if ZERO:  # after the wait: until the predecessor finished, Z's memory may still be another's
            zero_share(Z, NZ, h, tl.num_programs(1), BLOCK_D)


@triton.jit
def _prefix_stage(
    Q, K, V, KS, VS, ReqToToken, ReqIdx, Start, GroupRows, PrefO, PrefLse,
    sm_scale_log2,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ksh, stride_vsh,
    stride_r,
    stride_fb, stride_fh, stride_fs,
    stride_gb, stride_gh,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, MAX_ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PREFIX_SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr,
    KV_FP8: tl.constexpr, PDL: tl.constexpr,
):
    """Program (group i, KV head g, split s): the group's rows x the G query heads of g
    against one chunk of the shared prefix, which every member reads from the first
    member's req_to_token row (their slots there are identical)."""
    wait_for_predecessor(PDL)
    gi = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    b0 = tl.load(GroupRows + gi * MAX_ROWS).to(tl.int32)
    if b0 >= 0:
        plen = tl.load(Start + b0).to(tl.int32)
        chunk = tl.maximum(tl.cdiv(plen, PREFIX_SPLITS), MIN_CHUNK)
        chunk = tl.cdiv(chunk, BLOCK_N) * BLOCK_N
        start = s * chunk
        if start < plen:
            end = tl.minimum(start + chunk, plen)
            table = ReqToToken + tl.load(ReqIdx + b0).to(tl.int64) * stride_r
            offs_m = tl.arange(0, BLOCK_M)
            offs_d = tl.arange(0, BLOCK_D)
            member = offs_m // G
            heads = g * G + offs_m % G
            in_tile = offs_m < MAX_ROWS * G
            rows = tl.load(GroupRows + gi * MAX_ROWS + member, mask=in_tile, other=-1)
            valid = in_tile & (rows >= 0)
            rows64 = tl.maximum(rows, 0).to(tl.int64)
            mask_d = offs_d < HEAD_DIM
            q = tl.load(Q + rows64[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                        mask=valid[:, None] & mask_d[None, :], other=0.0)
            q, sm_scale_log2 = _fp8_query(q, sm_scale_log2, KV_FP8)
            acc, m_i, l_i = _attend_range(q, K, V, KS, VS, table, start, end, g, sm_scale_log2,
                                          stride_kt, stride_kh, stride_vt, stride_vh, stride_ksh, stride_vsh,
                                          BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, KV_FP8)
            out = acc / l_i[:, None]
            lse = m_i + tl.log2(l_i)
            pp = (gi * MAX_ROWS + member).to(tl.int64)
            tl.store(PrefO + pp[:, None] * stride_fb + heads[:, None] * stride_fh + s * stride_fs + offs_d[None, :],
                     out, mask=valid[:, None] & mask_d[None, :])
            tl.store(PrefLse + pp * stride_gb + heads * stride_gh + s, lse, mask=valid)


def block_n_for(head_dim: int, device_type: str) -> int:
    if device_type != "cuda":
        return 16  # interpreter: small tiles, few wasted lanes
    return 64 if head_dim <= 128 else 32


def choose_num_splits(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """Split count for a decode step: aim at ~4 programs per SM, at least 8, at most 32 (pow2).
    More splits let one long request fill the GPU (H100, L = 4096: batch 1 2.5x faster at S = 32
    than at S = 4); where the batch already fills it, they cost up to 8 %."""
    want = triton.cdiv(4 * num_sms, max(1, batch_size * num_kv_heads))
    return max(8, min(32, triton.next_power_of_2(want)))


def alloc_workspace(batch_size: int, num_heads: int, head_dim: int, num_splits: int, device):
    """(partial_out [B, Hq, S, D] fp32, partial_lse [B, Hq, S] fp32)."""
    return (torch.empty((batch_size, num_heads, num_splits, head_dim), dtype=torch.float32, device=device),
            torch.empty((batch_size, num_heads, num_splits), dtype=torch.float32, device=device))


# Callers of decode_attention must not read, before their PDL wait, anything but weights
# (kernels/pdl.py): with this on, stage 2 releases its successor before its own wait.
STAGE2_RELEASES_EARLY = True

PREFIX_SPLITS = 16  # chunks per shared prefix: NG x Hkv x 16 programs fill the GPU for a 4k prefix


def prefix_group_rows(group_size: int) -> int:
    """Rows per shared-prefix group: the group's query rows (rows x G heads) fill one 64-row tile."""
    return max(1, 64 // group_size)


class PrefixGroups:
    """Device tensors of a step's shared-prefix groups (fixed shapes, so graphs can hold them).

    start [B] int32: shared prefix length of each row (0: none); pos [B] int32: the row's
    index in the prefix partials (group * max_rows + member, -1: none); rows [NG, max_rows]
    int32: batch rows of each group (-1 pads; a group with rows[i, 0] = -1 is unused)."""

    def __init__(self, start: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor):
        self.start, self.pos, self.rows = start, pos, rows

    @property
    def num_groups(self) -> int:
        return self.rows.shape[0]

    @property
    def max_rows(self) -> int:
        return self.rows.shape[1]

    @staticmethod
    def host_arrays(batch_size: int, groups: list[tuple[int, list[int]]], num_groups: int, max_rows: int):
        """Lists -> (start, pos, rows) CPU int32 tensors.  groups: (prefix length, batch rows);
        at most num_groups groups of at most max_rows rows each (callers split larger ones)."""
        start = torch.zeros(batch_size, dtype=torch.int32)
        pos = torch.full((batch_size,), -1, dtype=torch.int32)
        rows = torch.full((num_groups, max_rows), -1, dtype=torch.int32)
        assert len(groups) <= num_groups
        for gi, (plen, members) in enumerate(groups):
            assert 0 < len(members) <= max_rows and plen > 0
            for j, b in enumerate(members):
                start[b] = plen
                pos[b] = gi * max_rows + j
                rows[gi, j] = b
        return start, pos, rows

    @classmethod
    def build(cls, batch_size, groups, num_groups, max_rows, device) -> "PrefixGroups":
        start, pos, rows = cls.host_arrays(batch_size, groups, num_groups, max_rows)
        if torch.device(device).type == "cuda":
            start, pos, rows = (t.pin_memory().to(device, non_blocking=True) for t in (start, pos, rows))
        return cls(start, pos, rows)


def alloc_prefix_workspace(num_groups: int, max_rows: int, num_heads: int, head_dim: int, device):
    """(prefix_out [NG*R, Hq, PREFIX_SPLITS, D] fp32, prefix_lse [NG*R, Hq, PREFIX_SPLITS] fp32)."""
    n = num_groups * max_rows
    return (torch.empty((n, num_heads, PREFIX_SPLITS, head_dim), dtype=torch.float32, device=device),
            torch.empty((n, num_heads, PREFIX_SPLITS), dtype=torch.float32, device=device))


def decode_attention(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale,
                     out=None, num_splits: int = 8, workspace=None, min_chunk: int | None = None,
                     groups: PrefixGroups | None = None, prefix_workspace=None, k_scale=None, v_scale=None,
                     int8_row=None, prefetch=()):
    """q: [B, Hq, D] (unit last stride); k_cache/v_cache: [slots, Hkv, D];
    req_to_token: [rows, ctx] int32; req_pool_indices: [B] int; seq_lens: [B] int (>= 1).
    Returns out [B, Hq, D] (q's dtype).  ``num_splits`` must be a power of two; ``workspace``
    (from :func:`alloc_workspace`, batch dim >= B) lets CUDA graphs keep fixed buffers.
    ``groups`` (:class:`PrefixGroups`): rows whose first ``start`` slots are shared attend to them
    through the prefix stage (every member's suffix must be >= 1 token; its max_rows must be
    prefix_group_rows(Hq // Hkv)).  ``k_scale``/``v_scale`` ([Hkv, slots] fp32, unit last
    stride): the caches are e4m3 with these per-(token, head) scales.  ``int8_row``
    (quant_words.PreparedRow of the GEMV that reads out, batch 1): the merge also writes its int8
    activations and zeroes its output where asked, and marks it filled (when the head dim is one
    power-of-two tile of whole 4E-column chunks; else it stays unfilled).  ``prefetch``: up to
    three (byte view, byte count) spans from l2_prefetch.spans, the weights of the GEMV after
    this, which stage 1's programs prefetch into L2 while the K/V a head reads stay within
    l2_prefetch.max_streamed.  No host syncs."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    assert Hq % Hkv == 0, "query heads must be a multiple of KV heads"
    assert num_splits & (num_splits - 1) == 0, "num_splits must be a power of two"
    G = Hq // Hkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    kv_fp8, k_scale, v_scale, scale_strides = _scale_args(k_cache, k_scale, v_scale)
    if workspace is None:
        workspace = alloc_workspace(B, Hq, D, num_splits, q.device)
    part_o, part_lse = workspace
    assert part_o.shape[0] >= B and part_o.shape[2] == num_splits
    BLOCK_H = max(16, triton.next_power_of_2(G))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = block_n_for(D, q.device.type)
    small = B <= 8  # batch-1-like steps: K/V loads before the wait, o_proj released early
    if min_chunk is None:  # small batches: shorter chunks (batch 1, H200: 11-21 % less time a layer)
        min_chunk = BLOCK_N if small else 2 * BLOCK_N
    has_prefix = groups is not None
    pdl = launch_options(q.device)
    if has_prefix:
        R = groups.max_rows
        assert R == prefix_group_rows(G), "groups.max_rows must be prefix_group_rows(Hq // Hkv)"
        if prefix_workspace is None:
            prefix_workspace = alloc_prefix_workspace(groups.num_groups, R, Hq, D, q.device)
        pref_o, pref_lse = prefix_workspace
        assert pref_o.shape[0] >= groups.num_groups * R
        _prefix_stage[(groups.num_groups, Hkv, PREFIX_SPLITS)](
            q, k_cache, v_cache, k_scale, v_scale, req_to_token, req_pool_indices, groups.start, groups.rows,
            pref_o, pref_lse,
            scale * LOG2E,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1),
            v_cache.stride(0), v_cache.stride(1),
            *scale_strides,
            req_to_token.stride(0),
            pref_o.stride(0), pref_o.stride(1), pref_o.stride(2),
            pref_lse.stride(0), pref_lse.stride(1),
            G=G, HEAD_DIM=D, MAX_ROWS=R, BLOCK_M=max(16, triton.next_power_of_2(R * G)),
            BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, PREFIX_SPLITS=PREFIX_SPLITS, MIN_CHUNK=min_chunk, KV_FP8=kv_fp8,
            num_warps=4, num_stages=2, **pdl,
            **FMA,
        )
        start, pos = groups.start, groups.pos
    else:
        start = pos = seq_lens  # unused (HAS_START / HAS_PREFIX off)
        pref_o, pref_lse = part_o, part_lse
    _decode_stage1[(B, Hkv, num_splits)](
        q, k_cache, v_cache, k_scale, v_scale, req_to_token, req_pool_indices, seq_lens, start, part_o, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        *scale_strides,
        req_to_token.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        G=G, HEAD_DIM=D, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
        NUM_SPLITS=num_splits, MIN_CHUNK=min_chunk, HAS_START=has_prefix, EARLY_KV=small, KV_FP8=kv_fp8,
        **prefetch_args(prefetch, part_lse),
        PF_MAX_LEN=max_tokens(q.device, Hkv * D * 2 * k_cache.element_size()) if prefetch else 0,
        num_warps=4, num_stages=2, **pdl,
        **FMA,
    )
    int8 = {}
    if int8_row is not None and B == 1 and BLOCK_D == D and D % (4 * int8_row.E) == 0 \
            and int8_row.xp.numel() * 4 == Hq * D:
        z = int8_row.out if int8_row.zero else int8_row.xs
        int8 = dict(XQ=int8_row.xp, XS=int8_row.xs, Z=z, NZ=z.numel() if int8_row.zero else 0, INT8_E=int8_row.E,
                    INT8_BK=int8_row.block_k, ZERO=int8_row.zero)
        int8_row.filled = True
    _decode_stage2[(B, Hq)](
        part_o, part_lse, seq_lens, start, pos, pref_o, pref_lse, out,
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        pref_o.stride(0), pref_o.stride(1), pref_o.stride(2),
        pref_lse.stride(0), pref_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, NUM_SPLITS=num_splits, MIN_CHUNK=min_chunk,
        HAS_PREFIX=has_prefix, PREFIX_SPLITS=PREFIX_SPLITS, RELEASE_EARLY=small and STAGE2_RELEASES_EARLY,
        num_warps=4 if BLOCK_D * num_splits >= 2048 else 2, **int8, **pdl,
        **FMA,
    )
    return out


def _scale_args(k_cache, k_scale, v_scale):
    """(KV_FP8, k_scale, v_scale, their head strides) for a launch; unused pointers and zero
    strides when the caches are not FP8."""
    if k_scale is None:
        return False, k_cache, k_cache, (0, 0)
    assert v_scale is not None and k_scale.stride(-1) == 1 and v_scale.stride(-1) == 1
    assert k_cache.dtype == torch.float8_e4m3fn, "scales come with e4m3 caches"
    return True, k_scale, v_scale, (k_scale.stride(0), v_scale.stride(0))


def dequantized_rows(cache, cache_scale, slots):
    """cache[slots] as fp64, multiplied by their per-(token, head) scales when given (FP8 pools)."""
    x = cache[slots].double()
    if cache_scale is not None:
        x = x * cache_scale[:, slots].t().double()[..., None]
    return x


def decode_attention_ref(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scale,
                         k_scale=None, v_scale=None):
    """Torch reference (fp64 math, output in q's dtype); loops over requests on the host."""
    B, Hq, D = q.shape
    G = Hq // k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(B):
        n = int(seq_lens[b])
        slots = req_to_token[int(req_pool_indices[b]), :n].long()
        k = dequantized_rows(k_cache, k_scale, slots).repeat_interleave(G, dim=1)  # [n, Hq, D]
        v = dequantized_rows(v_cache, v_scale, slots).repeat_interleave(G, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out
