"""What every `localsgl` command shares: exit codes, stderr/colour helpers, the error guard
and the engine flags.  A module of its own so the command modules (cli_run, cli_info,
cli_store) and cli.py can all import it without importing each other.
"""
import functools
import inspect
import logging
import os
import sys
from enum import IntEnum
from typing import Annotated, Any, Callable, Optional

import typer

from .config import DEFAULT_MODEL, ConfigError, debug_enabled


class ExitCode(IntEnum):
    OK = 0
    RUNTIME = 1
    USAGE = 2
    INTERRUPTED = 130


class UsageError(Exception):
    """A mistake in how the command was called (exit 2)."""


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


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
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
        ("localsgl.store.gguf_file", "GGUFError"),
        ("localsgl_kernels.quant_tiles", "TunedTilesError"),
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
        typer.Option("--model", "-m", help="Alias, a name from `localsgl quantize`, local HF directory, .gguf file or hub repo id", show_default=DEFAULT_MODEL, rich_help_panel=_P),
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
    "tp": Annotated[Optional[int], typer.Option("--tp", help="Tensor-parallel GPUs (only 1 today)", rich_help_panel=_P)],
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
