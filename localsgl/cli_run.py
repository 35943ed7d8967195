"""`localsgl run` and `localsgl chat`: answering prompts with an engine loaded here or a
running `localsgl serve`, one streamed answer or a batch, and opening the chat app.
run with no prompt on a terminal opens the chat, so both commands live here.
"""
import json
import logging
import os
import sys
import time
from typing import Annotated, Optional

import typer

from .cli_common import (
    InProcessOption,
    UsageError,
    _engine_mode,
    _err,
    _guard,
    _interactive,
    _paint,
    _stdin_is_terminal,
    engine_options,
)
from .config import DEFAULT_MODEL, not_utf8, resolve_engine_kwargs, resolve_settings


# ----------------------------------------------------------------------------- engine helpers


class _Loading:
    """A spinner on stderr while the model loads, only when stdout and stderr are terminals."""

    def __init__(self, model: str):
        self.model = model
        self._status = None

    def __enter__(self):
        if _interactive():
            from rich.console import Console

            self._status = Console(stderr=True).status(f"Loading {self.model}…")
            self._status.__enter__()
        return self

    def __exit__(self, *exc):
        if self._status is not None:
            self._status.__exit__(*exc)


def _load_engine(kwargs: dict):
    from .engine.api import Engine
    from .store.first_use import ensure_local

    # a hub model missing from the cache is pulled first, so its progress bars are not
    # drawn under the loading spinner
    ensure_local(kwargs.get("model", DEFAULT_MODEL), kwargs.get("load_format") or "auto")
    with _Loading(kwargs.get("model", DEFAULT_MODEL)):
        return Engine(**kwargs)


def _running_server(kwargs: dict, flags: dict):
    """A client of the running `localsgl serve` of kwargs' model, or None. Engine flags on
    the command line ask for an engine built that way, so they mean in-process."""
    given = sorted(k for k, v in flags.items() if v is not None and k != "model")
    if given:
        logging.getLogger("localsgl").info("engine flags given (%s): running in-process", ", ".join(given))
        return None
    from .client import RemoteEngine, find_server, server_address

    host, port, api_key = server_address(resolve_settings({}, ["host", "port", "api_key"]))
    server = find_server(kwargs["model"], host, port, api_key)
    return RemoteEngine(server) if server is not None else None


def _has_chat_template(engine) -> bool:
    tok = getattr(engine, "tokenizer", None)
    return tok is not None and bool(getattr(tok, "chat_template", None))


def _as_prompt(engine, text: str, system: Optional[str]):
    """Chat messages when the model has a chat template, else plain text."""
    if _has_chat_template(engine):
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [{"role": "user", "content": text}]
    return f"{system}\n\n{text}" if system else text


def _utf8(data: bytes, source: str) -> str:
    """UTF-8 text of ``data``; bytes that are not UTF-8 (a Latin-1 file, a binary in a pipe)
    become U+FFFD with a warning, as an editor shows them, instead of failing the tokenizer."""
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text:
        bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
        if bad:
            _err(f"warning: {source} is not all UTF-8 text: {bad} undecodable byte sequence"
                 f"{'s' if bad > 1 else ''} replaced with U+FFFD")
    return text


def _read_stdin() -> Optional[str]:
    """Piped stdin's text, or None when stdin is a terminal or absent."""
    stream = sys.stdin
    if stream is None:
        return None
    try:
        if stream.closed or stream.isatty():
            return None
        raw = getattr(stream, "buffer", None)
        if raw is None:  # a text-only stream (an embedding program's): already decoded
            return stream.read()
        return _utf8(raw.read(), "stdin")
    except (OSError, ValueError):
        return None


def _argument_text(prompt: Optional[str]) -> Optional[str]:
    """The prompt argument with bytes that were not UTF-8 (kept by Python as lone surrogates)
    replaced, as _utf8 does for stdin."""
    if prompt is None:
        return None
    try:
        prompt.encode("utf-8")
        return prompt
    except UnicodeEncodeError:
        return _utf8(prompt.encode("utf-8", errors="surrogateescape"), "the prompt argument")


