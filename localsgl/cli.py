"""The `localsgl` command line: one small function per command, no engine logic.

stdout carries only answers (or --json output); logs, progress and errors go to stderr.
Exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted (engine shut down first).
Set LOCALSGL_DEBUG=1 for tracebacks.
"""
import functools
import importlib
import inspect
import json
import logging
import os
import sys
import time
from enum import IntEnum
from typing import Annotated, Any, Callable, Optional

import typer

from .config import (
    DEFAULT_MODEL,
    ConfigError,
    debug_enabled,
    format_size,
    resolve_engine_kwargs,
    resolve_settings,
)


class ExitCode(IntEnum):
    OK = 0
    RUNTIME = 1
    USAGE = 2
    INTERRUPTED = 130


class UsageError(Exception):
    """A mistake in how the command was called (exit 2)."""


app = typer.Typer(
    name="localsgl",
    help="Run LLMs locally with an SGLang-class engine inside.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# ----------------------------------------------------------------------------- output helpers


def _color_ok(stream) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _paint(text: str, code: str, stream) -> str:
    return f"\033[{code}m{text}\033[0m" if _color_ok(stream) else text


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _error_line(exc_or_msg) -> None:
    msg = str(exc_or_msg).strip() or type(exc_or_msg).__name__
    _err(_paint("error:", "1;31", sys.stderr) + " " + msg)


def _interactive() -> bool:
    """Spinners only when both stdout and stderr are terminals."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _usage_error_types() -> tuple[type, ...]:
    from .engine.params import InvalidRequestError

    types: list[type] = [UsageError, ConfigError, InvalidRequestError]
    for mod, name in (
        ("localsgl.client", "RemoteRequestError"),
        ("localsgl.engine.plan", "PlanError"),
        ("localsgl.engine.models.config", "UnsupportedModelError"),
        ("localsgl.store.resolve", "UnknownModelError"),
    ):
        try:
            types.append(getattr(__import__(mod, fromlist=[name]), name))
        except Exception:  # module not there yet, or broken: classify by the others
            pass
    return tuple(types)


def _guard(body: Callable[[], Any]) -> None:
    """Run a command body, mapping exceptions to one line on stderr and an exit code."""
    try:
        body()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _err("interrupted")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except BrokenPipeError:
        # the reader went away (e.g. `| head -1`): stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        raise typer.Exit(ExitCode.OK) from None
    except Exception as e:  # noqa: BLE001 - every error becomes one clear line
        if debug_enabled():
            import traceback

            traceback.print_exc()
        usage = isinstance(e, _usage_error_types())
        _error_line(e if usage or isinstance(e, (RuntimeError, OSError)) else f"{type(e).__name__}: {e}")
        raise typer.Exit(ExitCode.USAGE if usage else ExitCode.RUNTIME) from None


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if debug_enabled() else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(stream=sys.stderr, level=level, format="%(levelname)s %(name)s: %(message)s")
    if level > logging.INFO:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


# ----------------------------------------------------------------------------- shared engine flags

_P = "Engine options"
ENGINE_OPTIONS: dict[str, Any] = {
    "model": Annotated[
        Optional[str],
        typer.Option("--model", "-m", help="Alias, local HF directory, .gguf file or hub repo id", show_default=DEFAULT_MODEL, rich_help_panel=_P),
    ],
    "dtype": Annotated[Optional[str], typer.Option("--dtype", help="float32 | bfloat16 | float16 | auto", rich_help_panel=_P)],
    "max_model_len": Annotated[Optional[int], typer.Option("--max-model-len", help="Context length (tokens)", rich_help_panel=_P)],
    "kv_memory": Annotated[Optional[str], typer.Option("--kv-memory", help="KV cache size, e.g. 2GiB", rich_help_panel=_P)],
    "gpu_memory": Annotated[Optional[str], typer.Option("--gpu-memory", help="Cap on GPU memory used, e.g. 8GiB", rich_help_panel=_P)],
    "max_running": Annotated[Optional[int], typer.Option("--max-running", help="Max concurrently running requests", rich_help_panel=_P)],
    "chunk_size": Annotated[Optional[int], typer.Option("--chunk-size", help="Prefill chunk (tokens per step)", rich_help_panel=_P)],
    "attention_backend": Annotated[Optional[str], typer.Option("--attention-backend", help="triton | torch | auto", rich_help_panel=_P)],
    "disable_cuda_graph": Annotated[Optional[bool], typer.Option("--disable-cuda-graph", help="Run decode eagerly", rich_help_panel=_P)],
    "disable_overlap": Annotated[Optional[bool], typer.Option("--disable-overlap", help="No CPU/GPU overlap scheduling", rich_help_panel=_P)],
    "disable_radix_cache": Annotated[Optional[bool], typer.Option("--disable-radix-cache", help="No prefix reuse", rich_help_panel=_P)],
    "load_format": Annotated[Optional[str], typer.Option("--load-format", help="auto | dummy (random weights)", rich_help_panel=_P)],
    "weights": Annotated[Optional[str], typer.Option("--weights", help="keep | dequantize: quantized weights (GGUF, AWQ, FP8, quantize outputs) stay quantized or load dense", show_default="keep on a GPU, dequantize on the CPU", rich_help_panel=_P)],
    "quantization": Annotated[Optional[str], typer.Option("--quantization", help="int4 | int8 | fp8: quantize dense linear weights as they load (with --load-format dummy: random weights in that format)", rich_help_panel=_P)],
    "kv_cache_dtype": Annotated[Optional[str], typer.Option("--kv-cache-dtype", help="auto | fp8: store the KV cache as fp8 (e4m3 with a scale per token and head): about half the bytes, so twice the tokens", show_default="auto (the model's dtype)", rich_help_panel=_P)],
    "device": Annotated[Optional[str], typer.Option("--device", help="cuda | cuda:N | cpu", show_default="cuda if present", rich_help_panel=_P)],
    "tp": Annotated[Optional[int], typer.Option("--tp", help="Tensor-parallel GPUs", rich_help_panel=_P)],
}


# Where the engine core runs: on a thread of this process, or in its own process (the front
# end keeps tokenization, text and HTTP).  Unset: LOCALSGL_IN_PROCESS, else the command's default
# (serve: its own process; run and chat: a thread, which reaches the first token sooner —
# bench/RESULTS.md "Engine core process (issue 18)").
InProcessOption = Annotated[Optional[bool], typer.Option(
    "--in-process/--core-process",
    help="Run the engine core on a thread of this process, or in its own process",
    show_default="serve: its own process; run: in-process")]


def _engine_mode(kwargs: dict, in_process: Optional[bool], default: Optional[bool] = None) -> None:
    """kwargs["in_process"]: the flag, else (LOCALSGL_IN_PROCESS unset) the command's default;
    left out, the Engine reads LOCALSGL_IN_PROCESS itself (default in-process)."""
    if in_process is None and not os.environ.get("LOCALSGL_IN_PROCESS"):
        in_process = default
    if in_process is not None:
        kwargs["in_process"] = in_process


def engine_options(func: Callable) -> Callable:
    """Add the common engine flags to a command; the command receives them as ``flags``
    (a dict of snake_case names, None where not given on the command line)."""
    sig = inspect.signature(func)
    own = [p for p in sig.parameters.values() if p.name != "flags"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann)
        for name, ann in ENGINE_OPTIONS.items()
    ]

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        flags = {name: kwargs.pop(name, None) for name in ENGINE_OPTIONS}
        return func(*args, flags=flags, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + extra)
    annotations = {k: v for k, v in func.__annotations__.items() if k != "flags"}
    annotations.update(ENGINE_OPTIONS)
    wrapper.__annotations__ = annotations
    del wrapper.__wrapped__
    return wrapper


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


def _read_stdin() -> Optional[str]:
    """Piped stdin's text, or None when stdin is a terminal or absent."""
    stream = sys.stdin
    if stream is None:
        return None
    try:
        if stream.closed or stream.isatty():
            return None
        return stream.read()
    except (OSError, ValueError):
        return None


def _gather_prompts(prompt: Optional[str], batch: bool) -> list[str]:
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


def _version_callback(value: bool) -> None:
    if value:
        from . import __version__

        print(f"localsgl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress (to stderr)")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit")
    ] = None,
) -> None:
    """Run LLMs locally with an SGLang-class engine inside."""
    _setup_logging(verbose)


