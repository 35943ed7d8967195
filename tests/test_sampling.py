"""Batched sampler: greedy, filters' distributions, seeds, penalties, min_tokens, logprobs."""
import math
import random
import time

import pytest
import torch

import localsgl.engine.sampling as sampling
from localsgl.engine.params import SamplingParams as SP
from localsgl.engine.sampling import SamplingBatch, filtered_sample_torch, sample

CPU = torch.device("cpu")
EOS = 2


def build(params, logits_or_v, prompts=None, outputs=None, gens=None, default=None, eos=(EOS,)):
    B = len(params)
    V = logits_or_v if isinstance(logits_or_v, int) else logits_or_v.shape[-1]
    return SamplingBatch.build(
        params,
        prompts if prompts is not None else [[] for _ in range(B)],
        outputs if outputs is not None else [[] for _ in range(B)],
        gens if gens is not None else [None] * B,
        list(eos),
        V,
        CPU,
        default if default is not None else torch.Generator().manual_seed(1234),
    )


def run(params, logits, **kw):
    return sample(logits, build(params, logits, **kw))


# -- reference (per row, plain Python/float64) ---------------------------------------------


def ref_filtered_probs(logits_row, p: SP):
    x = [v / p.temperature for v in logits_row.double().tolist()]
    V = len(x)
    order = sorted(range(V), key=lambda i: -x[i])
    keep = set(order)
    if 0 < p.top_k < V:
        keep = set(order[: p.top_k])
    m = max(x[i] for i in keep)
    w = {i: math.exp(x[i] - m) for i in keep}
    z = sum(w.values())
    prob = {i: w[i] / z for i in keep}
    if p.top_p < 1.0:
        cum, nucleus = 0.0, set()
        for i in order:
            if i not in prob:
                continue
            if cum >= p.top_p:
                break
            nucleus.add(i)
            cum += prob[i]
        prob = {i: prob[i] for i in nucleus}
    if p.min_p > 0:
        mx = max(prob.values())
        prob = {i: q for i, q in prob.items() if q >= p.min_p * mx}
    z = sum(prob.values())
    out = [0.0] * V
    for i, q in prob.items():
        out[i] = q / z
    return out


def ref_penalised(logits_row, p: SP, prompt, output, banned=()):
    x = logits_row.double().tolist()
    for t in banned:
        x[t] = -math.inf
    seen = set(prompt) | set(output)
    for t in seen:
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        c = output.count(t)
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


# -- greedy ----------------------------------------------------------------------------------


def test_greedy_is_argmax_and_fast_path():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g)
    params = [SP(temperature=0)] * 6
    b = build(params, logits)
    assert b.fast
    res = sample(logits, b)
    assert res.token_ids == logits.argmax(-1).tolist()
    assert res.logprobs is None and res.top_logprobs is None
    assert res.tokens.tolist() == res.token_ids


def test_top_k_1_is_greedy_and_mixed_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 200, generator=g)
    params = [SP(temperature=0.9, top_k=1), SP(temperature=1.3), SP(temperature=0), SP(top_p=0.5), SP(top_k=1)]
    res = run(params, logits)
    am = logits.argmax(-1).tolist()
    for i in (0, 2, 4):
        assert res.token_ids[i] == am[i]
    assert all(0 <= t < 200 for t in res.token_ids)


def test_input_logits_untouched_and_padded_vocab_ignored():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 64, generator=g)
    logits[:, 50:] = 100.0  # padded LM-head columns beyond the real vocabulary
    before = logits.clone()
    params = [SP(temperature=0.7, top_p=0.9, repetition_penalty=1.3), SP(temperature=0), SP(min_tokens=5)]
    b = build(params, 50, prompts=[[1, 3], [], []], outputs=[[4], [], []])
    for _ in range(20):
        res = sample(logits, b)
        assert all(t < 50 for t in res.token_ids)
    assert torch.equal(logits, before)


