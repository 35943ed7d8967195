"""A small stand-in for localsgl.Engine with the same public API (engine/api.py), for
fast server tests: byte-level tokenizer, a background "engine thread" that emits one
token per choice per step, seeded pseudo-random text, stop strings, max_tokens,
logprobs, n>1, abort, and KV bookkeeping that mirrors the real stats() keys
(slots of running requests are "locked"; finished prompts stay "cached").
"""
from __future__ import annotations

import hashlib
import itertools
import math
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass

from localsgl.engine.params import (
    InvalidRequestError,
    PromptTooLongError,
    RequestMetrics,
    SamplingParams,
    StreamDelta,
    TokenLogprob,
    TopLogprob,
)

BOS = 256
EOS = 257
VOCAB = 260
ALPHABET = b"abcdefghijklmnopqrstuvwxyz     .,"
REFUSED_REGEX = "(refused by the fake grammar)"  # such a request ends with grammar_error after two tokens


class FakeTokenizer:
    eos_token_id = EOS
    bos_token_id = BOS

    def __len__(self):
        return VOCAB

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for t in ids:
            if t < 256:
                out.append(t)
            elif not skip_special_tokens:
                out += {BOS: b"<s>", EOS: b"</s>"}.get(t, b"<unk>")
        return out.decode("utf-8", "replace")


@dataclass
class FakePlan:
    kv_tokens: int

    def describe(self) -> str:
        return f"kv={self.kv_tokens} tokens (fake)"


@dataclass
class FakeConfig:
    vocab_size: int = VOCAB


class _Choice:
    def __init__(self, rid, index, prompt, params, on_delta):
        self.rid, self.index, self.prompt, self.params, self.on_delta = rid, index, prompt, params, on_delta
        self.out: list[int] = []
        self.text = ""
        self.emitted = 0  # chars of self.text already sent
        self.finished = False
        seed = params.seed
        if seed is None:
            seed = random.getrandbits(62)
        self.rng = random.Random(seed * 1000 + index)
        self.metrics = RequestMetrics(prompt_tokens=len(prompt))
        self.t0 = time.perf_counter()


