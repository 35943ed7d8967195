"""A stand-in for localsgl.Engine that answers with scripted text, token by token, at a
fixed rate from its own thread: deterministic answers for snapshots, and a known emit
time per token for measuring how far the UI falls behind.

It mirrors the parts of the Engine API the chat uses: ``astream(messages, params)``
(cancelling the consumer aborts), ``stats()`` with the real keys (a running request's
slots are locked, a finished one's stay cached), per-request metrics with cached prompt
tokens (a prompt that extends an earlier one hits the cache for that one's tokens)."""
from __future__ import annotations

import asyncio
import re
import threading
import time

from localsgl.engine.params import RequestMetrics, StreamDelta, is_unset

TOKEN_RE = re.compile(r"\s*\S+|\s+")


def tokens_of(text: str) -> list[str]:
    """Split text into word-sized pieces that join back to it."""
    return TOKEN_RE.findall(text)


def prompt_tokens(messages: list[dict]) -> int:
    return sum(4 + len(tokens_of(m.get("content") or "")) for m in messages) + 2


class ScriptedEngine:
    def __init__(self, answers=None, tokens_per_second: float = 0.0, model_name: str = "scripted-model",
                 max_model_len: int = 4096, kv_tokens: int = 16384, timing: tuple[float, float] | None = None):
        self.answers = answers if answers is not None else ["Hello! How can I help?"]
        self.tokens_per_second = tokens_per_second  # 0: as fast as the thread runs
        self.timing = timing  # (time to first token, total time) reported for every answer, for snapshots
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.device = "cpu"
        self.kv_total = kv_tokens
        self.cached = 0
        self.locked = 0
        self.running = 0
        self.requests: list[list[dict]] = []  # the messages of every request, in order
        self.params: list = []
        self.emitted: list[tuple[int, float]] = []  # (chars of the answer so far, emit time) of the last request
        self._seen: list[tuple[tuple, int]] = []  # earlier prompts and their token counts
        self._lock = threading.Lock()
        self.shut = False

    # ------------------------------------------------------------------ the Engine API the chat uses
    def stats(self) -> dict:
        with self._lock:
            return {"running": self.running, "waiting": 0, "kv_slots_total": self.kv_total,
                    "kv_slots_used": self.locked + self.cached, "kv_slots_locked": self.locked,
                    "kv_slots_cached": self.cached, "cache_hit_tokens": 0, "cache_query_tokens": 0}

    def shutdown(self) -> None:
        self.shut = True

    def _answer_for(self, n: int) -> str:
        if callable(self.answers):
            return self.answers(n, self.requests[-1])
        return self.answers[min(n, len(self.answers) - 1)]

    def _cached_for(self, key: tuple) -> int:
        best = 0
        for seen, n in self._seen:
            if len(seen) <= len(key) and key[: len(seen)] == seen:
                best = max(best, n)
        return best

    async def astream(self, messages, params=None):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self.requests.append([dict(m) for m in messages])
        self.params.append(params)
        text = self._answer_for(len(self.requests) - 1)
        pieces = tokens_of(text)
        max_tokens = getattr(params, "max_tokens", None)
        if is_unset(max_tokens):  # the model's default: no limit here
            max_tokens = None
        if isinstance(max_tokens, int) and max_tokens > 0:
            pieces = pieces[:max_tokens]
        key = tuple((m["role"], m.get("content") or "") for m in messages)
        n_prompt = prompt_tokens(messages)
        metrics = RequestMetrics(prompt_tokens=n_prompt, cached_prompt_tokens=self._cached_for(key))
        self._seen.append((key, n_prompt))
        aborted = threading.Event()
        with self._lock:
            self.running += 1
            self.locked += n_prompt
        self.emitted = []

        def run() -> None:
            t0 = time.perf_counter()
            chars = 0
            finish = "length" if max_tokens and len(tokens_of(text)) > len(pieces) else "stop"
            for i, piece in enumerate(pieces):
                if self.tokens_per_second:
                    wait = t0 + (i + 1) / self.tokens_per_second - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                if aborted.is_set():
                    finish = "abort"
                    break
                chars += len(piece)
                now = time.perf_counter()
                if i == 0:
                    metrics.time_to_first_token = now - t0
                with self._lock:
                    self.locked += 1
                self.emitted.append((chars, now))
                last = i == len(pieces) - 1
                metrics.completion_tokens = i + 1
                if last:
                    metrics.total_time = now - t0
                    self._fix_timing(metrics)
                loop.call_soon_threadsafe(q.put_nowait, StreamDelta(0, piece, [i], finish if last else None, None,
                                                                    metrics if last else None))
            else:
                if pieces:
                    self._release(n_prompt + len(pieces))
                    return
            if not pieces:
                metrics.total_time = time.perf_counter() - t0
            self._fix_timing(metrics)
            self._release(n_prompt + metrics.completion_tokens)
            loop.call_soon_threadsafe(q.put_nowait, StreamDelta(0, "", [], finish, None, metrics))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        done = False
        try:
            while not done:
                d = await q.get()
                done = d.finish_reason is not None
                yield d
        finally:
            if not done:
                aborted.set()

    def _fix_timing(self, metrics: RequestMetrics) -> None:
        if self.timing is not None:
            metrics.time_to_first_token, metrics.total_time = self.timing

    def _release(self, n: int) -> None:
        with self._lock:
            self.running -= 1
            self.locked -= n
            self.cached = min(self.kv_total, self.cached + n)
