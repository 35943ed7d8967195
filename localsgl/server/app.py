"""`localsgl serve`: an OpenAI-compatible HTTP server around one in-process Engine.

``create_app(engine, ...)`` builds the FastAPI app (shared engine, never blocking the
event loop on it); ``serve(engine_kwargs, ...)`` builds the Engine, runs uvicorn on
127.0.0.1 by default, prints one startup line to stderr and shuts down gracefully on
SIGTERM/SIGINT (stop accepting, let in-flight requests finish for
``shutdown_timeout`` seconds, abort the rest, exit 0).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}],
GET /health (never needs the key), GET /metrics, POST /v1/tokenize, POST /v1/detokenize.
Every error is ``{"error": {"message", "type", "param", "code"}}`` (see errors.py).

This module assembles the app; the pieces live beside it: state.py (ServerState),
middleware.py (API key, error counts), request_parsing.py (reading the JSON body),
route_helpers.py (what the routes share), info_routes.py (health, metrics, models),
generation_routes.py (chat and text completions), tokenizer_routes.py, logprobs.py and
openapi.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .errors import install_error_handlers
from .generation_routes import add_generation_routes
from .info_routes import add_info_routes
from .middleware import AuthMiddleware, ErrorCountMiddleware
from .openapi import install_openapi
from .route_helpers import RouteHelpers
from .state import ServerState
from .tokenizer_routes import add_tokenizer_routes

log = logging.getLogger("localsgl.server")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_QUEUE = 1024


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

    helpers = RouteHelpers(state, engine)
    add_info_routes(app, state, engine)
    add_generation_routes(app, helpers)
    add_tokenizer_routes(app, helpers)
    install_openapi(app, state)
    return app


# =========================================================================== serve
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
