"""Logprobs in the response shapes of OpenAI's two APIs: chat (``content`` entries with
bytes and ``top_logprobs`` lists) and completions (parallel lists with text offsets)."""
from __future__ import annotations

import math

from localsgl.engine.params import TokenLogprob

LOGPROB_FLOOR = -9999.0  # what OpenAI reports for "impossible" tokens; JSON has no -inf


def _finite(x: float) -> float:
    x = float(x)
    return x if math.isfinite(x) and x > LOGPROB_FLOOR else LOGPROB_FLOOR


def _chat_lp(t: TokenLogprob) -> dict:
    return {
        "token": t.token,
        "logprob": _finite(t.logprob),
        "bytes": list(t.token.encode("utf-8", "replace")),
        "top_logprobs": [{"token": x.token, "logprob": _finite(x.logprob), "bytes": list(x.token.encode("utf-8", "replace"))}
                         for x in (t.top or [])],
    }


def _completion_lp(lps: list[TokenLogprob], start_offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    off = start_offset
    for t in lps:
        tokens.append(t.token)
        token_lps.append(_finite(t.logprob))
        tops.append({x.token: _finite(x.logprob) for x in (t.top or [])})
        offsets.append(off)
        off += len(t.token)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
