"""What the generation and tokenizer routes share: model and token-id checks, tokenizing off
the event loop, the context-length check, SamplingParams from a request, admission (the
--max-queue bound) and submission to the engine, and collecting a generation's outcome.

``RouteHelpers`` holds the app's ServerState and engine (one per ``create_app``); the
functions below it need neither.
"""
from __future__ import annotations

import asyncio
import contextlib
import uuid

from fastapi import Request

from localsgl.engine.params import InvalidRequestError, SamplingParams
from localsgl.engine.sampling_defaults import apply_defaults

from . import schemas as S
from .errors import INVALID_REQUEST, SERVER_ERROR, APIError, bad_request, error_body
from .request_parsing import unsupported
from .state import ServerState
from .streaming import Generation, sse, wait_for_disconnect


class RouteHelpers:
    def __init__(self, state: ServerState, engine):
        self.state = state
        self.engine = engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.state.model_names:
            raise APIError(404, f"The model `{name}` does not exist. This server serves "
                                f"`{self.state.model_name}`.", INVALID_REQUEST, "model", "model_not_found")

    def check_ids(self, ids: list[int], param: str) -> None:
        v = self.state.vocab_size
        if v is not None:
            for t in ids:
                if not (0 <= t < v):
                    raise bad_request(f"token id {t} is out of range [0, {v}).", param, "invalid_value")

    async def in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.state.executor, fn, *args)

    async def encode(self, prompt, param: str, render=None) -> list[int]:
        """Prompt ids (``render()`` when given, else the engine's encode_prompt), in a worker."""
        try:
            ids = await self.in_thread(render or (lambda: self.engine.encode_prompt(prompt)))
        except InvalidRequestError as e:
            raise bad_request(str(e), e.param or param, "invalid_value")
        except Exception as e:
            template_error = any("Template" in c.__name__ for c in type(e).__mro__)  # jinja2's, all of them
            if template_error or isinstance(e, (ValueError, TypeError)):
                raise bad_request(f"could not tokenize the {param}: {e}", param, "invalid_value")
            raise
        return list(ids)

    def check_lengths(self, ids: list[int], max_tokens: int | None, explicit: bool, param: str) -> int | None:
        n, m = len(ids), self.state.max_model_len
        if n == 0:
            raise bad_request(f"The {param} is empty.", param, "invalid_value")
        if n >= m:
            raise bad_request(
                f"This model's maximum context length is {m} tokens. However, your {param} is {n} tokens "
                f"(leave room for at least one generated token)."
                + (f" The context is {self.state.context_limit}." if self.state.context_limit else ""),
                param, "context_length_exceeded")
        if max_tokens is not None and n + max_tokens > m:
            if not explicit:
                return m - n
            raise bad_request(
                f"This model's maximum context length is {m} tokens. However, you requested {n + max_tokens} "
                f"tokens ({n} in the {param}, {max_tokens} in the completion). Please reduce the length of the "
                f"{param} or the completion.", "max_tokens", "context_length_exceeded")
        return max_tokens

    def build_params(self, req: S._SamplingFields, *, max_tokens: int | None, logprobs: bool, top_logprobs: int,
                     n: int) -> SamplingParams:
        if req.logit_bias:
            raise unsupported("logit_bias", "logit_bias")
        if req.stream_options is not None and not req.stream:
            raise bad_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              "stream_options", "invalid_value")
        json_schema = None
        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            json_schema = {"type": "object"}
        elif rf is not None and rf.type == "json_schema":
            json_schema = rf.json_schema.schema_ if rf.json_schema.schema_ is not None else {}
        if req.stop_token_ids:
            self.check_ids(req.stop_token_ids, "stop_token_ids")
        # omitted sampling fields take the model's defaults (engine.sampling_defaults)
        given = {f: getattr(req, f) for f in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                 if getattr(req, f) is not None}
        if given.get("top_k") == 0:
            given["top_k"] = -1
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=req.min_tokens or 0,
            **given,
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            seed=req.seed,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=bool(req.ignore_eos),
            n=n,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            json_schema=json_schema,
            regex=req.regex,
            grammar=req.grammar,
            skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens,
            json_whitespace=req.json_whitespace or "compact",
        )
        params = apply_defaults(params, self.state.sampling_defaults)
        try:
            params.validate()
        except InvalidRequestError as e:
            raise bad_request(str(e), e.param, "invalid_value")
        return params

    def admit(self, endpoint: str, params: SamplingParams, arrival: float) -> Generation:
        if self.state.shutting_down:
            raise APIError(503, "The server is shutting down.", SERVER_ERROR, None, "shutting_down",
                           headers={"Retry-After": "5"})
        if self.state.pending >= self.state.max_queue:
            self.state.metrics.rejected.inc()
            raise APIError(503, f"The server is overloaded: {self.state.pending} requests are waiting "
                                f"(--max-queue {self.state.max_queue}). Retry later.", SERVER_ERROR, None,
                           "overloaded", headers={"Retry-After": "1"})
        gen = Generation(self.state, params, endpoint, arrival)
        gen.admit()
        return gen

    async def submit(self, gen: Generation, prompts: list[list[int]], param_alias: dict | None = None) -> None:
        gen.set_prompts(prompts)
        try:
            await gen.start()
        except InvalidRequestError as e:
            param = e.param or "prompt"
            raise bad_request(str(e), (param_alias or {}).get(param, param), "invalid_value")
        except NotImplementedError as e:
            raise bad_request(f"not supported by this engine: {e}", None, "unsupported_parameter")
        except RuntimeError as e:
            if type(e).__name__ == "EngineOverloadedError":
                self.state.metrics.rejected.inc()
                raise APIError(503, f"The engine is overloaded ({e}). Retry later.", SERVER_ERROR, None,
                               "overloaded", headers={"Retry-After": "1"})
            if "shut down" in str(e):
                raise APIError(503, "The server is shutting down.", SERVER_ERROR, None, "shutting_down",
                               headers={"Retry-After": "5"})
            raise

    async def decode(self, ids: list[int]) -> str:
        tok = getattr(self.engine, "tokenizer", None)
        if tok is None:
            raise bad_request("This model has no tokenizer (dummy weights).", None, "unsupported_parameter")
        return await self.in_thread(lambda: tok.decode(ids, skip_special_tokens=False))


