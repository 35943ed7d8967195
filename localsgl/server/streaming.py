"""Bridge between the engine thread and asyncio, and Server-Sent Events framing.

A ``Generation`` is one HTTP request's engine work: one engine request per prompt
(each with ``n`` choices).  ``Engine.submit`` runs in a worker thread so tokenizing
or a busy engine lock never stalls the event loop; the engine calls ``on_delta`` on
its own thread and drops the delta into the loop's ``LoopMailbox``, which wakes the
loop once per batch of deltas (one engine step emits a delta per running request:
one ``call_soon_threadsafe`` each would cost a self-pipe write and a GIL hand-off per
token) and puts each generation's share of the batch into its asyncio queue as one list.  ``abort()`` is idempotent and is called from every exit path
(client disconnect, cancellation, shutdown deadline), so an abandoned request
frees its KV within one engine step.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from localsgl.engine.params import RequestMetrics, SamplingParams, StreamDelta, TokenLogprob
from localsgl.server.metrics import observe_times


@dataclass
class ChoiceState:
    text_parts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None
    last_token_time: float | None = None
    error: str | None = None  # the engine's message when finish_reason is "error"

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


_END = object()


class LoopMailbox:
    """Deltas from the engine thread to one event loop, delivered in batches.

    ``post`` (any thread) appends and schedules one ``_deliver`` unless one is already
    pending; ``_deliver`` (loop thread) clears the flag first and then empties the deque,
    so an item posted during delivery is either taken by this pass or schedules the next."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        import collections

        self.loop = loop
        self.items = collections.deque()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, item) -> None:
        self.items.append((queue, item))
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the event loop is gone (server stopped): nobody to tell
                self.items.clear()

    def _deliver(self) -> None:
        """Each queue gets one list: the items posted to it since the last delivery, in order."""
        self.scheduled = False
        items = self.items
        per_queue: dict = {}
        while items:
            q, item = items.popleft()
            got = per_queue.get(q)
            if got is None:
                per_queue[q] = [item]
            else:
                got.append(item)
        for q, got in per_queue.items():
            q.put_nowait(got)


def _merge_pending(items: list) -> list:
    """Merge consecutive deltas of the same choice (a token stream may carry several tokens
    per chunk, as OpenAI's does): under load the loop then writes one SSE event per choice
    per wake-up instead of one per token.  Nothing is merged past a finished delta."""
    out: list = []
    run: list = []  # consecutive deltas of one choice, the last of which may finish it

    def close_run() -> None:
        if len(run) == 1:
            out.append(run[0])
            return
        pi, last = run[-1]
        deltas = [d for _, d in run]
        lps = None
        if any(d.logprobs is not None for d in deltas):
            lps = [x for d in deltas for x in (d.logprobs or ())]
        extra: dict = {}
        for d in deltas:
            if d.extra:
                extra.update(d.extra)
        out.append((pi, StreamDelta(last.index, "".join(d.text for d in deltas),
                                    [t for d in deltas for t in d.token_ids], last.finish_reason, lps,
                                    last.metrics, extra)))

    for prompt_idx, d in items:
        if run:
            pi, first = run[0]
            if pi == prompt_idx and first.index == d.index and run[-1][1].finish_reason is None:
                run.append((prompt_idx, d))
                continue
            close_run()
        run = [(prompt_idx, d)]
    if run:
        close_run()
    return out


def mailbox_for(state, loop: asyncio.AbstractEventLoop) -> LoopMailbox:
    box = getattr(state, "mailbox", None)
    if box is None or box.loop is not loop:
        box = state.mailbox = LoopMailbox(loop)
    return box


