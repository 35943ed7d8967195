"""The status line: model, device, the last answer's speed and time to first token,
context used / max, KV pool use, and how much of the last prompt the prefix cache held."""
from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from .engine_link import TurnStats


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 10 else f"{seconds:.1f}s"


def _count(n: int) -> str:
    return f"{n / 1000:.0f}k" if n >= 100_000 else str(n)


def _speed(tps: float | None) -> str:
    if tps is None:
        return "-"
    return f"{tps:.0f}" if tps >= 100 else f"{tps:.1f}"


def _short_model(name: str) -> str:
    return name.rsplit("/", 1)[-1]


SEP = "  "
MODEL_MIN = 12  # a long model name is cut to no less than this before parts are dropped


class StatusBar(Static):
    """Figures are kept as attributes (model, device, turn, kv_used, kv_total, state) and
    drawn as one line that fits 80 columns; the least useful part goes first when short."""

    def __init__(self, **kw):
        super().__init__("", markup=False, **kw)
        self.model = "-"
        self.device = "-"
        self.turn: TurnStats | None = None
        self.max_model_len: int | None = None
        self.kv_used = 0
        self.kv_total = 0
        self.state = ""  # "loading …", "answering", "" when idle
        self.live_tokens_per_second: float | None = None

    def set_engine(self, model: str, device: str, max_model_len: int | None) -> None:
        self.model, self.device, self.max_model_len = model, device, max_model_len
        self.redraw()

    def set_turn(self, turn: TurnStats | None) -> None:
        self.turn = turn
        self.live_tokens_per_second = None
        self.redraw()

    def set_kv(self, stats: dict) -> None:
        used, total = int(stats.get("kv_slots_used", 0) or 0), int(stats.get("kv_slots_total", 0) or 0)
        if (used, total) != (self.kv_used, self.kv_total):
            self.kv_used, self.kv_total = used, total
            self.redraw()

    def set_state(self, state: str, live_tokens_per_second: float | None = None) -> None:
        self.state = state
        self.live_tokens_per_second = live_tokens_per_second
        self.redraw()

    # ------------------------------------------------------------------ drawing
    def parts(self) -> list[tuple[str, str]]:
        """(label, value) of each part, in order; the model's label is empty."""
        t = self.turn
        out = [("", _short_model(self.model)), ("", self.device)]
        if self.state:
            live = self.live_tokens_per_second
            out.append(("", self.state + (f" {_speed(live)} tok/s" if live else "")))
        elif t is not None:
            out.append(("", f"{_speed(t.tokens_per_second)} tok/s"))
            out.append(("TTFT ", _ms(t.time_to_first_token)))
        if t is not None:
            limit = _count(self.max_model_len) if self.max_model_len else "?"
            out.append(("ctx ", f"{_count(t.context_tokens)}/{limit}"))
        if self.kv_total:
            out.append(("KV ", f"{_count(self.kv_used)}/{_count(self.kv_total)}"))
        if t is not None and t.prompt_tokens:
            out.append(("cache ", f"{_count(t.cached_prompt_tokens)}/{_count(t.prompt_tokens)}"))
        return out

    def fitted(self, width: int) -> list[tuple[str, str]]:
        """The parts that fit ``width``: the device goes first, then a long model name is
        cut, then parts go from the end."""
        parts = self.parts()
        length = lambda ps: sum(len(a) + len(b) for a, b in ps) + len(SEP) * (len(ps) - 1)  # noqa: E731
        if length(parts) > width and len(parts) > 2:
            del parts[1]
        over = length(parts) - width
        name = parts[0][1]
        if over > 0 and len(name) > MODEL_MIN:
            cut = max(MODEL_MIN, len(name) - over)
            parts[0] = ("", name[: cut - 1] + "…")
        while length(parts) > width and len(parts) > 1:
            parts.pop()
        return parts

    def line(self, width: int | None = None) -> str:
        return SEP.join(a + b for a, b in self.fitted(self._width(width)))

    def _width(self, width: int | None) -> int:
        return (width or self.size.width or 80) - 2

    def redraw(self) -> None:
        text = Text(" ", no_wrap=True, overflow="ellipsis")
        for i, (label, value) in enumerate(self.fitted(self._width(None))):
            if i:
                text.append(SEP)
            if label:
                text.append(label, style="dim")
            text.append(value, style="bold" if i == 0 else "")
        self.update(text, layout=False)  # one line always: no layout pass for the screen

    def on_resize(self) -> None:
        self.redraw()