def _gather_prompts(prompt: Optional[str], batch: bool) -> list[str]:
    prompt = _argument_text(prompt)
    piped = _read_stdin()
    if batch:
        lines = [ln.strip() for ln in (piped or "").splitlines() if ln.strip()]
        if lines:
            return [f"{prompt}\n\n{ln}" if prompt else ln for ln in lines]
        if prompt:
            return [prompt]
        raise UsageError("--batch reads one prompt per line from stdin, and stdin had none")
    piped = (piped or "").strip("\n").rstrip()
    if prompt and piped:
        return [f"{prompt}\n\n{piped}"]
    if prompt or piped:
        return [prompt or piped]
    raise UsageError('no prompt: give one as an argument (localsgl run "...") or pipe it on stdin')


def _text_or_file(flag: str, value: str) -> str:
    """'@path' -> the file's text; anything else is the value itself."""
    if not value.startswith("@"):
        return value
    try:
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"{flag}: cannot read {value[1:]}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{flag}: {value[1:]} is {not_utf8(e)}") from None


def _json_schema_arg(value: Optional[str]) -> Optional[dict]:
    if value is None:
        return None
    text = _text_or_file("--json-schema", value)
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--json-schema: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(schema, (dict, bool)):
        raise UsageError("--json-schema: a schema is a JSON object")
    return schema


def _usage(metrics, completion_fallback: int) -> dict:
    prompt = getattr(metrics, "prompt_tokens", 0) or 0
    completion = getattr(metrics, "completion_tokens", 0) or completion_fallback
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": getattr(metrics, "cached_prompt_tokens", 0) or 0,
    }


def _print_stats(usage: dict, ttft: Optional[float], total: Optional[float], requests: int = 1) -> None:
    parts = [
        f"prompt tokens {usage['prompt_tokens']}",
        f"cached {usage['cached_tokens']}",
        f"completion tokens {usage['completion_tokens']}",
    ]
    if ttft is not None:
        parts.append(f"TTFT {ttft * 1000:.0f} ms")
    if total:
        decode_time = total - (ttft or 0.0)
        if requests == 1 and decode_time > 0 and usage["completion_tokens"] > 1:
            parts.append(f"{(usage['completion_tokens'] - 1) / decode_time:.1f} tok/s")
        else:
            parts.append(f"{usage['completion_tokens'] / total:.1f} tok/s")
        parts.append(f"total {total:.2f} s")
    if requests > 1:
        parts.insert(0, f"{requests} requests")
    _err(_paint("stats:", "2", sys.stderr) + " " + ", ".join(parts))


def _record(index: int, prompt: str, text: str, finish_reason, usage: dict) -> str:
    return json.dumps(
        {"index": index, "prompt": prompt, "text": text, "finish_reason": finish_reason, "usage": usage},
        ensure_ascii=False,
    )


def _run_single(engine, text: str, system, params, jsonl: bool, stats: bool) -> None:
    out = sys.stdout
    chunks: list[str] = []
    n_tokens = 0
    finish = None
    error = None
    metrics = None
    t0 = time.perf_counter()
    t_first = None
    stream = engine.stream(_as_prompt(engine, text, system), params)
    try:
        for delta in stream:
            if t_first is None and (delta.text or delta.token_ids):
                t_first = time.perf_counter()
            n_tokens += len(delta.token_ids)
            if delta.text:
                chunks.append(delta.text)
                if not jsonl:
                    out.write(delta.text)
                    out.flush()
            if delta.finish_reason is not None:
                finish = delta.finish_reason
                error = (getattr(delta, "extra", None) or {}).get("error")
            if delta.metrics is not None:
                metrics = delta.metrics
    finally:
        stream.close()
    answer = "".join(chunks)
    usage = _usage(metrics, n_tokens)
    if jsonl:
        out.write(_record(0, text, answer, finish, usage) + "\n")
    elif not answer.endswith("\n"):
        out.write("\n")
    out.flush()
    if stats:
        ttft = getattr(metrics, "time_to_first_token", None)
        total = getattr(metrics, "total_time", None)
        if ttft is None and t_first is not None:
            ttft = t_first - t0
        if total is None:
            total = time.perf_counter() - t0
        _print_stats(usage, ttft, total)
    if finish == "error":
        raise RuntimeError(f"the engine failed while answering: {error or 'unknown error'}")


