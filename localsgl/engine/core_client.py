"""The front end's handle on an engine core in its own process (core_process).

CoreClient stands where the in-thread EngineCore stands for the Engine (add, add_many,
abort, shutdown, stats, wait_idle, eos_ids) and does the per-token work the core leaves to
the front end: each step message's token ids go through the choice's text_output.ChoiceText
(detokenizer, stop strings) and logprob strings, and out to the choice's on_delta as
StreamDeltas, on this process's reader thread.  A stop string ends the choice here at once;
the core is told to abort it, and the tokens it made meanwhile are dropped.

Messages to the core go out on a sender thread of their own, in the order they were made,
consecutive submissions merged into one message: the HTTP server submits each request from
a worker thread, and a send made there under a shared lock would hand the interpreter lock
from thread to thread once per request (a burst of 1,000 requests then reached the core
over seconds instead of in one batch).

A core that exits (a crash, a kill) fails every open choice with finish_reason "error" and
a message saying so; later submissions raise CoreDiedError.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from array import array
from multiprocessing.connection import Connection
from types import MappingProxyType

from . import core_process as cp
from .params import RequestMetrics, StreamDelta
from .text_output import ChoiceText, make_logprob

log = logging.getLogger("localsgl.engine")


class CoreDiedError(RuntimeError):
    """The engine core process is gone; the engine cannot take requests."""


class _Choice:
    """One choice as the front end follows it."""

    __slots__ = ("rid", "index", "on_delta", "text", "metrics", "arrival", "count", "want_logprobs")

    def __init__(self, rid, index, on_delta, text, prompt_len, arrival, want_logprobs):
        self.rid = rid
        self.index = index
        self.on_delta = on_delta
        self.text = text
        self.metrics = RequestMetrics(prompt_tokens=prompt_len)
        self.arrival = arrival
        self.count = 0
        self.want_logprobs = want_logprobs


class CoreClient:
    """Starts the core process, waits for it to be ready and relays requests and steps."""

    def __init__(self, opts: dict, source, reasoning: str, tokenizer_ready):
        """``opts``: boot.boot_core's options (picklable); ``tokenizer_ready``: a callable
        that returns this process's tokenizer (loaded while the child loads the weights)."""
        parent_sock, child_sock = socket.socketpair()
        code = ("import sys; sys.path[:0] = sys.argv[2:]; "
                "from localsgl.engine.core_process import child_main; child_main(int(sys.argv[1]))")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(child_sock.fileno()), *sys.path],
                                     pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL)
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self._outbox: collections.deque = collections.deque()  # messages for the sender thread
        self._outbox_cv = threading.Condition(threading.Lock())
        self._sender_done = False  # the sender sent "stop" and ended
        self.closed = False
        self.died: str | None = None  # why the core is gone, once it is
        self.choices: dict[int, _Choice] = {}  # open for their callers
        self.live: set[int] = set()  # open in the core
        self._lock = threading.Lock()  # choices / live
        self._idle = threading.Event()
        self._idle.set()
        self._keys = itertools.count(0, 1 << 8)  # room for n <= 256 choices per request
        self._replies: dict[int, list] = {}
        self._tokens = itertools.count()
        self.num_running = 0
        self.num_waiting = 0
        self._sent_since_step = 0
        self._last_stats: dict = {}
        self.profile = None  # step profiles live in the core process
        self.cache = _RemoteCache(self)  # what benchmarks call on the in-thread core's radix cache
        self.conn.send({  # the child's first message: what to build
            "opts": opts, "source": source, "reasoning": reasoning, "parent_pid": os.getpid(),
            "pdeathsig": threading.current_thread() is threading.main_thread(),
            "log_level": logging.getLogger("localsgl").getEffectiveLevel(),
        })
        kind, payload = self._wait_ready()
        if kind == "failed":
            self._reap(5.0)
            raise payload
        self.info = payload
        self.eos_ids = payload["eos_ids"]
        self.tokenizer = tokenizer_ready()
        self._reader = threading.Thread(target=self._read_loop, name="localsgl-core-client", daemon=True)
        self._reader.start()
        self._sender = threading.Thread(target=self._send_loop, name="localsgl-core-sender", daemon=True)
        self._sender.start()

    # ------------------------------------------------------------ start / stop
    def _wait_ready(self):
        while True:
            if self.conn.poll(0.2):
                try:
                    return self.conn.recv()
                except (EOFError, OSError):
                    pass
            elif self.proc.poll() is None:
                continue
            rc = self._reap(5.0)
            raise CoreDiedError(f"the engine core process exited while starting (exit code {rc}); see the log above")

    def _reap(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the core (its open requests end with "abort") and wait for the process."""
        if self.closed:
            return
        self.closed = True
        self._send(("stop", None))
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the engine core process did not stop within %.0f s: killing it", timeout)
            self.proc.kill()
            self.proc.wait(10)
        if self._reader is not threading.current_thread():
            self._reader.join(5.0)
        self._sender.join(5.0)
        self.conn.close()

    def release(self) -> None:
        """The core's memory goes with its process."""

    @property
    def alive(self) -> bool:
        return self.died is None and not self.closed

    # ------------------------------------------------------------ requests
    def _send(self, msg) -> None:
        """Queue ``msg`` for the sender thread (never blocks on the socket)."""
        with self._outbox_cv:
            if not self._sender_done:
                self._outbox.append(msg)
                self._outbox_cv.notify()
                return
        self._undeliverable(msg, "engine is shut down")  # queued after "stop": nothing sends it

    def _send_loop(self) -> None:
        """Sends queued messages in order; consecutive "add"s go as one.  Ends after "stop"; a
        message that cannot be sent fails alone (its requests or its query), the rest go on."""
        while True:
            with self._outbox_cv:
                while not self._outbox:
                    self._outbox_cv.wait()
                batch = list(self._outbox)
                self._outbox.clear()
            merged = _merge_adds(batch)
            for i, msg in enumerate(merged):
                self._send_now(msg)
                if msg[0] == "stop":
                    with self._outbox_cv:
                        self._sender_done = True
                        late = merged[i + 1:] + list(self._outbox)
                        self._outbox.clear()
                    for m in late:
                        self._undeliverable(m, "engine is shut down")
                    return

    def _send_now(self, msg) -> None:
        try:
            self.conn.send(msg)  # pickled whole before a byte is written: a failure sends nothing
        except OSError:  # the core is gone (the reader says why)
            self._undeliverable(msg, self.died or "the engine core process is gone")
        except Exception as e:  # e.g. an object in a request that cannot be pickled
            if msg[0] == "add" and len(msg[1]) > 1:  # merged submissions: only the culprit fails
                for entry in msg[1]:
                    self._send_now(("add", [entry]))
                return
            log.warning("could not send %r to the engine core", msg[0], exc_info=True)
            self._undeliverable(msg, f"could not be sent to the engine core: {type(e).__name__}: {e}")

    def _undeliverable(self, msg, why: str) -> None:
        """A message that never reached the core: its requests end with an error, its query
        raises; an abort or a stop needs nothing."""
        kind, payload = msg
        if kind == "add":
            for _, key0, _, params, _ in payload:
                for i in range(params.n):
                    self._end_in_core(key0 + i)
                    self._fail_choice(key0 + i, why)
        elif kind == "query":
            box = self._replies.get(payload[0])
            if box is not None:
                box.append(RuntimeError(why))
                box[0].set()

    def _check_alive(self) -> None:
        if self.died is not None:
            raise CoreDiedError(self.died)
        if self.closed:
            raise RuntimeError("engine is shut down")

    def add(self, reqs) -> None:
        self.add_many([reqs])

    def add_many(self, groups) -> None:
        """Groups of api-built Requests (one group per prompt: its n choices)."""
        self._check_alive()
        wire = []
        with self._lock:
            for reqs in groups:
                first = reqs[0]
                key0 = next(self._keys)
                for r in reqs:
                    key = key0 + r.index
                    self.choices[key] = _Choice(r.rid, r.index, r.on_delta,
                                                ChoiceText(self.tokenizer, r.prompt_ids, r.params),
                                                len(r.prompt_ids), r.arrival, bool(r.params.logprobs))
                    self.live.add(key)
                p = first.params
                grammar = p.json_schema is not None or p.regex is not None or p.grammar is not None
                wire.append((first.rid, key0, array("i", first.prompt_ids).tobytes(), p, grammar))
            self._idle.clear()
            self._sent_since_step += sum(len(g) for g in groups)
        self._send(("add", wire))

    def abort(self, rid: str) -> None:
        if self.alive:
            self._send(("abort", rid))

    # ------------------------------------------------------------ queries
    def query(self, name: str, *args, timeout: float = 30.0):
        """The core's answer to ``name`` (core_process._query); its exception is raised here."""
        self._check_alive()
        token = next(self._tokens)
        box: list = [threading.Event()]
        self._replies[token] = box
        self._send(("query", (token, name, args)))
        try:
            while not box[0].wait(0.2):
                if self.died is not None:
                    raise CoreDiedError(self.died)
                timeout -= 0.2
                if timeout <= 0:
                    raise TimeoutError(f"the engine core did not answer {name!r}")
        finally:
            self._replies.pop(token, None)
        value = box[1]
        if isinstance(value, BaseException):
            raise value
        return value

    def stats(self) -> dict:
        """The core's counters (the last ones known once it is gone)."""
        if not self.alive:
            return dict(self._last_stats, running=0, waiting=0)
        if threading.current_thread() is self._reader:  # a callback: the reply would come through this thread
            return dict(self._last_stats)
        self._last_stats = self.query("stats")
        return self._last_stats

    def set_grammar_backend(self, backend) -> None:
        """The core builds a grammar backend like ``backend`` (its tokenizer, vocabulary, end
        ids, limits and reasoning tags) and compiles later requests' grammars with it.  The
        reply orders it before any request submitted after this returns."""
        recipe = (backend.tokenizer, backend.vocab_size, backend.eos_ids, backend.limits, backend.reasoning_tags)
        self.query("grammar_backend", recipe)

    @property
    def waiting_estimate(self) -> int:
        """Requests waiting in the core as of its last step, plus those sent since."""
        return self.num_waiting + self._sent_since_step

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    # ------------------------------------------------------------ steps
    def _read_loop(self) -> None:
        conn = self.conn
        while True:
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # pragma: no cover  (an undecodable message: the core's bug)
                log.exception("bad message from the engine core")
                continue
            try:
                if kind == "step":
                    self._on_step(*payload)
                elif kind == "reply":
                    token, value = payload
                    box = self._replies.get(token)
                    if box is not None:
                        box.append(value)
                        box[0].set()
                elif kind == "rejected":
                    keys, msg = payload
                    for key in keys:
                        self._end_in_core(key)
                        self._fail_choice(key, msg)
                elif kind == "exit":
                    break
            except Exception:  # a bug here must not stop the relay
                log.exception("handling a message of the engine core failed")
        self._on_core_gone()

    def _on_step(self, keys, toks, codes, extra, running, waiting) -> None:
        keys = array("i", keys)
        toks = array("i", toks)
        codes = bytes(codes)
        self.num_running, self.num_waiting = running, waiting
        self._sent_since_step = 0
        extra = extra or {}
        cached = extra.get("cached", {})
        lps = extra.get("lp", {})
        errors = extra.get("error", {})
        now = time.perf_counter()
        for i in range(len(keys)):
            key = keys[i]
            code = codes[i]
            if code != cp.CONTINUE:
                self._end_in_core(key)
            ch = self.choices.get(key)
            if ch is None:  # ended here already (a stop string, a failed callback)
                continue
            m = ch.metrics
            if i in cached:
                m.cached_prompt_tokens = cached[i]
            if code == cp.ENDED:
                reason = extra["reason"][i]
                text = ch.text.flush() if reason == cp.FINISH_GRAMMAR else ""
                self._finish(key, ch, now, extra, i)
                self._emit(key, ch, StreamDelta(ch.index, text, [], reason, None, m, _err(errors.get(i))))
                continue
            tok = toks[i]
            finish = cp.TOKEN_FINISH[code]
            error = errors.get(i)
            text, stop_string = ch.text.token(tok, finish, code == cp.STOP_HIDDEN)
            ch.count += 1
            if ch.count == 1:
                m.time_to_first_token = now - ch.arrival
            if stop_string:
                if finish is None:
                    self._abort_choice(ch)
                finish, error = "stop", None
            lp = None
            if ch.want_logprobs and i in lps:
                v, top = lps[i]
                lp = [make_logprob(self.tokenizer, tok, v, top)]
            if finish is not None:
                self._finish(key, ch, now, extra, i)
            self._emit(key, ch, StreamDelta(ch.index, text, [tok], finish, lp, m if finish else None, _err(error)))

    def _finish(self, key: int, ch: _Choice, now: float, extra: dict, i: int) -> None:
        m = ch.metrics
        m.completion_tokens = ch.count
        m.total_time = now - ch.arrival
        m.retractions = extra.get("retractions", {}).get(i, m.retractions)
        with self._lock:
            self.choices.pop(key, None)

    def _end_in_core(self, key: int) -> None:
        with self._lock:
            self.live.discard(key)
            if not self.live:
                self._idle.set()

    def _abort_choice(self, ch: _Choice) -> None:
        self._send(("abort_choice", (ch.rid, ch.index)))

    def _emit(self, key: int, ch: _Choice, delta: StreamDelta) -> None:
        if ch.on_delta is None:
            return
        try:
            ch.on_delta(delta)
        except Exception as e:  # a broken consumer: stop computing its output, say why once
            log.warning("on_delta callback of %s failed", ch.rid, exc_info=True)
            if delta.finish_reason is None:
                self._abort_choice(ch)
                self._fail_choice(key, f"{type(e).__name__}: {e}")

    def _fail_choice(self, key: int, msg: str) -> None:
        with self._lock:
            ch = self.choices.pop(key, None)
        if ch is None:
            return
        ch.metrics.completion_tokens = ch.count
        ch.metrics.total_time = time.perf_counter() - ch.arrival
        if ch.on_delta is not None:
            try:
                ch.on_delta(StreamDelta(ch.index, "", [], "error", None, ch.metrics, {"error": msg}))
            except Exception:
                log.warning("on_delta callback of %s failed", ch.rid, exc_info=True)

    def _on_core_gone(self) -> None:
        """EOF from the core: after a shutdown, nothing to do; otherwise every open choice fails."""
        rc = self.proc.poll()
        if rc is None and not self.closed:
            try:
                rc = self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                rc = None
        if not self.closed:
            self.died = (f"the engine core process exited unexpectedly (exit code {rc}); "
                         "the engine cannot serve requests until it is restarted")
            log.error("%s", self.died)
        for token, box in list(self._replies.items()):
            box.append(CoreDiedError(self.died or "engine is shut down"))
            box[0].set()
        msg = self.died or "engine shut down"
        for key in list(self.choices):
            self._fail_choice(key, msg) if self.died else self._end_quietly(key)
        with self._lock:
            self.live.clear()
        self._idle.set()

    def _end_quietly(self, key: int) -> None:
        """At shutdown a choice the core did not end gets "abort"."""
        with self._lock:
            ch = self.choices.pop(key, None)
        if ch is not None and ch.on_delta is not None:
            ch.metrics.completion_tokens = ch.count
            try:
                ch.on_delta(StreamDelta(ch.index, "", [], "abort", None, ch.metrics, {}))
            except Exception:
                pass


class _RemoteCache:
    """``reset()`` of the core process's radix cache (benchmarks empty it between runs)."""

    def __init__(self, client: CoreClient):
        self._client = client

    def reset(self) -> None:
        self._client.query("reset_cache")


def _merge_adds(batch: list) -> list:
    """Consecutive ("add", entries) messages of ``batch`` joined into one; order kept."""
    out: list = []
    for kind, payload in batch:
        if kind == "add" and out and out[-1][0] == "add":
            out[-1][1].extend(payload)
        else:
            out.append((kind, list(payload) if kind == "add" else payload))
    return out


_NO_EXTRA = MappingProxyType({})  # shared by every delta without an error: read-only


def _err(error: str | None):
    return {"error": error} if error else _NO_EXTRA
