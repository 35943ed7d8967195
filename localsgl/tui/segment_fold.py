"""Folding finished answer segments that lie far above the screen while an answer streams.

Textual lays out the whole screen whenever any widget's size may have changed, and every
layout visits every widget in the conversation, on screen or not. A streamed answer
changes size on nearly every frame, so without folding each frame costs time in proportion
to everything written so far (a long answer has hundreds of block widgets: each table cell
and list item is one). A folded segment keeps its height but hides its blocks, so the
layout visits one widget for it; what the screen shows is unchanged, because only segments
more than a screen above the visible part fold, and only while the view follows the end
of the answer. When the user scrolls away from the end, or the answer ends, every segment
unfolds."""
from __future__ import annotations

from textual.widget import Widget

FOLDED = "-folded"  # AnswerMarkdown's CSS hides the blocks of a segment with this class


class SegmentFolder:
    def __init__(self, view: Widget, owner: Widget):
        self.view = view  # the scrolling conversation
        self.owner = owner  # the answer's widget: the scroll watch ends with it
        self.folded: list[Widget] = []
        self._width = 0  # the view's width when the segments folded: their heights hold for it
        self._watching = False

    def following(self) -> bool:
        """The view stays at the end as the answer grows (the user has not scrolled up)."""
        view = self.view
        return view.is_anchored and not view._anchor_released

    def fold_far(self, finished: list[Widget]) -> None:
        """Fold the finished segments that end more than a screen above the visible part."""
        region = self.view.region
        if self.folded and region.width != self._width:
            self.unfold_all()
        if not self.following():
            return
        top = region.y - region.height
        for segment in finished:
            box = segment.region
            if segment.has_class(FOLDED) or not box.height or box.bottom >= top:
                continue
            segment.styles.height = segment.outer_size.height
            segment.add_class(FOLDED)
            self.folded.append(segment)
        self._width = region.width
        if self.folded and not self._watching:
            self._watching = True
            self.owner.watch(self.view, "scroll_y", self._scrolled, init=False)

    def unfold_all(self) -> None:
        for segment in self.folded:
            segment.remove_class(FOLDED)
            segment.styles.height = None
        self.folded.clear()

    def _scrolled(self) -> None:
        if self.folded and not self.following():
            self.unfold_all()
