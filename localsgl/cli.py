"""The `localsgl` command line: one small function per command, no engine logic.

stdout carries only answers (or --json output); logs, progress and errors go to stderr.
Exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted (engine shut down first).
Set LOCALSGL_DEBUG=1 for tracebacks.

The commands live in cli_run (run, chat), cli_info (info) and cli_store (pull, list, show,
quantize, rm); helpers they share are in cli_common.  This module holds the typer app, the
global options, the thin serve and bench hand-offs, and registers every command in --help order.
"""
import importlib
import sys
from typing import Annotated, Optional

import typer

from .cli_common import InProcessOption, _engine_mode, _guard, _setup_logging, engine_options
from .cli_info import info
from .cli_run import chat, run
from .cli_store import list_models_command, pull, quantize, rm, show
from .config import resolve_engine_kwargs, resolve_settings

app = typer.Typer(
    name="localsgl",
    help="Run LLMs locally with an SGLang-class engine inside.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


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
    _crash_traceback()


def _crash_traceback() -> None:
    """A crash inside a native kernel (SIGSEGV, SIGABRT) prints where Python was to stderr, as
    something to report, instead of ending the process without a word."""
    import faulthandler

    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable(file=sys.stderr, all_threads=False)
    except (AttributeError, ValueError, OSError, RuntimeError):  # a stderr without a file descriptor
        pass


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


@engine_options
def bench(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help="latency | throughput | prefix | serving (further options go to the "
                                            "benchmark)")],
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    *,
    flags: dict,
) -> None:
    """Time the engine on this machine: latency, throughput, prefix reuse, or serving over HTTP.

    `localsgl bench KIND -- --help` lists a benchmark's own options.
    """

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


# ----------------------------------------------------------------------------- the commands, in --help order

app.command()(run)
app.command()(chat)
app.command()(info)
app.command()(serve)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(bench)
app.command()(pull)
app.command("list")(list_models_command)
app.command()(show)
app.command()(quantize)
app.command()(rm)


if __name__ == "__main__":  # pragma: no cover
    app()
