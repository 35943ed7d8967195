"""The generation routes: POST /v1/chat/completions and POST /v1/completions, whole or
streamed as Server-Sent Events (chat: messages through the chat template, tools, reasoning
split out of the text; completions: one or more prompts, echo, text offsets of logprobs)."""
from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from localsgl.engine.params import InvalidRequestError
from localsgl.engine.reasoning import starts_inside

from . import schemas as S
from .chat_output import ChatOutput
from .errors import bad_request
from .logprobs import _chat_lp, _completion_lp
from .openapi import ERROR_RESPONSES, body_spec
from .request_parsing import parse_model, read_json, unsupported
from .route_helpers import (
    RouteHelpers,
    _format_alias,
    finish_non_streamed,
    grammar_error_field,
    new_id,
    stream_error,
)
from .streaming import SSE_DONE, SSEResponse, sse, sse_choice, sse_choice_prefix
from .tool_calls import (
    ToolError,
    detect_format,
    parse_tool_choice,
    parse_tools,
    render_messages,
    template_renders_tools,
)

MAX_PROMPTS_PER_REQUEST = 64

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


def add_generation_routes(app: FastAPI, helpers: RouteHelpers) -> None:
    state, engine = helpers.state, helpers.engine

    # ---------------------------------------------------------------- chat
    @app.post("/v1/chat/completions", tags=["openai"], openapi_extra=body_spec(S.ChatCompletionRequest),
              responses={200: {"model": S.ChatCompletionResponse, "content": {"text/event-stream": {}},
                               "description": "A chat completion, or SSE chunks when stream=true"},
                         **ERROR_RESPONSES})
    async def chat_completions(request: Request):
        arrival = time.perf_counter()
        req = parse_model(S.ChatCompletionRequest, await read_json(request, state.max_body_bytes))
        helpers.check_model(req.model)
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
        params = helpers.build_params(req, max_tokens=max_tokens, logprobs=bool(req.logprobs),
                                      top_logprobs=req.top_logprobs or 0, n=n)
        tok = getattr(engine, "tokenizer", None)
        fmt = None
        if use_tools:
            fmt = await helpers.in_thread(_tool_format, engine)  # the first builds the grammar tokenizer: ~1 s
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
        gen = helpers.admit("chat", params, arrival)
        try:
            ids = await helpers.encode(template_messages, "messages", render)
            params.max_tokens = helpers.check_lengths(ids, max_tokens, explicit, "messages")
            await helpers.submit(gen, [ids], {"grammar": "tools"} if use_tools else _format_alias(req))
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
                         **ERROR_RESPONSES})
    async def completions(request: Request):
        arrival = time.perf_counter()
        req = parse_model(S.CompletionRequest, await read_json(request, state.max_body_bytes))
        helpers.check_model(req.model)
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
                helpers.check_ids(rp, "prompt")
        explicit = "max_tokens" in req.model_fields_set and req.max_tokens is not None
        max_tokens = req.max_tokens if req.max_tokens is not None else state.default_max_tokens
        if explicit and max_tokens >= state.max_model_len:
            raise bad_request(f"max_tokens is {max_tokens} but the model's context holds {state.max_model_len} "
                              f"tokens, prompt included.", "max_tokens", "context_length_exceeded")
        want_lp = req.logprobs is not None
        params = helpers.build_params(req, max_tokens=max_tokens, logprobs=want_lp, top_logprobs=req.logprobs or 0,
                                      n=n)
        gen = helpers.admit("completions", params, arrival)
        try:
            prompts: list[list[int]] = []
            limits: list[int | None] = []
            for rp in raw_prompts:
                ids = list(rp) if isinstance(rp, list) else await helpers.encode(rp, "prompt")
                limits.append(helpers.check_lengths(ids, max_tokens, explicit, "prompt"))
                prompts.append(ids)
            if not explicit:
                params.max_tokens = min(x for x in limits if x is not None)
            echo_texts: list[str] = []
            if req.echo:
                for rp, ids in zip(raw_prompts, prompts):
                    echo_texts.append(rp if isinstance(rp, str) else await helpers.decode(ids))
            await helpers.submit(gen, prompts, _format_alias(req))
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