class Generation:
    def __init__(self, state, params: SamplingParams, endpoint: str, arrival: float):
        self.state = state
        self.engine = state.engine
        self.params = params
        self.n = params.n
        self.endpoint = endpoint
        self.arrival = arrival
        self.set_prompts([])
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.num_finished = 0
        self.first_token_seen = False
        self.aborted = False
        self.abort_reason: str | None = None
        self._pending_counted = False
        self._admitted = False
        self._closed = False

    def set_prompts(self, prompts: list[list[int]]) -> None:
        self.prompts = prompts
        self.num_choices = len(prompts) * self.n
        self.choices = [ChoiceState() for _ in range(self.num_choices)]
        self.rids: list[str | None] = [None] * len(prompts)

    # ------------------------------------------------------------------ lifecycle
    def admit(self) -> None:
        """Count this request as in flight and as waiting for its first token; every
        admitted generation must be ``close()``d."""
        self._admitted = self._pending_counted = True
        self.state.inflight.add(self)
        self.state.metrics.inflight.inc()
        self.state.pending += 1
        self.state.metrics.pending.inc()

    def _unpend(self) -> None:
        if self._pending_counted:
            self._pending_counted = False
            self.state.pending -= 1
            self.state.metrics.pending.dec()

    def _make_on_delta(self, prompt_idx: int):
        box, q = mailbox_for(self.state, self.loop), self.queue

        def on_delta(delta: StreamDelta) -> None:  # engine thread
            box.post(q, (prompt_idx, delta))

        return on_delta

    async def start(self) -> None:
        """Submit every prompt; on failure abort what was submitted and re-raise."""
        try:
            for i, ids in enumerate(self.prompts):
                fut = self.loop.run_in_executor(
                    self.state.executor, self.engine.submit, ids, self.params, self._make_on_delta(i)
                )
                try:
                    self.rids[i] = await asyncio.shield(fut)
                except asyncio.CancelledError:
                    # the submit may still complete in its thread: abort it when it does
                    fut.add_done_callback(self._abort_late)
                    raise
                if self.aborted:  # shutdown deadline hit while submitting
                    self.engine.abort(self.rids[i])
        except BaseException:
            self.close()
            raise

    def _abort_late(self, fut) -> None:
        if not fut.cancelled() and fut.exception() is None:
            try:
                self.engine.abort(fut.result())
            except Exception:
                pass

    def abort(self, reason: str = "client") -> None:
        """Abort every unfinished engine request of this generation (idempotent)."""
        if self.aborted or (self.num_choices and self.num_finished >= self.num_choices):
            return
        self.aborted = True
        self.abort_reason = reason
        for rid in self.rids:
            if rid is not None:
                try:
                    self.engine.abort(rid)
                except Exception:
                    pass

    def close(self) -> None:
        """Release server-side bookkeeping; aborts unfinished work."""
        if self._closed:
            return
        self._closed = True
        started = any(r is not None for r in self.rids)
        if self.num_finished < self.num_choices:
            self.abort(self.abort_reason or "client")
            if started:
                m = self.state.metrics
                if self.abort_reason == "client":
                    m.client_disconnects.inc()
                m.e2e.observe(time.perf_counter() - self.arrival)
                m.finished(self.endpoint, "abort")
        self._unpend()
        if self._admitted:
            self._admitted = False
            self.state.inflight.discard(self)
            self.state.metrics.inflight.dec()

    # ------------------------------------------------------------------ consuming
    async def deltas(self) -> AsyncIterator[tuple[int, StreamDelta]]:
        """Yield (choice index, delta) until every choice has finished."""
        m = self.state.metrics
        ready: list = []
        while self.num_finished < self.num_choices:
            if not ready:
                ready.extend(await self.queue.get())
                while not self.queue.empty():  # fell behind: send what piled up as fewer chunks
                    ready.extend(self.queue.get_nowait())
                ready = _merge_pending(ready)
                ready.reverse()
            prompt_idx, d = ready.pop()
            idx = prompt_idx * self.n + d.index
            if not (0 <= idx < self.num_choices):
                continue
            c = self.choices[idx]
            if c.finish_reason is not None:  # late duplicate after finish
                continue
            now = time.perf_counter()
            if d.token_ids:
                if not self.first_token_seen:
                    self.first_token_seen = True
                    self._unpend()
                    m.ttft.observe(now - self.arrival)
                elif c.last_token_time is not None:
                    k = len(d.token_ids)
                    observe_times(m.itl, (now - c.last_token_time) / k, k)
                c.last_token_time = now
                c.num_tokens += len(d.token_ids)
            if d.text:
                c.text_parts.append(d.text)
            if d.logprobs:
                c.logprobs.extend(d.logprobs)
            if d.finish_reason is not None:
                c.finish_reason = d.finish_reason
                c.metrics = d.metrics
                c.error = d.extra.get("error")
                self.num_finished += 1
            yield idx, d
        self._unpend()
        m.e2e.observe(time.perf_counter() - self.arrival)
        reasons = {c.finish_reason for c in self.choices}
        m.finished(self.endpoint, "abort" if "abort" in reasons else self.choices[0].finish_reason)

    async def drain(self) -> None:
        async for _ in self.deltas():
            pass

    # ------------------------------------------------------------------ usage
    def usage(self) -> dict[str, Any]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.num_tokens for c in self.choices)
        cached = 0
        for p in range(len(self.prompts)):
            mt = self.choices[p * self.n].metrics
            if mt is not None:
                cached += int(mt.cached_prompt_tokens or 0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }


# --------------------------------------------------------------------------- SSE
def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_choice_prefix(base: dict) -> bytes:
    """The constant head of every chunk of one stream, up to its choices list:
    ``sse_choice(prefix, choice)`` then equals ``sse({**base, "choices": [choice]})`` but
    serializes only the choice (this runs once per streamed token)."""
    head = json.dumps(base, ensure_ascii=False, separators=(",", ":"))
    assert head.endswith("}") and len(head) > 2
    return b"data: " + head[:-1].encode() + b',"choices":['


def sse_choice(prefix: bytes, choice: dict) -> bytes:
    return prefix + json.dumps(choice, ensure_ascii=False, separators=(",", ":")).encode() + b"]}\n\n"


class SSEResponse(StreamingResponse):
    """A streaming response that always runs ``on_close`` (aborting the engine work),
    however the stream ends: finished, client gone, or task cancelled."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close, **kw):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        headers.update(kw.pop("headers", None) or {})
        super().__init__(content, headers=headers, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                self._on_close()
            finally:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except BaseException:
                        pass


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client hangs up (call only after the body was read)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