def test_greedy_fast_path_overhead():
    V = 49152
    logits = torch.randn(1, V)
    params = [SP(temperature=0)]
    gen = torch.Generator().manual_seed(0)

    def step():
        return sample(logits, SamplingBatch.build(params, [[1, 2, 3]], [[4, 5]], [None], [EOS], V, CPU, gen))

    step()
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(50):
            step()
        best = min(best, (time.perf_counter() - t) / 50)
    assert best < 1e-3, f"greedy build+sample took {best * 1e6:.0f} us"


# -- distributions -------------------------------------------------------------------------

N = 20000


def empirical(logits_row, p: SP, seed=0):
    """N draws of one row, done as one batch of N identical (unseeded) rows."""
    logits = logits_row.view(1, -1).expand(N, -1).contiguous()
    res = run([p] * N, logits, default=torch.Generator().manual_seed(seed))
    counts = torch.bincount(torch.tensor(res.token_ids), minlength=logits.shape[1]).double()
    return (counts / N).tolist()


def check_distribution(logits_row, p: SP, seed=0):
    ref = ref_filtered_probs(logits_row, p)
    emp = empirical(logits_row, p, seed)
    support = [i for i, r in enumerate(ref) if r > 0]
    for i, (r, e) in enumerate(zip(ref, emp)):
        if r == 0.0:
            assert e == 0.0, f"token {i} is filtered out but was sampled ({e})"
    # Bins: each token with reference mass >= 0.5% alone, the rest of the support pooled
    # (keeps every expected count large enough for chi-square and TV to mean something).
    big = [i for i in support if ref[i] >= 0.005]
    small = [i for i in support if ref[i] < 0.005]
    r_bins = [ref[i] for i in big] + ([sum(ref[i] for i in small)] if small else [])
    e_bins = [emp[i] for i in big] + ([sum(emp[i] for i in small)] if small else [])
    tv = 0.5 * sum(abs(r - e) for r, e in zip(r_bins, e_bins))
    chi2 = sum((e - r) ** 2 * N / r for r, e in zip(r_bins, e_bins))
    df = max(len(r_bins) - 1, 1)
    assert tv < 0.02, (tv, p)
    assert chi2 < df + 6 * math.sqrt(2 * df) + 10, (chi2, df, p)  # ~6 sigma
    return support


SMALL = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.4, -1.0, -1.5, -3.0])


@pytest.mark.parametrize(
    "p",
    [
        SP(temperature=1.0),
        SP(temperature=0.5),
        SP(temperature=2.0),
        SP(temperature=1.0, top_k=3),
        SP(temperature=0.8, top_k=5),
        SP(temperature=1.0, top_p=0.8),
        SP(temperature=1.5, top_p=0.5),
        SP(temperature=1.0, min_p=0.2),
        SP(temperature=1.2, top_k=6, top_p=0.75, min_p=0.1),
    ],
    ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}",
)
def test_distribution_small_vocab(p):
    check_distribution(SMALL, p)


