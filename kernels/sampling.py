"""Sampling kernels: filtered exponential-race sampling and repetition/frequency/presence
penalties.  No sort, no host sync.

filtered_sample (one program per row, the row streamed from L2 a few times):
    x = logits / temperature (IEEE division), m = max x, e = exp(x − m) ∈ (0, 1], p = e / Σe
    top-k  (0 < k < V):  keep x ≥ t_k,  t_k = the k-th largest x (ties with it stay)
    top-p  (p < 1):      on the top-k-renormalised distribution keep x ≥ t_p with
                         t_p = max{t : Σ_{x ≥ t, x ≥ t_k} e ≥ top_p · Σ_{x ≥ t_k} e}
                         (the smallest set of most probable tokens whose mass reaches top_p)
    min-p:               keep e ≥ min_p  (⇔ p ≥ min_p · max p); the top token always stays
    token = argmax over kept of e / noise, noise ~ Exp(1)  (the exponential race: token i
    wins with probability p_i / Σ_kept p); temperature == 0 rows: argmax of the logits.
Thresholds t_k and t_p are found by a multi-way bisection on the *values* of x: each round
evaluates NT thresholds spread over the current bracket [lo, hi) in one pass (counts and
masses for all NT at once, accumulated per lane and reduced once per pass) and keeps the
sub-bracket that holds the answer; a search stops when its bracket holds a single distinct
value (count(lo) − count(hi) ≤ 1) or after MAX_ROUNDS rounds.
Floor: one read of logits and noise (8·B·V bytes) from HBM; the extra rounds re-read the
row from L2 (1 + 2 + rounds passes of 4·V bytes).

apply_penalties (elementwise, in place):
    seen = count > 0 or prompt_mask
    x = seen ? (x > 0 ? x / rep : x · rep) : x;   x −= freq · count + pres · (count > 0)
Floor: streaming, B·V·(4 + 4 + 1 + 4) bytes (logits read+write, counts, mask).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .options import FMA
from .pdl import launch_options, wait_for_predecessor

NT = 4  # thresholds per bisection round (a power of two): ~2.3 bits per pass
MAX_ROUNDS = 16


@triton.jit
def _pick(vec, idx, offs):
    """vec[idx] for a scalar idx (0 <= idx < len)."""
    return tl.sum(tl.where(offs == idx, vec, 0), 0)


@triton.jit
def _scaled(row_ptr, cols, V, temp):
    """x = logits / temperature with IEEE division, so every pass sees bit-identical x."""
    return tl.math.div_rn(tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")), temp)


@triton.jit
def _search_round(row_ptr, V, temp, m, lo, hi, BLOCK: tl.constexpr, NTH: tl.constexpr):
    """Counts and masses (Σ e, e = exp(x − m)) of {x >= t} at NTH thresholds t evenly inside
    (lo, hi), in one pass over the row.  Partial sums stay per lane ([NTH, BLOCK] registers)
    and are reduced once at the end.  Returns (thresholds, counts, masses)."""
    offs_t = tl.arange(0, NTH)
    ts = lo + (hi - lo) * ((offs_t + 1).to(tl.float32) / (NTH + 1))
    cnt = tl.zeros([NTH, BLOCK], tl.int32)
    mass = tl.zeros([NTH, BLOCK], tl.float32)
    offs = tl.arange(0, BLOCK)
    for v0 in range(0, V, BLOCK):
        x = _scaled(row_ptr, v0 + offs, V, temp)
        e = tl.exp(x - m)
        ge = x[None, :] >= ts[:, None]
        cnt += ge.to(tl.int32)
        mass += tl.where(ge, e[None, :], 0.0)
    return ts, tl.sum(cnt, 1), tl.sum(mass, 1)


@triton.jit
def _filtered_sample_kernel(
    Logits, Temp, TopK, TopP, MinP, Noise, Out,
    V, stride_l, stride_n,
    BLOCK: tl.constexpr, NTH: tl.constexpr, MAX_R: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row_ptr = Logits + r * stride_l
    noise_ptr = Noise + r * stride_n
    temp = tl.load(Temp + r).to(tl.float32)
    sampled = temp > 0.0  # temperature 0: greedy
    temp = tl.where(sampled, temp, 1.0)
    k = tl.load(TopK + r).to(tl.int32)
    top_p = tl.load(TopP + r).to(tl.float32)
    min_p = tl.load(MinP + r).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    offs_t = tl.arange(0, NTH)
    neg_inf = temp * 0.0 - float("inf")  # fp32 scalars, typed for loop-carried values

    # pass 1 (per lane, reduced once): max m, smallest finite value, count of finite
    # values, online sum of exp(x - m)
    m_l = tl.full([BLOCK], float("-inf"), tl.float32)
    mn_l = tl.full([BLOCK], float("inf"), tl.float32)
    z_l = tl.zeros([BLOCK], tl.float32)
    nf_l = tl.zeros([BLOCK], tl.int32)
    for v0 in range(0, V, BLOCK):
        x = _scaled(row_ptr, v0 + offs, V, temp)
        fin = x > float("-inf")
        m_new = tl.maximum(m_l, x)
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        z_l = z_l * tl.exp(m_l - m_safe) + tl.where(fin, tl.exp(x - m_safe), 0.0)
        m_l = m_new
        mn_l = tl.minimum(mn_l, tl.where(fin, x, float("inf")))
        nf_l += fin.to(tl.int32)
    m = tl.max(m_l, 0)
    z = tl.sum(tl.where(m_l > float("-inf"), z_l * tl.exp(m_l - m), 0.0), 0)
    mn = tl.min(mn_l, 0)
    n_fin = tl.sum(nf_l, 0)
    above = m + tl.maximum(1.0, tl.abs(m) * 1e-3)  # a value no x reaches

    thr = neg_inf  # keep x >= thr
    if sampled:
        kept_mass = z
        kept_cnt = n_fin
        # ---- top-k: t_k = max{t : count(x >= t) >= k}
        if (k > 0) & (k < n_fin):
            lo = mn
            hi = above
            c_lo = n_fin
            c_hi = k * 0
            s_lo = z
            rounds = 0
            while (c_lo - c_hi > 1) & (rounds < MAX_R):
                ts, cnt, mass = _search_round(row_ptr, V, temp, m, lo, hi, BLOCK, NTH)
                n_ok = tl.sum((cnt >= k).to(tl.int32), 0)  # counts fall as thresholds rise
                if n_ok > 0:
                    lo = _pick(ts, n_ok - 1, offs_t)
                    c_lo = _pick(cnt, n_ok - 1, offs_t)
                    s_lo = _pick(mass, n_ok - 1, offs_t)
                if n_ok < NTH:
                    hi = _pick(ts, n_ok, offs_t)
                    c_hi = _pick(cnt, n_ok, offs_t)
                rounds += 1
            thr = lo
            kept_mass = s_lo
            kept_cnt = c_lo
        # ---- top-p on the top-k-renormalised distribution:
        #      t_p = max{t >= t_k : mass(x >= t) >= top_p * kept_mass}
        if top_p < 1.0:
            target = top_p * kept_mass
            lo = tl.maximum(thr, mn)
            hi = above
            c_lo = kept_cnt
            c_hi = k * 0
            rounds = 0
            while (c_lo - c_hi > 1) & (rounds < MAX_R):
                ts, cnt, mass = _search_round(row_ptr, V, temp, m, lo, hi, BLOCK, NTH)
                n_ok = tl.sum((mass >= target).to(tl.int32), 0)
                if n_ok > 0:
                    lo = _pick(ts, n_ok - 1, offs_t)
                    c_lo = _pick(cnt, n_ok - 1, offs_t)
                if n_ok < NTH:
                    hi = _pick(ts, n_ok, offs_t)
                    c_hi = _pick(cnt, n_ok, offs_t)
                rounds += 1
            thr = tl.maximum(thr, lo)

    # final pass: argmax over kept of e / noise (greedy rows: of x).  The top token
    # (x == m, bit-exact since every pass divides the same way) always stays, as in the
    # reference.
    best_l = tl.full([BLOCK], float("-inf"), tl.float32)
    idx_l = tl.zeros([BLOCK], tl.int32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + offs
        inb = cols < V
        x = _scaled(row_ptr, cols, V, temp)
        e = tl.exp(x - m)
        q = tl.load(noise_ptr + cols, mask=inb, other=1.0)
        keep = ((x >= thr) & (e >= min_p)) | (x >= m)
        score = tl.where(keep, e / q, -1.0)
        score = tl.where(sampled, score, x)
        score = tl.where(inb, score, float("-inf"))
        best_l, idx_l = _lane_best(score, cols, best_l, idx_l)
    tl.store(Out + r, _first_argmax(best_l, idx_l, V).to(tl.int64))


@triton.jit
def _lane_best(score, cols, best_l, idx_l):
    """Per-lane running maximum; strict, so each lane keeps its earliest best."""
    better = score > best_l
    return tl.where(better, score, best_l), tl.where(better, cols, idx_l)


@triton.jit
def _first_argmax(best_l, idx_l, V):
    """The row's argmax from the per-lane bests: the first index among ties."""
    best = tl.max(best_l, 0)
    return tl.min(tl.where(best_l == best, idx_l, V), 0)


