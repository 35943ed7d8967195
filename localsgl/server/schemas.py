"""Pydantic models of the OpenAI HTTP API subset localsgl serves.

Request models are strict (``"5"`` is not an int, ``true`` is not a number) and
forbid unknown fields: like OpenAI, an argument we do not recognise is a 400
("Unrecognized request argument supplied: X"), never silently dropped.  Known
OpenAI fields that only carry metadata (``user``, ``store``, ``metadata``,
``service_tier``) are accepted and ignored; known fields whose effect we cannot
honour (``logit_bias``, ``audio``, image content, ``suffix``, ``best_of != n``)
are rejected with a 400 naming the field.  ``tools``, ``tool_choice`` and
``parallel_tool_calls`` are checked by the handler (server/tool_calls.py).

Response models document the wire shape; handlers build plain dicts of exactly
that shape (cheaper while streaming) and tests validate them against these.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 128
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16
MAX_SEED = 2**63 - 1


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Resp(BaseModel):
    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------- requests
class StreamOptions(_Req):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class TextContentPart(_Req):
    type: Literal["text"]
    text: str


class ImageURL(_Req):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageContentPart(_Req):
    """Accepted by the schema so the 400 can say why: no vision models here."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextContentPart, ImageContentPart], Field(discriminator="type")]


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None
    refusal: str | None = None


class JSONSchemaFormat(_Req):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormatText(_Req):
    type: Literal["text"]


class ResponseFormatJSONObject(_Req):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(_Req):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    Union[ResponseFormatText, ResponseFormatJSONObject, ResponseFormatJSONSchema], Field(discriminator="type")
]

Stop = Union[str, Annotated[list[str], Field(max_length=MAX_STOP)], None]


class _SamplingFields(_Req):
    """Fields shared by chat and text completions (OpenAI's plus common extensions).

    An omitted temperature, top_p, top_k, min_p or repetition_penalty takes the served
    model's default (its generation_config.json, else its alias's recommended values, else
    llama.cpp's); `localsgl info` lists them."""

    model: str
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    user: str | None = None
    # extensions (vLLM / SGLang spelling)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    skip_special_tokens: bool | None = None
    regex: str | None = None
    grammar: str | None = None  # Lark or GBNF
    json_whitespace: Literal["compact", "pretty"] | None = None  # JSON output's whitespace (default compact)
    response_format: ResponseFormat | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # OpenAI fields accepted for compatibility
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    modalities: list[Literal["text"]] | None = None
    audio: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    # extension (vLLM / SGLang spelling): extra variables for the chat template, e.g. enable_thinking
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: Union[
        str,
        Annotated[list[int], Field(min_length=1)],
        Annotated[list[str], Field(min_length=1)],
        Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)],
    ]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _not_empty(cls, value):
        """An empty list (or an empty token list inside one) is an empty prompt, not a type error
        of the union's first branch."""
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("The prompt is empty.")
        return value


class TokenizeRequest(_Req):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(_Req):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# --------------------------------------------------------------------------- responses
class ErrorDetail(_Resp):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Resp):
    error: ErrorDetail


class PromptTokensDetails(_Resp):
    cached_tokens: int = 0


class UsageInfo(_Resp):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprobEntry(_Resp):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(_Resp):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprobEntry]


class ChatChoiceLogprobs(_Resp):
    content: list[ChatTokenLogprob] | None = None


class ToolCallFunction(_Resp):
    name: str
    arguments: str  # JSON text


class ToolCall(_Resp):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class ChatResponseMessage(_Resp):
    role: Literal["assistant"]
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None  # a reasoning model's thinking, apart from content


class ToolCallDelta(_Resp):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunction | None = None


class ChatChoice(_Resp):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Resp):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class ChatDelta(_Resp):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = None


class ChatChunkChoice(_Resp):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Resp):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(_Resp):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Resp):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Resp):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(_Resp):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = None
    max_model_len: int | None = None
    # names, path, chat_template, max_tokens: how `localsgl run` tells that this server runs its model
    localsgl: dict[str, Any] | None = None


class ModelList(_Resp):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Resp):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Resp):
    prompt: str


class HealthResponse(_Resp):
    status: str


REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest)
