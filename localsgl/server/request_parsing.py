"""Reading and validating a request body: size limit, UTF-8, strict JSON (no NaN, no lone
surrogates), then the pydantic model of the route; every failure is an OpenAI-style 4xx."""
from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from .errors import INVALID_REQUEST, APIError, bad_request, validation_error_to_api_error


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
