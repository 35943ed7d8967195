"""The public Python API: Engine, SamplingParams, GenerateOutput.

Engine turns prompts (text, token ids or chat messages) into requests for the
engine thread (EngineCore) and turns its per-token deltas back into
blocking results, iterators or async iterators.  Tokenization and chat
templates happen here, in the caller's thread.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import queue
import threading
import time
import uuid
from typing import AsyncIterator, Callable, Iterator

import torch

from .params import (  # noqa: F401  (re-exported)
    Choice,
    GenerateOutput,
    InvalidRequestError,
    PromptTooLongError,
    RequestMetrics,
    SamplingParams,
    StreamDelta,
    TokenLogprob,
    TopLogprob,
)
from .boot import boot_core, in_background
from .request import Request

log = logging.getLogger("localsgl")


def _require_unicode(text: str, param: str) -> None:
    """Refuse text with a lone surrogate (JSON's "\\ud800", or undecodable bytes kept by Python's
    surrogateescape): it is not Unicode text, and the tokenizer would fail on it with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(f"{param} is not valid Unicode text: a lone surrogate "
                                  f"U+{ord(text[e.start]):04X} at character {e.start}", param) from None


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (max_queue); retry later."""


class _Collector:
    """Accumulates the deltas of one submitted prompt (n choices) into a GenerateOutput."""

    def __init__(self, n: int):
        self.texts = [[] for _ in range(n)]
        self.tokens = [[] for _ in range(n)]
        self.logprobs: list[list | None] = [None] * n
        self.finish: list[str | None] = [None] * n
        self.metrics: list[RequestMetrics | None] = [None] * n
        self.errors: list[str | None] = [None] * n
        self.left = n
        self.done = threading.Event()

    def __call__(self, d: StreamDelta) -> None:
        i = d.index
        self.texts[i].append(d.text)
        self.tokens[i].extend(d.token_ids)
        if d.logprobs:
            if self.logprobs[i] is None:
                self.logprobs[i] = []
            self.logprobs[i].extend(d.logprobs)
        if d.finish_reason is not None and self.finish[i] is None:
            self.finish[i] = d.finish_reason
            self.metrics[i] = d.metrics
            self.errors[i] = d.extra.get("error")
            self.left -= 1
            if self.left == 0:
                self.done.set()

    def result(self, rid: str, prompt_ids: list[int], want_logprobs: bool) -> GenerateOutput:
        choices = [
            Choice(i, "".join(t), toks, f, (lp or []) if want_logprobs else None, error=err)
            for i, (t, toks, f, lp, err) in enumerate(zip(self.texts, self.tokens, self.finish, self.logprobs, self.errors))
        ]
        m0 = self.metrics[0] or RequestMetrics(prompt_tokens=len(prompt_ids))
        if len(choices) > 1:  # usage of the whole group
            m0 = RequestMetrics(
                prompt_tokens=m0.prompt_tokens,
                cached_prompt_tokens=m0.cached_prompt_tokens,
                completion_tokens=sum(len(c.token_ids) for c in choices),
                time_to_first_token=m0.time_to_first_token,
                total_time=max((m.total_time or 0.0) for m in self.metrics if m is not None) if any(self.metrics) else None,
                retractions=sum(m.retractions for m in self.metrics if m is not None),
            )
        c0 = choices[0]
        return GenerateOutput(c0.text, c0.token_ids, c0.finish_reason, c0.logprobs, m0, choices, prompt_ids, rid,
                              error=c0.error)


class Engine:
    """An inference engine.  Its core (scheduler, KV cache, model, sampling) runs in a child
    process, or with ``in_process=True`` on a background thread of this one; the API is the
    same either way.  Tokenization, chat templates, detokenization and stop strings happen in
    this process in both modes.  ``in_process`` None takes ``LOCALSGL_IN_PROCESS`` (1/0),
    else True: a thread starts sooner; a core process keeps the step loop free of this
    process's Python (HTTP, detokenization), which pays when serving many streams.

    Flags (snake_case twins of the CLI's): model, device, dtype, max_model_len, kv_memory,
    gpu_memory, max_running, chunk_size, attention_backend, disable_cuda_graph,
    disable_overlap, disable_radix_cache, load_format, weights ("keep" | "dequantize": quantized
    weights stay quantized or load dense; default keep on a GPU, dequantize on the CPU),
    quantization ("int4" | "int8" | "fp8": quantize dense linear weights at load), kv_cache_dtype
    ("fp8": the KV cache in e4m3 with a scale per token and KV head; None: the model's dtype), schedule_policy
    ("fcfs" | "lpm"), seed, max_queue, tp, reasoning ("auto": the chat template decides whether a
    reasoning model thinks; "off": templates get ``enable_thinking=False``).  ``debug_switches`` (a DebugSwitches, not a CLI flag): debug/A-B switches,
    else those of the ``LOCALSGL_DEBUG_*`` environment variables (docs/switches.md).
    Attributes: tokenizer (None for dummy weights), model_name, max_model_len, config, plan, device, dtype,
    debug_switches.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        device: str | None = None,
        dtype=None,
        max_model_len: int | None = None,
        kv_memory=None,
        gpu_memory=None,
        max_running: int | None = None,
        chunk_size: int | None = None,
        attention_backend: str = "auto",
        disable_cuda_graph: bool = False,
        disable_overlap: bool = False,
        disable_radix_cache: bool = False,
        load_format: str = "auto",
        weights: str | None = None,
        quantization: str | None = None,
        kv_cache_dtype: str | None = None,
        schedule_policy: str = "fcfs",
        seed: int = 0,
        max_queue: int | None = None,
        tp: int = 1,
        debug_switches=None,
        default_sampling: dict | None = None,
        reasoning: str = "auto",
        in_process: bool | None = None,
        **unknown,
    ):
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        from .sampling_defaults import check_user_defaults

        # a person's own defaults for omitted sampling fields (checked before anything loads)
        self._user_sampling = check_user_defaults(default_sampling)
        if tp < 1:
            raise InvalidRequestError(f"tp must be at least 1, got {tp}", "tp")
        if tp != 1:
            raise InvalidRequestError("tensor parallelism (tp > 1) is not available in this build", "tp")
        if schedule_policy not in ("fcfs", "lpm"):
            raise InvalidRequestError("schedule_policy must be fcfs or lpm", "schedule_policy")
        self.reasoning = reasoning
        self.in_process = default_in_process() if in_process is None else bool(in_process)
        self._ids = itertools.count()
        self._closed = False
        opts = dict(
            model=model, device=device, dtype=dtype, max_model_len=max_model_len, kv_memory=kv_memory,
            gpu_memory=gpu_memory, max_running=max_running, chunk_size=chunk_size,
            attention_backend=attention_backend, disable_cuda_graph=disable_cuda_graph,
            disable_overlap=disable_overlap, disable_radix_cache=disable_radix_cache, load_format=load_format,
            weights=weights, quantization=quantization, schedule_policy=schedule_policy, seed=seed, max_queue=max_queue, debug_switches=debug_switches,
            kv_cache_dtype=kv_cache_dtype,
        )
        if not self.in_process:
            self._start_core_process(opts)
            return
        # The engine thread loads the model and then runs the loop: on the CPU the thread that
        # first ran torch's parallel ops keeps the fast intra-op pool (a decode step from another
        # thread takes ~1.5x as long), so loading and stepping share one thread.
        ready = threading.Event()
        failure: list[BaseException] = []

        def boot() -> None:
            try:
                boot_core(self, **opts)
            except BaseException as e:  # surfaced in the caller's thread
                failure.append(e)
                ready.set()
                return
            ready.set()
            self.core.run_loop()

        thread = threading.Thread(target=boot, name="localsgl-engine", daemon=True)
        thread.start()
        while not ready.wait(0.2):
            pass
        if failure:
            raise failure[0]
        self.core.attach_thread(thread)

    def _start_core_process(self, opts: dict) -> None:
        """Resolve the model and load the tokenizer here while the core process loads the
        weights; take the plan and the rest from the core's answer."""
        from ..store.resolve import resolve_model
        from .core_client import CoreClient
        from .models.config import ModelConfig
        from .reasoning import reasoning_tags

        t0 = time.perf_counter()
        self.source = resolve_model(opts["model"], load_format=opts["load_format"])
        self.model_name = self.source.name
        self.config = ModelConfig.from_hf(self.source.config)
        tokenizer = in_background(self.source.load_tokenizer)
        self.core = CoreClient(opts, self.source, self.reasoning, tokenizer)
        info = self.core.info
        self.plan = info["plan"]
        self.max_model_len = info["max_model_len"]
        self.device = torch.device(info["device"])
        self.dtype = info["dtype"]
        self.device_info = info["device_info"]
        self.weights_estimate = info["weights_estimate"]
        self.debug_switches = info["debug_switches"]
        self.ready_after_weights_seconds = info["ready_after_weights_seconds"]
        self.max_queue = opts["max_queue"]
        self.model = None  # the weights live in the core process
        self.tokenizer = self.core.tokenizer
        self.reasoning_tags = None if self.reasoning == "off" else reasoning_tags(self.tokenizer)
        self.load_seconds = time.perf_counter() - t0
        log.info("engine ready in %.1f s (core process %d): %s", self.load_seconds, self.core.proc.pid,
                 self.plan.describe())

    @property
    def alive(self) -> bool:
        """Whether the core can take requests (False once shut down, or its process is gone)."""
        if self._closed:
            return False
        if self.in_process:
            t = self.core._thread
            return t is None or t.is_alive()
        return self.core.alive

    # ------------------------------------------------------------ prompts
    def encode_prompt(self, prompt) -> list[int]:
        """Text -> ids (no chat template), chat messages -> templated ids, ids -> ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer (dummy weights): pass token ids", "prompt")
            _require_unicode(prompt, "prompt")
            return list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.apply_chat_template(list(prompt))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if t < 0 or t >= self.config.vocab_size]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})", "prompt")
            return ids
        raise InvalidRequestError("prompt must be text, a list of token ids, or a list of chat messages", "prompt")

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None, **template_kwargs) -> list[int]:
        """Chat messages -> prompt ids through the model's chat template (with the generation
        prompt).  ``tools`` (OpenAI function definitions) and ``template_kwargs`` (e.g.
        ``enable_thinking``) go to the template; with ``reasoning="off"`` it gets
        ``enable_thinking=False`` unless told otherwise."""
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer (dummy weights): pass token ids", "messages")
        if not messages:
            raise InvalidRequestError("messages must not be empty", "messages")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content", ""), (str, type(None))):
                raise InvalidRequestError("each message needs a role and text content", "messages")
        if self.reasoning == "off":
            template_kwargs.setdefault("enable_thinking", False)
        if getattr(self.tokenizer, "chat_template", None):
            if tools:
                template_kwargs["tools"] = tools
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                          **template_kwargs)
            except Exception as e:
                if any("Template" in c.__name__ for c in type(e).__mro__):  # jinja2's errors, all of them
                    raise InvalidRequestError(f"the model's chat template cannot render these messages: {e}",
                                              "messages") from None
                raise
            _require_unicode(text, "messages")
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        text = "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages) + "\nassistant:"
        _require_unicode(text, "messages")
        return list(self.tokenizer(text)["input_ids"])

    # ------------------------------------------------------------ submit
    def submit(self, prompt, params: SamplingParams | None = None, on_delta: Callable[[StreamDelta], None] | None = None,
               request_id: str | None = None) -> str:
        """Enqueue a prompt and return its request id; on_delta(StreamDelta) runs on the engine thread.
        Raises InvalidRequestError / PromptTooLongError / EngineOverloadedError synchronously."""
        ids = self.encode_prompt(prompt)
        return self._submit_ids(ids, params, on_delta, request_id)

    def _submit_ids(self, ids, params, on_delta, request_id=None, defer: list | None = None) -> str:
        if self._closed:
            raise RuntimeError("engine is shut down")
        params = self.resolve_sampling(params)
        params.validate()
        if not ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        if len(ids) >= self.max_model_len:
            err = PromptTooLongError(len(ids), self.max_model_len)
            if self.plan.context_limit:
                err.args = (f"{err}; the context is {self.plan.context_limit}",)
            raise err
        if self.max_queue is not None:
            waiting = self.core.scheduler.num_waiting if self.in_process else self.core.waiting_estimate
            if waiting >= self.max_queue:
                raise EngineOverloadedError(f"{waiting} requests waiting (max_queue={self.max_queue})")
        grammar = None
        if params.json_schema is not None or params.regex is not None or params.grammar is not None:
            grammar = self.grammar_backend.compile(params, ids)  # this thread, not the engine's
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        first = Request(rid, ids, params, 0, on_delta)
        reqs = [first] + [Request(rid, ids, params, i, on_delta, depends_on=first) for i in range(1, params.n)]
        if grammar is not None and self.in_process:  # a core process compiles its own
            for r in reqs:
                r.grammar = grammar.new_state()
        if defer is not None:  # batch submission: the caller adds them all at once
            defer.append(reqs)
        else:
            self.core.add(reqs)
        return rid

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    # ------------------------------------------------------------ blocking
    def generate(self, prompt, params: SamplingParams | list[SamplingParams] | None = None):
        """One prompt -> GenerateOutput; a list of prompts (texts or id lists) -> list, in input order,
        run concurrently.  ``params`` may be a list with one SamplingParams per prompt."""
        batch = isinstance(prompt, (list, tuple)) and prompt and (
            isinstance(prompt[0], str) or (isinstance(prompt[0], (list, tuple)) and not isinstance(prompt[0], dict))
        )
        prompts = list(prompt) if batch else [prompt]
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise InvalidRequestError(f"{len(params)} sampling params for {len(prompts)} prompts", "params")
            per_prompt = [p or SamplingParams() for p in params]
        else:
            per_prompt = [params or SamplingParams()] * len(prompts)
        encoded = [self.encode_prompt(p) for p in prompts]
        collectors = []
        groups: list = []
        for ids, sp in zip(encoded, per_prompt):
            c = _Collector(sp.n)
            rid = self._submit_ids(ids, sp, c, defer=groups)
            collectors.append((rid, ids, c, sp))
        self.core.add_many(groups)  # one inbox message: the scheduler sees the whole batch
        outs = []
        try:
            for rid, ids, c, sp in collectors:
                while not c.done.wait(0.5):
                    if self._closed:
                        raise RuntimeError("engine shut down while generating")
                outs.append(c.result(rid, ids, sp.logprobs))
        except BaseException:
            for rid, _, c, _ in collectors:
                if not c.done.is_set():
                    self.abort(rid)
            raise
        return outs if batch else outs[0]

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> GenerateOutput:
        """Apply the model's chat template (add_generation_prompt) and generate."""
        params = params or SamplingParams()
        ids = self.apply_chat_template(messages)
        c = _Collector(params.n)
        rid = self._submit_ids(ids, params, c)
        try:
            while not c.done.wait(0.5):
                if self._closed:
                    raise RuntimeError("engine shut down while generating")
        except BaseException:
            self.abort(rid)
            raise
        return c.result(rid, ids, params.logprobs)

    # ------------------------------------------------------------ streaming
    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield StreamDelta as tokens arrive.  Closing the iterator aborts the request."""
        params = params or SamplingParams()
        q: queue.Queue = queue.Queue()
        rid = self.submit(prompt, params, q.put)
        left = params.n
        try:
            while left:
                try:
                    d = q.get(timeout=0.5)
                except queue.Empty:
                    if self._closed:
                        return
                    continue
                if d.finish_reason is not None:
                    left -= 1
                yield d
        finally:
            if left:
                self.abort(rid)

    async def astream(self, prompt, params: SamplingParams | None = None) -> AsyncIterator[StreamDelta]:
        """asyncio version of stream; cancelling the consumer aborts the request."""
        params = params or SamplingParams()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def push(d: StreamDelta) -> None:
            loop.call_soon_threadsafe(q.put_nowait, d)

        rid = self.submit(prompt, params, push)
        left = params.n
        try:
            while left:
                d = await q.get()
                if d.finish_reason is not None:
                    left -= 1
                yield d
        finally:
            if left:
                self.abort(rid)

    # ------------------------------------------------------------ sampling defaults
    @functools.cached_property
    def sampling_defaults(self) -> dict[str, tuple[object, str]]:
        """Each model-default SamplingParams field -> (value, where it came from): the model's
        generation_config.json, its alias's recommended values, or llama.cpp's defaults."""
        from .sampling_defaults import model_sampling_defaults

        return model_sampling_defaults(self.source, self._user_sampling)

    def resolve_sampling(self, params: SamplingParams | None) -> SamplingParams:
        """``params`` with every field the caller left unset taken from sampling_defaults."""
        from .sampling_defaults import apply_defaults

        return apply_defaults(params or SamplingParams(), self.sampling_defaults)

    # ------------------------------------------------------------ structured output
    @property
    def grammar_backend(self):
        """The model's llguidance side (grammar.GrammarBackend), made on first use; its
        tokenizer is built then, once.  Assignable (a benchmark of dummy weights gives one
        built on another tokenizer; with the core in its own process, the core gets one made
        the same way, for the requests submitted after the assignment)."""
        backend = getattr(self, "_grammar_backend", None)
        if backend is None:
            with _GRAMMAR_LOCK:
                backend = getattr(self, "_grammar_backend", None)
                if backend is None:
                    backend = self._grammar_backend = self._new_grammar_backend()
        return backend

    def _new_grammar_backend(self, like=None):
        """A GrammarBackend with the current reasoning tags: for this model, or with the
        tokenizer, vocabulary, end ids and limits of ``like`` (an assigned one)."""
        from .grammar import GrammarBackend

        if like is not None:
            return GrammarBackend(like.tokenizer, like.vocab_size, like.eos_ids, like.limits, self.reasoning_tags)
        return GrammarBackend(self.tokenizer, self.config.vocab_size, self.core.eos_ids,
                              reasoning_tags=self.reasoning_tags)

    @grammar_backend.setter
    def grammar_backend(self, backend) -> None:
        if not self.in_process:  # the core process compiles the grammars it runs
            self.core.set_grammar_backend(backend)
        self._grammar_backend = backend

    @property
    def reasoning(self) -> str:
        """"auto" or "off" (see the class docstring).  Assignable after start-up: the chat
        template, the reasoning parser's tags and the grammars compiled after it (here or in
        the core process) follow."""
        return self._reasoning

    @reasoning.setter
    def reasoning(self, value: str) -> None:
        if value not in ("auto", "off"):
            raise InvalidRequestError("reasoning must be auto or off", "reasoning")
        self._reasoning = value
        if "reasoning_tags" not in self.__dict__:  # still starting: start-up reads it
            return
        from .reasoning import reasoning_tags

        self.reasoning_tags = None if value == "off" else reasoning_tags(self.tokenizer)
        if self.tokenizer is not None:  # the grammars compiled from now on (here or in the core) wrap with them
            self.grammar_backend = self._new_grammar_backend(getattr(self, "_grammar_backend", None))

    # ------------------------------------------------------------ misc
    def stats(self) -> dict:
        return self.core.stats()

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self.core.wait_idle(timeout)

    def wait_graphs(self, timeout: float | None = None) -> bool:
        """Wait until every planned decode CUDA graph is captured (the engine captures the
        large buckets while idle after start-up); True when none is pending."""
        if not self.in_process:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.core.query("graphs")["pending"]:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(0.1)
            return True
        graphs = self.core.runner.graphs
        return graphs is None or graphs.done.wait(timeout)

    @property
    def graphs_ready_after_weights_seconds(self) -> float | None:
        """Seconds from the weights on the device to the last decode graph captured (0.0 with
        no graphs; None while some are pending)."""
        if not self.in_process:
            return self.core.query("graphs")["ready_after_weights"]
        graphs = self.core.runner.graphs
        if graphs is None:
            return 0.0
        return None if graphs.done_at is None else graphs.done_at - self._t_weights

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.core.shutdown()
        self.core.release()
        self.model = None
        if not self.in_process:  # the memory went with the core process
            return
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __del__(self):  # pragma: no cover
        try:
            self.shutdown()
        except Exception:
            pass


_GRAMMAR_LOCK = threading.Lock()


def default_in_process() -> bool:
    """``LOCALSGL_IN_PROCESS`` (1/0, true/false), else True."""
    v = os.environ.get("LOCALSGL_IN_PROCESS", "").strip().lower()
    if v in ("0", "false", "no", "off"):
        return False
    return True
