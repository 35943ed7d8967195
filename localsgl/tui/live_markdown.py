"""An answer's Markdown while it streams: one widget drawn through Textual's Line API.

A Markdown widget is a tree of block widgets (each list item and table cell is one), and
Textual lays out and composes the whole screen's tree on every frame in which any size
changed, so a streamed answer made of widgets costs more per frame the longer it gets.
This view keeps the answer as lines instead: the blocks that are finished (every
top-level block but the last: a block that has a successor can no longer change) are
rendered once, with Rich's Markdown, at the view's width, and only the live last block
is rendered again when text arrives. A frame then costs the live block's rendering and
a layout of a screen whose widgets do not multiply as the answer grows.

Deltas are appended; only the text from the first unfinished block on is parsed again.
The lines equal Rich's rendering of the whole text. Rich puts a blank line before a
top-level block unless it is the first one or follows a horizontal rule; a list, quote
or table rendered on its own already starts with that blank line (Rich decides it by
the last element closed, which for these is one of their own), so this view adds the
blank line between blocks only before the other kinds.

Code is highlighted with the colours the final view's code blocks use (Textual's
highlight theme, resolved against the app's theme). When the answer ends, the message
view replaces this view by the final Markdown widget (message_view.py)."""
from __future__ import annotations

import re

from markdown_it import MarkdownIt
from pygments.token import Token
from rich.console import Console, ConsoleOptions
from rich.markdown import Markdown as RichMarkdown
from rich.segment import Segment
from rich.style import Style
from rich.syntax import SyntaxTheme
from textual.app import App
from textual.color import Color
from textual.geometry import Region, Size
from textual.highlight import ANSIDarkHighlightTheme, ANSILightHighlightTheme, HighlightTheme
from textual.strip import Strip
from textual.style import Style as TextualStyle
from textual.widget import Widget

from .growing import LaidOutOnce

CONTAINERS = {"bullet_list_open", "ordered_list_open", "blockquote_open", "table_open"}
_TEXT_VARIABLE = re.compile(r"\$text(?![-\w])")  # "$text" is an automatic contrast colour; code takes the theme's foreground


class CodeTheme(SyntaxTheme):
    """Textual's code highlight colours for Rich's Syntax, with no background of its own."""

    def __init__(self, styles: dict, variables: dict[str, str]):
        background = Color.parse(variables.get("background", "black"))
        self._styles = {token: self._resolve(spec, variables, background) for token, spec in styles.items()}

    @staticmethod
    def _resolve(spec: str, variables: dict[str, str], background: Color) -> Style:
        try:
            style = TextualStyle.parse(_TEXT_VARIABLE.sub("$foreground", spec), variables)
        except Exception:  # noqa: BLE001 - a colour this theme lacks: the code's plain colour
            return Style()
        rich = style.rich_style
        colour = style.foreground
        if colour is not None and colour.a < 1:  # blend a translucent colour over the background, as Textual does
            rich += Style(color=background.blend(colour.with_alpha(1), colour.a).rich_color)
        return rich

    def get_style_for_token(self, token_type) -> Style:
        while token_type not in self._styles and token_type is not Token:
            token_type = token_type.parent
        return self._styles.get(token_type, Style())

    def get_background_style(self) -> Style:
        return Style()


def code_theme_for(app: App) -> CodeTheme:
    """The highlight colours of the app's Markdown code blocks under its current theme."""
    dark = app.current_theme.dark
    if app.ansi_color:
        styles = (ANSIDarkHighlightTheme if dark else ANSILightHighlightTheme).STYLES
    else:
        styles = HighlightTheme.STYLES
    return CodeTheme(styles, app.theme_variables)


def markdown_parser() -> MarkdownIt:
    """The parser Rich's Markdown uses, so block boundaries here are Rich's."""
    return MarkdownIt().enable("strikethrough").enable("table")


def top_level_blocks(parser: MarkdownIt, text: str) -> list[tuple[int, str]]:
    """(first source line, token type) of each top-level block of ``text``."""
    return [(t.map[0], t.type) for t in parser.parse(text) if t.level == 0 and t.map is not None and t.nesting >= 0]


def render_markdown(text: str, console: Console, options: ConsoleOptions, code_theme: str | SyntaxTheme) -> list[Strip]:
    """Rich's rendering of ``text``, one Strip a line, padded to the options' width."""
    lines = console.render_lines(RichMarkdown(text, code_theme=code_theme), options, pad=True)
    return [Strip(line, options.max_width) for line in lines]


class _Block:
    __slots__ = ("text", "kind")

    def __init__(self, text: str, kind: str):
        self.text = text
        self.kind = kind  # the block's first token type


