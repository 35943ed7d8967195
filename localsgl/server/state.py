"""What one app's route handlers share: the engine, the limits taken from the command line,
the model's names and sampling defaults, metrics, the worker pool and the in-flight requests
(``app.state.localsgl``; ``serve`` reads it to shut down gracefully)."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from localsgl.engine.sampling_defaults import BUILTIN_DEFAULTS, GENERATION_CONFIG

from .metrics import ServerMetrics
from .streaming import Generation


def _fingerprint() -> str:
    try:
        from localsgl import __version__
    except Exception:  # pragma: no cover
        __version__ = "0"
    return f"localsgl-{__version__}"


class ServerState:
    def __init__(self, engine, *, api_key, max_body_bytes, max_queue, served_model_name):
        self.engine = engine
        self.api_key = api_key
        self.max_body_bytes = int(max_body_bytes)
        self.max_queue = int(max_queue)
        engine_name = str(getattr(engine, "model_name", None) or "model")
        self.model_name = served_model_name or engine_name
        self.model_names = {self.model_name, engine_name}
        repo = getattr(getattr(engine, "source", None), "repo_id", None)
        if isinstance(repo, str) and repo:
            self.model_names.add(repo)  # clients may name the hub repo instead of the alias
        self.max_model_len = int(engine.max_model_len)
        # why the context stops short of the model's positions (a sliding window), or None
        self.context_limit = getattr(getattr(engine, "plan", None), "context_limit", None)
        self.vocab_size = _vocab_size(engine)
        self.sampling_defaults = getattr(engine, "sampling_defaults", None) or dict(BUILTIN_DEFAULTS)
        # an omitted max_tokens (chat; null in completions) runs to the end of the context, unless
        # the model's generation_config.json sets max_new_tokens (as vLLM does)
        value, source = self.sampling_defaults.get("max_tokens", (None, ""))
        self.default_max_tokens = value if source == GENERATION_CONFIG else self.max_model_len
        self.created = int(time.time())
        self.fingerprint = _fingerprint()
        self.metrics = ServerMetrics(engine, self.model_name)
        self.executor = ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 2) + 4),
                                           thread_name_prefix="localsgl-http")
        self.pending = 0  # admitted requests without a first token yet (bounded by max_queue)
        self.inflight: set[Generation] = set()
        self.shutting_down = False
        self.mailbox = None  # streaming.LoopMailbox of the serving loop, made on first use
        # dummy weights have no tokenizer: stream one (empty-text) chunk per token anyway,
        # so clients and `bench serving` still see when tokens arrive
        self.token_chunks = getattr(engine, "tokenizer", None) is None

    def abort_all(self, reason: str) -> int:
        gens = list(self.inflight)
        for g in gens:
            g.abort(reason)
        return len(gens)


def _vocab_size(engine) -> int | None:
    for obj, attr in ((getattr(engine, "config", None), "vocab_size"), (engine, "vocab_size")):
        v = getattr(obj, attr, None) if obj is not None else None
        if isinstance(v, int) and v > 0:
            return v
    tok = getattr(engine, "tokenizer", None)
    if tok is not None:
        try:
            return len(tok)
        except Exception:
            return None
    return None