@app.command()
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


@app.command()
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


@app.command()
@engine_options
def info(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    *,
    flags: dict,
) -> None:
    """Device, dtype, model and the memory plan, computed without loading the weights."""

    def body():
        report = _info_report(resolve_engine_kwargs(flags))
        if json_output:
            print(json.dumps(report, indent=2, default=str))
        else:
            _print_info(report)

    _guard(body)


def _info_report(kwargs: dict) -> dict:
    from . import __version__
    from .engine.models.config import ModelConfig
    from .engine.plan import default_dtype, detect_device, dtype_name, make_plan, plan_options
    from .engine.sampling_defaults import defaults_as_dict, model_sampling_defaults
    from .store.resolve import resolve_model

    dev = detect_device(kwargs.get("device"))
    dtype = dtype_name(kwargs["dtype"]) if kwargs.get("dtype") not in (None, "auto") else dtype_name(default_dtype(dev))
    source = resolve_model(kwargs["model"], load_format=kwargs.get("load_format", "auto"), record_use=False)
    cfg = ModelConfig.from_hf(source.config)
    from .engine.weight_estimate import estimate as estimate_weights

    weights = estimate_weights(source, cfg, dtype, dev.kind, kwargs.get("weights"), kwargs.get("quantization"))
    options = plan_options(kwargs)
    if weights is not None:
        options["weights_bytes"] = weights.total_bytes
    plan = make_plan(cfg, dev, dtype, **options)  # as the engine plans
    versions = {"localsgl": __version__, "python": sys.version.split()[0]}
    for mod in ("torch", "transformers", "triton"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    return {
        "device": {**dev.to_dict(), "torch_device": dev.torch_device},
        "dtype": dtype,
        "model": {
            "name": getattr(source, "name", kwargs["model"]),
            "kind": getattr(source, "kind", None),
            "path": str(getattr(source, "path", "")) or None,
            **cfg.shape(),
            "max_position_embeddings": cfg.max_position_embeddings,
            "weights_bytes": plan.weights_bytes,
            "weights_format": weights.by_format if weights is not None else {dtype: plan.weights_bytes},
            "kv_bytes_per_token": plan.kv_bytes_per_token,
        },
        "plan": plan.to_dict(),
        "sampling": defaults_as_dict(model_sampling_defaults(source, kwargs.get("default_sampling"))),
        "versions": versions,
    }


def _print_info(r: dict) -> None:
    out = sys.stdout
    head = lambda s: _paint(s, "1", out)  # noqa: E731
    d, m, p = r["device"], r["model"], r["plan"]
    lines = [head("Device")]
    if d["kind"] == "cuda":
        lines += [
            f"  name                {d['name']} ({d['torch_device']}, {d['count']} visible)",
            f"  memory              {format_size(d['total_memory'])} total, {format_size(d['free_memory'])} free",
            f"  SMs                 {d['sm_count']}",
            f"  compute capability  {d['capability']}",
        ]
    else:
        lines += [
            f"  name                {d['name']}",
            f"  cores               {d['cores']}",
            f"  RAM                 {format_size(d['total_memory'])} total, {format_size(d['free_memory'])} available",
        ]
    lines.append(f"  bf16                {'yes' if d['bf16'] else 'no'}")
    lines.append(f"  dtype               {r['dtype']}")
    lines += [
        head("Model"),
        f"  name                {m['name']} ({m['kind']})",
        f"  path                {m['path']}",
        f"  architecture        {m['architecture']}: {m['layers']} layers, hidden {m['hidden_size']}, "
        f"{m['heads']} heads / {m['kv_heads']} KV heads x {m['head_dim']}, vocab {m['vocab_size']}",
        f"  parameters          {m['params'] / 1e9:.3f} B",
        f"  weights             {format_size(m['weights_bytes'])} " + (
            f"at {r['dtype']}" if list(m.get("weights_format") or {r['dtype']: 0}) == [r['dtype']] else
            "(" + ", ".join(f"{k} {format_size(v)}" for k, v in sorted(m["weights_format"].items(), key=lambda kv: -kv[1])) + ")"),
        f"  KV per token        {format_size(m['kv_bytes_per_token'])}" + (" (fp8)" if r["plan"].get("kv_cache_dtype") else ""),
        f"  max positions       {m['max_position_embeddings']:,}",
        head("Memory plan"),
    ]
    if p["device"] == "cuda":
        lines.append(f"  budget              {format_size(p['budget_bytes'])} (margin {format_size(p['safety_margin_bytes'])})")
        lines.append(f"  activations         {format_size(p['activation_reserve_bytes'])}, CUDA graphs {format_size(p['graph_reserve_bytes'])}")
    graphs = ", ".join(map(str, p["cuda_graph_bs"])) if p["cuda_graph_bs"] else "none"
    if p["cuda_graph_bs"]:
        from .engine.graph_schedule import capture_order

        first, later = capture_order(p["cuda_graph_bs"], cascade=False)
        if later:
            graphs += f" ({', '.join(str(k.batch_size) for k in reversed(first))} captured before serving, the rest while serving)"
    lines += [
        f"  KV cache            {p['kv_tokens']:,} tokens ({format_size(p['kv_bytes'])})",
        f"  max running         {p['max_running']}",
        f"  max model len       {p['max_model_len']:,}",
        f"  chunk size          {p['chunk_size']}",
        f"  graph buckets       {graphs}",
    ]
    lines += [f"  note                {n}" for n in p["notes"]]
    lines.append(head("Sampling defaults") + " (for fields a request leaves unset)")
    for name, d in r.get("sampling", {}).items():
        lines.append(f"  {name:<19} {d['value']:<8} {d['source']}")
    out.write("\n".join(lines) + "\n")


@app.command()
@engine_options
def serve(
    host: Annotated[Optional[str], typer.Option("--host", help="Bind address", show_default="127.0.0.1")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="Port", show_default="8000")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require this bearer token on every route but /health")] = None,
    reasoning: Annotated[Optional[str], typer.Option("--reasoning", help="auto | off: with off, a reasoning model's chat template is asked not to think, unless a request's chat_template_kwargs say otherwise")] = None,
    in_process: InProcessOption = None,
    *,
    flags: dict,
) -> None:
    """Serve the OpenAI-compatible HTTP API."""

    def body():
        kwargs = resolve_engine_kwargs(flags)
        if reasoning is not None:
            kwargs["reasoning"] = reasoning
        _engine_mode(kwargs, in_process)  # left out: serve() puts the core in its own process
        s = resolve_settings({"host": host, "port": port, "api_key": api_key}, ["host", "port", "api_key"])
        try:
            serve_app = importlib.import_module("localsgl.server.app").serve
        except ModuleNotFoundError as e:
            if e.name in ("localsgl.server", "localsgl.server.app"):
                raise RuntimeError("the HTTP server is not available in this build (localsgl.server.app is missing)") from None
            raise
        rc = serve_app(kwargs, s.get("host", "127.0.0.1"), s.get("port", 8000), s.get("api_key"))
        if rc:
            raise typer.Exit(int(rc))

    _guard(body)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@engine_options
def bench(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help="latency | throughput | serving (further options go to the benchmark)")],
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    *,
    flags: dict,
) -> None:
    """Benchmarks: localsgl.bench.main(kind, engine_kwargs, args, json_output) does the work."""

    def body():
        kwargs = resolve_engine_kwargs(flags)
        try:
            bench_mod = importlib.import_module("localsgl.bench")
        except ModuleNotFoundError as e:
            if e.name == "localsgl.bench":
                raise RuntimeError("benchmarks are not available in this build (localsgl.bench is missing)") from None
            raise
        rc = bench_mod.main(kind, kwargs, list(ctx.args), json_output=json_output)
        if rc:
            raise typer.Exit(int(rc))

    _guard(body)