def blank_line_between(before: _Block | None, kind: str) -> bool:
    """Whether a blank line goes between a block rendered on its own and the next one."""
    return before is not None and before.kind != "hr" and kind not in CONTAINERS


class LiveMarkdown(LaidOutOnce, Widget):
    DEFAULT_CSS = """
    LiveMarkdown {
        height: auto;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self._parser = markdown_parser()
        self.source = ""
        self._tail = ""  # the source from the first unfinished block on
        self._tail_kind = ""  # the type of the tail's block
        self._finished: list[_Block] = []
        self._finished_strips: list[Strip] = []  # the finished blocks' lines, at _width and _theme
        self._rendered = 0  # how many finished blocks _finished_strips holds
        self._live_strips: list[Strip] = []
        self._live_stale = True
        self._width = 0
        self._theme = ""  # the app theme the lines were rendered under
        self._code_theme: tuple[str, CodeTheme] | None = None  # (the app theme's name, its code colours)
        self._line_style: Style | None = None
        self.block_renders = 0  # blocks rendered so far: finished blocks once per width, the live one per update

    # ------------------------------------------------------------------ text
    def append(self, text: str) -> None:
        """Add ``text`` to the answer and redraw; a layout only where the height changed."""
        if not text:
            return
        self.source += text
        self._tail += text
        self._settle_finished_blocks()
        self._live_stale = True
        width = self.content_size.width
        if width <= 0:  # not laid out yet: the first layout renders
            self.refresh(layout=True)
            return
        before = len(self._finished_strips) + len(self._live_strips) if width == self._width else -1
        self._update_lines(width)
        after = len(self._finished_strips) + len(self._live_strips)
        self.refresh(layout=after != before)

    def _settle_finished_blocks(self) -> None:
        """Move every block of the tail that has a successor to the finished blocks."""
        blocks = top_level_blocks(self._parser, self._tail)
        self._tail_kind = blocks[-1][1] if blocks else ""
        if len(blocks) < 2:
            return
        lines = self._tail.splitlines(keepends=True)
        for (start, kind), (end, _) in zip(blocks, blocks[1:]):
            self._finished.append(_Block("".join(lines[start:end]), kind))
        self._tail = "".join(lines[blocks[-1][0]:])

    def code_blocks(self) -> list[str]:
        """The code of the answer's fenced and indented code blocks so far."""
        return [t.content.rstrip() for t in self._parser.parse(self.source) if t.type in ("fence", "code_block")]

    # ------------------------------------------------------------------ lines
    def _render(self, text: str, width: int) -> list[Strip]:
        self.block_renders += 1
        console = self.app.console
        options = console.options.update(width=width, height=None, highlight=False)
        return render_markdown(text, console, options, self._current_code_theme())

    def _current_code_theme(self) -> CodeTheme:
        name = self.app.theme
        if self._code_theme is None or self._code_theme[0] != name:
            self._code_theme = (name, code_theme_for(self.app))
        return self._code_theme[1]

    def _update_lines(self, width: int) -> None:
        if width != self._width or self.app.theme != self._theme:  # the lines' width or colours changed
            self._width = width
            self._theme = self.app.theme
            self._finished_strips = []
            self._rendered = 0
            self._live_stale = True
        blank = Strip([Segment(" " * width)], width)
        for block in self._finished[self._rendered:]:
            if blank_line_between(self._finished[self._rendered - 1] if self._rendered else None, block.kind):
                self._finished_strips.append(blank)
            self._finished_strips.extend(self._render(block.text, width))
            self._rendered += 1
        if self._live_stale:
            self._live_stale = False
            live = self._render(self._tail, width) if self._tail.strip() else []
            if live and blank_line_between(self._finished[-1] if self._finished else None, self._tail_kind):
                live.insert(0, blank)
            self._live_strips = live

    def lines(self, width: int) -> list[Strip]:
        """The answer's lines at ``width``."""
        self._update_lines(width)
        return self._finished_strips + self._live_strips

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        self._update_lines(width)
        return len(self._finished_strips) + len(self._live_strips)

    def render_lines(self, crop: Region) -> list[Strip]:
        # the widget's style walks its ancestors: once for all the lines drawn, not once a line
        self._line_style = self.rich_style
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self.content_size.width
        self._update_lines(width)
        finished = self._finished_strips
        style = self._line_style if self._line_style is not None else self.rich_style
        if y < len(finished):
            strip = finished[y]
        elif y - len(finished) < len(self._live_strips):
            strip = self._live_strips[y - len(finished)]
        else:
            return Strip.blank(width, style)
        return strip.apply_style(style)