def long_tail_logits(V=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(V, generator=g) - 7.0  # a long tail holding ~2% of the mass
    x[:6] = torch.tensor([3.0, 2.5, 2.2, 1.8, 1.0, 0.5])
    return x


@pytest.mark.parametrize(
    "p, wide",
    [
        (SP(temperature=1.0, top_p=0.7), False),  # nucleus inside the first 256 candidates
        (SP(temperature=1.0, top_p=0.999, top_k=500), True),  # reaches past them: full sort
        (SP(temperature=1.0, top_p=0.999), True),
        (SP(temperature=0.7, top_k=20, min_p=0.05), False),
        (SP(temperature=1.3, top_k=400), True),
    ],
    ids=["top_p_candidates", "top_p_top_k_sorted", "top_p_sorted", "top_k_min_p", "top_k_wide"],
)
def test_distribution_large_vocab(p, wide):
    support = check_distribution(long_tail_logits(), p, seed=3)
    assert (len(support) > sampling._CANDIDATES) == wide


def test_candidate_path_equals_full_sort(monkeypatch):
    g = torch.Generator().manual_seed(7)
    n, V = 64, 3000
    x = torch.randn(n, V, generator=g) * 3
    temperature = torch.rand(n, 1, generator=g) + 0.3
    top_p = torch.rand(n, generator=g) * 0.9 + 0.05
    top_k = torch.where(torch.rand(n, generator=g) < 0.5, torch.randint(1, 200, (n,), generator=g), V)
    min_p = torch.rand(n, generator=g) * 0.1
    noise = torch.empty(n, V).exponential_(generator=g)
    # every row covered by the 256 candidates (peaked): same tokens with and without the shortcut
    peaked = x * 4
    a = filtered_sample_torch(peaked, temperature, top_k, top_p, min_p, noise)
    monkeypatch.setattr(sampling, "_CANDIDATES", 10**9)
    b = filtered_sample_torch(peaked, temperature, top_k, top_p, min_p, noise)
    assert torch.equal(a, b)


# -- seeds ---------------------------------------------------------------------------------


def seeded_run(rows, steps, V, seed_row_index, logits_seq, outputs_init=None):
    """Run `steps` steps for a batch; returns the token ids of row `seed_row_index`."""
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in rows]
    default = torch.Generator().manual_seed(999 + len(rows))
    outputs = [[] for _ in rows]
    prompts = [[5, 6, 7] for _ in rows]
    got = []
    for s in range(steps):
        logits = logits_seq(s, len(rows), seed_row_index)
        b = SamplingBatch.build(rows, prompts, outputs, gens, [EOS], V, CPU, default)
        res = sample(logits, b)
        for o, t in zip(outputs, res.token_ids):
            o.append(t)
        got.append(res.token_ids[seed_row_index])
    return got


@pytest.mark.parametrize(
    "p",
    [
        SP(temperature=1.0, seed=42),
        SP(temperature=0.8, top_k=50, seed=7),
        SP(temperature=1.1, top_p=0.9, seed=3),
        SP(temperature=1.0, min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.3, seed=11),
    ],
    ids=["temp", "top_k", "top_p", "min_p_penalties"],
)
def test_seeded_row_independent_of_batch(p):
    V = 700
    base = torch.Generator().manual_seed(123)
    table = torch.randn(30, V, generator=base) * 2.5

    def logits_seq(step, B, idx):
        other = torch.Generator().manual_seed(10_000 + step * 31 + B)
        x = torch.randn(B, V, generator=other) * 2.5
        x[idx] = table[step]  # the seeded row sees the same logits in every batch
        return x

    alone = seeded_run([p], 30, V, 0, logits_seq)
    others = [SP(temperature=1.0), SP(temperature=0.5, seed=5), SP(temperature=0), SP(top_k=3),
              SP(top_p=0.5, seed=42), SP(presence_penalty=1.0)]
    mixed = seeded_run(others[:3] + [p] + others[3:], 30, V, 3, logits_seq)
    assert alone == mixed
    again = seeded_run([SP(temperature=1.0)] + [p], 30, V, 1, logits_seq)
    assert alone == again
    # and the seed matters
    q = SP(**{**p.__dict__, "seed": p.seed + 1})
    assert seeded_run([q], 30, V, 0, logits_seq) != alone


# -- penalties, min_tokens -----------------------------------------------------------------


