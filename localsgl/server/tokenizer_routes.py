"""POST /v1/tokenize and POST /v1/detokenize: the model's tokenizer over HTTP (a prompt, or
messages through the chat template, to ids; ids back to text)."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from . import schemas as S
from .errors import bad_request
from .openapi import ERROR_RESPONSES, body_spec
from .request_parsing import parse_model, read_json, unsupported
from .route_helpers import RouteHelpers


def add_tokenizer_routes(app: FastAPI, helpers: RouteHelpers) -> None:
    state = helpers.state

    @app.post("/v1/tokenize", tags=["tokenizer"], openapi_extra=body_spec(S.TokenizeRequest),
              responses={200: {"model": S.TokenizeResponse, "description": "Token ids"}, **ERROR_RESPONSES})
    async def tokenize(request: Request):
        req = parse_model(S.TokenizeRequest, await read_json(request, state.max_body_bytes))
        helpers.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Give exactly one of 'prompt' or 'messages'.", "prompt", "invalid_value")
        if req.prompt is not None:
            ids = await helpers.encode(req.prompt, "prompt")
        else:
            msgs = []
            for i, m in enumerate(req.messages):
                if m.content is not None and not isinstance(m.content, str):
                    if any(part.type != "text" for part in m.content):
                        raise unsupported(f"messages[{i}].content", "Non-text content")
                    content = "\n".join(part.text for part in m.content)
                else:
                    content = m.content or ""
                msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content})
            if not msgs:
                raise bad_request("'messages' must not be empty.", "messages", "invalid_value")
            ids = await helpers.encode(msgs, "messages")
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len})

    @app.post("/v1/detokenize", tags=["tokenizer"], openapi_extra=body_spec(S.DetokenizeRequest),
              responses={200: {"model": S.DetokenizeResponse, "description": "Text"}, **ERROR_RESPONSES})
    async def detokenize(request: Request):
        req = parse_model(S.DetokenizeRequest, await read_json(request, state.max_body_bytes))
        helpers.check_model(req.model)
        helpers.check_ids(req.tokens, "tokens")
        return JSONResponse({"prompt": await helpers.decode(req.tokens)})
