"""Folding the earlier conversation that lies far above the screen while an answer streams.

Textual lays out the whole screen whenever a widget's size may have changed, and every
layout visits every widget in the conversation, on screen or not. A streaming answer
changes size on nearly every frame, so an earlier long answer (hundreds of block
widgets: each list item and table cell is one) would make each of its frames cost in
proportion to everything said before. A folded widget keeps its height but hides its
children (an inline style on each, so no style sheet runs again over the subtree), so a
layout visits one widget for it. Only what ends more than a screen above
the visible part folds, and only while the view follows the end of the answer, so what
the screen shows is unchanged: whole messages, or the top-level blocks of the message
that reaches into that band. When the user scrolls away from the end, the width
changes, or the answer ends, everything unfolds."""
from __future__ import annotations

from textual.widget import Widget

FOLDED = "-folded"  # marks a folded widget


class AboveFolder:
    def __init__(self, view: Widget, streaming: Widget):
        self.view = view  # the scrolling conversation
        self.streaming = streaming  # the answer's message view: never folded; the scroll watch ends with it
        self.folded: list[Widget] = []
        self._width = 0  # the view's width when things folded: their heights hold for it
        self._watching = False

    def following(self) -> bool:
        """The view stays at the end as the answer grows (the user has not scrolled up)."""
        view = self.view
        return view.is_anchored and not view._anchor_released

    def fold_far(self) -> None:
        """Fold what ends more than a screen above the visible part."""
        region = self.view.region
        if self.folded and region.width != self._width:
            self.unfold_all()
        if not self.following():
            return
        top = region.y - region.height
        for message in self.view.children:
            if message is self.streaming:
                break
            box = message.region
            if message.has_class(FOLDED) or not box.height or box.y >= top:
                continue
            if box.bottom < top:
                self._fold(message)
                continue
            for body in message.query_children(".body"):  # reaches into the band: fold its blocks above it
                for block in body.children:
                    inner = block.region
                    if block.children and not block.has_class(FOLDED) and inner.height and inner.bottom < top:
                        self._fold(block)
        self._width = region.width
        if self.folded and not self._watching:
            self._watching = True
            self.streaming.watch(self.view, "scroll_y", self._scrolled, init=False)

    def _fold(self, widget: Widget) -> None:
        widget.styles.height = widget.outer_size.height
        for child in widget.children:
            child.styles.display = "none"
        widget.set_class(True, FOLDED, update=False)
        self.folded.append(widget)

    def unfold_all(self) -> None:
        for widget in self.folded:
            for child in widget.children:
                child.styles.display = None  # back to what the style sheet says
            widget.styles.height = None
            widget.set_class(False, FOLDED, update=False)
        self.folded.clear()

    def _scrolled(self) -> None:
        if self.folded and not self.following():
            self.unfold_all()