def _run_batch(engine, texts: list[str], system, params, jsonl: bool, stats: bool) -> None:
    from .engine.params import PromptTooLongError

    ids = [engine.encode_prompt(_as_prompt(engine, t, system)) for t in texts]
    limit = getattr(engine, "max_model_len", None)
    for i, p in enumerate(ids):
        if limit is not None and len(p) >= limit:
            e = PromptTooLongError(len(p), limit)
            raise UsageError(f"prompt {i + 1} (line {i + 1} of stdin): {e}")
    t0 = time.perf_counter()
    outputs = engine.generate(ids, params)
    wall = time.perf_counter() - t0
    out = sys.stdout
    totals = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cached_tokens": 0}
    for i, (text, o) in enumerate(zip(texts, outputs)):
        usage = _usage(o.metrics, len(o.token_ids))
        for k in totals:
            totals[k] += usage[k]
        if jsonl:
            out.write(_record(i, text, o.text, o.finish_reason, usage) + "\n")
        else:
            if i:
                out.write("\n")
            out.write(o.text.rstrip("\n") + "\n")
        out.flush()
    if stats:
        ttfts = [o.metrics.time_to_first_token for o in outputs if getattr(o.metrics, "time_to_first_token", None) is not None]
        _print_stats(totals, (sum(ttfts) / len(ttfts)) if ttfts else None, wall, requests=len(outputs))
    failed = [(i, getattr(o, "error", None)) for i, o in enumerate(outputs) if o.finish_reason == "error"]
    if failed:
        lines = "; ".join(f"prompt {i + 1}: {err or 'unknown error'}" for i, err in failed)
        raise RuntimeError(f"the engine failed on {len(failed)} of {len(outputs)} prompts ({lines})")


# ----------------------------------------------------------------------------- commands


