"""Structured decoding with llguidance: JSON schemas, regexes, Lark and GBNF grammars.

Three parts, one per lifetime:

* ``GrammarBackend`` — one per engine: the llguidance tokenizer (built once, on the first
  constrained request: ~1 s for a 50k vocabulary) and a cache of compiled grammars.
  ``compile`` runs in the submitting thread, never on the engine thread, and refuses a
  grammar that is too large or takes too long (``GrammarLimits``) with an
  ``InvalidRequestError`` naming the field, before the request is queued.  llguidance
  builds its lexer lazily, during the first mask computations, so the up-front part is
  small (about a millisecond for a typical schema).
* ``GrammarState`` — one per request (each of ``n`` choices has its own matcher).  The
  matcher follows ``Request.output_ids``: ``consumed`` tokens of it have been fed to the
  matcher.  Output only grows while a request runs (a retracted request keeps its output),
  so retraction needs no rollback.  Where the grammar ends (complete, or unable to go on)
  is recorded as an output position, so a request ends at the same token whether its
  tokens are resolved at once or one step later (overlap scheduling).
* ``MaskFiller`` — one per engine core: fills the token bitmasks of a step's constrained
  rows with llguidance's parallel executor (the GIL is dropped) into pinned host buffers
  and uploads them; the sampler applies them before sampling (sampling.py, step (0)).

Tokens the grammar forces (``compute_ff_tokens``: e.g. ``{"name":"`` of a schema) are
taken without a forward step each: the step's sampled token is forced to the first, and the
rest are appended after it, so the next step computes them all at once as one extend.

JSON is constrained to compact whitespace by default: a small model must not be able to pad
with spaces or newlines until ``max_tokens``.  ``json_whitespace="pretty"`` allows one
space, or a newline and up to 20 spaces of indentation, between tokens (bounded per gap), and a schema's own
``"x-guidance"`` options (llguidance's JSON options) override both.
"""
from __future__ import annotations

import collections
import concurrent.futures
import copy
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

import torch

from .params import InvalidRequestError, SamplingParams

log = logging.getLogger("localsgl.grammar")

# the whitespace llguidance allows between JSON tokens
JSON_WHITESPACE = {
    "compact": {"whitespace_flexible": False},
    "pretty": {"whitespace_flexible": True, "whitespace_pattern": r"( |\n {0,20})?"},  # one space, or a new indented line
}
# matcher stop reasons that mean "the output is complete"; any other stop is a failure
_COMPLETE = ("NoExtension", "EndOfSentence")
FINISH_GRAMMAR = "grammar_error"  # finish_reason of a request whose grammar cannot continue
MAX_FORCED_TOKENS = 64  # forced tokens appended after one sampled token


@dataclass(frozen=True)
class GrammarLimits:
    """What a grammar may cost.  Sizes are checked before compiling; llguidance's own limits
    bound the work of the compile and of each mask step; the wall-clock limit catches the
    rest (the compile thread runs on, but the request is refused)."""

    max_source_bytes: int = 1 << 20  # schema / regex / grammar text
    compile_seconds: float = 10.0
    max_grammar_size: int = 500_000  # symbols in the grammar's productions
    initial_lexer_fuel: int = 1_000_000  # building the lexer's regexes (~50k per ms)
    step_lexer_fuel: int = 200_000  # one mask computation's lexer work (~14k per ms)
    step_max_items: int = 50_000  # Earley items per mask computation
    max_lexer_states: int = 250_000

    def parser_limits(self):
        import llguidance

        return llguidance.LLParserLimits(
            max_grammar_size=self.max_grammar_size, initial_lexer_fuel=self.initial_lexer_fuel,
            step_lexer_fuel=self.step_lexer_fuel, step_max_items=self.step_max_items,
            max_lexer_states=self.max_lexer_states, verbose_errors=False,
        )


def constraint_field(params: SamplingParams) -> str | None:
    """The SamplingParams field that constrains the output, if any."""
    for name in ("json_schema", "regex", "grammar"):
        if getattr(params, name) is not None:
            return name
    return None


