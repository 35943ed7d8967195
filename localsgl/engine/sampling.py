"""Batched next-token sampling: min_tokens, penalties, temperature, top-k/top-p/min-p, seeds, logprobs.

The engine calls :meth:`SamplingBatch.build` once per model step for the B rows that
need a next token, then :func:`sample` with the last-position logits ``[B, V]``.  The
penalties' per-request history (output-token counts, prompt-token mask) comes from
``penalties.PenaltyState``, kept on the device and updated by one scatter per step.

Per row, in this order (the order is part of the contract, tests check it):

(0) grammar: a constrained row's logits outside its token bitmask (grammar.py, filled on the
    host while the device runs the step) get ``-inf``; its min_tokens ban is not applied
    (the grammar decides when the output may end).
(a) ``min_tokens``: while the row has produced fewer than ``min_tokens`` tokens, its
    ``stop_token_ids`` and (unless ``ignore_eos``) the model's EOS ids get ``-inf``.
(b) ``repetition_penalty`` p (HF style) over every token of prompt + output:
    a positive logit is divided by p, a negative one multiplied by p.
(c) ``frequency_penalty`` f and ``presence_penalty`` r (OpenAI style) over OUTPUT tokens:
    ``logit -= f * count + r * (count > 0)``.
(d) ``temperature == 0`` (or ``top_k == 1``) -> greedy argmax of the penalised logits;
    otherwise ``logits / temperature``.
(e) filters, each on the distribution renormalised after the previous one (HF/vLLM order):
    ``top_k`` (<= 0 or >= V: off), ``top_p`` nucleus (keep the smallest prefix of the
    sorted distribution whose mass reaches top_p; the top token always stays), ``min_p``
    (keep p >= min_p * max p).
(f) a sample by the exponential race: ``token = argmax(p / q)`` with ``q ~ Exp(1)`` i.i.d.
    per vocabulary entry.  This picks token i with probability p_i exactly, needs no
    cumulative sum, and lets a seeded row draw its ``q`` from its own generator: a row with a
    ``seed`` gives the same tokens whatever else is in the batch.  Unseeded rows share
    ``default_generator``; greedy rows draw nothing.

Logprobs (when a row asks for them) are those of the model's raw distribution,
``log_softmax(logits)`` BEFORE min_tokens, penalties, temperature and filters (vLLM's default
"raw logprobs"), so they are comparable across sampling settings.

Fast path: when every row is greedy with no penalty and no active min_tokens ban, ``sample``
is one argmax (plus logprobs if asked); ``build`` is one pass over the params.

On CUDA, ``localsgl_kernels.sampling`` is used when it exists, called as

    filtered_sample(logits [n,V] fp32 contiguous, temperature [n] fp32 (> 0), top_k [n] int32
                    (V = off), top_p [n] fp32 (1 = off), min_p [n] fp32 (0 = off),
                    noise [n,V] fp32 Exp(1)) -> [n] token ids        (non-greedy rows only)
    apply_penalties(logits [m,V] fp32 contiguous, counts [m,V] int32 or fp32 (output-token counts),
                    prompt_mask [m,V] bool (prompt tokens), repetition [m], frequency [m],
                    presence [m] fp32) -> [m,V] or None (in place)   (penalised rows only)

and a kernel that raises is logged once and replaced by the torch path for the process.
The torch functions below (``filtered_sample_torch``, ``apply_penalties_torch``) are the
reference those kernels are tested against.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .params import SamplingParams

logger = logging.getLogger(__name__)

_NEG_INF = float("-inf")
_CANDIDATES = 256  # top-p looks at this many top entries before falling back to a full sort

_kernel_mod = None
_kernel_checked = False


def _kernels():
    """``localsgl_kernels.sampling`` if it exists with all its entry points, else None (cached)."""
    global _kernel_mod, _kernel_checked
    if not _kernel_checked:
        _kernel_checked = True
        try:
            from localsgl_kernels import sampling as mod  # type: ignore[import-not-found]

            if all(hasattr(mod, f) for f in ("filtered_sample", "apply_penalties", "argmax_rows")):
                _kernel_mod = mod
        except Exception:  # ImportError, or triton missing / broken on this machine
            _kernel_mod = None
    return _kernel_mod


def _kernels_for(logits: torch.Tensor):
    return _kernels() if logits.is_cuda else None


def _kernel_failed(name: str, err: Exception) -> None:
    """Log once and use the torch path from now on."""
    global _kernel_mod
    _kernel_mod = None
    logger.warning("localsgl_kernels.sampling.%s failed (%s: %s); using the torch sampler", name,
                   type(err).__name__, err)


def upload(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device``; on CUDA through pinned memory, so the copy is
    queued on the stream and the host never waits for the device."""
    t = torch.tensor(data, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class SampleResult:
    token_ids: list[int]
    # Only when some row asked for logprobs; None entries for rows that did not.
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None
    # The chosen ids as a [B] int64 tensor on the logits' device (for the next step's input).
    tokens: torch.Tensor | None = None


class SamplingBatch:
    """Per-step sampling state for B rows; tensors exist only for the features some row uses."""

    def __init__(self, size: int, vocab_size: int, device: torch.device):
        self.size = size
        self.vocab_size = vocab_size
        self.device = device
        self.fast = True  # all greedy, no penalties, no min_tokens ban -> plain argmax
        # logprobs
        self.lp_rows: list[int] = []  # rows that want logprobs
        self.lp_top: list[int] = []  # their top_logprobs
        # (a) min_tokens bans: parallel index tensors (row, token)
        self.ban_rows: torch.Tensor | None = None
        self.ban_ids: torch.Tensor | None = None
        # (b, c) penalties over a subset of rows
        self.pen_rows: torch.Tensor | None = None  # [m] long, or None when m == B
        self.pen_count = 0
        self.counts: torch.Tensor | None = None  # [m, V] output-token counts (int32 or fp32)
        self.prompt_mask: torch.Tensor | None = None  # [m, V] bool, prompt tokens
        self.repetition: torch.Tensor | None = None  # [m, 1]
        self.frequency: torch.Tensor | None = None  # [m, 1]
        self.presence: torch.Tensor | None = None  # [m, 1]
        self.use_repetition = False
        self.use_freq_presence = False
        # (d) greedy / sampled split; None index = "all rows"
        self.greedy_rows: torch.Tensor | None = None
        self.sample_rows: torch.Tensor | None = None
        self.n_greedy = 0
        self.n_sample = 0
        # (e) per sampled row
        self.temperature: torch.Tensor | None = None  # [n, 1] fp32
        self.top_k: torch.Tensor | None = None  # [n] long, V when off
        self.top_p: torch.Tensor | None = None  # [n] fp32, 1 when off
        self.min_p: torch.Tensor | None = None  # [n] fp32, 0 when off
        self.k_max = 0
        self.need_top_k = False
        self.need_top_p = False
        self.need_min_p = False
        # (f)
        self.generators: list[torch.Generator | None] = []  # per sampled row
        self.default_generator: torch.Generator | None = None
        # (0) grammar bitmasks: rows [m] long and their int32 bitmasks [m, ceil(V'/32)], on the device
        self.grammar_rows: torch.Tensor | None = None
        self.grammar_bits: torch.Tensor | None = None

    def set_grammar(self, rows: list[int], bits: torch.Tensor) -> None:
        """Constrain these rows to the tokens their bitmasks allow (bit j of word i: token 32i+j)."""
        self.grammar_rows = None if len(rows) == self.size else upload(rows, torch.long, self.device)
        self.grammar_bits = bits

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
        eos_ids: list[int],
        vocab_size: int,
        device: torch.device,
        default_generator: torch.Generator,
        penalty_source: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
        constrained: frozenset[int] = frozenset(),
    ) -> "SamplingBatch":
        """The sampling state of B rows.  ``penalty_source(rows)``, when given, returns the
        output-token counts [m, V] and prompt-token mask [m, V] (or None without repetition
        penalties) of those penalised rows, kept on the device (``penalties.PenaltyState``);
        without it they are built from ``prompt_ids`` / ``output_ids``, O(context) per row.
        ``constrained``: rows with a grammar (their bitmasks come through ``set_grammar``)."""
        B = len(params)
        V = vocab_size
        b = cls(B, V, device)
        b.default_generator = default_generator

        greedy: list[int] = []
        sampled: list[int] = []
        pen: list[int] = []
        ban_r: list[int] = []
        ban_t: list[int] = []
        for i, p in enumerate(params):
            if p.logprobs or p.top_logprobs > 0:
                b.lp_rows.append(i)
                b.lp_top.append(p.top_logprobs)
            if p.temperature == 0.0 or p.top_k == 1:
                greedy.append(i)
            else:
                sampled.append(i)
            if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
                pen.append(i)
            if p.min_tokens > len(output_ids[i]) and i not in constrained:
                banned = set(p.stop_token_ids)
                if not p.ignore_eos:
                    banned.update(eos_ids)
                for t in banned:
                    if 0 <= t < V:
                        ban_r.append(i)
                        ban_t.append(t)
        b.fast = not sampled and not pen and not ban_r
        if b.fast:
            b.n_greedy = B
            return b

        def idx(rows: list[int]) -> torch.Tensor:
            return upload(rows, torch.long, device)

        if ban_r:
            b.ban_rows = idx(ban_r)
            b.ban_ids = idx(ban_t)

        if pen:
            b._build_penalties(params, prompt_ids, output_ids, pen, penalty_source)

        b.n_greedy, b.n_sample = len(greedy), len(sampled)
        if greedy and sampled:
            b.greedy_rows = idx(greedy)
            b.sample_rows = idx(sampled)
        if sampled:
            temp, tk, tp, mp = [], [], [], []
            for i in sampled:
                p = params[i]
                temp.append(p.temperature)
                k = p.top_k if 0 < p.top_k < V else V
                tk.append(k)
                tp.append(p.top_p)
                mp.append(p.min_p)
                b.generators.append(generators[i] if p.seed is not None else None)
            b.need_top_k = any(k < V for k in tk)
            b.need_top_p = any(x < 1.0 for x in tp)
            b.need_min_p = any(x > 0.0 for x in mp)
            b.k_max = max(k for k in tk if k < V) if b.need_top_k else V
            b.temperature = upload(temp, torch.float32, device).view(-1, 1)
            b.top_k = upload(tk, torch.long, device)
            b.top_p = upload(tp, torch.float32, device)
            b.min_p = upload(mp, torch.float32, device)
        return b

    def _build_penalties(self, params, prompt_ids, output_ids, pen: list[int], source) -> None:
        dev, V, m = self.device, self.vocab_size, len(pen)
        self.pen_count = m
        if m != self.size:
            self.pen_rows = upload(pen, torch.long, dev)
        rep = [params[i].repetition_penalty for i in pen]
        freq = [params[i].frequency_penalty for i in pen]
        pres = [params[i].presence_penalty for i in pen]
        self.use_repetition = any(r != 1.0 for r in rep)
        self.use_freq_presence = any(f != 0.0 for f in freq) or any(r != 0.0 for r in pres)
        self.repetition, self.frequency, self.presence = upload([rep, freq, pres], torch.float32, dev).view(3, m, 1)
        if source is not None:
            self.counts, self.prompt_mask = source(pen)
            if not self.use_repetition:
                self.prompt_mask = None
            return

        # Output-token counts (needed by every penalty: repetition also covers output tokens).
        rows, flat = [], []
        for j, i in enumerate(pen):
            out = output_ids[i]
            rows.extend([j] * len(out))
            flat.extend(out)
        self.counts = torch.zeros(m, V, dtype=torch.float32, device=dev)
        if flat:
            r = upload(rows, torch.long, dev)
            t = upload(flat, torch.long, dev)
            ok = (t >= 0) & (t < V)
            self.counts.index_put_((r[ok], t[ok]), torch.ones((), device=dev), accumulate=True)
        if self.use_repetition:
            rows, flat = [], []
            for j, i in enumerate(pen):
                if params[i].repetition_penalty != 1.0:
                    pr = prompt_ids[i]
                    rows.extend([j] * len(pr))
                    flat.extend(pr)
            self.prompt_mask = torch.zeros(m, V, dtype=torch.bool, device=dev)
            if flat:
                r = upload(rows, torch.long, dev)
                t = upload(flat, torch.long, dev)
                ok = (t >= 0) & (t < V)
                self.prompt_mask[r[ok], t[ok]] = True

    # -- helpers used by sample() ------------------------------------------------------

    def noise(self) -> torch.Tensor:
        """q ~ Exp(1) of shape [n_sample, V]: seeded rows from their own generator (V draws per
        step, independent of the batch), the other rows from the default generator."""
        n, V = self.n_sample, self.vocab_size
        u = torch.empty(n, V, dtype=torch.float32, device=self.device)
        unseeded = [j for j, g in enumerate(self.generators) if g is None]
        if len(unseeded) == n:
            u.uniform_(generator=self.default_generator)
        else:
            for j, g in enumerate(self.generators):
                if g is not None:
                    u[j].uniform_(generator=g)
            if unseeded:
                r = torch.empty(len(unseeded), V, dtype=torch.float32, device=self.device)
                r.uniform_(generator=self.default_generator)
                u[torch.tensor(unseeded, dtype=torch.long, device=self.device)] = r
        # q = -log(u), u in [0, 1): q > 0 always (never p/0); u == 0 gives q = inf, i.e. that
        # token loses this draw (probability 2^-24 per entry).  Cheaper than exponential_ on CPU.
        return u.log_().neg_()


