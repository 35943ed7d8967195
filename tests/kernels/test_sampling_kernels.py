"""Sampling kernels vs the engine's torch reference (localsgl.engine.sampling), same noise:

* filtered_sample returns exactly the reference's token for random temperatures, top-k
  (off as 0 / -1 / V), top-p (off as 1, and 0), min-p, greedy rows (temperature 0), banned
  (-inf) logits, and peaked and flat rows; once with Exp(1) noise and once with noise
  that makes every kept token equally likely (so the kept-set boundaries get hit);
* apply_penalties equals apply_penalties_torch (int32 and fp32 counts), in place.
"""
import pytest
import torch
from kutil import DEV, ON_GPU, gen

from localsgl.engine.sampling import apply_penalties_torch, filtered_sample_torch
from localsgl_kernels.sampling import apply_penalties, filtered_sample


def make_rows(g, B, V):
    scale = torch.tensor([0.5, 2.0, 6.0, 20.0])[torch.randint(0, 4, (B,), generator=g)]
    logits = torch.randn(B, V, generator=g) * scale[:, None]
    logits[3, torch.randperm(V, generator=g)[: V - 7]] = float("-inf")  # only 7 finite tokens
    logits[4, :: 3] = float("-inf")
    temp = torch.rand(B, generator=g) * 1.5 + 0.2
    temp[0] = 0.0
    temp[5] = 0.0
    top_k = torch.randint(1, 80, (B,), generator=g).int()
    off = torch.rand(B, generator=g) < 0.3
    top_k[off] = torch.tensor([0, -1, V], dtype=torch.int32)[torch.randint(0, 3, (int(off.sum()),), generator=g)]
    top_k[3] = 50  # more than the finite tokens
    top_p = torch.rand(B, generator=g) * 0.98 + 0.01
    top_p[torch.rand(B, generator=g) < 0.3] = 1.0
    top_p[6] = 0.0
    min_p = torch.rand(B, generator=g) * 0.3
    min_p[torch.rand(B, generator=g) < 0.4] = 0.0
    return logits, temp, top_k, top_p, min_p


def reference(logits, temp, top_k, top_p, min_p, noise):
    V = logits.shape[1]
    out = logits.argmax(-1)
    s = temp > 0
    tk = torch.where((top_k <= 0) | (top_k >= V), torch.full_like(top_k, V), top_k).long()
    out[s] = filtered_sample_torch(logits[s].double().float(), temp[s].view(-1, 1), tk[s], top_p[s], min_p[s],
                                   noise[s])
    return out


@pytest.mark.parametrize("flat_noise", [False, True])
def test_filtered_sample_matches_reference(flat_noise):
    g = gen(int(flat_noise))
    B, V = (24, 1000) if not ON_GPU else (256, 32000)
    logits, temp, top_k, top_p, min_p = make_rows(g, B, V)
    noise = -torch.rand(B, V, generator=g).log()
    if flat_noise:  # noise ∝ p: every kept token has the same expected score
        x = logits / torch.where(temp > 0, temp, 1.0)[:, None]
        p = torch.softmax(x, -1)
        noise = (p * noise).clamp_min(1e-30)
    ref = reference(logits, temp, top_k, top_p, min_p, noise)
    d = lambda t: t.to(DEV)  # noqa: E731
    out = filtered_sample(d(logits), d(temp), d(top_k), d(top_p), d(min_p), d(noise))
    assert out.dtype == torch.int64 and out.shape == (B,)
    mism = (out.cpu() != ref).nonzero().view(-1).tolist()
    assert not mism, f"rows {mism}: kernel {out.cpu()[mism].tolist()} vs reference {ref[mism].tolist()}"


