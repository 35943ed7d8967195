"""The chat's main screen: the conversation, a loading bar while a model loads, the
message box, the status line and the key hints. It lays widgets out and forwards what
the user does to the app, which owns the conversation and the engine."""
from __future__ import annotations

import time

from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Label, ProgressBar

from .conversation import ChatMessage, Conversation
from .growing import ConversationScroll
from .keys import KEY_ACTIONS
from .message_view import MessageView
from .prompt_input import PromptInput
from .status_bar import StatusBar


def _binding(bid: str, action: str, show: bool = False) -> Binding:
    a = KEY_ACTIONS[bid]
    return Binding(a.key, action, a.short or a.description, id=bid, show=show)


def answer_header(message: ChatMessage) -> str:
    who = (message.model or "assistant").rsplit("/", 1)[-1]
    if message.finish_reason == "abort":
        return f"{who} (stopped)"
    if message.finish_reason == "length":
        return f"{who} (cut at the token limit)"
    return who


class ChatScreen(Screen):
    BINDINGS = [
        _binding("stop", "app.stop", show=True),
        _binding("new_chat", "app.new_chat"),
        _binding("copy_answer", "app.copy_answer"),
        _binding("copy_code", "app.copy_code"),
        _binding("select_text", "app.select_text"),
    ]

    def compose(self):
        yield ConversationScroll(id="conversation")
        with Horizontal(id="loading"):
            yield Label("", id="loading-label", markup=False)
            yield ProgressBar(id="loading-bar", total=None, show_eta=False, show_percentage=False)
        yield PromptInput(id="prompt")
        yield StatusBar(id="status")
        yield Footer(compact=True, show_command_palette=False)

    async def on_mount(self) -> None:
        self.query_one("#loading").display = False
        self.conversation_view.anchor()
        self.prompt.focus()
        self._loading_since: float | None = None
        self._loading_text = ""
        self.set_interval(0.5, self._tick_loading)
        await self.app.start_chat()

    # ------------------------------------------------------------------ parts
    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def conversation_view(self) -> VerticalScroll:
        return self.query_one("#conversation", VerticalScroll)

    def message_views(self) -> list[MessageView]:
        return list(self.conversation_view.query(MessageView))

    # ------------------------------------------------------------------ content
    def add_message(self, message: ChatMessage, on_rendered=None) -> MessageView:
        header = "you" if message.role == "user" else answer_header(message)
        view = MessageView(message, header=header, on_rendered=on_rendered)
        self.conversation_view.mount(view)
        self.conversation_view.anchor()
        return view

    async def add_answer(self, message: ChatMessage, on_rendered=None) -> MessageView:
        """An answer's view, mounted (so it can stream)."""
        view = MessageView(message, header=answer_header(message), on_rendered=on_rendered)
        await self.conversation_view.mount(view)
        self.conversation_view.anchor()
        return view

    def add_note(self, text: str, error: bool = False) -> MessageView:
        view = MessageView(None, note=text)
        if error:
            view.add_class("error")
        self.conversation_view.mount(view)
        self.conversation_view.anchor()
        return view

    async def remove_last_turn(self, keep_question: bool) -> None:
        """Remove the answers after the last user message (and that message's own view
        unless ``keep_question``): what /regenerate and /edit replace. Notes stay."""
        views = self.message_views()
        users = [i for i, v in enumerate(views) if v.message is not None and v.message.role == "user"]
        if not users:
            return
        start = users[-1] + (1 if keep_question else 0)
        for v in views[start:]:
            if v.message is not None:
                await v.remove()

    async def show_conversation(self, conv: Conversation, intro: str = "") -> None:
        """Replace what the view shows by ``conv``."""
        view = self.conversation_view
        await view.remove_children()
        if intro:
            self.add_note(intro)
        if conv.system:
            self.add_note(f"system: {conv.system}")
        for m in conv.messages:
            self.add_message(m)

    # ------------------------------------------------------------------ loading
    def set_loading(self, text: str | None) -> None:
        bar = self.query_one("#loading")
        if text is None:
            bar.display = False
            self._loading_since = None
            return
        self._loading_text = text
        self._loading_since = time.monotonic()
        self.query_one("#loading-label", Label).update(text)
        bar.display = True

    def _tick_loading(self) -> None:
        if self._loading_since is not None:
            secs = time.monotonic() - self._loading_since
            self.query_one("#loading-label", Label).update(f"{self._loading_text} {secs:.0f} s")

    def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        event.stop()
        self.app.handle_input(event.text)
