"""Stop strings over streamed text.

``feed`` takes each new piece of detokenized text and returns the part that is safe to show
now.  Text that could still turn into a stop string (a suffix of what we have that is a proper
prefix of some stop) is held back until the next piece decides it.  The first stop to COMPLETE
wins (smallest end position; among stops ending at the same place, the longest, i.e. the one
starting earliest), so the result does not depend on how the text was split into pieces.
The emitted text ends right before the stop string (the stop itself is not included, as in the
OpenAI API); after a match every later feed returns ``("", None)``.
"""
from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]  # unique, non-empty, order kept
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.held = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, new_text: str) -> tuple[str, str | None]:
        if self.matched is not None:
            return "", None
        if not self.stops:
            return new_text, None
        buf = self.held + new_text
        best_end = best_start = -1
        best = None
        for s in self.stops:
            i = buf.find(s)
            if i < 0:
                continue
            end = i + len(s)
            if best is None or end < best_end or (end == best_end and i < best_start):
                best, best_end, best_start = s, end, i
        if best is not None:
            self.matched = best
            self.held = ""
            return buf[:best_start], best
        keep = self._partial_suffix_len(buf)
        if keep:
            self.held = buf[-keep:]
            return buf[:-keep], None
        self.held = ""
        return buf, None

    def flush(self) -> str:
        """Release held text when generation ended for another reason."""
        out, self.held = self.held, ""
        return "" if self.matched is not None else out

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop."""
        start = max(0, len(buf) - (self.max_len - 1))
        for i in range(start, len(buf)):  # earliest start = longest suffix
            tail = buf[i:]
            for s in self.stops:
                if len(s) > len(tail) and s.startswith(tail):
                    return len(buf) - i
        return 0
