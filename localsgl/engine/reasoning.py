"""Reasoning kept apart: models that think in ``<think>…</think>`` before they answer.

``reasoning_tags(tokenizer)`` tells whether a model reasons that way (its vocabulary holds
both tags as single tokens: Qwen3, QwQ, DeepSeek-R1 distills).  ``ReasoningParser`` splits
the streamed text of such a model into reasoning and answer; the HTTP server returns the
first as ``reasoning_content``.  A grammar constrains only the answer (grammar.py wraps it
so the reasoning comes first, free).  A chat template that already opened the reasoning in
the prompt (``…<think>\\n``) makes the output start inside it: ``starts_inside``.
"""
from __future__ import annotations

THINK_TAGS = ("<think>", "</think>")


def reasoning_tags(tokenizer) -> tuple[str, str] | None:
    """The model's reasoning tags, or None when it does not reason in tags."""
    if tokenizer is None:
        return None
    try:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in THINK_TAGS]
    except Exception:  # noqa: BLE001 - a tokenizer without the lookup: no tags
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if all(isinstance(i, int) and i >= 0 and i != unk for i in ids):
        return THINK_TAGS
    return None


def starts_inside(prompt_text: str, tags: tuple[str, str] = THINK_TAGS) -> bool:
    """Whether a prompt ends inside an open reasoning block (the output continues it)."""
    open_tag, close_tag = tags
    return prompt_text.rfind(open_tag) > prompt_text.rfind(close_tag)


class ReasoningParser:
    """Streamed text in, (reasoning, answer) pieces out.

    The output may open with ``open_tag`` (leading whitespace allowed); everything up to
    ``close_tag`` is reasoning, the rest the answer.  Text that could still turn into a tag
    is held back until the next piece decides it, so the split does not depend on how the
    text was cut into pieces.  Whitespace right after a tag and at the end of the reasoning
    is dropped.  An output that never opens the block is all answer; one that never closes
    it, all reasoning."""

    def __init__(self, tags: tuple[str, str] = THINK_TAGS, inside: bool = False):
        self.open_tag, self.close_tag = tags
        self.state = "reasoning" if inside else "start"
        self.held = ""
        self._skip_space = inside  # at the start of a reasoning or an answer

    def feed(self, text: str) -> tuple[str, str]:
        reasoning = answer = ""
        buf = self.held + text
        self.held = ""
        while buf:
            if self.state == "start":
                stripped = buf.lstrip()
                if stripped.startswith(self.open_tag):
                    buf = stripped[len(self.open_tag):]
                    self.state, self._skip_space = "reasoning", True
                    continue
                if not stripped or self.open_tag.startswith(stripped):
                    self.held = buf  # still undecided
                    break
                self.state = "answer"
                continue
            if self.state == "reasoning":
                if self._skip_space:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    self._skip_space = False
                i = buf.find(self.close_tag)
                if i >= 0:
                    reasoning += buf[:i].rstrip()
                    buf = buf[i + len(self.close_tag):]
                    self.state, self._skip_space = "answer", True
                    continue
                keep = _partial_suffix(buf, self.close_tag)
                body, tail = buf[:len(buf) - keep], buf[len(buf) - keep:]
                core = body.rstrip()
                reasoning += core
                self.held = body[len(core):] + tail  # trailing space waits: it may end the reasoning
                break
            # answer
            if self._skip_space:
                buf = buf.lstrip()
                if not buf:
                    break
                self._skip_space = False
            answer += buf
            break
        return reasoning, answer

    def flush(self) -> tuple[str, str]:
        """What is still held back, at the end of the output."""
        held, self.held = self.held, ""
        if self.state == "reasoning":
            return held.rstrip(), ""
        if self.state == "start":
            return "", held
        return "", held


def split_reasoning(text: str, tags: tuple[str, str] = THINK_TAGS, inside: bool = False) -> tuple[str, str]:
    """A whole output's (reasoning, answer)."""
    p = ReasoningParser(tags, inside)
    r1, a1 = p.feed(text)
    r2, a2 = p.flush()
    return r1 + r2, a1 + a2


def _partial_suffix(buf: str, tag: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(buf)), 0, -1):
        if tag.startswith(buf[-n:]):
            return n
    return 0