def grammar_source(params: SamplingParams) -> tuple[str, dict]:
    """(field, llguidance top-level grammar) for the constrained field of params: a dict
    ``{"grammars": [...]}``, the first entry the start.  Raises InvalidRequestError."""
    import llguidance

    field = constraint_field(params)
    if field is None:
        raise ValueError("params carry no constraint")
    try:
        if field == "json_schema":
            schema = params.json_schema
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise InvalidRequestError(f"json_schema is not valid JSON: {e}", field) from None
            if schema is True or schema == {}:
                schema = {"type": "object"}  # "any JSON object"
            if not isinstance(schema, dict):
                raise InvalidRequestError("json_schema must be a JSON object (a schema)", field)
            ws = getattr(params, "json_whitespace", "compact")
            if ws not in JSON_WHITESPACE:
                raise InvalidRequestError(f"json_whitespace must be one of {', '.join(JSON_WHITESPACE)}", "json_whitespace")
            text = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_WHITESPACE[ws])
        elif field == "regex":
            if not isinstance(params.regex, str) or not params.regex:
                raise InvalidRequestError("regex must be a non-empty string", field)
            text = llguidance.LLMatcher.grammar_from_regex(params.regex)
        else:
            g = params.grammar
            if not isinstance(g, str) or not g.strip():
                raise InvalidRequestError("grammar must be a non-empty string (Lark or GBNF)", field)
            if g.lstrip().startswith("{"):  # llguidance's own JSON form {"grammars": [...]}
                try:
                    top = json.loads(g)
                except json.JSONDecodeError as e:
                    raise InvalidRequestError(f"grammar looks like JSON but does not parse: {e}", field) from None
                if not isinstance(top, dict) or not isinstance(top.get("grammars"), list) or not top["grammars"]:
                    raise InvalidRequestError('a JSON grammar needs a non-empty "grammars" list', field)
                return field, top
            try:
                lark = llguidance.grammar_from("grammar", g)  # Lark as is; GBNF through llguidance's converter
            except ValueError as e:
                raise InvalidRequestError(f"grammar: {e}", field) from None
            return field, {"grammars": [{"lark_grammar": lark}]}
    except RecursionError:
        raise InvalidRequestError(f"{field} is nested too deeply", field) from None
    except ValueError as e:
        if isinstance(e, InvalidRequestError):
            raise
        raise InvalidRequestError(f"{field}: {e}", field) from None
    except BaseException as e:  # a panic in llguidance's Rust code (pyo3 raises those as BaseException)
        if not _is_panic(e):
            raise
        raise InvalidRequestError(f"{field}: llguidance failed on it ({e})", field) from None
    return field, json.loads(text)


def _is_panic(e: BaseException) -> bool:
    return type(e).__name__ == "PanicException"


def wrap_after_reasoning(top: dict, open_tag: str, close_tag: str, inside: bool, special: dict[str, int]) -> dict:
    """A grammar that allows free reasoning first — ``open_tag … close_tag`` (optional), or,
    when the prompt already opened it (``inside``), text up to ``close_tag`` — and then the
    constrained output.  ``special`` maps a tag that is a special token to its id."""
    grammars = [dict(g) for g in top["grammars"]]
    first = grammars[0]
    name = first.get("name") or "constrained"
    first["name"] = name

    def token(t: str) -> str:
        return f"<[{special[t]}]>"

    def text(t: str) -> str:
        return _lark_regex_literal(t)

    if inside:
        if close_tag in special:
            lark = f"start: think_rest gap @{name}\nthink_rest: /(.|\\n)*/ {token(close_tag)}\n"
        else:
            lark = f"start: think_rest gap @{name}\nthink_rest[lazy]: /(.|\\n)*{text(close_tag)}/\n"
    elif open_tag in special and close_tag in special:
        lark = f"start: (think gap)? @{name}\nthink: {token(open_tag)} /(.|\\n)*/ {token(close_tag)}\n"
    else:
        lark = f"start: (think gap)? @{name}\nthink[lazy]: /{text(open_tag)}(.|\\n)*{text(close_tag)}/\n"
    lark += "gap: /[ \\n]{0,4}/\n"
    return {"grammars": [{"name": "after_reasoning", "lark_grammar": lark}] + grammars}


def _lark_regex_literal(s: str) -> str:
    """s as a literal inside a Lark /regex/."""
    return re.escape(s).replace("/", "\\/")


