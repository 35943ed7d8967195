"""The chat app driven by Textual's pilot over a scripted engine: sending, stopping,
every slash command, saved conversations, key bindings and the status line."""
from __future__ import annotations

import asyncio
import json

from chat_pilot import make_app, send_and_wait, type_and_send, wait_for
from scripted_engine import ScriptedEngine, tokens_of

from localsgl.config import ConfigError
from localsgl.tui.keys import keymap_from_config

SIZE = (80, 24)


def run(coro):
    return asyncio.run(coro)


def answers(app) -> list[str]:
    return [m.content for m in app.conversation.messages if m.role == "assistant"]


def test_send_streams_the_answer_and_fills_the_status_line(history):
    engine = ScriptedEngine(["Hello **there**, friend.", "Second answer."])

    async def scenario():
        app = make_app(engine, history)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "hi")
            assert [m.role for m in app.conversation.messages] == ["user", "assistant"]
            assert answers(app) == ["Hello **there**, friend."]
            view = app.chat.message_views()[-1]
            assert "there" in view.source
            turn = app.last_turn
            assert turn.prompt_tokens > 0 and turn.completion_tokens == len(tokens_of(answers(app)[0])) and turn.cached_prompt_tokens == 0
            line = app.chat.status.line(80)
            assert "scripted-model" in line and f"cache 0/{turn.prompt_tokens}" in line and "KV " in line
            await send_and_wait(pilot, "again")
            second = app.last_turn
            # the second prompt extends the first: the cache holds the first prompt's tokens
            assert second.cached_prompt_tokens == turn.prompt_tokens
            assert f"cache {second.cached_prompt_tokens}/{second.prompt_tokens}" in app.chat.status.line(80)
            assert engine.requests[-1][-1] == {"role": "user", "content": "again"}
            assert len(app.chat.status.line(80)) <= 78

    run(scenario())


def test_escape_stops_the_answer_and_frees_its_kv(history):
    engine = ScriptedEngine([" ".join(f"word{i}" for i in range(400))], tokens_per_second=50)

    async def scenario():
        app = make_app(engine, history)
        async with app.run_test(size=SIZE) as pilot:
            await type_and_send(pilot, "write a lot")
            await wait_for(pilot, lambda: engine.stats()["kv_slots_locked"] > 0 and engine.emitted, what="first tokens")
            await pilot.press("escape")
            await wait_for(pilot, lambda: not app.answering, 5, "the stop")
            await wait_for(pilot, lambda: engine.stats()["running"] == 0, 5, "the abort")
            s = engine.stats()
            assert s["kv_slots_locked"] == 0 and s["kv_slots_used"] == s["kv_slots_cached"]
            reply = app.conversation.messages[-1]
            assert reply.finish_reason == "abort" and 0 < len(reply.content) < 400 * 6
            assert "(stopped)" in app.chat.message_views()[-1].header
            assert app.last_turn.finish_reason == "abort"

    run(scenario())


def test_system_clear_regenerate_edit_save(history, tmp_path):
    engine = ScriptedEngine(lambda n, messages: f"answer {n}")

    async def scenario():
        app = make_app(engine, history)
        async with app.run_test(size=SIZE) as pilot:
            await type_and_send(pilot, "/system You are terse.")
            assert app.conversation.system == "You are terse."
            await send_and_wait(pilot, "first")
            assert engine.requests[-1][0] == {"role": "system", "content": "You are terse."}

            await type_and_send(pilot, "/regenerate")
            await wait_for(pilot, lambda: len(engine.requests) == 2 and not app.answering, what="the regenerated answer")
            assert answers(app) == ["answer 1"]
            assert engine.requests[1] == engine.requests[0]

            await type_and_send(pilot, "/edit first, edited")
            await wait_for(pilot, lambda: len(engine.requests) == 3 and not app.answering, what="the edited answer")
            assert [m.content for m in app.conversation.messages] == ["first, edited", "answer 2"]

            # /edit alone puts the last message in the box; Enter sends it in its place
            await type_and_send(pilot, "/edit")
            assert app.chat.prompt.text == "first, edited"
            app.chat.prompt.load_text("first, edited twice")
            await pilot.press("enter")
            await wait_for(pilot, lambda: len(engine.requests) == 4 and not app.answering, what="the re-edited answer")
            assert [m.content for m in app.conversation.messages] == ["first, edited twice", "answer 3"]

            md, js = tmp_path / "out" / "chat.md", tmp_path / "chat.json"
            await type_and_send(pilot, f"/save {md}")
            await type_and_send(pilot, f"/save {js}")
            text = md.read_text()
            assert "You are terse." in text and "first, edited twice" in text and "answer 3" in text
            data = json.loads(js.read_text())
            assert data["system"] == "You are terse." and [m["content"] for m in data["messages"]][-1] == "answer 3"

            saved_id = app.conversation.id
            await type_and_send(pilot, "/clear")
            await pilot.pause()
            assert app.conversation.messages == [] and app.conversation.id != saved_id
            assert app.conversation.system == "You are terse."  # a setting, kept across conversations
            assert len(app.chat.message_views()) == 2  # the "new conversation" note and the system note
            assert history.load(saved_id).messages[-1].content == "answer 3"

    run(scenario())


