"""`localsgl serve`: an OpenAI-compatible HTTP server around one in-process Engine.

``create_app(engine, ...)`` builds the FastAPI app (shared engine, never blocking the
event loop on it); ``serve(engine_kwargs, ...)`` builds the Engine, runs uvicorn on
127.0.0.1 by default, prints one startup line to stderr and shuts down gracefully on
SIGTERM/SIGINT (stop accepting, let in-flight requests finish for
``shutdown_timeout`` seconds, abort the rest, exit 0).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}],
GET /health (never needs the key), GET /metrics, POST /v1/tokenize, POST /v1/detokenize.
Every error is ``{"error": {"message", "type", "param", "code"}}`` (see errors.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from localsgl.engine.params import InvalidRequestError, SamplingParams, TokenLogprob
from localsgl.engine.reasoning import starts_inside
from localsgl.engine.sampling_defaults import BUILTIN_DEFAULTS, GENERATION_CONFIG, apply_defaults

from . import schemas as S
from .errors import (
    INVALID_REQUEST,
    SERVER_ERROR,
    APIError,
    bad_request,
    error_body,
    install_error_handlers,
    validation_error_to_api_error,
)
from .chat_output import ChatOutput
from .metrics import ServerMetrics
from .streaming import SSE_DONE, Generation, SSEResponse, sse, sse_choice, sse_choice_prefix, wait_for_disconnect
from .tool_calls import (
    ToolError,
    detect_format,
    parse_tool_choice,
    parse_tools,
    render_messages,
    template_renders_tools,
)

log = logging.getLogger("localsgl.server")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_QUEUE = 1024
MAX_PROMPTS_PER_REQUEST = 64
OPEN_PATHS = frozenset({"/health"})
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for "impossible" tokens; JSON has no -inf


def grammar_error_field(finish_reason: str | None, error: str | None) -> dict:
    """A choice that ended with ``grammar_error`` says why (``grammar_error``: the message);
    nothing for any other ending."""
    return {"grammar_error": error or "the grammar cannot continue"} if finish_reason == "grammar_error" else {}


def _fingerprint() -> str:
    try:
        from localsgl import __version__
    except Exception:  # pragma: no cover
        __version__ = "0"
    return f"localsgl-{__version__}"


# =========================================================================== state
class ServerState:
    def __init__(self, engine, *, api_key, max_body_bytes, max_queue, served_model_name):
        self.engine = engine
        self.api_key = api_key
        self.max_body_bytes = int(max_body_bytes)
        self.max_queue = int(max_queue)
        engine_name = str(getattr(engine, "model_name", None) or "model")
        self.model_name = served_model_name or engine_name
        self.model_names = {self.model_name, engine_name}
        repo = getattr(getattr(engine, "source", None), "repo_id", None)
        if isinstance(repo, str) and repo:
            self.model_names.add(repo)  # clients may name the hub repo instead of the alias
        self.max_model_len = int(engine.max_model_len)
        # why the context stops short of the model's positions (a sliding window), or None
        self.context_limit = getattr(getattr(engine, "plan", None), "context_limit", None)
        self.vocab_size = _vocab_size(engine)
        self.sampling_defaults = getattr(engine, "sampling_defaults", None) or dict(BUILTIN_DEFAULTS)
        # an omitted max_tokens (chat; null in completions) runs to the end of the context, unless
        # the model's generation_config.json sets max_new_tokens (as vLLM does)
        value, source = self.sampling_defaults.get("max_tokens", (None, ""))
        self.default_max_tokens = value if source == GENERATION_CONFIG else self.max_model_len
        self.created = int(time.time())
        self.fingerprint = _fingerprint()
        self.metrics = ServerMetrics(engine, self.model_name)
        self.executor = ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 2) + 4),
                                           thread_name_prefix="localsgl-http")
        self.pending = 0  # admitted requests without a first token yet (bounded by max_queue)
        self.inflight: set[Generation] = set()
        self.shutting_down = False
        self.mailbox = None  # streaming.LoopMailbox of the serving loop, made on first use
        # dummy weights have no tokenizer: stream one (empty-text) chunk per token anyway,
        # so clients and `bench serving` still see when tokens arrive
        self.token_chunks = getattr(engine, "tokenizer", None) is None

    def abort_all(self, reason: str) -> int:
        gens = list(self.inflight)
        for g in gens:
            g.abort(reason)
        return len(gens)


def _vocab_size(engine) -> int | None:
    for obj, attr in ((getattr(engine, "config", None), "vocab_size"), (engine, "vocab_size")):
        v = getattr(obj, attr, None) if obj is not None else None
        if isinstance(v, int) and v > 0:
            return v
    tok = getattr(engine, "tokenizer", None)
    if tok is not None:
        try:
            return len(tok)
        except Exception:
            return None
    return None


# =========================================================================== middleware
class AuthMiddleware:
    """Bearer-token check on every route but /health (CORS preflights are answered by
    the CORS middleware outside this one)."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        auth = b""
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                auth = v
                break
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        msg = ("Incorrect API key provided." if auth else
               "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.")
        resp = JSONResponse(error_body(msg, INVALID_REQUEST, None, "invalid_api_key"), status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


class ErrorCountMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.error(message["status"])
            await send(message)

        await self.app(scope, receive, send_wrapper)


# =========================================================================== request parsing
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _has_lone_surrogate(obj: Any) -> bool:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return False


async def read_json(request: Request, limit: int) -> dict:
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            if int(cl) > limit:
                raise _too_large(limit)
        except ValueError:
            raise bad_request("invalid Content-Length header", None, "invalid_header")
    size = 0
    parts: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    raw = b"".join(parts)
    if not raw.strip():
        raise bad_request("The request body is empty; send a JSON object.", None, "invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"The request body is not valid UTF-8 (byte {e.start}).", None, "invalid_encoding")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise bad_request("The JSON body is nested too deeply.", None, "invalid_json")
    except ValueError as e:
        raise bad_request(f"We could not parse the JSON body of your request: {e}", None, "invalid_json")
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    if "\\ud" in text.lower() and _has_lone_surrogate(data):
        raise bad_request("The request body contains an unpaired UTF-16 surrogate escape.", None, "invalid_encoding")
    return data


def _too_large(limit: int) -> APIError:
    return APIError(413, f"Request body too large (limit {limit} bytes; see --max-body-bytes).", INVALID_REQUEST,
                    None, "request_too_large")


def parse_model(cls: type[BaseModel], data: dict):
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise validation_error_to_api_error(list(e.errors()))
    except RecursionError:
        raise bad_request("The JSON body is nested too deeply.", None, "invalid_json")


def unsupported(param: str, what: str) -> APIError:
    return bad_request(f"{what} is not supported by this server.", param, "unsupported_parameter")


# =========================================================================== app
def create_app(
    engine,
    *,
    api_key: str | None = None,
    cors_origins: Iterable[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_queue: int | None = DEFAULT_MAX_QUEUE,
    served_model_name: str | None = None,
) -> FastAPI:
    state = ServerState(
        engine,
        api_key=api_key or None,
        max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES,
        max_queue=DEFAULT_MAX_QUEUE if max_queue is None else max_queue,
        served_model_name=served_model_name,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            state.shutting_down = True
            state.abort_all("shutdown")
            state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="localsgl",
        version=state.fingerprint.split("-", 1)[1],
        description="OpenAI-compatible API of a local localsgl engine.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.localsgl = state
    install_error_handlers(app)
    app.add_middleware(AuthMiddleware, api_key=state.api_key)
    app.add_middleware(ErrorCountMiddleware, metrics=state.metrics)
    origins = [o for o in (cors_origins or ()) if o]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            allow_credentials=False,
            max_age=600,
        )

    err_responses = {
        400: {"model": S.ErrorResponse, "description": "Invalid request"},
        401: {"model": S.ErrorResponse, "description": "Missing or wrong API key"},
        404: {"model": S.ErrorResponse, "description": "Unknown model"},
        413: {"model": S.ErrorResponse, "description": "Body larger than --max-body-bytes"},
        503: {"model": S.ErrorResponse, "description": "Queue full (see Retry-After) or shutting down"},
    }

    def body_spec(model: type[BaseModel]) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}

    # ------------------------------------------------------------------ helpers
    def check_model(name: str | None) -> None:
        if name is not None and name not in state.model_names:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{state.model_name}`.",
                           INVALID_REQUEST, "model", "model_not_found")

    def check_ids(ids: list[int], param: str) -> None:
        v = state.vocab_size
        if v is not None:
            for t in ids:
                if not (0 <= t < v):
                    raise bad_request(f"token id {t} is out of range [0, {v}).", param, "invalid_value")

    async def in_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(state.executor, fn, *args)

    async def encode(prompt, param: str, render=None) -> list[int]:
        """Prompt ids (``render()`` when given, else the engine's encode_prompt), in a worker."""
        try:
            ids = await in_thread(render or (lambda: engine.encode_prompt(prompt)))
        except InvalidRequestError as e:
            raise bad_request(str(e), e.param or param, "invalid_value")
        except Exception as e:
            template_error = any("Template" in c.__name__ for c in type(e).__mro__)  # jinja2's, all of them
            if template_error or isinstance(e, (ValueError, TypeError)):
                raise bad_request(f"could not tokenize the {param}: {e}", param, "invalid_value")
            raise
        return list(ids)

    def check_lengths(ids: list[int], max_tokens: int | None, explicit: bool, param: str) -> int | None:
        n, m = len(ids), state.max_model_len
        if n == 0:
            raise bad_request(f"The {param} is empty.", param, "invalid_value")
        if n >= m:
            raise bad_request(
                f"This model's maximum context length is {m} tokens. However, your {param} is {n} tokens "
                f"(leave room for at least one generated token)."
                + (f" The context is {state.context_limit}." if state.context_limit else ""),
                param, "context_length_exceeded")
        if max_tokens is not None and n + max_tokens > m:
            if not explicit:
                return m - n
            raise bad_request(
                f"This model's maximum context length is {m} tokens. However, you requested {n + max_tokens} "
                f"tokens ({n} in the {param}, {max_tokens} in the completion). Please reduce the length of the "
                f"{param} or the completion.", "max_tokens", "context_length_exceeded")
        return max_tokens

    def build_params(req: S._SamplingFields, *, max_tokens: int | None, logprobs: bool, top_logprobs: int,
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
            check_ids(req.stop_token_ids, "stop_token_ids")
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
        params = apply_defaults(params, state.sampling_defaults)
        try:
            params.validate()
        except InvalidRequestError as e:
            raise bad_request(str(e), e.param, "invalid_value")
        return params

    def admit(endpoint: str, params: SamplingParams, arrival: float) -> Generation:
        if state.shutting_down:
            raise APIError(503, "The server is shutting down.", SERVER_ERROR, None, "shutting_down",
                           headers={"Retry-After": "5"})
        if state.pending >= state.max_queue:
            state.metrics.rejected.inc()
            raise APIError(503, f"The server is overloaded: {state.pending} requests are waiting "
                                f"(--max-queue {state.max_queue}). Retry later.", SERVER_ERROR, None, "overloaded",
                           headers={"Retry-After": "1"})
        gen = Generation(state, params, endpoint, arrival)
        gen.admit()
        return gen

    async def submit(gen: Generation, prompts: list[list[int]], param_alias: dict | None = None) -> None:
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
                state.metrics.rejected.inc()
                raise APIError(503, f"The engine is overloaded ({e}). Retry later.", SERVER_ERROR, None,
                               "overloaded", headers={"Retry-After": "1"})
            if "shut down" in str(e):
                raise APIError(503, "The server is shutting down.", SERVER_ERROR, None, "shutting_down",
                               headers={"Retry-After": "5"})
            raise

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

    # ------------------------------------------------------------------ routes
    @app.get("/health", response_model=S.HealthResponse, tags=["server"])
    async def health():
        if state.shutting_down:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if not getattr(engine, "alive", True):  # its core process is gone
            return JSONResponse({"status": "engine_dead"}, status_code=503)
        return {"status": "ok"}

    auth_responses = {401: err_responses[401]}

    @app.get("/metrics", tags=["server"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"},
                        **auth_responses})
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    details = _model_details(engine, state)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "localsgl",
                "root": str(getattr(engine, "model_name", state.model_name)), "max_model_len": state.max_model_len,
                "localsgl": details}

    @app.get("/v1/models", response_model=S.ModelList, tags=["openai"], responses=auth_responses)
    async def list_models():
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}", response_model=S.ModelCard, tags=["openai"],
             responses={404: {"model": S.ErrorResponse}, **auth_responses})
    async def get_model(model_id: str):
        if model_id not in state.model_names:
            raise APIError(404, f"The model `{model_id}` does not exist.", INVALID_REQUEST, "model",
                           "model_not_found")
        return JSONResponse(model_card())

    # ---------------------------------------------------------------- chat
    @app.post("/v1/chat/completions", tags=["openai"], openapi_extra=body_spec(S.ChatCompletionRequest),
              responses={200: {"model": S.ChatCompletionResponse, "content": {"text/event-stream": {}},
                               "description": "A chat completion, or SSE chunks when stream=true"},
                         **err_responses})
    async def chat_completions(request: Request):
        arrival = time.perf_counter()
        req = parse_model(S.ChatCompletionRequest, await read_json(request, state.max_body_bytes))
        check_model(req.model)
        try:
            tools = parse_tools(req.tools or [])
            tool_choice = parse_tool_choice(req.tool_choice, tools)
        except ToolError as e:
            raise bad_request(str(e), e.param, "invalid_value")
        use_tools = tool_choice != "none"
        if use_tools and (req.regex is not None or req.grammar is not None
                          or (req.response_format is not None and req.response_format.type != "text")):
            raise bad_request("tools cannot be combined with response_format, regex or grammar.", "tools",
                              "invalid_value")
        if req.audio is not None:
            raise unsupported("audio", "Audio output")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("'logprobs' must be true when 'top_logprobs' is set.", "top_logprobs",
                              "invalid_value")
        messages = []
        for i, m in enumerate(req.messages):
            if m.content is None:
                content = ""
            elif isinstance(m.content, str):
                content = m.content
            else:
                texts = []
                for j, part in enumerate(m.content):
                    if part.type != "text":
                        raise unsupported(f"messages[{i}].content[{j}]", f"Content of type '{part.type}'")
                    texts.append(part.text)
                content = "\n".join(texts)
            d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.name is not None:
                d["name"] = m.name
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                d["tool_calls"] = m.tool_calls
            messages.append(d)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        explicit = max_tokens is not None
        if not explicit:
            max_tokens = state.default_max_tokens
        if explicit and max_tokens >= state.max_model_len:
            raise bad_request(f"max_tokens is {max_tokens} but the model's context holds {state.max_model_len} "
                              f"tokens, prompt included.", "max_tokens", "context_length_exceeded")
        n = req.n or 1
        params = build_params(req, max_tokens=max_tokens, logprobs=bool(req.logprobs),
                              top_logprobs=req.top_logprobs or 0, n=n)
        tok = getattr(engine, "tokenizer", None)
        fmt = None
        if use_tools:
            fmt = await in_thread(_tool_format, engine)  # the first builds the grammar tokenizer: ~1 s
            params.grammar = fmt.grammar(tools, tool_choice, req.parallel_tool_calls is not False)
            if fmt.needs_special_tokens:
                params.skip_special_tokens = False  # the call markers must reach the parser
        native = template_renders_tools(tok)
        template_messages = render_messages(messages, tools if use_tools else [], native)
        template_kwargs = dict(req.chat_template_kwargs or {})
        reserved = sorted(set(template_kwargs) & _TEMPLATE_ARGUMENTS)
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}.", "chat_template_kwargs",
                              "invalid_value")
        definitions = [t.definition() for t in tools] if use_tools and native else None
        render = None
        if definitions or template_kwargs or template_messages != messages:
            def render():
                if not hasattr(engine, "apply_chat_template"):
                    return engine.encode_prompt(template_messages)
                return engine.apply_chat_template(template_messages, tools=definitions, **template_kwargs)
        gen = admit("chat", params, arrival)
        try:
            ids = await encode(template_messages, "messages", render)
            params.max_tokens = check_lengths(ids, max_tokens, explicit, "messages")
            await submit(gen, [ids], {"grammar": "tools"} if use_tools else _format_alias(req))
        except BaseException:
            gen.close()
            raise
        tags = getattr(engine, "reasoning_tags", None) if tok is not None else None
        inside = bool(tags) and starts_inside(tok.decode(ids[-16:], skip_special_tokens=False), tags)

        def output() -> ChatOutput:
            return ChatOutput(tags, inside, fmt, tools)

        rid = new_id("chatcmpl")
        created = int(time.time())
        model = state.model_name

        if not req.stream:
            if not await finish_non_streamed(gen, request):
                return Response(status_code=499)  # nobody is listening any more
            choices = []
            for i, c in enumerate(gen.choices):
                out = output()
                message = {"role": "assistant", "content": c.text, "refusal": None}
                if out.active:
                    message.update(out.message(c.text))
                choices.append({
                    "index": i,
                    "message": message,
                    "logprobs": {"content": [_chat_lp(x) for x in c.logprobs]} if params.logprobs else None,
                    "finish_reason": out.finish_reason(c.finish_reason),
                    **grammar_error_field(c.finish_reason, c.error),
                })
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                                 "choices": choices, "usage": gen.usage(), "system_fingerprint": state.fingerprint})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": state.fingerprint}
        if include_usage:
            base["usage"] = None

        head = sse_choice_prefix(base)

        def chunk(idx: int, delta: dict, logprobs=None, finish=None, why=None) -> bytes:
            return sse_choice(head, {"index": idx, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                                     **grammar_error_field(finish, why)})

        outs = [output() for _ in range(gen.num_choices)]

        async def events():
            for i in range(gen.num_choices):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for idx, d in gen.deltas():
                if d.finish_reason in ("abort", "error"):
                    yield stream_error(gen, d.finish_reason)
                    return
                lps = {"content": [_chat_lp(x) for x in d.logprobs]} if (params.logprobs and d.logprobs) else None
                out = outs[idx]
                if out.active:  # reasoning and tool calls split out of the text
                    pieces = out.feed(d.text) + (out.flush() if d.finish_reason is not None else [])
                    if lps and not pieces:
                        pieces = [{"content": ""}]
                    for k, piece in enumerate(pieces):
                        yield chunk(idx, piece, lps if k == 0 else None)
                elif d.text or lps or (state.token_chunks and d.token_ids):
                    yield chunk(idx, {"content": d.text}, lps)
                if d.finish_reason is not None:
                    yield chunk(idx, {}, None, out.finish_reason(d.finish_reason), (d.extra or {}).get("error"))
            if include_usage:
                yield sse({**base, "choices": [], "usage": gen.usage()})
            yield SSE_DONE

        return SSEResponse(events(), on_close=gen.close)

    # ---------------------------------------------------------------- completions
    @app.post("/v1/completions", tags=["openai"], openapi_extra=body_spec(S.CompletionRequest),
              responses={200: {"model": S.CompletionResponse, "content": {"text/event-stream": {}},
                               "description": "A text completion, or SSE chunks when stream=true"},
                         **err_responses})
    async def completions(request: Request):
        arrival = time.perf_counter()
        req = parse_model(S.CompletionRequest, await read_json(request, state.max_body_bytes))
        check_model(req.model)
        n = req.n or 1
        if req.suffix:
            raise unsupported("suffix", "suffix (insertion)")
        if req.best_of is not None and req.best_of != n:
            raise unsupported("best_of", "best_of different from n")
        if req.echo and req.logprobs is not None:
            raise unsupported("echo", "echo together with logprobs (prompt logprobs)")
        p = req.prompt
        if isinstance(p, str):
            raw_prompts: list = [p]
        elif p and isinstance(p[0], int):
            raw_prompts = [p]
        else:
            raw_prompts = list(p)
        if len(raw_prompts) > MAX_PROMPTS_PER_REQUEST:
            raise bad_request(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request", "prompt", "invalid_value")
        if len(raw_prompts) * n > S.MAX_N:
            raise bad_request(f"number of prompts times n must be at most {S.MAX_N}", "n", "invalid_value")
        for rp in raw_prompts:
            if isinstance(rp, list):
                check_ids(rp, "prompt")
        explicit = "max_tokens" in req.model_fields_set and req.max_tokens is not None
        max_tokens = req.max_tokens if req.max_tokens is not None else state.default_max_tokens
        if explicit and max_tokens >= state.max_model_len:
            raise bad_request(f"max_tokens is {max_tokens} but the model's context holds {state.max_model_len} "
                              f"tokens, prompt included.", "max_tokens", "context_length_exceeded")
        want_lp = req.logprobs is not None
        params = build_params(req, max_tokens=max_tokens, logprobs=want_lp, top_logprobs=req.logprobs or 0, n=n)
        gen = admit("completions", params, arrival)
        try:
            prompts: list[list[int]] = []
            limits: list[int | None] = []
            for rp in raw_prompts:
                ids = list(rp) if isinstance(rp, list) else await encode(rp, "prompt")
                limits.append(check_lengths(ids, max_tokens, explicit, "prompt"))
                prompts.append(ids)
            if not explicit:
                params.max_tokens = min(x for x in limits if x is not None)
            echo_texts: list[str] = []
            if req.echo:
                for rp, ids in zip(raw_prompts, prompts):
                    echo_texts.append(rp if isinstance(rp, str) else await _decode(ids))
            await submit(gen, prompts, _format_alias(req))
        except BaseException:
            gen.close()
            raise

        rid = new_id("cmpl")
        created = int(time.time())
        model = state.model_name

        def echo_for(idx: int) -> str:
            return echo_texts[idx // n] if req.echo else ""

        if not req.stream:
            if not await finish_non_streamed(gen, request):
                return Response(status_code=499)  # nobody is listening any more
            choices = []
            for i, c in enumerate(gen.choices):
                prefix = echo_for(i)
                lp = None
                if want_lp:
                    lp = _completion_lp(c.logprobs, len(prefix))
                choices.append({"index": i, "text": prefix + c.text, "logprobs": lp, "finish_reason": c.finish_reason,
                                **grammar_error_field(c.finish_reason, c.error)})
            return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                                 "choices": choices, "usage": gen.usage(), "system_fingerprint": state.fingerprint})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        base = {"id": rid, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": state.fingerprint}
        if include_usage:
            base["usage"] = None
        offsets = [len(echo_for(i)) for i in range(gen.num_choices)]

        head = sse_choice_prefix(base)

        def chunk(idx: int, text: str, logprobs=None, finish=None, why=None) -> bytes:
            return sse_choice(head, {"index": idx, "text": text, "logprobs": logprobs, "finish_reason": finish,
                                     **grammar_error_field(finish, why)})

        async def events():
            if req.echo:
                for i in range(gen.num_choices):
                    yield chunk(i, echo_for(i))
            async for idx, d in gen.deltas():
                if d.finish_reason in ("abort", "error"):
                    yield stream_error(gen, d.finish_reason)
                    return
                lp = None
                if want_lp and d.logprobs:
                    lp = _completion_lp(d.logprobs, offsets[idx])
                    offsets[idx] += sum(len(x.token) for x in d.logprobs)
                if d.text or lp or (state.token_chunks and d.token_ids):
                    yield chunk(idx, d.text, lp)
                if d.finish_reason is not None:
                    yield chunk(idx, "", None, d.finish_reason, (d.extra or {}).get("error"))
            if include_usage:
                yield sse({**base, "choices": [], "usage": gen.usage()})
            yield SSE_DONE

        return SSEResponse(events(), on_close=gen.close)

    async def _decode(ids: list[int]) -> str:
        tok = getattr(engine, "tokenizer", None)
        if tok is None:
            raise bad_request("This model has no tokenizer (dummy weights).", None, "unsupported_parameter")
        return await in_thread(lambda: tok.decode(ids, skip_special_tokens=False))

    # ---------------------------------------------------------------- tokenizer
    @app.post("/v1/tokenize", tags=["tokenizer"], openapi_extra=body_spec(S.TokenizeRequest),
              responses={200: {"model": S.TokenizeResponse, "description": "Token ids"}, **err_responses})
    async def tokenize(request: Request):
        req = parse_model(S.TokenizeRequest, await read_json(request, state.max_body_bytes))
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Give exactly one of 'prompt' or 'messages'.", "prompt", "invalid_value")
        if req.prompt is not None:
            ids = await encode(req.prompt, "prompt")
        else:
            msgs = []
            for i, m in enumerate(req.messages):
                if m.content is not None and not isinstance(m.content, str):
                    if any(part.type != "text" for part in m.content):
                        raise unsupported(f"messages[{i}].content", "Non-text content")
                    content = "\n".join(part.text for part in m.content)
                else:
                    content = m.content or ""
                msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content})
            if not msgs:
                raise bad_request("'messages' must not be empty.", "messages", "invalid_value")
            ids = await encode(msgs, "messages")
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len})

    @app.post("/v1/detokenize", tags=["tokenizer"], openapi_extra=body_spec(S.DetokenizeRequest),
              responses={200: {"model": S.DetokenizeResponse, "description": "Text"}, **err_responses})
    async def detokenize(request: Request):
        req = parse_model(S.DetokenizeRequest, await read_json(request, state.max_body_bytes))
        check_model(req.model)
        check_ids(req.tokens, "tokens")
        return JSONResponse({"prompt": await _decode(req.tokens)})

    # ---------------------------------------------------------------- OpenAPI
    def custom_openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        names = sorted(state.model_names)
        for m in S.REQUEST_MODELS:
            js = m.model_json_schema(ref_template="#/components/schemas/{model}", mode="validation")
            for k, v in js.pop("$defs", {}).items():
                comps.setdefault(k, v)
            # document which model names this server answers to
            prop = js.get("properties", {}).get("model")
            if prop is not None:
                enum = {"type": "string", "enum": names}
                js["properties"]["model"] = {"anyOf": [enum, {"type": "null"}]} if "anyOf" in prop else enum
            comps[m.__name__] = js
        if state.api_key:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            health = schema.get("paths", {}).get("/health", {}).get("get")
            if health is not None:
                health["security"] = []
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi
    return app


# what the server itself passes to a chat template
_TEMPLATE_ARGUMENTS = frozenset({"messages", "conversation", "tools", "documents", "add_generation_prompt", "tokenize",
                                 "chat_template"})


def _tool_format(engine):
    """The engine's model's tool call format (markers that are special tokens found through
    its grammar backend, engine/grammar.py, when it has one)."""
    tok = getattr(engine, "tokenizer", None)
    try:
        backend = getattr(engine, "grammar_backend", None)
    except InvalidRequestError:  # no tokenizer: markers are taken as text
        backend = None
    return detect_format(tok, backend.special_token_ids if backend is not None else None)


def _format_alias(req) -> dict:
    """Engine errors name SamplingParams fields; name the request field the user sent."""
    if req.response_format is not None:
        return {"json_schema": "response_format"}
    if req.regex is None and req.grammar is None:
        return {"json_schema": "response_format"}
    return {"json_schema": "regex" if req.regex is not None else "grammar"}


def _finite(x: float) -> float:
    x = float(x)
    return x if math.isfinite(x) and x > LOGPROB_FLOOR else LOGPROB_FLOOR


def _chat_lp(t: TokenLogprob) -> dict:
    return {
        "token": t.token,
        "logprob": _finite(t.logprob),
        "bytes": list(t.token.encode("utf-8", "replace")),
        "top_logprobs": [{"token": x.token, "logprob": _finite(x.logprob), "bytes": list(x.token.encode("utf-8", "replace"))}
                         for x in (t.top or [])],
    }


def _completion_lp(lps: list[TokenLogprob], start_offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    off = start_offset
    for t in lps:
        tokens.append(t.token)
        token_lps.append(_finite(t.logprob))
        tops.append({x.token: _finite(x.logprob) for x in (t.top or [])})
        offsets.append(off)
        off += len(t.token)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


# =========================================================================== serve
def _model_details(engine, state: ServerState) -> dict:
    """The model card's ``localsgl`` field: what `localsgl run` needs to use this server
    instead of loading the model itself (localsgl/client.py): every name the model goes by,
    its file or directory, whether prompts go through a chat template, and the max_tokens
    an engine request that leaves it unset gets."""
    source = getattr(engine, "source", None)
    names = set(state.model_names)
    try:
        from localsgl.store.resolve import alias_of

        alias = alias_of(source) if source is not None else None
    except Exception:  # noqa: BLE001 - a source without the fields alias_of reads
        alias = None
    if alias:
        names.add(alias)
    path = getattr(source, "path", None)
    defaults = getattr(state, "sampling_defaults", None) or {}
    max_tokens = defaults.get("max_tokens", (None, ""))[0]
    return {
        "names": sorted(names),
        "path": str(path) if path else None,
        "chat_template": bool(getattr(getattr(engine, "tokenizer", None), "chat_template", None)),
        "max_tokens": max_tokens if isinstance(max_tokens, int) else None,
    }


def _plan_summary(engine) -> str:
    plan = getattr(engine, "plan", None)
    if plan is None:
        return "plan: n/a"
    for attr in ("summary", "describe", "one_line"):
        f = getattr(plan, attr, None)
        if callable(f):
            try:
                return " ".join(str(f()).split())
            except Exception:
                break
        if isinstance(f, str):
            return " ".join(f.split())
    return " ".join(str(plan).split())


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def _make_server_class():
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn.Server with: a startup line printed once the socket is bound, our own
        signal handling (graceful stop, then exit 0 instead of re-raising the signal),
        and in-flight requests aborted when the shutdown deadline passes."""

        def __init__(self, config, state: ServerState, shutdown_timeout: float, banner):
            super().__init__(config)
            self.lsgl_state = state
            self.lsgl_timeout = max(0.0, float(shutdown_timeout))
            self.lsgl_banner = banner
            self.bound_port: int | None = None

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = [signal.SIGINT, signal.SIGTERM]
            orig = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in orig.items():
                    signal.signal(s, h)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and not self.should_exit:
                try:
                    self.bound_port = self.servers[0].sockets[0].getsockname()[1]
                except Exception:
                    self.bound_port = self.config.port
                self.lsgl_banner(self.bound_port)

        async def shutdown(self, sockets=None):
            st = self.lsgl_state
            st.shutting_down = True
            busy = len(st.inflight)
            if busy:
                print(f"localsgl serve: shutting down, waiting up to {self.lsgl_timeout:g}s for "
                      f"{busy} in-flight request(s)", file=sys.stderr, flush=True)

            async def deadline():
                # wait for in-flight work, then abort whatever is left
                t_end = time.monotonic() + self.lsgl_timeout
                while st.inflight and time.monotonic() < t_end:
                    await asyncio.sleep(0.05)
                if st.inflight:
                    n = st.abort_all("shutdown")
                    print(f"localsgl serve: aborted {n} request(s) at the shutdown deadline",
                          file=sys.stderr, flush=True)

            task = asyncio.ensure_future(deadline())
            try:
                await super().shutdown(sockets)
            finally:
                task.cancel()

    return _Server


def serve(
    engine_kwargs: dict | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    cors_origins: Iterable[str] = (),
    max_queue: int | None = None,
    shutdown_timeout: float = 30.0,
    max_body_bytes: int | None = None,
    served_model_name: str | None = None,
    log_level: str = "warning",
    engine=None,
) -> int:
    """Build the Engine (unless ``engine`` is given), serve until SIGTERM/SIGINT, return 0.

    The engine core runs in its own process unless ``engine_kwargs`` says ``in_process``
    (or ``LOCALSGL_IN_PROCESS`` is set): the step loop then shares no interpreter lock
    with HTTP, tokenization and detokenization.  ``api_key`` falls back to ``$LOCALSGL_API_KEY``; ``max_queue`` None means
    DEFAULT_MAX_QUEUE; ``port=0`` picks a free port (the startup line tells which).
    """
    import uvicorn

    api_key = api_key or os.environ.get("LOCALSGL_API_KEY") or None
    owned = engine is None
    if owned:
        from localsgl import Engine

        kwargs = dict(engine_kwargs or {})
        if not os.environ.get("LOCALSGL_IN_PROCESS"):
            kwargs.setdefault("in_process", False)
        engine = Engine(**kwargs)
    try:
        app = create_app(
            engine,
            api_key=api_key,
            cors_origins=tuple(cors_origins or ()),
            max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES,
            max_queue=max_queue,
            served_model_name=served_model_name,
        )
        state: ServerState = app.state.localsgl
        if not _is_loopback(host) and not api_key:
            log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)

        def banner(bound_port: int) -> None:
            shown = f"[{host}]" if ":" in host else host
            plan = _plan_summary(engine)
            if "max_model_len" not in plan:
                plan += f", max_model_len {state.max_model_len}"
            print(
                f"localsgl serve: http://{shown}:{bound_port}/v1 model={state.model_name} | {plan} | "
                f"{'API key required' if api_key else 'no API key'}",
                file=sys.stderr,
                flush=True,
            )

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            lifespan="on",
            server_header=False,
            timeout_graceful_shutdown=max(0.0, float(shutdown_timeout)) + 3.0,
            timeout_keep_alive=5,
        )
        server = _make_server_class()(config, state, shutdown_timeout, banner)
        try:
            server.run()
        except SystemExit:  # uvicorn exits this way when it cannot bind
            if server.started:
                raise
        if not server.started:
            print(f"localsgl serve: could not listen on {host}:{port} (see the error above)", file=sys.stderr,
                  flush=True)
            return 1
    finally:
        if owned:
            try:
                engine.shutdown()
            except Exception:
                log.exception("engine shutdown failed")
    return 0