class GrammarBackend:
    """The llguidance side of one model: its tokenizer and compiled grammars.

    ``tokenizer``: the engine's (a LightTokenizer or a transformers fast tokenizer);
    ``vocab_size``: the model's (logit columns).  The masks cover max(model vocab, tokenizer
    size) tokens, so a model whose vocabulary is padded past its tokenizer (or a dummy model
    run with a smaller tokenizer) never samples a token the tokenizer does not have."""

    CACHE_SIZE = 128

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int], limits: GrammarLimits | None = None,
                 reasoning_tags: tuple[str, str] | None = None):
        if tokenizer is None:
            raise InvalidRequestError("structured output needs the model's tokenizer (dummy weights have none)",
                                      "json_schema")
        self.tokenizer = tokenizer
        self.limits = limits or GrammarLimits()
        try:
            tok_size = len(tokenizer)
        except TypeError:
            tok_size = vocab_size
        self.vocab_size = max(int(vocab_size), int(tok_size))
        self.words = (self.vocab_size + 31) // 32  # int32 words of one row's bitmask
        self.eos_ids = sorted({int(e) for e in eos_ids if 0 <= int(e) < self.vocab_size})
        self.reasoning_tags = reasoning_tags
        self._ll = None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="localsgl-grammar")

    # ------------------------------------------------------------ tokenizer
    @property
    def ll_tokenizer(self):
        """The llguidance tokenizer, built on first use (thread-safe)."""
        if self._ll is None:
            with self._lock:
                if self._ll is None:
                    self._ll = self._build_tokenizer()
        return self._ll

    def _build_tokenizer(self):
        import llguidance

        t0 = time.perf_counter()
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)  # transformers' fast tokenizers
        if backend is None:
            backend = getattr(tok, "_tok", None)  # LightTokenizer's tokenizers.Tokenizer
        if backend is None or not hasattr(backend, "to_str"):
            raise InvalidRequestError("structured output needs a fast (tokenizers-backed) tokenizer", "json_schema")
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        ll = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_ids or None)
        log.info("llguidance tokenizer built in %.2f s (%d tokens)", time.perf_counter() - t0, ll.vocab_size)
        return ll

    def special_token_ids(self, texts) -> dict[str, int]:
        """Those of texts that are single special tokens, with their ids."""
        out = {}
        ll = self.ll_tokenizer
        for t in texts:
            ids = ll.tokenize_str(t, parse_special=True)
            if len(ids) == 1 and ll.is_special_token(ids[0]):
                out[t] = ids[0]
        return out

    # ------------------------------------------------------------ compile
    def compile(self, params: SamplingParams, prompt_ids: list[int] | None = None) -> "CompiledGrammar":
        """The compiled grammar of params' constraint; raises InvalidRequestError (naming the
        field) when it is invalid, too large or too slow to compile."""
        field, top = grammar_source(params)
        if self.reasoning_tags is not None:
            open_tag, close_tag = self.reasoning_tags
            top = wrap_after_reasoning(top, open_tag, close_tag, self._prompt_inside_reasoning(prompt_ids),
                                       self.special_token_ids(self.reasoning_tags))
        text = json.dumps(top, separators=(",", ":"))
        if len(text.encode()) > self.limits.max_source_bytes:
            raise InvalidRequestError(
                f"{field} is too large ({len(text.encode())} bytes; the limit is {self.limits.max_source_bytes})", field)
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
        if hit is None:
            hit = self._compile_limited(field, text)
            with self._lock:
                self._cache[text] = hit
                while len(self._cache) > self.CACHE_SIZE:
                    self._cache.popitem(last=False)
        return CompiledGrammar(self, hit, field)

    def _prompt_inside_reasoning(self, prompt_ids) -> bool:
        if not prompt_ids or self.reasoning_tags is None:
            return False
        tail = self.tokenizer.decode(list(prompt_ids[-16:]), skip_special_tokens=False)
        open_tag, close_tag = self.reasoning_tags
        return tail.rfind(open_tag) > tail.rfind(close_tag)

    def _compile_limited(self, field: str, text: str):
        ll = self.ll_tokenizer  # built outside the time limit: it is the model's, not the request's
        fut = self._pool.submit(self._compile, text, ll)
        try:
            matcher = fut.result(timeout=self.limits.compile_seconds)
        except concurrent.futures.TimeoutError:
            raise InvalidRequestError(
                f"{field}: compiling it took longer than {self.limits.compile_seconds:g} s; simplify it", field) from None
        except BaseException as e:
            if not _is_panic(e):
                raise
            raise InvalidRequestError(f"{field}: llguidance failed on it ({e})", field) from None
        if matcher.is_error():
            raise InvalidRequestError(f"invalid {field}: {_first_lines(matcher.get_error())}", field)
        return matcher

    def _compile(self, text: str, ll):
        import llguidance

        m = llguidance.LLMatcher(ll, text, log_level=0, limits=self.limits.parser_limits())
        if not m.is_error():
            m.compute_bitmask()  # the first mask builds the lexer: inside the time limit, shared by copies
        return m


