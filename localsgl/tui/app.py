"""ChatApp: the `localsgl chat` Textual app. It owns the conversation, the engine link
and the saved-conversation store; the screens lay out widgets and call back here.

The engine loads and switches in worker threads; answers stream in an async worker that
reads the engine's deltas from this event loop, so the UI never waits on the engine.
Cancelling that worker (Esc) aborts the request, and the engine frees its KV slots."""
from __future__ import annotations

import asyncio
import sqlite3
import time
from contextlib import aclosing
from pathlib import Path
from typing import Callable

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.worker import Worker

from . import commands as cmd
from .chat_screen import ChatScreen, answer_header
from .commands import CommandError
from .conversation import Conversation
from .engine_link import EngineLink, TurnStats, turn_stats
from .help_screen import HelpScreen
from .history import ChatHistory, NoHistory
from .keys import KEY_ACTIONS, effective_keys
from .model_screen import ModelScreen
from .sessions_screen import SessionsScreen
from .text_screen import TextScreen

KV_REFRESH_SECONDS = 0.5
LIVE_SPEED_SECONDS = 0.25


def _binding(bid: str, action: str, priority: bool = False, show: bool = False) -> Binding:
    a = KEY_ACTIONS[bid]
    return Binding(a.key, action, a.short or a.description, id=bid, priority=priority, show=show)


def _open_history() -> ChatHistory | NoHistory:
    """The saved conversations, or a stand-in that saves nothing when the store cannot be opened."""
    try:
        return ChatHistory()
    except (sqlite3.Error, OSError) as e:
        return NoHistory(str(e))