def filtered_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """logits [B, V] fp32; temperature [B] (0 = greedy); top_k [B] int (<= 0 or >= V: off);
    top_p [B] (1 = off); min_p [B] (0 = off); noise [B, V] fp32 Exp(1).  -> int64 [B]."""
    B, V = logits.shape
    if logits.dtype != torch.float32:
        logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if noise.stride(-1) != 1 or noise.dtype != torch.float32:
        noise = noise.float().contiguous()
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    temperature = temperature.reshape(-1).float()
    top_k = top_k.reshape(-1)
    top_p = top_p.reshape(-1).float()
    min_p = min_p.reshape(-1).float()
    # 2048 lanes x 8 warps: 8 elements per thread in flight per iteration; the per-lane
    # accumulators ([NT, BLOCK] counts and masses) then take ~64 registers (no spills, sm_90)
    block = 128 if logits.device.type != "cuda" else 2048
    block = min(block, max(16, triton.next_power_of_2(V)))
    _filtered_sample_kernel[(B,)](
        logits, temperature, top_k, top_p, min_p, noise, out,
        V, logits.stride(0), noise.stride(0),
        BLOCK=block, NTH=NT, MAX_R=MAX_ROUNDS, num_warps=8,
        **FMA,
    )
    return out


@triton.jit
def _penalties_kernel(
    Logits, Counts, Prompt, Rep, Freq, Pres,
    V, stride_l, stride_c, stride_p,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    rep = tl.load(Rep + r).to(tl.float32)
    freq = tl.load(Freq + r).to(tl.float32)
    pres = tl.load(Pres + r).to(tl.float32)
    x = tl.load(Logits + r * stride_l + cols, mask=mask, other=0.0)
    c = tl.load(Counts + r * stride_c + cols, mask=mask, other=0).to(tl.float32)
    pm = tl.load(Prompt + r * stride_p + cols, mask=mask, other=0)
    present = c > 0
    seen = present | (pm != 0)
    x = tl.where(seen, tl.where(x > 0, x / rep, x * rep), x)
    x = x - freq * c - pres * present.to(tl.float32)
    tl.store(Logits + r * stride_l + cols, x, mask=mask)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, prompt_mask: torch.Tensor, repetition: torch.Tensor,
                    frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """In place on logits [B, V] fp32 (unit last stride); counts [B, V] int or fp32 output-token
    counts; prompt_mask [B, V] bool; repetition / frequency / presence [B].  Returns logits."""
    B, V = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(-1) == 1
    if B == 0:
        return logits
    if counts.stride(-1) != 1:
        counts = counts.contiguous()
    if prompt_mask.dtype == torch.bool:
        prompt_mask = prompt_mask.contiguous().view(torch.uint8)
    block = 1024
    _penalties_kernel[(B, triton.cdiv(V, block))](
        logits, counts, prompt_mask, repetition.reshape(-1), frequency.reshape(-1), presence.reshape(-1),
        V, logits.stride(0), counts.stride(0), prompt_mask.stride(0),
        BLOCK=block, num_warps=4,
        **FMA,
    )
    return logits


@triton.jit
def _argmax_chunk_kernel(X, PartV, PartI, V, stride_x, C, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    """Program (row r, chunk c): the maximum of X[r, c·CHUNK : (c+1)·CHUNK] and its first index."""
    wait_for_predecessor(PDL)
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    row = X + r * stride_x
    cols0 = c * CHUNK + tl.arange(0, BLOCK)
    best_l = tl.full([BLOCK], float("-inf"), tl.float32)
    idx_l = cols0  # a chunk of -inf (or a row of them) reports its first column, as torch does
    for c0 in range(0, CHUNK, BLOCK):
        cols = cols0 + c0
        x = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        best_l, idx_l = _lane_best(x, cols, best_l, idx_l)
    tl.store(PartV + r * C + c, tl.max(best_l, 0))
    tl.store(PartI + r * C + c, _first_argmax(best_l, idx_l, V))


@triton.jit
def _argmax_merge_kernel(PartV, PartI, Out, V, C, C_PAD: tl.constexpr, PDL: tl.constexpr):
    """Row r: the chunk maxima's maximum; among equal ones the smallest index (the first)."""
    wait_for_predecessor(PDL)
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, C_PAD)
    m = offs < C
    v = tl.load(PartV + r * C + offs, mask=m, other=float("-inf"))
    i = tl.load(PartI + r * C + offs, mask=m, other=V)
    best = tl.max(v, 0)
    tl.store(Out + r, tl.min(tl.where(m & (v == best), i, V), 0).to(tl.int64))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Greedy tokens: the first index of each row's maximum, int64 [B] (like torch.argmax for
    rows without NaN).  Split over the vocabulary so a single row fills the GPU: B × C programs
    each reduce one chunk, then one program per row merges the C partials.  At batch 1 on an
    H200, 128k vocabulary: torch's reduction 38 µs, one program per row 52 µs."""
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    on_gpu = logits.device.type == "cuda"
    block = min(1024 if on_gpu else 64, max(16, triton.next_power_of_2(V)))
    chunk = block * (4 if on_gpu else 2)
    C = triton.cdiv(V, chunk)
    part_v = torch.empty((B, C), dtype=torch.float32, device=logits.device)
    part_i = torch.empty((B, C), dtype=torch.int32, device=logits.device)
    pdl = launch_options(logits.device)
    _argmax_chunk_kernel[(B, C)](logits, part_v, part_i, V, logits.stride(0), C, CHUNK=chunk, BLOCK=block,
                                 num_warps=4, **pdl, **FMA)
    _argmax_merge_kernel[(B,)](part_v, part_i, out, V, C, C_PAD=max(16, triton.next_power_of_2(C)), num_warps=1,
                               **pdl, **FMA)
    return out
