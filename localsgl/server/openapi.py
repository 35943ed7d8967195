"""The app's OpenAPI document: the error responses every route may give, request bodies
documented by their pydantic models (the routes read the raw body themselves, see
request_parsing.py), the model names the server answers to and the bearer scheme."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from . import schemas as S
from .state import ServerState

ERROR_RESPONSES = {
    400: {"model": S.ErrorResponse, "description": "Invalid request"},
    401: {"model": S.ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": S.ErrorResponse, "description": "Unknown model"},
    413: {"model": S.ErrorResponse, "description": "Body larger than --max-body-bytes"},
    503: {"model": S.ErrorResponse, "description": "Queue full (see Retry-After) or shutting down"},
}


def body_spec(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def install_openapi(app: FastAPI, state: ServerState) -> None:
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