class ChatApp(App):
    CSS_PATH = "chat.tcss"
    TITLE = "localsgl chat"
    BINDINGS = [
        _binding("quit", "quit", priority=True),
        _binding("palette", "command_palette", priority=True, show=True),
        _binding("help", "help", show=True),
        _binding("models", "models", show=True),
        _binding("sessions", "sessions", show=True),
    ]

    def __init__(self, link: EngineLink, *, history: ChatHistory | None = None, system: str | None = None,
                 resume: bool = False, model_given: bool = True, keymap: dict[str, str] | None = None,
                 theme: str | None = None, on_rendered: Callable[[int, float], None] | None = None):
        super().__init__()
        self.link = link
        self.history = history if history is not None else _open_history()
        self.keymap = dict(keymap or {})
        self.on_rendered = on_rendered  # told (chars on screen, time) after each answer update reaches the screen
        self._theme_name = theme
        self.last_turn: TurnStats | None = None
        self.editing = False  # the next message replaces the last one sent (/edit)
        self._answer_worker: Worker | None = None
        self._pending_answer = False  # a message came while the model loaded
        try:
            resumed = self.history.latest() if resume else None
        except sqlite3.Error as e:  # locked by another chat for longer than the store waits
            self.history = NoHistory(str(e))
            resumed = None
        if resumed is not None:
            if not model_given and not link.ready:
                link.engine_kwargs["model"] = resumed.model
            self.conversation = resumed
            if system is not None:
                resumed.system = system
        else:
            self.conversation = Conversation(model=link.model_spec, system=system)
        self.resumed = resumed is not None

    # ------------------------------------------------------------------ start and stop
    def get_default_screen(self) -> ChatScreen:
        return ChatScreen()

    @property
    def chat(self) -> ChatScreen:
        return self.screen_stack[0]

    async def on_mount(self) -> None:
        if self.keymap:
            self.set_keymap(self.keymap)
        if self._theme_name:
            try:
                self.theme = self._theme_name
            except Exception:  # noqa: BLE001 - an unknown theme leaves the default
                self.notify(f"unknown theme {self._theme_name!r}", severity="warning")

    async def start_chat(self) -> None:
        """The chat screen is mounted: show the conversation and start loading the model."""
        intro = "localsgl chat: /help lists commands, F2 the models, F3 saved conversations."
        if self.resumed:
            intro += f" Resumed: {self.conversation.title or 'conversation'}."
        await self.chat.show_conversation(self.conversation, intro)
        if self.history.notice:
            self.chat.add_note(self.history.notice, error=True)
            self.history.notice = None
        self.set_interval(KV_REFRESH_SECONDS, self.refresh_kv)
        if self.link.ready:
            self._engine_ready()
        else:
            self.chat.set_loading(f"loading {self.link.model_spec}…")
            self._load()

    @work(thread=True, exclusive=True, group="engine")
    def _load(self) -> None:
        try:
            self.link.load()
        except Exception as e:  # noqa: BLE001 - shown in the chat
            self.call_from_thread(self._load_failed, e)
            return
        self.call_from_thread(self._engine_ready)

    def _load_failed(self, e: Exception) -> None:
        self.chat.set_loading(None)
        self._pending_answer = False
        self.chat.add_note(f"cannot load {self.link.model_spec}: {e}\n/model NAME tries another model.", error=True)

    def _engine_ready(self) -> None:
        self.chat.set_loading(None)
        self.chat.status.set_engine(self.link.model_name, self.link.device, self.link.max_model_len)
        self.conversation.model = self.link.model_spec
        self.refresh_kv()
        if self._pending_answer:
            self._pending_answer = False
            self.start_answer()

    def refresh_kv(self) -> None:
        try:
            status = self.chat.status
        except (NoMatches, IndexError):  # the app is closing
            return
        status.set_kv(self.link.stats())

    async def action_quit(self) -> None:
        self.stop_answer()
        self.exit()

    def on_unmount(self) -> None:
        self.link.shutdown()

    # ------------------------------------------------------------------ input
    def handle_input(self, text: str) -> None:
        try:
            parsed = cmd.parse(text)
        except CommandError as e:
            self.chat.add_note(str(e), error=True)
            return
        if parsed is not None:
            self.run_command(parsed.name, parsed.arg)
            return
        self.send(cmd.unescape(text))

    def send(self, text: str) -> None:
        if self.answering:
            self.chat.prompt.set_text(text)
            self.notify("an answer is being written: Esc stops it", severity="warning")
            return
        if self.editing:
            self.editing = False
            self.conversation.drop_after_last_user()
            if self.conversation.messages:
                self.conversation.messages.pop()
            self.call_next(self._replace_last_turn, text)
            return
        msg = self.conversation.add("user", text)
        self.save()
        self.chat.add_message(msg)
        self.start_answer()

    async def _replace_last_turn(self, question: str | None) -> None:
        """Answer again: the last question as it is (None) or replaced by ``question``."""
        await self.chat.remove_last_turn(keep_question=question is None)
        if question is not None:
            self.chat.add_message(self.conversation.add("user", question))
        self.save()
        self.start_answer()

    def save(self) -> None:
        if self.conversation.messages:
            try:
                self.history.save(self.conversation)
            except Exception as e:  # noqa: BLE001 - the chat goes on unsaved
                self.notify(f"cannot save the conversation: {e}", severity="error")

    # ------------------------------------------------------------------ answering
    @property
    def answering(self) -> bool:
        w = self._answer_worker
        return w is not None and not w.is_finished

    def start_answer(self) -> None:
        if not self.link.ready:
            self._pending_answer = True
            self.notify("the model is still loading; the answer follows")
            return
        self._answer_worker = self._answer()

    def stop_answer(self) -> bool:
        if self.answering:
            self._answer_worker.cancel()
            return True
        return False

    @work(exclusive=True, group="answer")
    async def _answer(self) -> None:
        conv = self.conversation
        messages = conv.engine_messages()
        reply = conv.add("assistant", "", model=self.link.model_name)
        view = await self.chat.add_answer(reply, on_rendered=self.on_rendered)
        status = self.chat.status
        stream = view.start_stream()
        chunks: list[str] = []
        n_tokens, finish, metrics, error = 0, None, None, None
        t0 = time.perf_counter()
        t_first = None
        last_live = t0
        status.set_state("answering")
        try:
            async with aclosing(self.link.astream(messages)) as deltas:
                async for d in deltas:
                    if d.token_ids and t_first is None:
                        t_first = time.perf_counter()
                    n_tokens += len(d.token_ids)
                    if d.text:
                        chunks.append(d.text)
                        await stream.write(d.text)
                    if d.finish_reason is not None:
                        finish, metrics = d.finish_reason, d.metrics
                    now = time.perf_counter()
                    if t_first is not None and now - last_live >= LIVE_SPEED_SECONDS and n_tokens > 1:
                        last_live = now
                        status.set_state("answering", (n_tokens - 1) / max(1e-9, now - t_first))
        except asyncio.CancelledError:
            finish = finish or "abort"
            raise
        except Exception as e:  # noqa: BLE001 - e.g. the prompt no longer fits: shown in the chat
            error = e
        finally:
            await view.end_stream()
            elapsed = time.perf_counter() - t0
            reply.content = "".join(chunks)
            reply.finish_reason = finish or ("abort" if error is None else "error")
            self.last_turn = turn_stats(metrics, reply.finish_reason, n_tokens, elapsed,
                                        None if t_first is None else t_first - t0)
            view.set_header(answer_header(reply))
            status.set_state("")
            status.set_turn(self.last_turn)
            if error is not None and not reply.content:
                conv.messages.remove(reply)
                await view.remove()
                self.chat.add_note(f"error: {error}", error=True)
            self.save()
            self.refresh_kv()

    def action_stop(self) -> None:
        self.stop_answer()

    # ------------------------------------------------------------------ commands
    def run_command(self, name: str, arg: str) -> None:
        handler = getattr(self, "cmd_" + name.replace("-", "_"))
        try:
            handler(arg)
        except CommandError as e:
            self.chat.add_note(str(e), error=True)

    def _idle_or_fail(self, what: str) -> None:
        if self.answering:
            raise CommandError(f"{what}: an answer is being written (Esc stops it)")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.chat.add_note(f"system: {self.conversation.system}" if self.conversation.system else "no system message")
            return
        self.conversation.system = None if arg == "-" else arg
        self.chat.add_note("system message cleared" if arg == "-" else f"system: {arg}")
        self.save()

    def cmd_clear(self, arg: str = "") -> None:
        self.stop_answer()
        self.editing = False
        self.conversation = Conversation(model=self.link.model_spec, system=self.conversation.system)
        self.last_turn = None
        self.chat.status.set_turn(None)
        self.call_next(self.chat.show_conversation, self.conversation, "new conversation")

    def cmd_model(self, arg: str) -> None:
        if not arg:
            self.action_models()
            return
        self.switch_model(arg)

    def cmd_temp(self, arg: str) -> None:
        if arg:
            self.link.sampling["temperature"] = cmd.parse_float(arg, "/temp", 0.0, 100.0)
        value, mine = self.link.sampling_value("temperature")
        self.chat.add_note(f"temperature {value}" + ("" if mine else " (the model's default)"))

    def cmd_max_tokens(self, arg: str) -> None:
        if arg:
            self.link.sampling["max_tokens"] = cmd.parse_int(arg, "/max-tokens", 1)
        value, mine = self.link.sampling_value("max_tokens")
        self.chat.add_note(f"max tokens {value}" + ("" if mine else " (the model's default)"))

    def cmd_regenerate(self, arg: str = "") -> None:
        self._idle_or_fail("/regenerate")
        if self.conversation.drop_after_last_user() is None:
            raise CommandError("/regenerate: no message to answer yet")
        self.call_next(self._replace_last_turn, None)

    def cmd_edit(self, arg: str) -> None:
        self._idle_or_fail("/edit")
        last = self.conversation.last("user")
        if last is None:
            raise CommandError("/edit: no message sent yet")
        if arg:
            self.editing = True
            self.send(arg)
            return
        self.editing = True
        self.chat.prompt.set_text(last.content)
        self.chat.add_note("editing your last message: Enter sends it in place of the old one")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise CommandError("/save FILE: name a file (FILE.json for JSON, anything else for Markdown)")
        try:
            path = self.conversation.save_as(arg)
        except OSError as e:
            raise CommandError(f"/save: cannot write {arg}: {e.strerror or e}") from None
        self.chat.add_note(f"saved to {Path(path).resolve()}")

    def cmd_copy(self, arg: str) -> None:
        if arg.strip().lower() in ("code", "block"):
            self.action_copy_code()
        elif arg:
            raise CommandError("/copy: give nothing (the last answer) or 'code' (its last code block)")
        else:
            self.action_copy_answer()

    def cmd_sessions(self, arg: str = "") -> None:
        self.action_sessions()

    def cmd_help(self, arg: str = "") -> None:
        self.action_help()

    def cmd_quit(self, arg: str = "") -> None:
        self.stop_answer()
        self.exit()

    # ------------------------------------------------------------------ models
    def switch_model(self, model: str) -> None:
        self.stop_answer()
        self.chat.set_loading(f"loading {model}…")
        self._switch(model)

    @work(thread=True, exclusive=True, group="engine")
    def _switch(self, model: str) -> None:
        try:
            self.link.switch(model)
        except Exception as e:  # noqa: BLE001 - shown in the chat
            self.call_from_thread(self._switch_failed, model, e)
            return
        self.call_from_thread(self._switched)

    def _switched(self) -> None:
        self._engine_ready()
        self.chat.add_note(f"now answering with {self.link.model_name}; the conversation is kept")
        self.save()

    def _switch_failed(self, model: str, e: Exception) -> None:
        self.chat.set_loading(None)
        back = f"; still using {self.link.model_name}" if self.link.ready else ""
        self.chat.add_note(f"cannot load {model}: {e}{back}", error=True)
        if self.link.ready:
            self._engine_ready()

    # ------------------------------------------------------------------ actions
    def action_models(self) -> None:
        def chosen(name: str | None) -> None:
            if name and name != self.link.model_spec:
                self.switch_model(name)

        self.push_screen(ModelScreen(self.link.model_spec), chosen)

    def action_sessions(self) -> None:
        def chosen(conv_id: int | None) -> None:
            if conv_id is not None and conv_id != self.conversation.id:
                self.call_next(self.open_conversation, conv_id)

        self.push_screen(SessionsScreen(self.history, self.conversation.id), chosen)

    async def open_conversation(self, conv_id: int) -> None:
        try:
            conv = self.history.load(conv_id)
        except sqlite3.Error as e:
            self.notify(f"cannot open the conversation: {e}", severity="error")
            return
        if conv is None:
            self.notify("that conversation is gone", severity="warning")
            return
        self.stop_answer()
        self.editing = False
        self.conversation = conv
        intro = f"reopened: {conv.title or 'conversation'}"
        if conv.model != self.link.model_spec:
            intro += f" (written with {conv.model}; /model {conv.model} switches to it)"
        await self.chat.show_conversation(conv, intro)

    def action_help(self) -> None:
        keys = effective_keys(self.keymap)
        self.push_screen(HelpScreen(cmd.help_markdown(keys, {k: a.description for k, a in KEY_ACTIONS.items()})))

    def action_new_chat(self) -> None:
        self.cmd_clear("")

    def action_copy_answer(self) -> None:
        last = self.conversation.last("assistant")
        if last is None or not last.content:
            self.notify("no answer to copy yet", severity="warning")
            return
        self.copy_to_clipboard(last.content)
        self.notify("answer copied", timeout=2)

    def action_copy_code(self) -> None:
        views = [v for v in self.chat.message_views() if v.code_blocks()]
        if not views:
            self.notify("no code block to copy", severity="warning")
            return
        self.copy_to_clipboard(views[-1].code_blocks()[-1])
        self.notify("code block copied", timeout=2)

    def action_select_text(self) -> None:
        self.push_screen(TextScreen(self.conversation.to_markdown().rstrip("\n")))

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        for c in cmd.COMMANDS.values():
            if c.needs_args:
                yield SystemCommand(f"/{c.name} {c.args}", c.help, self._prefill(c.name))
            else:
                yield SystemCommand(f"/{c.name}", c.help, self._runner(c.name))

    def _prefill(self, name: str):
        return lambda: self.chat.prompt.set_text(f"/{name} ")

    def _runner(self, name: str):
        return lambda: self.run_command(name, "")