# ---------------------------------------------------------------------------------------
# torch reference implementation


def apply_penalties_torch(
    logits: torch.Tensor,
    counts: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    repetition: torch.Tensor | None,
    frequency: torch.Tensor | None,
    presence: torch.Tensor | None,
) -> torch.Tensor:
    """(b) + (c) out of place. logits/counts/prompt_mask [m, V]; penalty tensors [m, 1] or None."""
    x = logits
    present = counts > 0
    if repetition is not None:
        seen = present if prompt_mask is None else (present | prompt_mask)
        x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    if frequency is not None:
        x = x - frequency * counts
    if presence is not None:
        x = x - presence * present.to(x.dtype)
    return x


def filtered_sample_torch(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    noise: torch.Tensor,
    k_max: int | None = None,
) -> torch.Tensor:
    """(d non-greedy) + (e) + (f) for [n, V] logits -> [n] long token ids.

    ``temperature`` [n, 1] (> 0); ``top_k`` [n] long (V = off) or None; ``top_p`` [n] (1 = off)
    or None; ``min_p`` [n] (0 = off) or None; ``noise`` [n, V], Exp(1) draws (> 0)."""
    n, V = logits.shape
    x = logits / temperature
    if top_k is not None:
        # topk (a partial selection) rather than a full sort: drop everything below the
        # k-th largest logit (ties with it stay).
        k_max = min(int(k_max) if k_max else int(top_k.max()), V)
        vals = x.topk(k_max, dim=-1, sorted=True).values
        thresh = vals.gather(1, top_k.clamp(max=k_max).view(-1, 1) - 1)
        thresh = torch.where(top_k.view(-1, 1) >= V, torch.full_like(thresh, _NEG_INF), thresh)
        x = x.masked_fill(x < thresh, _NEG_INF)
    if top_p is None:
        p = x.softmax(dim=-1)
        if min_p is not None:
            p = p.masked_fill(p < min_p.view(-1, 1) * p.max(dim=-1, keepdim=True).values, 0.0)
        return (p / noise).argmax(dim=-1)

    # Nucleus: needs the distribution in descending order.  Try the top CANDIDATES entries
    # first; fall back to a full sort only when some row's nucleus (or its whole top-k set,
    # for a row without top-p) might reach past them.  Probabilities are exp(x - lse) with
    # lse over the whole (top-k-filtered) row in both cases, so both give the same numbers.
    lse = x.logsumexp(dim=-1, keepdim=True)
    tp = torch.where(top_p >= 1.0, torch.full_like(top_p, float("inf")), top_p).view(-1, 1)
    order = None
    if V > _CANDIDATES:
        sx, order = x.topk(_CANDIDATES, dim=-1, sorted=True)
        sp = (sx - lse).exp()
        cum = sp.cumsum(dim=-1)
        # Covered: the nucleus ends inside (the next entry's "mass before" is >= top_p), or
        # every entry that survived top-k is inside (the last candidate is already -inf).
        covered = (cum[:, -1:] >= tp) | (sx[:, -1:] == _NEG_INF)
        if not bool(covered.all()):
            order = None
    if order is None:
        sx, order = x.sort(dim=-1, descending=True, stable=True)
        sp = (sx - lse).exp()
        cum = sp.cumsum(dim=-1)
    before = cum - sp  # mass strictly before each entry
    remove = before >= tp
    if min_p is not None:
        remove |= sp < min_p.view(-1, 1) * sp[:, :1]
    remove[:, 0] = False
    sp = sp.masked_fill(remove, 0.0)
    # Sample in sorted order with the noise gathered to match: token i always meets its own q_i.
    j = (sp / noise.gather(1, order)).argmax(dim=-1, keepdim=True)
    return order.gather(1, j).view(-1)


