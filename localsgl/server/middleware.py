"""ASGI middlewares of the app: the bearer-token check and the error counter of /metrics."""
from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import INVALID_REQUEST, error_body
from .metrics import ServerMetrics

OPEN_PATHS = frozenset({"/health"})


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