def test_greedy_and_top1():
    g = gen(5)
    B, V = 6, 777
    logits = torch.randn(B, V, generator=g).to(DEV)
    noise = (-torch.rand(B, V, generator=g).log()).to(DEV)
    z = torch.zeros(B, device=DEV)
    one = torch.ones(B, device=DEV)
    out = filtered_sample(logits, z, torch.zeros(B, dtype=torch.int32, device=DEV), one, z, noise)
    assert torch.equal(out, logits.argmax(-1))
    out = filtered_sample(logits, one * 0.7, torch.ones(B, dtype=torch.int32, device=DEV), one, z, noise)
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize("count_dtype", [torch.int32, torch.float32])
def test_apply_penalties(count_dtype):
    g = gen(7)
    B, V = 5, 1000
    logits = torch.randn(B, V, generator=g) * 3
    counts = torch.zeros(B, V, dtype=torch.int32)
    for b in range(B):
        ids = torch.randint(0, V, (40,), generator=g)
        counts[b].index_put_((ids,), torch.ones(40, dtype=torch.int32), accumulate=True)
    prompt = torch.rand(B, V, generator=g) < 0.05
    rep = torch.tensor([1.0, 1.3, 0.8, 1.1, 2.0])
    freq = torch.tensor([0.0, 0.5, -0.2, 0.1, 0.0])
    pres = torch.tensor([0.0, 0.3, 0.0, -0.5, 1.0])
    ref = apply_penalties_torch(logits, counts.float(), prompt, rep.view(-1, 1), freq.view(-1, 1), pres.view(-1, 1))
    x = logits.to(DEV)
    out = apply_penalties(x, counts.to(count_dtype).to(DEV), prompt.to(DEV), rep.to(DEV), freq.to(DEV), pres.to(DEV))
    assert out.data_ptr() == x.data_ptr()
    assert torch.allclose(out.cpu(), ref, rtol=1e-6, atol=1e-6)


def test_kept_set_boundaries():
    """The kept set is a prefix of the tokens sorted by probability.  Find its size per row
    from the reference (bisection with "spotlight" noise: tiny noise on one token makes it
    win iff it is kept), then check that the kernel keeps the last kept token and drops the
    first dropped one."""
    g = gen(11)
    B, V = (24, 1000) if not ON_GPU else (128, 32000)
    logits, temp, top_k, top_p, min_p = make_rows(g, B, V)
    temp[temp == 0] = 1.0
    x = logits / temp[:, None]
    order = x.argsort(dim=-1, descending=True)
    rows = torch.arange(B)

    def spotlight(ranks):
        noise = torch.ones(B, V)
        noise[rows, order[rows, ranks]] = 1e-30
        return noise, order[rows, ranks]

    lo = torch.zeros(B, dtype=torch.long)  # rank lo is kept (the top token always is)
    hi = torch.full((B,), V, dtype=torch.long)  # ranks >= hi are dropped
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        noise, tok = spotlight(mid)
        kept = reference(logits, temp, top_k, top_p, min_p, noise) == tok
        lo = torch.where(kept & (hi - lo > 1), mid, lo)
        hi = torch.where(~kept & (hi - lo > 1), mid, hi)
    d = lambda t: t.to(DEV)  # noqa: E731
    noise, last_kept = spotlight(lo)
    out = filtered_sample(d(logits), d(temp), d(top_k), d(top_p), d(min_p), d(noise)).cpu()
    assert torch.equal(out, last_kept), (lo, out, last_kept)
    has_dropped = hi < V
    noise, first_dropped = spotlight(hi.clamp(max=V - 1))
    out = filtered_sample(d(logits), d(temp), d(top_k), d(top_p), d(min_p), d(noise)).cpu()
    ref = reference(logits, temp, top_k, top_p, min_p, noise)
    assert not bool((out == first_dropped)[has_dropped].any())
    assert torch.equal(out, ref)


@pytest.mark.parametrize("B,V", [(1, 1000), (5, 300), (3, 7)] if not ON_GPU else [(1, 128256), (64, 32000), (3, 7)])
def test_argmax_rows(B, V):
    """The greedy fast path: first index of the row maximum, exactly torch.argmax."""
    from localsgl_kernels.sampling import argmax_rows

    g = gen(B * V)
    logits = torch.randn(B, V, generator=g)
    logits[0, V // 3] = logits[0, V - 1] = 50.0  # a tie: the first index wins, as in torch
    if B > 1:
        logits[1] = -1e30  # an all-equal row
    assert torch.equal(argmax_rows(logits.to(DEV)).cpu(), logits.argmax(-1))
    wide = torch.randn(B, V + 5, generator=g).to(DEV)[:, :V]  # a strided view (padded LM head)
    assert torch.equal(argmax_rows(wide).cpu(), wide.cpu().argmax(-1))