@engine_options
def run(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; piped stdin is appended after it (or is the prompt)")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System message", envvar="LOCALSGL_SYSTEM")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Max tokens to generate; default: the model's, see localsgl info", envvar="LOCALSGL_MAX_TOKENS")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 = greedy; default: the model's, see localsgl info", envvar="LOCALSGL_TEMPERATURE")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling, in (0, 1]; default: the model's", envvar="LOCALSGL_TOP_P")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Top-k sampling (-1 = off); default: the model's", envvar="LOCALSGL_TOP_K")] = None,
    min_p: Annotated[Optional[float], typer.Option("--min-p", help="Min-p sampling, in [0, 1]; default: the model's", envvar="LOCALSGL_MIN_P")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed", envvar="LOCALSGL_SAMPLING_SEED")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable)")] = None,
    json_schema: Annotated[Optional[str], typer.Option("--json-schema", help="Constrain the answer to a JSON schema (inline or @FILE)")] = None,
    regex: Annotated[Optional[str], typer.Option("--regex", help="Constrain the answer to a regular expression")] = None,
    grammar: Annotated[Optional[str], typer.Option("--grammar", help="Constrain the answer to a Lark or GBNF grammar (@FILE or inline)")] = None,
    json_pretty: Annotated[bool, typer.Option("--json-pretty", help="With --json-schema: allow spaces and indented new lines between JSON tokens (default: compact)")] = False,
    reasoning: Annotated[Optional[str], typer.Option("--reasoning", help="auto | off: with off, a reasoning model's chat template is asked not to think (enable_thinking=False)")] = None,
    batch: Annotated[bool, typer.Option("--batch", help="Each stdin line is its own prompt; all run concurrently")] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="One JSON object per answer: index, prompt, text, finish_reason, usage")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Token counts, TTFT and tok/s on stderr")] = False,
    local: Annotated[bool, typer.Option("--local", help="Load the model in this process even when a `localsgl serve` of it is running")] = False,
    no_pull: Annotated[bool, typer.Option("--no-pull", help="Never download: a model missing from the cache is an error (env LOCALSGL_NO_PULL=1)")] = False,
    in_process: InProcessOption = None,
    *,
    flags: dict,
) -> None:
    """Answer a prompt (argument or piped stdin) and print the answer to stdout.

    When a `localsgl serve` of the same model runs on this machine (its address from
    [server] in the config file or LOCALSGL_HOST / LOCALSGL_PORT, default 127.0.0.1:8000),
    the prompts go there; --local, or any engine flag on the command line, runs in-process."""

    def body():
        from .engine.params import SamplingParams

        given = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                     stop=stop or None, json_schema=_json_schema_arg(json_schema), regex=regex,
                     grammar=None if grammar is None else _text_or_file("--grammar", grammar),
                     json_whitespace="pretty" if json_pretty else None)
        if json_pretty and json_schema is None:
            raise UsageError("--json-pretty applies to --json-schema answers")
        params = SamplingParams(**{k: v for k, v in given.items() if v is not None})
        params.validate()
        if prompt is None and not batch and _stdin_is_terminal():  # nothing to answer: chat, as `ollama run`
            chat_sampling = {k: given[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop")}
            _open_chat(flags, system, resume=False, inline=False, sampling=chat_sampling, no_pull=no_pull)
            return
        kwargs = resolve_engine_kwargs(flags)
        if reasoning is not None:  # an engine setting: the answer comes from an engine built with it
            kwargs["reasoning"] = reasoning
        prompts = _gather_prompts(prompt, batch)
        if no_pull:
            from .store.hub_cache import NO_PULL_ENV

            os.environ[NO_PULL_ENV] = "1"
        _engine_mode(kwargs, in_process)
        local_only = local or reasoning is not None
        engine = (None if local_only else _running_server(kwargs, flags)) or _load_engine(kwargs)
        with engine:
            if system and not _has_chat_template(engine):
                _err("note: this model has no chat template; the system text is prepended to the prompt")
            if batch:
                _run_batch(engine, prompts, system, params, jsonl, stats)
            else:
                _run_single(engine, prompts[0], system, params, jsonl, stats)

    _guard(body)


@engine_options
def chat(
    system: Annotated[Optional[str], typer.Option("--system", help="System message", envvar="LOCALSGL_SYSTEM")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Reopen the last conversation (F3 in the chat lists them all)")] = False,
    inline: Annotated[bool, typer.Option("--inline", help="Run under the prompt and leave the chat in the shell's scrollback")] = False,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Longest answer; default: the model's", envvar="LOCALSGL_MAX_TOKENS")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 = greedy; default: the model's", envvar="LOCALSGL_TEMPERATURE")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling, in (0, 1]; default: the model's", envvar="LOCALSGL_TOP_P")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Top-k sampling (-1 = off); default: the model's", envvar="LOCALSGL_TOP_K")] = None,
    min_p: Annotated[Optional[float], typer.Option("--min-p", help="Min-p sampling, in [0, 1]; default: the model's", envvar="LOCALSGL_MIN_P")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed", envvar="LOCALSGL_SAMPLING_SEED")] = None,
    *,
    flags: dict,
) -> None:
    """Chat in the terminal. Conversations are saved as you go; --resume reopens the last.

    Keys and commands: F1 or /help inside the chat; keys can be changed in the
    config file (see docs/tui.md)."""

    def body():
        from .engine.params import SamplingParams

        sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
        SamplingParams(**{k: v for k, v in sampling.items() if v is not None}).validate()
        _open_chat(flags, system, resume=resume, inline=inline, sampling=sampling)

    _guard(body)


def _open_chat(flags: dict, system: Optional[str], *, resume: bool, inline: bool, sampling: dict,
               no_pull: bool = False) -> None:
    """Run the chat app (Textual is imported here, never by the other commands)."""
    if not (_stdin_is_terminal() and sys.stdout.isatty()):
        raise UsageError("the chat needs a terminal; to answer a prompt from a script use: localsgl run \"PROMPT\"")
    kwargs = resolve_engine_kwargs(flags)
    if no_pull:
        from .store.hub_cache import NO_PULL_ENV

        os.environ[NO_PULL_ENV] = "1"
    model_given = "model" in resolve_settings({"model": flags.get("model")}, ["model"])
    from .store.first_use import ensure_local

    ensure_local(kwargs["model"], kwargs.get("load_format") or "auto")  # a download shows before the app
    from .tui import run_chat

    rc = run_chat(kwargs, system=system, resume=resume, inline=inline, model_given=model_given,
                  sampling={k: v for k, v in sampling.items() if v is not None})
    if rc:
        raise typer.Exit(rc)