async def collect(gen: Generation, request: Request) -> bool:
    """Run a non-streamed generation to the end; False (and aborted) if the client left."""
    work = asyncio.ensure_future(gen.drain())
    watch = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not watch.done():
            watch.cancel()
    if work not in done:
        gen.abort("client")
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        return False
    work.result()
    return True


async def finish_non_streamed(gen: Generation, request: Request) -> bool:
    """Collect a non-streamed generation, close it and raise for engine errors/aborts;
    False when the client went away first."""
    try:
        completed = await collect(gen, request)
    finally:
        gen.close()
    if completed:
        check_outcome(gen)
    return completed


def engine_failure(gen: Generation) -> str:
    detail = next((c.error for c in gen.choices if c.finish_reason == "error" and c.error), None)
    return "The engine failed while generating this request" + (f": {detail}" if detail else ".")


def check_outcome(gen: Generation) -> None:
    reasons = {c.finish_reason for c in gen.choices}
    if "error" in reasons:
        raise APIError(500, engine_failure(gen), SERVER_ERROR, None, "engine_error")
    if "abort" in reasons:
        raise APIError(503, "The request was aborted because the server is shutting down.", SERVER_ERROR,
                       None, "aborted", headers={"Retry-After": "5"})


def stream_error(gen: Generation, reason: str) -> bytes:
    if reason == "error":
        return sse(error_body(engine_failure(gen), SERVER_ERROR, None, "engine_error"))
    return sse(error_body("The request was aborted because the server is shutting down.", SERVER_ERROR,
                          None, "aborted"))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def grammar_error_field(finish_reason: str | None, error: str | None) -> dict:
    """A choice that ended with ``grammar_error`` says why (``grammar_error``: the message);
    nothing for any other ending."""
    return {"grammar_error": error or "the grammar cannot continue"} if finish_reason == "grammar_error" else {}


def _format_alias(req) -> dict:
    """Engine errors name SamplingParams fields; name the request field the user sent."""
    if req.response_format is not None:
        return {"json_schema": "response_format"}
    if req.regex is None and req.grammar is None:
        return {"json_schema": "response_format"}
    return {"json_schema": "regex" if req.regex is not None else "grammar"}
