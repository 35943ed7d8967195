"""A request's state inside the engine: its tokens, KV bookkeeping, sampling and output state.

Token bookkeeping: ``all_ids = prompt_ids + output_ids``.  ``kv_len`` tokens have
their KV in the pool, recorded in row ``req_row`` of the req->token table; the
first ``cached_len`` of them are owned by the radix cache (locked through
``last_node``), the rest by the request.  The request needs a step whenever
``kv_len < len(all_ids)``; when a step brings kv_len to len(all_ids) a new token
is sampled from the last position's logits.
"""
from __future__ import annotations

import enum
import time
from typing import Callable

import torch

from .params import RequestMetrics, SamplingParams, StreamDelta, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(
        self,
        rid: str,
        prompt_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        on_delta: Callable[[StreamDelta], None] | None = None,
        depends_on: "Request | None" = None,
        arrival: float | None = None,
    ):
        self.rid = rid
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.index = index
        self.on_delta = on_delta
        self.depends_on = depends_on
        self.status = Status.WAITING
        self.arrival = arrival if arrival is not None else time.perf_counter()
        self.arrival_no = -1  # scheduler-wide arrival order, set once when first queued; never reassigned
        # KV bookkeeping
        self.req_row: int | None = None
        self.kv_len = 0
        self.pending = 0  # slots allocated for the step in flight, not yet committed
        self.cached_len = 0
        self.last_node = None
        # sampling / output
        self.generator: torch.Generator | None = None
        self.text = None  # text_output.ChoiceText, when the core makes the text (in-process)
        self.grammar = None  # grammar.GrammarState of a constrained request
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs else None
        self.finish_reason: str | None = None
        self.matched_stop: str | int | None = None
        self.aborted = False
        self.error: str | None = None  # the failure behind finish_reason "error"
        self.metrics = RequestMetrics(prompt_tokens=len(prompt_ids))
        self.first_admitted = False

    @property
    def all_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def all_ids(self, end: int | None = None) -> list[int]:
        ids = self.prompt_ids + self.output_ids
        return ids if end is None else ids[:end]

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < n else self.output_ids[pos - n]

    @property
    def remaining_tokens(self) -> int:
        return self.all_len - self.kv_len

    @property
    def is_decoding(self) -> bool:
        # written out (no property chain): the scheduler asks this of every running row each step
        n = len(self.output_ids)
        return n > 0 and self.status is Status.RUNNING and len(self.prompt_ids) + n - self.kv_len == 1

    @property
    def retractions(self) -> int:
        return self.metrics.retractions

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    def max_new_remaining(self, max_model_len: int) -> int:
        n = len(self.output_ids)
        cap = max_model_len - len(self.prompt_ids) - n
        mt = self.params.max_tokens
        if mt is not None and mt - n < cap:
            cap = mt - n
        return cap if cap > 0 else 0

    def final_len(self, max_model_len: int) -> int:
        """Context length at the latest possible finish: the KV this request can come to hold."""
        return self.all_len + self.max_new_remaining(max_model_len)

    def resolved_len(self, end: int) -> int:
        """How many of the first ``end`` positions have known token ids.  With overlap a sampled
        token is a placeholder (negative) until its step resolves; a failed step can leave
        placeholders behind whose KV was computed from a token nobody saw."""
        n = len(self.prompt_ids)
        if end <= n:
            return end
        for i, t in enumerate(self.output_ids[: end - n]):
            if t < 0:
                return n + i
        return end

    def __repr__(self) -> str:  # pragma: no cover
        return f"Request({self.rid}#{self.index}, {self.status.value}, kv={self.kv_len}/{self.all_len})"
