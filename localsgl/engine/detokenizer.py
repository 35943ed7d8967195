"""Incremental detokenization: token ids in, only the NEW text out, never half a character.

Decoding token by token and concatenating is wrong for two reasons: a UTF-8 character can be
split over several byte-level tokens (each alone decodes to U+FFFD), and sentencepiece-style
tokenizers decide a token's leading space from its neighbours.  So each step decodes a short
window ``ids[prefix_offset:]`` and emits the part beyond ``decode(ids[prefix_offset:read_offset])``
(the text of the window's already-emitted tokens); while the window's text ends in U+FFFD the
tail is held back, because the next token may complete the character.

Contract: ``"".join(pieces) + flush() == tokenizer.decode(output_ids, skip_special_tokens=...)``.
The output's text is defined as the decode of the OUTPUT ids alone (OpenAI chat convention), so
the prompt is NOT used as decoding context: with a sentencepiece tokenizer the first output
token's leading space is dropped exactly as ``decode(output_ids)`` drops it.
"""
from __future__ import annotations

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.prompt_len = len(prompt_ids)  # kept for callers' bookkeeping; not decode context
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []  # output ids so far
        self.text = ""  # everything returned so far (add + flush)
        self.prefix_offset = 0  # window start: first token of the last emitted group
        self.read_offset = 0  # tokens before this are emitted
        self._finished = False

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int]) -> str:
        """Append generated ids; return the text that became final (possibly "")."""
        if not token_ids:
            return ""
        ids = self.token_ids
        ids.extend(token_ids)
        prefix_text = self._decode(ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            # Nothing new yet (a special token that decodes to nothing, or an incomplete
            # character): keep the window where it is and wait for more tokens.
            return ""
        if not new_text.startswith(prefix_text):
            # A decoder rewrote already-emitted text given more context (rare: clean-up
            # rules).  Emit nothing now; flush() settles against the full decode.
            return ""
        piece = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(ids)
        self.text += piece
        return piece

    def flush(self) -> str:
        """Text still held back at the end (e.g. an incomplete character: it comes out as the
        same U+FFFD that a full decode shows)."""
        if self._finished:
            return ""
        self._finished = True
        full = self._decode(self.token_ids)
        if full.startswith(self.text):
            rest = full[len(self.text) :]
        else:  # cannot happen with the decoders we know; fall back to the window remainder
            prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
            new_text = self._decode(self.token_ids[self.prefix_offset :])
            rest = new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else ""
        self.read_offset = self.prefix_offset = len(self.token_ids)
        self.text += rest
        return rest

