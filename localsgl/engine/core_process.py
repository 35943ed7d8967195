"""The engine core in its own process: the child's side.

The front end (core_client.CoreClient) starts ``python -c ... child_main(fd)`` with one end
of a socket pair and sends the engine options; the child loads the model, builds the
EngineCore, answers ``("ready", info)`` and runs the core's loop on its main thread (on the
CPU the thread that loaded the model keeps torch's fast intra-op pool).  A reader thread
turns the front end's messages into the core's inbox (compiling grammars there, off the
loop); the loop sends back one message per step (StepOutbox): the step's new token ids,
finish codes and the few extras some requests need, as packed arrays — no object per token.

The child ends with its front end: it notices EOF on its socket (and, when started from a
process's main thread, the kernel kills it with the parent: PR_SET_PDEATHSIG), and ignores
SIGINT, so a Ctrl-C in the terminal reaches the front end alone, which shuts it down.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import pickle
import signal
import sys
import threading
from array import array

from .grammar import FINISH_GRAMMAR

log = logging.getLogger("localsgl.engine")

# Finish codes of a step message's events: a token that continues, a token that ends the
# output (its reason: text shown, text hidden, length, grammar), or an end without a token.
CONTINUE, STOP, STOP_HIDDEN, LENGTH, GRAMMAR, ENDED = range(6)
TOKEN_FINISH = {CONTINUE: None, STOP: "stop", STOP_HIDDEN: "stop", LENGTH: "length", GRAMMAR: FINISH_GRAMMAR}
_EXIT_AFTER_EOF_SECONDS = 5.0


class StepOutbox:
    """Collects one step's tokens and finishes of every request, sent as one message.

    Events are parallel arrays (choice key, token id, finish code); ``extra`` holds what only
    some events carry: first tokens' cached prompt length, finishes' reasons, errors and
    retractions, logprobs (as arrays)."""

    def __init__(self, send):
        self._send = send
        self.keys: dict[object, int] = {}  # Request -> the front end's key of that choice
        self._seen: set[int] = set()  # keys whose first event went out
        self._reset()

    def _reset(self) -> None:
        self.ev_keys = array("i")
        self.ev_toks = array("i")
        self.ev_codes = array("b")
        self.extra: dict | None = None

    def _x(self, name: str) -> dict:
        if self.extra is None:
            self.extra = {}
        return self.extra.setdefault(name, {})

    def token(self, r, tok: int, lp, finish: str | None, hides_text: bool, error: str | None) -> None:
        key = self.keys.get(r)
        if key is None:
            return
        i = len(self.ev_keys)
        if finish is None:
            code = CONTINUE
        elif finish == "stop":
            code = STOP_HIDDEN if hides_text else STOP
        elif finish == "length":
            code = LENGTH
        else:
            code = GRAMMAR
        self.ev_keys.append(key)
        self.ev_toks.append(tok)
        self.ev_codes.append(code)
        if key not in self._seen:
            self._seen.add(key)
            self._x("cached")[i] = r.metrics.cached_prompt_tokens
        if lp is not None:
            self._x("lp")[i] = (float(lp[0]), [(int(t), float(v)) for t, v in (lp[1] or [])])
        if finish is not None:
            self._end(r, key, i, error)

    def finish(self, r, reason: str, error: str | None) -> None:
        """r ended without a token (abort, error, a refused token)."""
        key = self.keys.get(r)
        if key is None:
            return
        i = len(self.ev_keys)
        self.ev_keys.append(key)
        self.ev_toks.append(-1)
        self.ev_codes.append(ENDED)
        self._x("reason")[i] = reason
        if key not in self._seen:
            self._x("cached")[i] = r.metrics.cached_prompt_tokens
        self._end(r, key, i, error)

    def _end(self, r, key: int, i: int, error: str | None) -> None:
        if error is not None:
            self._x("error")[i] = error
        if r.metrics.retractions:
            self._x("retractions")[i] = r.metrics.retractions
        del self.keys[r]
        self._seen.discard(key)

    def flush(self, core) -> None:
        """Send this step's events (nothing when there are none)."""
        if not self.ev_keys:
            return
        s = core.scheduler
        msg = ("step", (self.ev_keys.tobytes(), self.ev_toks.tobytes(), self.ev_codes.tobytes(), self.extra,
                        s.num_running, s.num_waiting))
        self._reset()
        self._send(msg)


class _CoreHost:
    """What boot.boot_core fills in the child (the Engine's attributes, without the Engine)."""

    def __init__(self, reasoning: str):
        self.reasoning = reasoning
        self._grammar_backend = None
        self._grammar_lock = threading.Lock()

    def grammar_backend(self):
        with self._grammar_lock:
            if self._grammar_backend is None:
                from .grammar import GrammarBackend

                self._grammar_backend = GrammarBackend(self.tokenizer, self.config.vocab_size, self.core.eos_ids,
                                                       reasoning_tags=self.reasoning_tags)
            return self._grammar_backend

    def set_grammar_backend(self, backend) -> None:
        with self._grammar_lock:
            self._grammar_backend = backend

    def info(self) -> dict:
        """The Engine attributes the front end shows for the core (all picklable)."""
        return {
            "model_name": self.model_name, "plan": self.plan, "max_model_len": self.max_model_len,
            "device": str(self.device), "dtype": self.dtype, "device_info": self.device_info,
            "eos_ids": list(self.core.eos_ids), "load_seconds": self.load_seconds,
            "ready_after_weights_seconds": self.ready_after_weights_seconds,
            "weights_estimate": self.weights_estimate, "debug_switches": self.debug_switches,
        }