def _first_lines(msg: str, n: int = 6) -> str:
    lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
    return "\n".join(lines[:n])


class CompiledGrammar:
    """A compiled grammar: a template matcher in its initial state."""

    def __init__(self, backend: GrammarBackend, template, field: str):
        self.backend = backend
        self.template = template
        self.field = field

    def new_state(self) -> "GrammarState":
        return GrammarState(self.backend, self.template.deep_copy())


class GrammarState:
    """One request's matcher and where its output stands against the grammar.

    ``consumed``: output tokens fed to the matcher.  ``end_at`` / ``end_error``: the output
    length at which the grammar is complete (``end_error`` None) or cannot go on (the token
    at position ``end_at`` is refused, or nothing may follow ``end_at`` tokens).
    ``forced_after``: output position -> how many forced tokens follow it (appended by the
    engine without a step each)."""

    __slots__ = ("backend", "matcher", "consumed", "end_at", "end_error", "forced_after")

    def __init__(self, backend: GrammarBackend, matcher):
        self.backend = backend
        self.matcher = matcher
        self.consumed = 0
        self.end_at: int | None = None
        self.end_error: str | None = None
        self.forced_after: dict[int, int] = {}

    @property
    def ended(self) -> bool:
        return self.end_at is not None

    def consume(self, tokens: list[int]) -> None:
        """Feed the output tokens at positions consumed.. to the matcher; record where the
        grammar ends, if it does (tokens past the end are counted, never fed)."""
        m = self.matcher
        for t in tokens:
            pos = self.consumed
            self.consumed += 1
            if self.end_at is not None:
                continue
            if not m.consume_token(int(t)):
                self.end_at = pos
                self.end_error = _first_lines(m.get_error()) or f"the grammar does not allow token {t}"
            elif m.is_stopped():
                self._stopped()

    def _stopped(self) -> None:
        m = self.matcher
        reason = m.stop_reason()
        self.end_at = self.consumed
        if m.is_error() or reason not in _COMPLETE or not m.is_accepting():
            self.end_error = _first_lines(m.get_error()) or f"the grammar cannot continue ({reason})"

    def check_after_mask(self) -> None:
        """A mask computation can stop the matcher (a step limit hit): nothing may follow."""
        m = self.matcher
        if not self.ended and (m.is_error() or m.is_stopped()):
            self._stopped()
            if self.end_error is None and not m.is_accepting():
                self.end_error = "the grammar cannot continue"

    def after(self, idx: int, tok: int) -> str:
        """The verdict on the token resolved at output position idx (fed to the matcher here
        unless a step's mask preparation already did)."""
        if self.consumed == idx:
            self.consume([tok])
        return self.verdict(idx)

    def verdict(self, idx: int) -> str:
        """For the token resolved at output position idx: "ok"; "complete" (the output ends
        with it); "fail_after" (it is kept, and nothing may follow it); "reject" (the
        grammar refuses it, or it comes after the end)."""
        end = self.end_at
        if end is None or idx + 1 < end:
            return "ok"
        if idx >= end:
            return "reject"
        return "complete" if self.end_error is None else "fail_after"


