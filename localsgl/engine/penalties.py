"""Penalty state on the device: per-request output-token counts and prompt-token masks.

Repetition, frequency and presence penalties read a request's whole history (every
prompt token, the count of every output token).  Rebuilding that from the token lists
at every step costs O(context) host work per token; here each penalised request owns a
row of two pooled device tensors instead:

* ``counts`` [rows, V] int32 — how often each token occurs in the request's output;
* ``prompt_mask`` [rows, V] bool — which tokens its prompt holds (filled once, when the
  request is first sampled, and only with a repetition penalty).

At each sampling the output tokens appended since the last one (one per decode step) are
added with one scatter.  A token still in flight under overlap scheduling (a negative
placeholder ``-(1 + j)`` in ``output_ids``) is read from the previous step's device
tensor, as the runner reads it, so penalised requests never make a step wait for the
host.  The counts follow ``output_ids``, which only grows while a request runs (tokens
are appended, placeholders replaced by the ids they stand for): a retracted request keeps
its row and its output, and an output seen shorter than what was counted (tokens dropped)
is counted again from the list.  Rows are freed when the request finishes; only penalised
requests hold one.
"""
from __future__ import annotations

import torch

from .sampling import upload

_INITIAL_ROWS = 4


class PenaltyState:
    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=self.device)
        self.prompt_mask = torch.zeros(0, vocab_size, dtype=torch.bool, device=self.device)
        self._free: list[int] = []
        self._row: dict[object, int] = {}  # request -> its row
        self._counted: dict[object, int] = {}  # request -> how many of its output ids counts holds

    @property
    def num_rows(self) -> int:
        """Rows in use (one per unfinished penalised request that has been sampled)."""
        return len(self._row)

    def gather(self, reqs: list, prev_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Counts [m, V] int32 and prompt mask [m, V] bool (None when no request has a
        repetition penalty) of these requests, brought up to date with their output_ids.

        ``prev_tokens``: the in-flight step's sampled ids on the device, which placeholders
        in output_ids refer to."""
        rows: list[int] = []
        add_rows: list[int] = []
        add_ids: list[int] = []
        counted: list[tuple[object, int]] = []
        need_mask = False
        for r in reqs:
            row = self._row.get(r)
            if row is None:
                row = self._open(r)
            out = r.output_ids
            done = self._counted[r]
            if done > len(out):  # the output got shorter: count it again
                self.counts[row].zero_()
                done = self._counted[r] = 0
            if done < len(out):
                tail = out[done:]
                add_rows.extend([row] * len(tail))
                add_ids.extend(tail)
                counted.append((r, len(out)))
            rows.append(row)
            need_mask = need_mask or r.params.repetition_penalty != 1.0
        if add_ids:
            self._add(add_rows, add_ids, prev_tokens)
            for r, n in counted:  # only once the scatter is queued
                self._counted[r] = n
        idx = self._to_device(rows)
        counts = self.counts.index_select(0, idx)
        mask = self.prompt_mask.index_select(0, idx) if need_mask else None
        return counts, mask

    def free(self, req) -> None:
        """Give back req's row (no-op for a request that holds none)."""
        row = self._row.pop(req, None)
        if row is None:
            return
        del self._counted[req]
        self._free.append(row)
        if not self._row and self.counts.shape[0] > _INITIAL_ROWS:  # idle: drop the grown pool
            self._resize(0)

    # ------------------------------------------------------------ internals
    def _open(self, req) -> int:
        if not self._free:
            self._resize(max(_INITIAL_ROWS, 2 * self.counts.shape[0]))
        row = self._free.pop()
        self.counts[row].zero_()
        self.prompt_mask[row].zero_()
        if req.params.repetition_penalty != 1.0 and req.prompt_ids:
            V = self.vocab_size
            ids = self._to_device(req.prompt_ids)
            ids = torch.where((ids >= 0) & (ids < V), ids, V)  # ids outside the vocabulary go to a spare column
            seen = torch.zeros(V + 1, dtype=torch.bool, device=self.device)
            seen[ids] = True
            self.prompt_mask[row] = seen[:V]
        self._row[req] = row
        self._counted[req] = 0
        return row

    def _add(self, rows: list[int], ids: list[int], prev_tokens: torch.Tensor | None) -> None:
        """counts[rows[i], ids[i]] += 1, placeholders resolved on the device."""
        t = self._to_device(ids)
        if min(ids) < 0:
            if prev_tokens is None:
                raise RuntimeError("penalties: an output token is a placeholder but no step is in flight")
            t = torch.where(t < 0, prev_tokens[(-t - 1).clamp(min=0)], t)
        V = self.vocab_size
        ok = ((t >= 0) & (t < V)).to(torch.int32)  # an id outside the vocabulary adds 0
        flat = self._to_device(rows) * V + t.clamp(0, V - 1)
        self.counts.view(-1).index_add_(0, flat, ok)

    def _resize(self, n: int) -> None:
        """Grow to n rows (keeping the used rows), or drop everything when n == 0."""
        old = self.counts.shape[0]
        V, dev = self.vocab_size, self.device
        if n == 0:
            self.counts = torch.zeros(0, V, dtype=torch.int32, device=dev)
            self.prompt_mask = torch.zeros(0, V, dtype=torch.bool, device=dev)
            self._free = []
            return
        counts = torch.empty(n, V, dtype=torch.int32, device=dev)
        mask = torch.empty(n, V, dtype=torch.bool, device=dev)
        counts[:old] = self.counts
        mask[:old] = self.prompt_mask
        self.counts, self.prompt_mask = counts, mask
        self._free.extend(range(n - 1, old - 1, -1))  # rows are zeroed when opened

    def _to_device(self, data: list[int]) -> torch.Tensor:
        return upload(data, torch.int64, self.device)