def _die_with_parent(parent_pid: int, use_pdeathsig: bool) -> None:
    """Linux: the kernel sends SIGKILL when the parent dies.  It is tied to the parent's
    spawning thread, so the front end asks for it only from its main thread."""
    if use_pdeathsig and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # pragma: no cover  (EOF on the socket still ends the child)
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def child_main(fd: int) -> None:
    """The core process: read the options, build the core, serve the socket until EOF or stop."""
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    hello = conn.recv()
    _die_with_parent(hello["parent_pid"], hello["pdeathsig"])
    logging.basicConfig(stream=sys.stderr, level=hello["log_level"], format="%(levelname)s %(name)s: %(message)s")
    faulthandler.enable(file=sys.stderr, all_threads=False)  # a native crash leaves its stack beside the parent's report
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            conn.send(msg)

    import torch

    torch.set_grad_enabled(False)
    from .boot import boot_core

    host = _CoreHost(hello["reasoning"])
    try:
        boot_core(host, **hello["opts"], source=hello["source"])
    except BaseException as e:  # noqa: BLE001  (the front end raises it)
        send(("failed", _picklable(e)))
        return
    core = host.core
    core.outbox = StepOutbox(send)
    core.attach_thread(threading.current_thread())
    send(("ready", host.info()))
    reader = threading.Thread(target=_read, args=(conn, core, host, send), name="localsgl-core-inbox", daemon=True)
    reader.start()
    try:
        core.run_loop()
    finally:
        core.release()
        try:
            send(("exit", None))
        except OSError:
            pass
    os._exit(0)  # daemon threads (grammar workers, the reader) must not hold the exit


def _read(conn, core, host, send) -> None:
    """The front end's messages -> the core's inbox; replies to queries."""
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):  # the front end is gone: stop, and exit even if a step hangs
            core.shutdown(timeout=0)
            threading.Timer(_EXIT_AFTER_EOF_SECONDS, os._exit, (1,)).start()
            return
        try:
            if _handle(kind, payload, core, host, send):
                return
        except Exception:  # a bug here must not stop the relay (the front end would wait on it)
            log.exception("handling a %r message of the front end failed", kind)


def _handle(kind: str, payload, core, host, send) -> bool:
    """One message of the front end; True after the last one (stop)."""
    from .request import Request

    if kind == "add":
        groups = []
        for rid, key0, ids, params, grammar_wanted in payload:
            try:  # the front end checked and compiled it too; this rarely fails here
                ids = array("i", ids).tolist()
                first = Request(rid, ids, params, 0)
                reqs = [first] + [Request(rid, ids, params, i, depends_on=first) for i in range(1, params.n)]
                if grammar_wanted:
                    compiled = host.grammar_backend().compile(params, ids)
                    for r in reqs:
                        r.grammar = compiled.new_state()
            except Exception as e:  # its choices end with this error; the others run
                send(("rejected", ([key0 + i for i in range(params.n)], f"{type(e).__name__}: {e}")))
                continue
            for r in reqs:
                core.outbox.keys[r] = key0 + r.index
            groups.append(reqs)
        if groups:
            core.add_many(groups)
    elif kind == "abort":
        core.abort(payload)
    elif kind == "abort_choice":
        core.inbox.put(("abort_choice", payload))
    elif kind == "query":
        token, name, args = payload
        try:
            value = _query(core, host, name, *args)
        except Exception as e:  # noqa: BLE001
            value = _picklable(e)
        send(("reply", (token, value)))
    elif kind == "stop":
        core.shutdown(timeout=0)
        return True
    return False


def _query(core, host, name: str, *args):
    if name == "stats":
        return core.stats()
    if name == "graphs":
        graphs = core.runner.graphs
        if graphs is None:
            return {"pending": False, "ready_after_weights": 0.0}
        done = graphs.done.is_set()
        return {"pending": not done,
                "ready_after_weights": None if graphs.done_at is None else graphs.done_at - host._t_weights}
    if name == "reset_cache":
        core.cache.reset()
        return True
    if name == "grammar_backend":  # Engine.grammar_backend assigned in the front end
        from .grammar import GrammarBackend

        tokenizer, vocab_size, eos_ids, limits, reasoning_tags = args[0]
        host.set_grammar_backend(GrammarBackend(tokenizer, vocab_size, eos_ids, limits, reasoning_tags=reasoning_tags))
        return True
    raise ValueError(f"unknown query {name!r}")


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")