class MaskFiller:
    """Token bitmasks of one step's constrained rows: filled on the host (llguidance's
    parallel executor, GIL released) into one of two pinned buffers, then uploaded.  Two
    buffers so a step's fill never overwrites the previous step's upload still in flight."""

    def __init__(self, words: int, device: torch.device, threads: int | None = None):
        import llguidance

        self.words = words
        self.device = torch.device(device)
        n = threads or max(1, min(8, (os.cpu_count() or 2)))
        self.executor = llguidance.LLExecutor(n)
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._events: list = [None, None]
        self._turn = 0
        self.seconds = 0.0  # host time spent filling masks (llguidance work and bookkeeping)
        self.fills = 0

    def _buffer(self, rows: int) -> tuple[torch.Tensor, int]:
        k = self._turn
        self._turn ^= 1
        buf = self._bufs[k]
        if buf is None or buf.shape[0] < rows:
            n = max(rows, 8 if buf is None else 2 * buf.shape[0])
            pin = self.device.type == "cuda"
            buf = torch.empty(n, self.words, dtype=torch.int32, pin_memory=pin)
            self._bufs[k] = buf
            self._events[k] = None
        ev = self._events[k]
        if ev is not None:
            ev.synchronize()  # its last upload is done (normally long since)
        return buf, k

    def fill(self, states: list[GrammarState], forced: dict[int, int], eos: int) -> tuple[torch.Tensor, int]:
        """Host bitmasks [len(states), words] and their buffer's number (for ``upload``): a
        forced row allows only its token, an ended row only ``eos`` (its token is dropped
        anyway), the rest what its grammar allows next.  Any thread."""
        m = len(states)
        buf, k = self._buffer(m)
        host = buf[:m]
        work = []
        for i, g in enumerate(states):
            tok = forced.get(i)
            if tok is None and g.ended:
                tok = eos
            if tok is None:
                work.append((g.matcher, i))
            else:
                host[i].zero_()
                host[i, tok // 32] = _bit(tok % 32)
        if work:  # (llguidance.torch's wrapper of this call imports torch's compiler: seconds)
            self.executor.unsafe_compute_mask_ptr(work, buf.data_ptr(), self.words * 4, buf.shape[0])
        self.fills += 1
        return host, k

    def upload(self, host: torch.Tensor, k: int) -> torch.Tensor:
        """The bitmasks on the device, queued on the calling thread's stream (the engine
        thread's: the sampler that reads them runs there)."""
        if self.device.type == "cpu":
            return host  # read by this step's sampling, before the buffer's next turn
        if self.device.type != "cuda":
            return host.to(self.device)
        out = host.to(self.device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._events[k] = ev
        return out


def _bit(j: int) -> int:
    """The int32 value with bit j set (bit 31 is the sign bit)."""
    return (1 << j) - (1 << 32) if j == 31 else 1 << j


class StepMasks:
    """The grammar work of one step: bring the matchers of its constrained rows up to date
    with their output, choose forced tokens, fill their bitmasks.

    ``rows``: the step's sampled requests; ``read_inflight()`` returns the host ids of the
    step still in flight, which placeholders ``-(1 + j)`` in output_ids stand for (called
    only when a constrained row has one).  ``start(pool)`` runs the work on a worker (while
    the forward runs); otherwise ``result()`` runs it in the calling thread.  ``result()``
    returns (positions in rows, device bitmasks, {request: its forced tokens, the first being
    the one it samples, the rest to append after it})."""

    def __init__(self, filler: MaskFiller, rows: list, max_model_len: int, read_inflight):
        self.filler = filler
        self.rows = rows
        self.max_model_len = max_model_len
        self.read_inflight = read_inflight
        self.positions = [j for j, r in enumerate(rows) if r.grammar is not None]
        self.waits_for_inflight = any(
            t < 0 for j in self.positions for t in rows[j].output_ids[rows[j].grammar.consumed:])
        self._future = None
        self._done = None

    def start(self, pool: concurrent.futures.Executor) -> None:
        self._future = pool.submit(self._run)

    def result(self):
        """Call on the engine thread: the upload joins the stream its sampling runs on."""
        if self._done is None:
            positions, host, k, extras = self._future.result() if self._future is not None else self._run()
            self._done = positions, self.filler.upload(host, k), extras
        return self._done

    def join(self) -> None:
        """Wait for a started fill, whatever happens to the step (the matchers are not shared)."""
        if self._future is not None:
            concurrent.futures.wait([self._future])

    def _run(self):
        t0 = time.perf_counter()
        inflight = None
        states, forced, extras = [], {}, {}
        for k, j in enumerate(self.positions):
            r = self.rows[j]
            g = r.grammar
            tail = r.output_ids[g.consumed:]
            if tail and min(tail) < 0:
                if inflight is None:
                    inflight = self.read_inflight()
                tail = [inflight[-(t + 1)] if t < 0 else t for t in tail]
            g.consume(tail)
            states.append(g)
            if g.ended or r.params.logprobs:
                continue
            ff = g.matcher.compute_ff_tokens()
            if not ff:
                continue
            use = min(len(ff), 1 + MAX_FORCED_TOKENS, max(r.max_new_remaining(self.max_model_len), 1))
            forced[k] = ff[0]
            extras[r] = ff[:use]  # fed to the matcher once the step is launched (a failed step never used them)
        eos = states[0].backend.eos_ids[0] if states[0].backend.eos_ids else 0
        host, buf = self.filler.fill(states, forced, eos)
        for k, g in enumerate(states):
            if k not in forced:
                g.check_after_mask()
        self.filler.seconds += time.perf_counter() - t0
        return self.positions, host, buf, extras