# ---------------------------------------------------------------------------------------


def _penalise(x: torch.Tensor, b: SamplingBatch, kmod) -> torch.Tensor:
    sub = x if b.pen_rows is None else x.index_select(0, b.pen_rows)
    done = False
    if kmod is not None:
        pm = b.prompt_mask
        if pm is None:
            pm = torch.zeros_like(b.counts, dtype=torch.bool)
        try:
            sub = sub.contiguous()
            out = kmod.apply_penalties(
                sub, b.counts, pm, b.repetition.view(-1), b.frequency.view(-1), b.presence.view(-1)
            )
            sub = sub if out is None else out  # the kernel may work in place
            done = True
        except Exception as e:  # a broken kernel must not take the engine down
            _kernel_failed("apply_penalties", e)
    if not done:
        sub = apply_penalties_torch(
            sub,
            b.counts,
            b.prompt_mask,
            b.repetition if b.use_repetition else None,
            b.frequency if b.use_freq_presence else None,
            b.presence if b.use_freq_presence else None,
        )
    if b.pen_rows is None:
        return sub
    x.index_copy_(0, b.pen_rows, sub)
    return x


def _sample_rows(x: torch.Tensor, b: SamplingBatch, kmod) -> torch.Tensor:
    q = b.noise()
    if kmod is not None:
        try:
            out = kmod.filtered_sample(
                x.contiguous(), b.temperature.view(-1), b.top_k.to(torch.int32), b.top_p, b.min_p, q
            )
            return out.view(-1).long()
        except Exception as e:
            _kernel_failed("filtered_sample", e)
    return filtered_sample_torch(
        x,
        b.temperature,
        b.top_k if b.need_top_k else None,
        b.top_p if b.need_top_p else None,
        b.min_p if b.need_min_p else None,
        q,
        k_max=b.k_max,
    )


