"""OpenAI-style errors: every failure leaves the server as
``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.

``APIError`` is raised anywhere in a handler; ``install_error_handlers`` turns it,
FastAPI's own HTTP errors and anything unexpected into that body, so no route
ever answers with FastAPI's default ``{"detail": ...}`` shape.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("localsgl.server")

# OpenAI's error "type" values
INVALID_REQUEST = "invalid_request_error"  # 4xx, auth and unknown routes included (as OpenAI)
SERVER_ERROR = "server_error"  # 5xx: engine failure, overload, shutting down


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.message, err.type, err.param, err.code), status_code=err.status, headers=err.headers
    )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def _loc_to_param(loc: tuple | list) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    # drop pydantic's union-branch tags ("str", "list[...]", "function-after[...]")
    out: list[str] = []
    for p in parts:
        if "[" in p or p in ("str", "int", "float", "bool", "list", "dict", "none") or p.startswith("function-"):
            continue
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}[{p}]"
        else:
            out.append(p)
    return ".".join(out) or None


def validation_error_to_api_error(errors: list[dict[str, Any]]) -> APIError:
    """The first pydantic error, phrased the way OpenAI phrases them."""
    if not errors:
        return bad_request("invalid request body")
    # an unknown field wins: OpenAI reports those before anything else
    for e in errors:
        if e.get("type") == "extra_forbidden":
            name = _loc_to_param(e.get("loc", ())) or "?"
            return bad_request(f"Unrecognized request argument supplied: {name}", name, "unrecognized_argument")
    e = errors[0]
    param = _loc_to_param(e.get("loc", ()))
    kind = e.get("type", "")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    msg = e.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = e.get("input")
    if kind.endswith("_type") or kind in ("is_instance_of", "model_type", "union_tag_invalid", "literal_error"):
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return bad_request(f"Invalid type for '{param}': {msg} (got {shown}).", param, "invalid_type")
    return bad_request(f"Invalid value for '{param}': {msg}", param, "invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(validation_error_to_api_error(list(exc.errors())))

    @app.exception_handler(ValidationError)
    async def _pyd_validation(request: Request, exc: ValidationError):
        return error_response(validation_error_to_api_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        if status == 404:
            err = APIError(404, f"Invalid URL ({request.method} {request.url.path})", INVALID_REQUEST, None,
                           "not_found")
        elif status == 405:
            err = APIError(405, f"Method {request.method} not allowed on {request.url.path}", INVALID_REQUEST,
                           None, "method_not_allowed")
        else:
            err = APIError(status, str(exc.detail), INVALID_REQUEST if status < 500 else SERVER_ERROR)
        err.headers = dict(exc.headers) if getattr(exc, "headers", None) else None
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", SERVER_ERROR, None,
                                       "internal_error"))