def test_penalties_match_reference():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(4)
    B, V = 8, 60
    logits = torch.randn(B, V, generator=g) * 3
    params, prompts, outputs = [], [], []
    for i in range(B):
        if i % 3 == 2:
            params.append(SP(temperature=0))  # a row without penalties in the same batch
        else:
            params.append(SP(temperature=0, repetition_penalty=rng.choice([1.0, 0.8, 1.3, 2.0]),
                             frequency_penalty=rng.choice([0.0, 0.5, -0.7, 2.0]),
                             presence_penalty=rng.choice([0.0, 1.0, -0.5])))
        prompts.append([rng.randrange(V) for _ in range(rng.randint(0, 15))])
        outputs.append([rng.randrange(V) for _ in range(rng.randint(0, 15))])
    b = build(params, logits, prompts=prompts, outputs=outputs)
    x = sampling._penalise(logits.clone(), b, None)
    for i in range(B):
        ref = torch.tensor(ref_penalised(logits[i], params[i], prompts[i], outputs[i]), dtype=torch.float32)
        torch.testing.assert_close(x[i], ref, rtol=1e-5, atol=1e-5)
    res = sample(logits, b)
    for i in range(B):
        ref = ref_penalised(logits[i], params[i], prompts[i], outputs[i])
        assert res.token_ids[i] == max(range(V), key=lambda t: ref[t])


def test_repetition_penalty_covers_prompt_and_output():
    logits = torch.tensor([[4.0, 3.9, 3.8, -1.0]])
    p = SP(temperature=0, repetition_penalty=2.0)
    assert run([p], logits, prompts=[[0]], outputs=[[]]).token_ids == [1]
    assert run([p], logits, prompts=[[0]], outputs=[[1]]).token_ids == [2]
    logits = torch.tensor([[-1.0, -1.2, -5.0]])  # negative logits are multiplied
    assert run([p], logits, prompts=[[]], outputs=[[0]]).token_ids == [1]


def test_frequency_presence_only_over_output():
    logits = torch.tensor([[5.0, 4.0, 3.0]])
    p = SP(temperature=0, frequency_penalty=0.3, presence_penalty=0.5)
    assert run([p], logits, prompts=[[0, 0, 0]], outputs=[[]]).token_ids == [0]  # prompt ignored
    assert run([p], logits, prompts=[[]], outputs=[[0]]).token_ids == [0]  # 5 - 0.8 = 4.2 > 4
    assert run([p], logits, prompts=[[]], outputs=[[0, 0]]).token_ids == [1]  # 5 - 1.1 = 3.9 < 4


def test_min_tokens_suppresses_eos_and_stop_ids():
    V = 20
    logits = torch.zeros(4, V)
    logits[:, EOS] = 10.0
    logits[:, 7] = 9.0
    logits[:, 3] = 8.0
    params = [
        SP(temperature=0, min_tokens=3),
        SP(temperature=0, min_tokens=3, stop_token_ids=[7]),
        SP(temperature=0.5, min_tokens=2, stop_token_ids=[7]),
        SP(temperature=0, min_tokens=3, ignore_eos=True),  # EOS is no stop then: not banned
    ]
    outs = [[1], [1], [1], [1]]
    res = run(params, logits, outputs=outs)
    assert res.token_ids[0] == 7
    assert res.token_ids[1] == 3
    assert res.token_ids[2] not in (EOS, 7)
    assert res.token_ids[3] == EOS
    # once min_tokens is reached, nothing is banned
    res = run(params, logits, outputs=[[1, 1, 1]] * 4)
    assert res.token_ids[0] == EOS and res.token_ids[1] == EOS


def test_min_tokens_multiple_eos_ids():
    logits = torch.zeros(1, 10)
    logits[0, 2] = 5.0
    logits[0, 9] = 4.0
    res = run([SP(temperature=0, min_tokens=1)], logits, eos=(2, 9))
    assert res.token_ids[0] not in (2, 9)


