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
        self.seq_no = 0  # admission order; retraction picks the largest
        # KV bookkeeping
        self.req_row: int | None = None
        self.kv_len = 0
        self.pending = 0  # slots allocated for the step in flight, not yet committed
        self.cached_len = 0
        self.last_node = None
        # sampling / output
        self.generator: torch.Generator | None = None
        self.detok = None
        self.stop_matcher = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs else None
        self.finish_reason: str | None = None
        self.matched_stop: str | int | None = None
        self.aborted = False
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
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    def max_new_remaining(self, max_model_len: int) -> int:
        n = len(self.output_ids)
        cap = max_model_len - len(self.prompt_ids) - n
        mt = self.params.max_tokens
        if mt is not None and mt - n < cap:
            cap = mt - n
        return cap if cap > 0 else 0

    def __repr__(self) -> str:  # pragma: no cover
        return f"Request({self.rid}#{self.index}, {self.status.value}, kv={self.kv_len}/{self.all_len})"
