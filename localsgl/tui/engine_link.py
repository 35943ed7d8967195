"""The chat's handle on its in-process Engine: loading and switching models (blocking, so
the app calls them from worker threads), streaming one answer, and the figures the
status bar shows. No Textual here.

The engine runs its own thread; ``astream`` hands its deltas to the caller's event loop,
and cancelling the consumer aborts the request, so the scheduler frees its KV slots."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

@dataclass
class TurnStats:
    """One answer's figures, from the engine's per-request metrics."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float | None = None
    total_time: float | None = None
    finish_reason: str | None = None

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first over the time after the first."""
        if self.total_time is None or self.time_to_first_token is None or self.completion_tokens < 2:
            return None
        decode = self.total_time - self.time_to_first_token
        return (self.completion_tokens - 1) / decode if decode > 0 else None

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cache_hit(self) -> float | None:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else None


def device_label(engine) -> str:
    info = getattr(engine, "device_info", None)
    dev = getattr(engine, "device", None)
    kind = getattr(dev, "type", None) or (str(dev) if dev is not None else "")
    name = getattr(info, "name", None)
    if kind == "cuda" and name:
        return str(name).replace("NVIDIA ", "")
    return kind or "-"


class EngineLink:
    """Owns (or borrows) the engine. ``factory(model=..., **flags)`` builds one; ``engine``
    passes a ready one (then ``own`` says whether shutdown() stops it)."""

    def __init__(self, engine_kwargs: dict | None = None, *, engine=None, factory: Callable[..., Any] | None = None,
                 own: bool | None = None, sampling: dict | None = None):
        self.engine_kwargs = dict(engine_kwargs or {})
        self.engine = engine
        self.factory = factory
        self.own = (engine is None) if own is None else own
        self.sampling: dict[str, Any] = {k: v for k, v in (sampling or {}).items() if v is not None}
        self.load_seconds: float | None = None

    # ------------------------------------------------------------------ loading
    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def model_spec(self) -> str:
        return self.engine_kwargs.get("model") or getattr(self.engine, "model_name", None) or "-"

    def _build(self, kwargs: dict):
        if self.factory is not None:
            return self.factory(**kwargs)
        from ..engine.api import Engine

        return Engine(**kwargs)

    def load(self) -> None:
        """Build the engine if there is none (blocking: call from a worker thread)."""
        if self.engine is None:
            t0 = time.perf_counter()
            self.engine = self._build(self.engine_kwargs)
            self.own = True
            self.load_seconds = time.perf_counter() - t0

    def switch(self, model: str) -> None:
        """Replace the engine by one of ``model`` with the same flags (blocking). The old
        engine goes first, so two models never share the device; if the new one fails to
        load, the old model is loaded again and the error re-raised."""
        old_kwargs = dict(self.engine_kwargs)
        self.shutdown()
        self.engine_kwargs["model"] = model
        try:
            self.load()
        except BaseException:
            self.engine_kwargs = old_kwargs
            try:
                self.load()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                self.engine = None
            raise

    def shutdown(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None and self.own:
            engine.shutdown()

    # ------------------------------------------------------------------ facts
    @property
    def model_name(self) -> str:
        return str(getattr(self.engine, "model_name", None) or self.model_spec)

    @property
    def device(self) -> str:
        return device_label(self.engine) if self.engine is not None else "-"

    @property
    def max_model_len(self) -> int | None:
        return getattr(self.engine, "max_model_len", None)

    def stats(self) -> dict:
        """The engine's KV and cache counters (a cheap read of the engine thread's state)."""
        if self.engine is None:
            return {}
        try:
            return dict(self.engine.stats())
        except Exception:  # noqa: BLE001 - a status figure is never worth a crash
            return {}

    def sampling_value(self, name: str):
        """The value a sampling field has for the next answer, and whether the user set it."""
        if name in self.sampling:
            return self.sampling[name], True
        defaults = getattr(self.engine, "sampling_defaults", None) or {}
        value = defaults.get(name, (None, ""))[0] if isinstance(defaults, dict) else None
        return value, False

    def params(self):
        from ..engine.params import SamplingParams

        p = SamplingParams(**self.sampling)
        p.validate()
        return p

    # ------------------------------------------------------------------ answering
    async def astream(self, messages: list[dict]) -> AsyncIterator:
        """The answer to ``messages`` as StreamDeltas; closing or cancelling the iteration
        aborts the request."""
        if self.engine is None:
            raise RuntimeError("no model is loaded")
        stream = self.engine.astream(messages, self.params())
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()


def turn_stats(metrics, finish_reason: str | None, completion_fallback: int, elapsed: float | None,
               first_token_after: float | None) -> TurnStats:
    """TurnStats from a final delta's metrics; the caller's own timings fill what the
    engine did not report (an aborted request may carry none)."""
    m = metrics
    return TurnStats(
        prompt_tokens=getattr(m, "prompt_tokens", 0) or 0,
        cached_prompt_tokens=getattr(m, "cached_prompt_tokens", 0) or 0,
        completion_tokens=getattr(m, "completion_tokens", 0) or completion_fallback,
        time_to_first_token=getattr(m, "time_to_first_token", None) if m is not None else first_token_after,
        total_time=(getattr(m, "total_time", None) if m is not None else None) or elapsed,
        finish_reason=finish_reason,
    )