# -- logprobs ------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax():
    g = torch.Generator().manual_seed(9)
    B, V = 5, 80
    logits = torch.randn(B, V, generator=g) * 2
    params = [
        SP(temperature=0.5, top_k=5, repetition_penalty=1.5, logprobs=True, top_logprobs=4),
        SP(temperature=0, logprobs=False),
        SP(temperature=0, logprobs=True),
        SP(temperature=1.0, top_p=0.3, logprobs=True, top_logprobs=20),
        SP(temperature=0, min_tokens=4, logprobs=True, top_logprobs=1),
    ]
    res = run(params, logits, prompts=[[1, 2, 3]] * B, outputs=[[4]] * B)
    lsm = torch.log_softmax(logits, dim=-1)
    assert res.logprobs[1] is None and res.top_logprobs[1] is None
    assert res.top_logprobs[2] == []
    for i in (0, 2, 3, 4):
        assert res.logprobs[i] == pytest.approx(lsm[i, res.token_ids[i]].item(), abs=1e-5)
    for i, n in ((0, 4), (3, 20), (4, 1)):
        top = res.top_logprobs[i]
        assert len(top) == n
        vals = [v for _, v in top]
        assert vals == sorted(vals, reverse=True)
        ref_ids = lsm[i].topk(n).indices.tolist()
        assert [t for t, _ in top] == ref_ids
        for t, v in top:
            assert v == pytest.approx(lsm[i, t].item(), abs=1e-5)


def test_logprobs_on_fast_path():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    res = run([SP(temperature=0, logprobs=True, top_logprobs=2)], logits)
    lsm = torch.log_softmax(logits, -1)[0]
    assert res.token_ids == [1]
    assert res.logprobs[0] == pytest.approx(lsm[1].item())
    assert [t for t, _ in res.top_logprobs[0]] == [1, 2]


# -- kernel dispatch (a fake module with the documented calling convention) ----------------


class FakeKernels:
    def __init__(self, fail=False):
        self.fail = fail
        self.calls = []

    def filtered_sample(self, logits, temperature, top_k, top_p, min_p, noise):
        self.calls.append("filtered_sample")
        if self.fail:
            raise RuntimeError("boom")
        V = logits.shape[1]
        assert logits.is_contiguous() and temperature.dim() == 1 and top_k.dtype == torch.int32
        return filtered_sample_torch(logits, temperature.view(-1, 1), top_k.long(), top_p, min_p, noise, k_max=V)

    def apply_penalties(self, logits, counts, prompt_mask, repetition, frequency, presence):
        self.calls.append("apply_penalties")
        if self.fail:
            raise RuntimeError("boom")
        assert repetition.dim() == 1 and prompt_mask.dtype == torch.bool
        out = sampling.apply_penalties_torch(logits, counts, prompt_mask, repetition.view(-1, 1),
                                             frequency.view(-1, 1), presence.view(-1, 1))
        logits.copy_(out)  # in place, returns None


@pytest.mark.parametrize("fail", [False, True])
def test_kernel_dispatch_matches_torch(monkeypatch, fail):
    g = torch.Generator().manual_seed(21)
    B, V = 6, 300
    logits = torch.randn(B, V, generator=g) * 2
    params = [SP(temperature=0.8, top_k=30, top_p=0.9, seed=1), SP(temperature=0, repetition_penalty=1.4),
              SP(temperature=1.2, min_p=0.1, frequency_penalty=0.5, seed=2), SP(temperature=0.5, seed=3),
              SP(temperature=1.0, presence_penalty=1.0, seed=4), SP(top_p=0.3, seed=5)]
    prompts = [[1, 2, 3]] * B
    outputs = [[4, 5, 5, 7]] * B

    def go():
        gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
        b = SamplingBatch.build(params, prompts, outputs, gens, [EOS], V, CPU, torch.Generator().manual_seed(0))
        return sample(logits, b).token_ids

    ref = go()
    fake = FakeKernels(fail)
    monkeypatch.setattr(sampling, "_kernel_mod", fake)
    monkeypatch.setattr(sampling, "_kernel_checked", True)
    monkeypatch.setattr(sampling, "_kernels_for", lambda x: sampling._kernels())
    assert go() == ref
    assert set(fake.calls) == {"filtered_sample", "apply_penalties"}
    assert (sampling._kernel_mod is None) == fail  # a failing kernel is dropped