def sample(logits: torch.Tensor, batch: SamplingBatch, use_kernels: bool = True, defer: bool = False) -> SampleResult:
    """Next token for each of the B rows of ``logits`` [B, V'] (V' >= V; extra columns, e.g. a
    padded LM head, are ignored). Never writes into ``logits``."""
    b = batch
    V = b.vocab_size
    if logits.shape[-1] != V:
        logits = logits[:, :V]
    raw = logits  # logprobs are the model's, before any mask
    if b.grammar_bits is not None:  # in the logits' own dtype (exact: it adds 0 or -inf), half the bytes of float32
        logits = apply_token_bitmask(logits, b.grammar_rows, b.grammar_bits)
    if logits.dtype != torch.float32:
        logits = logits.float()

    kmod = _kernels_for(logits) if use_kernels else None
    if b.fast:
        tokens = kmod.argmax_rows(logits) if kmod is not None else logits.argmax(dim=-1)
    else:
        x = logits.clone()
        if b.ban_rows is not None:
            x[b.ban_rows, b.ban_ids] = _NEG_INF
        if b.pen_count:
            x = _penalise(x, b, kmod)
        if b.n_sample == 0:
            tokens = x.argmax(dim=-1)
        elif b.n_greedy == 0:
            tokens = _sample_rows(x, b, kmod)
        else:
            tokens = torch.empty(b.size, dtype=torch.long, device=x.device)
            tokens[b.greedy_rows] = x.index_select(0, b.greedy_rows).argmax(dim=-1)
            tokens[b.sample_rows] = _sample_rows(x.index_select(0, b.sample_rows), b, kmod)

    if defer and not b.lp_rows:  # overlap scheduling: leave the ids on the device, no sync
        return SampleResult(token_ids=None, tokens=tokens)
    token_ids = tokens.tolist()
    res = SampleResult(token_ids=token_ids, tokens=tokens)
    if b.lp_rows:
        _add_logprobs(res, raw.float(), tokens, b)
    return res


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor | None, bits: torch.Tensor) -> torch.Tensor:
    """(0) out of place: ``logits`` [B, V] with -inf outside the allowed tokens of ``rows``
    (None: every row), ``bits`` [m, W] int32, bit j of word i allowing token 32i+j; tokens
    past 32W are not allowed.

    Each byte of the masks picks its 8 additive terms (0 or -inf) from a 256-row table, and
    one add applies them: a quarter of the time of expanding the bits into a boolean mask
    (bench/RESULTS.md, structured decoding).  A NaN logit stays NaN where it is allowed; one
    where it is not can win the argmax, and the matcher then refuses that token, which ends
    the output with "grammar_error" (grammar.GrammarState.after)."""
    V = logits.shape[-1]
    table = _byte_mask_table(logits.device, logits.dtype)
    # the int32 words as bytes, least significant first (every supported host and device
    # is little-endian): byte k of word i holds the bits of tokens 32i+8k .. 32i+8k+7
    add = table.index_select(0, bits.contiguous().view(torch.uint8).view(-1).long()).view(bits.shape[0], -1)
    if add.shape[1] >= V:
        add = add[:, :V]
    else:
        add = torch.nn.functional.pad(add, (0, V - add.shape[1]), value=_NEG_INF)
    if rows is None:
        return logits + add
    out = logits.clone()
    out.index_copy_(0, rows, logits.index_select(0, rows) + add)
    return out