# ----------------------------------------------------------------------------- model store


@app.command()
def pull(
    model: Annotated[str, typer.Argument(help="An alias or a hub repo: org/name, org/name:QUANT (one GGUF file, e.g. :Q4_K_M), org/name@REVISION")],
    file: Annotated[Optional[str], typer.Option("--file", help="The .gguf file to fetch from a GGUF repo")] = None,
) -> None:
    """Download a model into the Hugging Face cache; prints the name to run it by."""

    def body():
        from .store.manage import pull as pull_model

        print(pull_model(model, file=file), flush=True)

    _guard(body)


@app.command("list")
def list_models_command(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Models that run without a download: name, format, size, parameters, source, last use."""

    def body():
        from .store.manage import scan

        models, incomplete = scan()
        if json_output:
            print(json.dumps([m.to_dict() for m in models], indent=2))
        else:
            _print_models(models)
        for d in incomplete:
            _err(f"note: {d.name} is an incomplete download ({d.problem}): `localsgl pull {d.name}` "
                 f"finishes it, `localsgl rm {d.name}` removes it")

    _guard(body)


def _print_models(models) -> None:
    from .store.manage import describe_last_used, format_params

    rows = [("NAME", "FORMAT", "SIZE", "PARAMS", "SOURCE", "LAST USED")]
    for m in models:
        name = m.name + (f" ({', '.join(a for a in m.aliases if a != m.name)})" if set(m.aliases) - {m.name} else "")
        fmt = m.format + ("" if m.supported else f" [unsupported: {m.architecture}]")
        rows.append((name, fmt, format_size(m.size_bytes), format_params(m.params), m.source, describe_last_used(m.last_used)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = sys.stdout
    for i, r in enumerate(rows):
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        out.write((_paint(line, "1", out) if i == 0 else line) + "\n")


@app.command()
def show(
    model: Annotated[str, typer.Argument(help="A listed model, an alias, a path or a cached hub repo")],
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """A model's architecture, parameters, context length, chat template, files and memory plan."""

    def body():
        from .store.manage import show_model

        report = show_model(model)
        if json_output:
            print(json.dumps(report, indent=2, default=str))
        else:
            _print_show(report)

    _guard(body)


def _print_show(r: dict) -> None:
    from .store.manage import describe_last_used, format_params

    out = sys.stdout
    head = lambda s: _paint(s, "1", out)  # noqa: E731
    aliases = [a for a in r["aliases"] if a != r["name"]]
    rev = f", revision {r['revision']}" if r.get("revision") else ""
    template = "yes" if r["chat_template"] else "no"
    if r["chat_template"]:
        template += ", takes tools" if r["tool_calls"] else ", no tools"
    lines = [
        head("Model"),
        f"  name                {r['name']}" + (f" (alias {', '.join(aliases)})" if aliases else ""),
        f"  source              {r['source']}{rev}",
        f"  path                {r['path']}",
        f"  format              {r['format'] or '-'}, {format_size(r['size_bytes'])} on disk",
        f"  architecture        {r['architecture']}: {r['layers']} layers, hidden {r['hidden_size']}, "
        f"{r['heads']} heads / {r['kv_heads']} KV heads x {r['head_dim']}, vocab {r['vocab_size']}",
        f"  parameters          {format_params(r['params'])}",
        f"  context length      {r['context_length']:,}" + (f" (sliding window {r['sliding_window']:,})" if r.get("sliding_window") else ""),
        f"  chat template       {template}",
        f"  last used           {describe_last_used(r['last_used'])}",
        head("Files"),
    ]
    width = max([len(f["name"]) for f in r["files"]] + [18])
    lines += [f"  {f['name']:<{width}}  {format_size(f['size'])}" for f in r["files"]]
    sampling = r.get("sampling") or {}
    if "error" not in sampling:
        lines.append(head("Sampling defaults"))
        lines += [f"  {k:<19} {d['value']!s:<8} {d['source']}" for k, d in sampling.items()]
    plan = r.get("plan")
    if plan:
        lines.append(head("Memory plan") + " (as `localsgl info` would make it here)")
        if "error" in plan:
            lines.append(f"  cannot plan: {plan['error']}")
        else:
            lines += [
                f"  device              {plan['device']} ({plan['dtype']})",
                f"  KV cache            {plan['kv_tokens']:,} tokens ({format_size(plan['kv_bytes'])})",
                f"  max running         {plan['max_running']}",
                f"  max model len       {plan['max_model_len']:,}",
            ]
    out.write("\n".join(lines) + "\n")


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="The model to quantize (alias, directory, .gguf file, hub repo)")],
    method: Annotated[str, typer.Option("--method", help="int4 | int8 | fp8")],
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Inputs per scale (default: int4 128, int8/fp8 one scale per row: 0)")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Name of the quantized model (default: SOURCE-METHOD)")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Where to quantize: cuda | cpu", show_default="cuda if present")] = None,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="GPTQ over a short shipped calibration text instead of round-to-nearest (int4/int8; slower)")] = False,
) -> None:
    """Round a model's linear weights to int4 / int8 / fp8 and save it as a local model; prints its name."""

    def body():
        from .store.quantize import QuantizeError, quantize_model

        try:
            result = _run_quantize(functools.partial(quantize_model, calibrate=calibrate), model, method, group_size,
                                   output, device)
        except QuantizeError as e:
            raise UsageError(str(e)) from None
        _err(f"quantized {model} -> {result.name}: {result.quantized} linear weights {result.method}"
             f"{f' group {result.group_size}' if result.group_size else ''}, {format_size(result.bytes)} "
             f"in {result.seconds:.1f} s ({result.path})")
        print(result.name, flush=True)

    _guard(body)