class FakeEngine:
    def __init__(self, max_model_len: int = 512, kv_tokens: int = 65536, max_running: int = 256,
                 step_delay: float = 0.002, model_name: str = "fake-echo"):
        self.tokenizer = FakeTokenizer()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.config = FakeConfig()
        self.plan = FakePlan(kv_tokens)
        self.kv_total = kv_tokens
        self.max_running = max_running
        self.step_delay = step_delay
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: list[_Choice] = []
        self.running: list[_Choice] = []
        self.groups: dict[str, list[_Choice]] = {}
        self.cached = 0
        self.prompt_total = 0
        self.gen_total = 0
        self.hit = 0
        self.query = 0
        self.seen_prefixes: set[str] = set()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(x, int) for x in prompt):
            return list(prompt)
        if isinstance(prompt, list) and all(isinstance(x, dict) for x in prompt):
            text = ""
            for m in prompt:
                if m.get("role") not in ("system", "user", "assistant", "tool"):
                    raise InvalidRequestError(f"unknown role {m.get('role')!r}", "messages")
                text += f"<|{m['role']}|>{m.get('content') or ''}\n"
            return self.tokenizer.encode(text + "<|assistant|>")
        raise InvalidRequestError("prompt must be text, token ids or chat messages", "prompt")

    def submit(self, prompt, params: SamplingParams | None = None, on_delta=None) -> str:
        params = params or SamplingParams()
        params.validate()
        ids = self.encode_prompt(prompt)
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(len(ids), self.max_model_len)
        if any(not (0 <= t < VOCAB) for t in ids):
            raise InvalidRequestError("token id out of range", "prompt")
        rid = f"fake-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        choices = [_Choice(rid, i, ids, params, on_delta) for i in range(params.n)]
        self.inbox.put(("add", choices))
        return rid

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    async def astream(self, prompt, params=None):  # pragma: no cover - the server uses submit
        import asyncio

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = self.submit(prompt, params, lambda d: loop.call_soon_threadsafe(q.put_nowait, d))
        n = (params or SamplingParams()).n
        done = 0
        try:
            while done < n:
                d = await q.get()
                if d.finish_reason:
                    done += 1
                yield d
        finally:
            if done < n:
                self.abort(rid)

    def stats(self) -> dict:
        running = list(self.running)
        locked = sum(len(c.prompt) + len(c.out) for c in running)
        return {
            "running": len(running),
            "waiting": len(self.waiting),
            "kv_slots_total": self.kv_total,
            "kv_slots_used": locked + self.cached,
            "kv_slots_locked": locked,
            "kv_slots_cached": self.cached,
            "cache_hit_tokens": self.hit,
            "cache_query_tokens": self.query,
            "prompt_tokens_total": self.prompt_total,
            "generation_tokens_total": self.gen_total,
            "retractions_total": 0,
        }

    def shutdown(self) -> None:
        self._stop.set()
        self.inbox.put(("stop", None))
        self._thread.join(5)

    # ------------------------------------------------------------------ engine thread
    def _loop(self):
        while not self._stop.is_set():
            self._drain(block=not (self.running or self.waiting))
            if self._stop.is_set():
                break
            self._step()
            time.sleep(self.step_delay)
        for c in list(self.running) + list(self.waiting):
            self._finish(c, "abort", emit=True)

    def _drain(self, block: bool):
        while True:
            try:
                kind, payload = self.inbox.get(block=block, timeout=0.2 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                for c in payload:
                    key = hashlib.sha1(bytes(str(c.prompt), "ascii")).hexdigest()
                    self.query += len(c.prompt)
                    if key in self.seen_prefixes:
                        self.hit += len(c.prompt)
                        c.metrics.cached_prompt_tokens = len(c.prompt)
                    self.seen_prefixes.add(key)
                    self.prompt_total += len(c.prompt)
                    self.waiting.append(c)
                self.groups[payload[0].rid] = payload
            elif kind == "abort":
                for c in self.groups.get(payload, []):
                    if not c.finished:
                        self._finish(c, "abort", emit=True)
            elif kind == "stop":
                return

    def _step(self):
        while self.waiting and len(self.running) < self.max_running:
            self.running.append(self.waiting.pop(0))
        for c in list(self.running):
            self._decode(c)

    def _decode(self, c: _Choice):
        p = c.params
        if p.temperature == 0:
            tok = ALPHABET[(sum(c.prompt) + 7 * len(c.out)) % len(ALPHABET)]
        else:
            tok = c.rng.choice(ALPHABET)
        n_out = len(c.out) + 1
        c.out.append(tok)
        self.gen_total += 1
        if n_out == 1:
            c.metrics.time_to_first_token = time.perf_counter() - c.t0
        lp = None
        if p.logprobs:
            top = [TopLogprob(t, chr(t), -0.5 - i) for i, t in enumerate(ALPHABET[: p.top_logprobs])]
            lp = TokenLogprob(tok, chr(tok) if tok < 256 else "</s>", -math.log(len(ALPHABET)), top)
        finish = None
        if tok == EOS or tok in p.stop_token_ids:
            finish = "stop"
        else:
            c.text += chr(tok)
            for s in p.stop:
                k = c.text.find(s, max(0, c.emitted - len(s)))
                if k >= 0:
                    c.text = c.text[:k]
                    finish = "stop"
                    break
        if finish is None and p.regex == REFUSED_REGEX and n_out >= 2:
            finish = "grammar_error"
        if finish is None and p.max_tokens is not None and n_out >= p.max_tokens:
            finish = "length"
        if finish is None and len(c.prompt) + n_out >= self.max_model_len:
            finish = "length"
        # hold back text that could still become a stop string
        hold = 0
        if finish is None and p.stop:
            hold = max(len(s) for s in p.stop) - 1
        upto = max(c.emitted, len(c.text) - hold)
        text = c.text[c.emitted:upto]
        c.emitted = upto
        if finish is not None:
            self._finish(c, finish, emit=False)
        extra = {"error": "scripted refusal"} if finish == "grammar_error" else {}
        self._emit(c, StreamDelta(c.index, text, [tok], finish, [lp] if lp else None, c.metrics if finish else None,
                                  extra))

    def _finish(self, c: _Choice, reason: str, emit: bool):
        if c.finished:
            return
        c.finished = True
        if c in self.running:
            self.running.remove(c)
            self.cached = min(self.kv_total, self.cached + len(c.prompt) + len(c.out))
        elif c in self.waiting:
            self.waiting.remove(c)
        c.metrics.completion_tokens = len(c.out)
        c.metrics.total_time = time.perf_counter() - c.t0
        g = self.groups.get(c.rid)
        if g is not None and all(x.finished for x in g):
            del self.groups[c.rid]
        if emit:
            self._emit(c, StreamDelta(c.index, "", [], reason, None, c.metrics))

    def _emit(self, c: _Choice, d: StreamDelta):
        if c.on_delta is not None:
            try:
                c.on_delta(d)
            except Exception:
                pass
