"""Routes that describe the server rather than generate: GET /health (never needs the key),
GET /metrics (Prometheus) and GET /v1/models[/{id}] (the model card, with what `localsgl run`
needs to use this server instead of loading the model itself)."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from . import schemas as S
from .errors import INVALID_REQUEST, APIError
from .openapi import ERROR_RESPONSES
from .state import ServerState


def _model_details(engine, state: ServerState) -> dict:
    """The model card's ``localsgl`` field: what `localsgl run` needs to use this server
    instead of loading the model itself (localsgl/client.py): every name the model goes by,
    its file or directory, whether prompts go through a chat template, and the max_tokens
    an engine request that leaves it unset gets."""
    source = getattr(engine, "source", None)
    names = set(state.model_names)
    try:
        from localsgl.store.resolve import alias_of

        alias = alias_of(source) if source is not None else None
    except Exception:  # noqa: BLE001 - a source without the fields alias_of reads
        alias = None
    if alias:
        names.add(alias)
    path = getattr(source, "path", None)
    defaults = getattr(state, "sampling_defaults", None) or {}
    max_tokens = defaults.get("max_tokens", (None, ""))[0]
    return {
        "names": sorted(names),
        "path": str(path) if path else None,
        "chat_template": bool(getattr(getattr(engine, "tokenizer", None), "chat_template", None)),
        "max_tokens": max_tokens if isinstance(max_tokens, int) else None,
    }


def add_info_routes(app: FastAPI, state: ServerState, engine) -> None:
    @app.get("/health", response_model=S.HealthResponse, tags=["server"])
    async def health():
        if state.shutting_down:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        if not getattr(engine, "alive", True):  # its core process is gone
            return JSONResponse({"status": "engine_dead"}, status_code=503)
        return {"status": "ok"}

    auth_responses = {401: ERROR_RESPONSES[401]}

    @app.get("/metrics", tags=["server"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"},
                        **auth_responses})
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    details = _model_details(engine, state)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "localsgl",
                "root": str(getattr(engine, "model_name", state.model_name)), "max_model_len": state.max_model_len,
                "localsgl": details}

    @app.get("/v1/models", response_model=S.ModelList, tags=["openai"], responses=auth_responses)
    async def list_models():
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}", response_model=S.ModelCard, tags=["openai"],
             responses={404: {"model": S.ErrorResponse}, **auth_responses})
    async def get_model(model_id: str):
        if model_id not in state.model_names:
            raise APIError(404, f"The model `{model_id}` does not exist.", INVALID_REQUEST, "model",
                           "model_not_found")
        return JSONResponse(model_card())