def _run_quantize(fn, model, method, group_size, output, device):
    """quantize_model with a rich progress bar on stderr when it is a terminal."""
    if not sys.stderr.isatty():
        return fn(model, method, group_size, output, device)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("quantizing {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(model, total=None)

        def progress(done, total, name):
            bar.update(task, completed=done, total=total or None)

        return fn(model, method, group_size, output, device, progress=progress)


@app.command()
def rm(
    model: Annotated[str, typer.Argument(help="A listed model (name, alias or path)")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking")] = False,
) -> None:
    """Delete a model's files from the Hugging Face cache (or a quantized output); prints what it freed."""

    def body():
        from .store.manage import IncompleteDownload, find_removable, remove

        target = find_removable(model)
        what = (f"{target.name} (incomplete download, {target.path})" if isinstance(target, IncompleteDownload)
                else f"{target.name} ({format_size(target.size_bytes)}, {target.path})")
        if not yes:
            if not _stdin_is_terminal():
                raise UsageError(f"rm asks before deleting {target.name}; pass --yes to remove it without asking")
            if not typer.confirm(f"Remove {what}?", default=False, err=True):
                _err(f"kept {target.name}")
                return
        freed = remove(model)
        print(f"removed {target.name}: {format_size(freed)} freed")

    _guard(body)


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


if __name__ == "__main__":  # pragma: no cover
    app()