def test_sampling_commands_and_errors(history):
    engine = ScriptedEngine(["one two three four five six"])

    async def scenario():
        app = make_app(engine, history)
        async with app.run_test(size=SIZE) as pilot:
            await type_and_send(pilot, "/temp 0.3")
            await type_and_send(pilot, "/max-tokens 3")
            await send_and_wait(pilot, "count")
            p = engine.params[-1]
            assert p.temperature == 0.3 and p.max_tokens == 3
            assert answers(app) == ["one two three"]
            assert app.conversation.messages[-1].finish_reason == "length"
            for bad in ["/temp hot", "/max-tokens 0", "/nope", "/regenerate now"]:
                await type_and_send(pilot, bad)
            notes = [v for v in app.chat.message_views() if v.has_class("error")]
            assert len(notes) == 3  # /regenerate ignores its argument and answers again
            assert "unknown command /nope" in notes[2].note
            await type_and_send(pilot, "//literal slash")
            await wait_for(pilot, lambda: not app.answering)
            assert engine.requests[-1][-1]["content"] == "/literal slash"

    run(scenario())


def test_resume_and_the_sessions_screen(history):
    engine = ScriptedEngine(lambda n, messages: f"reply {n}")

    async def first():
        app = make_app(engine, history)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "old topic")
            await type_and_send(pilot, "/clear")
            await send_and_wait(pilot, "new topic")
        return app.conversation.id

    newest = run(first())
    assert [s.title for s in history.summaries()] == ["new topic", "old topic"]

    async def second():
        app = make_app(engine, history, resume=True)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert app.conversation.id == newest
            assert [m.content for m in app.conversation.messages] == ["new topic", "reply 1"]
            assert any(v.message is not None and v.message.content == "reply 1" for v in app.chat.message_views())
            await send_and_wait(pilot, "follow-up")
            assert [m["content"] for m in engine.requests[-1]] == ["new topic", "reply 1", "follow-up"]
            await pilot.press("f3")
            await pilot.pause()
            assert type(app.screen).__name__ == "SessionsScreen"
            await pilot.press("down", "enter")  # the older conversation
            await wait_for(pilot, lambda: app.conversation.title == "old topic", 5, "the old conversation")
            assert [m.content for m in app.conversation.messages] == ["old topic", "reply 0"]

    run(second())


def test_keys_come_from_the_config_table(history):
    engine = ScriptedEngine(["ok"])
    keymap = keymap_from_config({"send": "ctrl+s", "newline": "enter"})

    async def scenario():
        app = make_app(engine, history, keymap=keymap)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("a", "enter", "b")
            assert app.chat.prompt.text == "a\nb" and not engine.requests
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: not app.answering and answers(app) == ["ok"])
            assert engine.requests[-1][-1]["content"] == "a\nb"
            await pilot.press("up")  # recalls what was sent
            assert app.chat.prompt.text == "a\nb"

    run(scenario())
    try:
        keymap_from_config({"sned": "ctrl+s"})
    except ConfigError as e:
        assert "unknown binding 'sned'" in str(e)
    else:
        raise AssertionError("a misspelt binding id must be refused")


def test_command_palette_lists_the_slash_commands(history):
    engine = ScriptedEngine(["ok"])

    async def scenario():
        app = make_app(engine, history)
        async with app.run_test(size=SIZE) as pilot:
            titles = [c.title for c in app.get_system_commands(app.screen)]
            for name in ["/clear", "/regenerate", "/system TEXT", "/save FILE", "/help"]:
                assert name in titles
            await pilot.press("ctrl+p")
            await pilot.pause()
            assert type(app.screen).__name__ == "CommandPalette"
            await pilot.press(*"/clear", "enter")
            await pilot.pause()
            assert type(app.screen).__name__ == "ChatScreen"
            assert app.chat.message_views()[-1].note == "new conversation"

    run(scenario())


