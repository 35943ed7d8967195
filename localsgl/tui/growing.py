"""Widgets that grow while an answer streams, made cheap to lay out and paint per frame.

Textual records a widget's new virtual size, during a layout, through a reactive that
asks for another layout and paint of the screen. For the conversation, a message and
the live answer, that second pass finds everything already right: the sizes came from
the layout that just ran, which also moved the scroll container's anchored position and
repainted every region that changed (the scrollbar asks for its own repaint, and a
scrollbar that appears or goes for its own layout). LaidOutOnce declares the reactive
without those requests, so a streamed frame costs one layout instead of two.

A widget whose size changed renders all its lines again. A message's own area is plain
background under its header and body, the same on every line, so BlankLines renders one
line and repeats it (through Textual's style cache, so colour filters such as NO_COLOR
still apply)."""
from __future__ import annotations

from textual.containers import VerticalScroll
from textual.geometry import Region, Size
from textual.reactive import Reactive
from textual.strip import Strip


class LaidOutOnce:
    """Mixin for a widget whose virtual size only changes as the result of a layout."""

    virtual_size = Reactive(Size(0, 0), layout=False, repaint=False)


class BlankLines:
    """Mixin for a container without content of its own: where nothing above or below the
    content (padding, border, outline) makes its lines differ, one is rendered for all."""

    def render_lines(self, crop: Region) -> list[Strip]:
        styles = self.styles
        gutter = styles.gutter
        if crop.height <= 1 or gutter.top or gutter.bottom or any(
                kind not in ("", "none", "hidden") for kind, _ in styles.outline):
            return super().render_lines(crop)
        return super().render_lines(Region(crop.x, crop.y, crop.width, 1)) * crop.height


class ConversationScroll(LaidOutOnce, VerticalScroll):
    """The scrolling conversation."""