_BYTE_MASK_TABLES: dict[tuple, torch.Tensor] = {}


def _byte_mask_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: row b holds 0 where bit j of byte b is set and -inf elsewhere."""
    key = (device, dtype)
    t = _BYTE_MASK_TABLES.get(key)
    if t is None:
        bit_set = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool()
        t = torch.zeros(256, 8).masked_fill_(~bit_set, _NEG_INF).to(device=device, dtype=dtype)
        _BYTE_MASK_TABLES[key] = t
    return t


def _add_logprobs(res: SampleResult, logits: torch.Tensor, tokens: torch.Tensor, b: SamplingBatch) -> None:
    """Raw-model logprobs: log_softmax of the unmodified logits."""
    B = b.size
    if len(b.lp_rows) == B:
        lg, tk = logits, tokens
    else:
        ri = torch.tensor(b.lp_rows, dtype=torch.long, device=logits.device)
        lg, tk = logits.index_select(0, ri), tokens.index_select(0, ri)
    lp = torch.log_softmax(lg, dim=-1)
    chosen = lp.gather(1, tk.view(-1, 1)).view(-1).tolist()
    n_top = max(b.lp_top)
    if n_top > 0:
        tv, ti = lp.topk(min(n_top, lp.shape[-1]), dim=-1, sorted=True)
        tv, ti = tv.tolist(), ti.tolist()
    res.logprobs = [None] * B
    res.top_logprobs = [None] * B
    for j, (i, n) in enumerate(zip(b.lp_rows, b.lp_top)):
        res.logprobs[i] = chosen[j]
        res.top_logprobs[i] = list(zip(ti[j][:n], tv[j][:n])) if n > 0 else []