def test_model_switch_keeps_the_conversation_and_shows_loading(history):
    from localsgl.tui.app import ChatApp
    from localsgl.tui.engine_link import EngineLink

    gate = __import__("threading").Event()
    built: list[ScriptedEngine] = []

    def factory(model, **flags):
        gate.wait(10)
        if model == "broken":
            raise RuntimeError("no such model")
        built.append(ScriptedEngine(lambda n, messages: f"from {model}", model_name=model))
        return built[-1]

    async def scenario():
        app = ChatApp(EngineLink({"model": "m1", "device": "cpu"}, factory=factory), history=history)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            loading = app.chat.query_one("#loading")
            assert loading.display and "loading m1" in str(app.chat.query_one("#loading-label").render())
            await type_and_send(pilot, "early question")  # waits for the model
            gate.set()
            await wait_for(pilot, lambda: answers(app) == ["from m1"], 10, "the first model's answer")
            assert not loading.display

            await type_and_send(pilot, "/model m2")
            await wait_for(pilot, lambda: app.link.model_name == "m2" and not loading.display, 10, "the switch")
            assert built[0].shut and app.link.engine_kwargs == {"model": "m2", "device": "cpu"}
            assert app.chat.status.model == "m2"
            await send_and_wait(pilot, "and now?")
            assert answers(app) == ["from m1", "from m2"]
            assert [m["content"] for m in built[1].requests[-1]] == ["early question", "from m1", "and now?"]
            assert app.conversation.messages[-1].model == "m2"

            await type_and_send(pilot, "/model broken")
            await wait_for(pilot, lambda: not loading.display and app.link.ready, 10, "the failed switch")
            assert app.link.model_name == "m2"  # loaded again after the failure
            assert "cannot load broken: no such model" in app.chat.message_views()[-1].note

    run(scenario())


def test_copy_keys_and_keyboard_selection(history):
    answer = "Use this:\n\n```python\nprint('hi')\n```\n\nand that is all."
    engine = ScriptedEngine([answer])

    async def scenario():
        app = make_app(engine, history)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "code please")
            await pilot.press("ctrl+r")
            assert app.clipboard == answer
            await pilot.press("ctrl+b")
            assert app.clipboard == "print('hi')"
            app.copy_to_clipboard("")
            fence = app.chat.query("CopyableFence").last()
            await pilot.click(fence)
            assert app.clipboard == "print('hi')"
            await pilot.press("f4")
            await pilot.pause()
            assert type(app.screen).__name__ == "TextScreen"
            await pilot.press("shift+home", "ctrl+c")  # the last line of the transcript
            assert app.clipboard == "and that is all."
            await pilot.press("escape")
            await pilot.pause()
            assert type(app.screen).__name__ == "ChatScreen"

    run(scenario())


def test_model_screen_pulls_with_progress_deletes_after_asking_and_switches(history, monkeypatch):
    import threading

    from localsgl.store.download_progress import PullProgress
    from localsgl.tui import model_catalog
    from localsgl.tui.app import ChatApp
    from localsgl.tui.engine_link import EngineLink

    rows = [model_catalog.ModelRow("m1", "GGUF Q4_1", 1 << 20, None, "embedded", None),
            model_catalog.ModelRow("old/model", "safetensors BF16", 2 << 30, None, "hub", None)]
    halfway, finish = threading.Event(), threading.Event()
    removed = []

    def pull(spec, progress=None):
        progress(PullProgress(spec, "model.safetensors", 50, 100, 0, 1))
        halfway.set()
        finish.wait(10)
        rows.append(model_catalog.ModelRow(spec, "safetensors BF16", 100, None, "hub", None))
        return spec

    def remove(name):
        removed.append(name)
        rows[:] = [r for r in rows if r.name != name]
        return 2 << 30

    monkeypatch.setattr(model_catalog, "local_models", lambda: list(rows))
    monkeypatch.setattr(model_catalog, "pull_model", pull)
    monkeypatch.setattr(model_catalog, "remove_model", remove)

    def factory(model, **flags):
        return ScriptedEngine([f"from {model}"], model_name=model)

    async def scenario():
        app = ChatApp(EngineLink({"model": "m1"}, factory=factory), history=history)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.link.ready, 10, "the model")
            await pilot.press("f2")
            await wait_for(pilot, lambda: getattr(app.screen, "rows", None), 10, "the list")
            screen = app.screen
            await pilot.press("p")
            screen.query_one("#pull-spec").value = "new/model"
            await pilot.press("enter")
            await wait_for(pilot, halfway.is_set, 10, "the pull to start")
            bar = screen.query_one("#pull-progress")
            await wait_for(pilot, lambda: bar.display and bar.percentage == 0.5, 10, "the progress bar at 50%")
            finish.set()
            await wait_for(pilot, lambda: any(r.name == "new/model" for r in screen.rows), 10, "the pulled model")
            assert not bar.display

            await pilot.press("down")  # old/model
            await pilot.press("d")
            await pilot.pause()
            assert type(app.screen).__name__ == "ConfirmScreen"
            await pilot.press("n")
            await pilot.pause()
            assert not removed
            await pilot.press("d", "y")
            await wait_for(pilot, lambda: removed == ["old/model"] and len(screen.rows) == 2, 10, "the deletion")

            await pilot.press("down", "enter")  # new/model: switch to it
            await wait_for(pilot, lambda: app.link.model_name == "new/model", 10, "the switch")
            assert type(app.screen).__name__ == "ChatScreen"

    run(scenario())


