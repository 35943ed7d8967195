"""EngineCore's output side: a launched step's sampled tokens handed to their requests.

Per token: the grammar's verdict, the stop checks (stop token ids and EOS, max_tokens, the
model's length), the request's finish, and the way out: text, stop strings and logprobs
through ``text_output.ChoiceText`` to the request's ``on_delta`` callback, or the raw token
to the step's ``outbox`` when the core runs in its own process (the front end makes the
text).  Tokens computed past a stop are dropped.

``CoreOutput`` is a mixin of EngineCore (core.py) and uses its state: ``scheduler``,
``penalties``, ``requests``, ``outbox``, ``tokenizer``, ``eos_ids``, ``cfg``, ``fault``,
``generation_tokens_total`` and ``_fail``.
"""
from __future__ import annotations

import logging
import time
import traceback
from typing import TYPE_CHECKING

from .grammar import FINISH_GRAMMAR
from .params import StreamDelta
from .request import Request
from .text_output import make_logprob

if TYPE_CHECKING:
    from .core import _Launched

log = logging.getLogger("localsgl.engine")


class CoreOutput:
    """Resolving a step's tokens, finishing requests and emitting their deltas."""

    def _resolve(self, la: "_Launched") -> None:
        """Hand a launched step's tokens to its requests.  If the tokens cannot be read, the
        step's rows end with "error"; if one request's own handling (detokenizer, stop check)
        raises, that request alone does."""
        try:
            if self.fault is not None:
                self.fault("resolve", la.rows)
            if la.deferred:
                if la.event is not None:
                    la.event.synchronize()
                toks = la.cpu_tokens.tolist()
            else:
                toks = la.result.token_ids
        except Exception as e:
            log.error("reading a step's tokens failed:\n%s", traceback.format_exc())
            self._fail(la.rows, e)
            return
        lps = la.result.logprobs
        tops = la.result.top_logprobs
        for j, (r, idx) in enumerate(zip(la.rows, la.slots)):
            if r.finished or idx >= len(r.output_ids) or r.output_ids[idx] != -(1 + j):
                continue  # finished meanwhile: its extra token is dropped
            try:
                tok = int(toks[j])
                lp = None
                if r.params.logprobs and lps is not None:
                    lp = (lps[j], tops[j] if tops is not None else None)
                self._append_token(r, tok, lp, idx)
                if r.grammar is not None and not r.finished:
                    self._append_forced(r, idx)
            except Exception as e:
                log.error("handling the new token of %s failed:\n%s", r.rid, traceback.format_exc())
                self._fail([r], e)

    def _append_forced(self, r: Request, idx: int) -> None:
        """The tokens the grammar forced after the one at idx (already in output_ids)."""
        for i in range(idx + 1, idx + 1 + r.grammar.forced_after.pop(idx, 0)):
            if r.finished or i >= len(r.output_ids):
                return
            self._append_token(r, r.output_ids[i], None, i)

    def _append_token(self, r: Request, tok: int, lp, idx: int) -> None:
        """Resolve output position idx (a placeholder) to tok: check stops, finish, and hand it
        on — as text to on_delta (text_output.ChoiceText), or raw to the step's outbox.
        ``lp``: (logprob, top pairs) when the request asked for logprobs."""
        p = r.params
        verdict = r.grammar.after(idx, tok) if r.grammar is not None else "ok"
        if verdict == "reject":
            self._grammar_rejects(r, tok, idx)
            return
        r.output_ids[idx] = tok
        self.generation_tokens_total += 1
        n_out = idx + 1
        if n_out == 1:
            r.metrics.time_to_first_token = time.perf_counter() - r.arrival
        finish = None
        hit_stop_token = False
        if n_out >= p.min_tokens or verdict == "complete":
            if tok in p.stop_token_ids:
                finish, r.matched_stop, hit_stop_token = "stop", tok, True
            elif (not p.ignore_eos or verdict == "complete") and tok in self.eos_ids:
                finish, r.matched_stop, hit_stop_token = "stop", tok, True
        if finish is None and verdict != "ok":  # the grammar is complete, or nothing may follow
            finish = "stop" if verdict == "complete" else FINISH_GRAMMAR
        if finish is None:
            if p.max_tokens is not None and n_out >= p.max_tokens:
                finish = "length"
            elif len(r.prompt_ids) + n_out >= self.cfg.max_model_len:
                finish = "length"
        error = r.grammar.end_error if finish == FINISH_GRAMMAR else None
        if self.fault is not None:
            self.fault("detokenize", [r])
        if self.outbox is not None:
            if finish is not None:
                del r.output_ids[n_out:]  # tokens computed past the stop are dropped
                self._finish(r, finish, emit=False, error=error)
            self.outbox.token(r, tok, lp, finish, hit_stop_token, error)
            return
        text, stop_string = r.text.token(tok, finish, hit_stop_token)
        if stop_string:
            finish, error, r.matched_stop = "stop", None, r.text.matched_stop
        tlp = make_logprob(self.tokenizer, tok, lp[0], lp[1]) if lp is not None else None
        if tlp is not None and r.logprobs is not None:
            r.logprobs.append(tlp)
        if finish is not None:
            del r.output_ids[n_out:]  # tokens computed past the stop are dropped
            self._finish(r, finish, emit=False, error=error)
        self._emit(r, StreamDelta(r.index, text, [tok], finish, [tlp] if tlp is not None else None,
                                  r.metrics if finish else None, {"error": error} if error else {}))

    def _grammar_rejects(self, r: Request, tok: int, idx: int) -> None:
        """The grammar refuses the token at idx (or ended before it): the request ends with
        FINISH_GRAMMAR, without that token, and says why."""
        r.output_ids[idx] = tok  # kept only for the KV it may already have; never shown
        del r.output_ids[idx + 1:]
        error = r.grammar.end_error or "the grammar cannot continue"
        if self.outbox is not None:
            self._finish(r, FINISH_GRAMMAR, emit=False, error=error)
            r.metrics.completion_tokens = idx
            self.outbox.finish(r, FINISH_GRAMMAR, error)
            return
        text = r.text.flush()
        if r.text.matched_stop is not None:
            r.matched_stop = r.text.matched_stop
        self._finish(r, FINISH_GRAMMAR, emit=False, error=error)
        r.metrics.completion_tokens = idx
        self._emit(r, StreamDelta(r.index, text, [], FINISH_GRAMMAR, None, r.metrics, {"error": error}))

    def _finish(self, r: Request, reason: str, emit: bool, error: str | None = None) -> None:
        if error is not None:
            r.error = error
        self.scheduler.finish(r, reason)
        self.penalties.free(r)
        r.metrics.completion_tokens = len(r.output_ids)
        r.metrics.total_time = time.perf_counter() - r.arrival
        group = self.requests.get(r.rid)
        if group is not None and all(x.finished for x in group):
            del self.requests[r.rid]
        if emit:
            if self.outbox is not None:
                self.outbox.finish(r, reason, error)
                return
            extra = {"error": error} if error is not None else {}
            self._emit(r, StreamDelta(r.index, "", [], reason, None, r.metrics, extra))

    def _emit(self, r: Request, delta: StreamDelta) -> None:
        if r.on_delta is None:
            return
        try:
            r.on_delta(delta)
        except Exception as e:  # a broken consumer must not take the engine down
            log.warning("on_delta callback of %s failed:\n%s", r.rid, traceback.format_exc())
            if not r.finished:  # nobody reads its output: stop computing it (one last delta says why)
                self._fail([r], e)

    def _abort_all(self) -> None:
        try:
            self._finish_all("abort")
        except Exception:  # pragma: no cover
            log.error("abort at shutdown failed:\n%s", traceback.format_exc())

    def _finish_all(self, reason: str) -> None:
        for r in list(self.scheduler.running) + list(self.scheduler.waiting):
            if not r.finished:
                self._finish(r, reason, emit=True)
