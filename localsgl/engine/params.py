"""Public value types of the engine API: SamplingParams in, GenerateOutput out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class InvalidRequestError(ValueError):
    """Bad user input (sampling values, prompt too long, ...): a usage error, never a crash."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    def __init__(self, prompt_tokens: int, max_model_len: int):
        super().__init__(
            f"prompt is {prompt_tokens} tokens but the context holds {max_model_len} "
            f"(leave room for at least one generated token)",
            param="prompt",
        )
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len


class _UnsetFloat(float):
    """A float field the caller left to the model's defaults.

    It reads as the field's neutral value (no filter, temperature 1) so that code below the
    Engine (the core, the sampler, their tests) works on plain numbers; the Engine replaces
    it with the model's default before a request is queued (engine/sampling_defaults.py)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"unset({float.__repr__(self)})"


class _UnsetInt(int):
    """An int field the caller left to the model's defaults (see _UnsetFloat)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"unset({int.__repr__(self)})"


def is_unset(value) -> bool:
    """Whether a SamplingParams value is a model-default placeholder rather than a caller's value."""
    return isinstance(value, (_UnsetFloat, _UnsetInt))


# Fields that take the model's defaults when the caller leaves them unset, with the neutral
# value each reads as until then.
MODEL_DEFAULT_FIELDS: dict[str, float | int] = {
    "max_tokens": 256,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}


def _unset(field_name: str):
    v = MODEL_DEFAULT_FIELDS[field_name]
    return _UnsetFloat(v) if isinstance(v, float) else _UnsetInt(v)


@dataclass
class SamplingParams:
    """What to generate and how.  Fields in MODEL_DEFAULT_FIELDS that the caller does not set
    are placeholders (``is_unset``) that the Engine fills from the model's own defaults
    (``Engine.sampling_defaults``: its generation_config.json, its alias's recommended
    values, else llama.cpp's); a value the caller sets, even one equal to a default, wins."""

    max_tokens: int | None = _unset("max_tokens")  # None: up to the context length
    min_tokens: int = 0
    temperature: float = _unset("temperature")  # 0 = greedy
    top_p: float = _unset("top_p")
    top_k: int = _unset("top_k")  # -1 or 0 = off
    min_p: float = _unset("min_p")
    repetition_penalty: float = _unset("repetition_penalty")
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    json_schema: str | dict | None = None
    regex: str | None = None
    grammar: str | None = None  # Lark or GBNF (llguidance)
    json_whitespace: str = "compact"  # between JSON tokens under json_schema: "compact" | "pretty"
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    def validate(self) -> None:
        def bad(msg, param):
            raise InvalidRequestError(msg, param)

        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if self.min_tokens < 0:
            bad(f"min_tokens must be >= 0, got {self.min_tokens}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens must not exceed max_tokens", "min_tokens")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            bad(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            bad(f"top_k must be -1 (off) or >= 0, got {self.top_k}", "top_k")
        if not (0.0 <= self.min_p <= 1.0):
            bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not (self.repetition_penalty > 0.0):
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}", "frequency_penalty")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}", "presence_penalty")
        if not (1 <= self.n <= 128):
            bad(f"n must be in [1, 128], got {self.n}", "n")
        if not (0 <= self.top_logprobs <= 20):
            bad(f"top_logprobs must be in [0, 20], got {self.top_logprobs}", "top_logprobs")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings", "stop")
        if len(self.stop) > 16:
            bad("at most 16 stop strings", "stop")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            bad("seed must be a non-negative 64-bit integer", "seed")
        if sum(x is not None for x in (self.json_schema, self.regex, self.grammar)) > 1:
            bad("give at most one of json_schema, regex, grammar", "json_schema")
        if self.json_whitespace not in ("compact", "pretty"):
            bad(f"json_whitespace must be compact or pretty, got {self.json_whitespace!r}", "json_whitespace")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def unset_fields(self) -> list[str]:
        """The fields still waiting for the model's defaults."""
        return [f for f in MODEL_DEFAULT_FIELDS if is_unset(getattr(self, f))]


@dataclass
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class RequestMetrics:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float | None = None  # seconds from submit
    total_time: float | None = None  # seconds from submit to finish
    retractions: int = 0


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | ...
    logprobs: list[TokenLogprob] | None = None
    matched_stop: str | int | None = None
    error: str | None = None  # why, when finish_reason is "error" (or a grammar refused)


@dataclass
class GenerateOutput:
    """Choice 0's fields at the top level; every choice (n of them) in ``choices``."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None
    metrics: RequestMetrics
    choices: list[Choice]
    prompt_token_ids: list[int] = field(default_factory=list)
    request_id: str = ""
    error: str | None = None  # choice 0's error message, if it failed


@dataclass
class StreamDelta:
    """One increment of a streamed request: new text and the token ids that made it.

    ``finish_reason`` is set on the last delta of a choice; ``metrics`` on it too."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    metrics: RequestMetrics | None = None
    extra: dict[str, Any] = field(default_factory=dict)