def test_an_unreadable_history_is_kept_aside_and_a_new_one_started(tmp_path, monkeypatch):
    """A chats file that is not SQLite (or is damaged) is renamed, never deleted, and the chat
    starts a new store and says so; a store that cannot be opened at all (here: a directory
    in its place) leaves the chat running unsaved, each save saying why."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    store = tmp_path / "localsgl" / "chats.sqlite3"
    store.parent.mkdir()
    store.write_bytes(b"not a database " * 100)
    engine = ScriptedEngine(lambda n, messages: f"reply {n}")

    async def session():
        app = make_app(engine, None)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            errors = [v.note for v in app.chat.message_views() if v.has_class("error")]
            assert len(errors) == 1 and "could not be read (file is not a database)" in errors[0], errors
            await send_and_wait(pilot, "hello")
        return app

    app = run(session())
    kept = [p for p in store.parent.iterdir() if p.name.startswith("chats.sqlite3.unreadable-")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"not a database " * 100
    assert [s.title for s in app.history.summaries()] == ["hello"]  # the new store works

    store.unlink()
    store.mkdir()  # sqlite cannot open a directory: OperationalError, not the file's fault

    async def unsaved():
        app = make_app(engine, None, resume=True)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            errors = [v.note for v in app.chat.message_views() if v.has_class("error")]
            assert len(errors) == 1 and errors[0].startswith("conversations are not saved this time: "), errors
            await send_and_wait(pilot, "still answers")
            assert answers(app)[-1].startswith("reply")
            await pilot.press("f3")
            await pilot.pause()
            assert type(app.screen).__name__ == "SessionsScreen" and app.screen.rows == []

    run(unsaved())
    assert store.is_dir() and not any(store.iterdir())


def test_a_store_locked_mid_chat_leaves_the_chat_running(history, monkeypatch):
    """Another program holding the store past its 5 s wait: --resume starts unsaved instead of
    crashing, and the sessions screen, reopening and deleting say why and go on."""
    import sqlite3

    engine = ScriptedEngine(lambda n, messages: f"reply {n}")

    async def first():
        app = make_app(engine, history)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "kept topic")

    run(first())

    def locked(*a, **k):
        raise sqlite3.OperationalError("database is locked")

    for method in ("latest", "summaries", "load", "delete"):
        monkeypatch.setattr(history, method, locked)

    async def second():
        app = make_app(engine, history, resume=True)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            errors = [v.note for v in app.chat.message_views() if v.has_class("error")]
            assert errors == ["conversations are not saved this time: database is locked"], errors
            assert app.conversation.messages == []  # not resumed, and nothing lost: the store still holds it
            await send_and_wait(pilot, "still answers")
            assert answers(app)[-1].startswith("reply")

    run(second())

    async def third():  # the store opened, then locked: the sessions screen and reopening
        monkeypatch.setattr(history, "latest", lambda: None)
        app = make_app(engine, history)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await pilot.press("f3")
            await pilot.pause()
            assert type(app.screen).__name__ == "SessionsScreen" and app.screen.rows == []
            await pilot.press("escape")
            await pilot.pause()
            await app.open_conversation(1)
            await pilot.pause()
            assert app.conversation.messages == []

    run(third())
    monkeypatch.undo()
    assert [s.title for s in history.summaries()] == ["kept topic"]
