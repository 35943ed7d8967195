"""What a caller sees of a choice's tokens: incremental text, stop strings, logprob strings.

One implementation for both engine modes.  With the core in this process (``in_process``)
the core calls it on its own thread as each token resolves; with the core in a child
process the front end (core_client) calls it on the ids each step message brings, so the
core's step loop does no per-token text work.
"""
from __future__ import annotations

from .params import SamplingParams, TokenLogprob, TopLogprob


class ChoiceText:
    """One choice's detokenizer and stop-string matcher.

    ``token`` turns the next output id into the text to show; the core decides the finishes
    it can see without text (stop ids, EOS, max_tokens, the grammar), a stop string is seen
    here and wins over them."""

    __slots__ = ("detok", "stop_matcher", "matched_stop")

    def __init__(self, tokenizer, prompt_ids: list[int], params: SamplingParams):
        self.detok = None
        self.stop_matcher = None
        self.matched_stop: str | None = None
        if tokenizer is not None:
            from .detokenizer import IncrementalDetokenizer

            self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens)
        if params.stop:
            from .stop import StopStringMatcher

            self.stop_matcher = StopStringMatcher(params.stop)

    def token(self, tok: int, finish: str | None, hides_text: bool) -> tuple[str, bool]:
        """(text to show for ``tok``, whether a stop string ends the output here).

        ``finish``: the core's finish reason for this token (None while the output goes on);
        with one, the held-back text is flushed.  ``hides_text``: the token is a stop id or
        EOS, whose text is never shown."""
        text = ""
        if self.detok is not None and not hides_text:
            text = self.detok.add([tok])
        if self.stop_matcher is not None and text:
            text, matched = self.stop_matcher.feed(text)
            if matched is not None:
                self.matched_stop = matched
                return text, True
        if finish is not None:
            text += self.flush()
        return text, False

    def flush(self) -> str:
        """The text held back (an incomplete character, a possible stop-string start), at the end."""
        tail = self.detok.flush() if self.detok is not None else ""
        if self.stop_matcher is not None:
            if tail:
                t, matched = self.stop_matcher.feed(tail)
                if matched is not None:
                    self.matched_stop = matched
                    return t
                tail = t
            tail += self.stop_matcher.flush()
        return tail


def token_str(tokenizer, tok: int) -> str:
    if tokenizer is None:
        return ""
    return tokenizer.decode([tok], skip_special_tokens=False)


def make_logprob(tokenizer, tok: int, lp: float, top) -> TokenLogprob:
    """A sampled token's logprob with its text; ``top``: (id, logprob) pairs or None."""
    return TokenLogprob(
        token_id=tok,
        token=token_str(tokenizer, tok),
        logprob=float(lp),
        top=[TopLogprob(int(t), token_str(tokenizer, int(t)), float(v)) for t, v in (top or [])],
    )
