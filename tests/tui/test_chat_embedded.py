"""The chat app over the real engine and the embedded model (smollm2-135m on the CPU),
one engine shared by the module and answers of a few tokens: the status line's figures,
prefix-cache reuse across turns, Esc freeing the KV of the request it stops, the
commands, resuming, and the model screen."""
from __future__ import annotations

import asyncio
import json

import pytest
from chat_pilot import make_app, send_and_wait, type_and_send, wait_for

from localsgl.tui.conversation import Conversation

SIZE = (80, 24)
SHORT = {"max_tokens": 3, "temperature": 0.0}
ANSWER_TIMEOUT = 240.0  # a loaded 2-core CI machine can be slow


@pytest.fixture(scope="module")
def engine():
    from localsgl import Engine

    with Engine(model="smollm2-135m", device="cpu", dtype="float32", kv_memory="32MiB", max_model_len=512) as e:
        yield e


def idle_kv(engine) -> bool:
    s = engine.stats()
    return s["running"] == 0 and s["waiting"] == 0 and s["kv_slots_locked"] == 0


def run(coro):
    return asyncio.run(coro)


def test_two_turns_reuse_the_first_turns_kv_and_the_status_line_shows_it(engine, history):
    async def scenario():
        app = make_app(engine, history, sampling=SHORT)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "What is the capital of France?", ANSWER_TIMEOUT)
            first = app.last_turn
            answer = app.conversation.messages[-1]
            assert answer.role == "assistant" and answer.content.strip() and answer.finish_reason in ("stop", "length")
            assert answer.content in app.chat.message_views()[-1].source
            assert first.prompt_tokens > 5 and 1 <= first.completion_tokens <= 3
            line = app.chat.status.line(80)
            assert line.startswith("smollm2-135m") and "cpu" in line and "TTFT" in line
            assert f"ctx {first.context_tokens}/512" in line
            assert f"KV {engine.stats()['kv_slots_used']}/{engine.stats()['kv_slots_total']}" in line

            await send_and_wait(pilot, "And of Italy?", ANSWER_TIMEOUT)
            second = app.last_turn
            # the second prompt starts with the first turn: the radix cache holds its KV
            assert second.cached_prompt_tokens >= first.prompt_tokens - 1
            assert f"cache {second.cached_prompt_tokens}/{second.prompt_tokens}" in app.chat.status.line(80)
        saved = history.load(app.conversation.id)
        assert [m.role for m in saved.messages] == ["user", "assistant", "user", "assistant"]

    run(scenario())


def test_escape_aborts_the_request_and_the_kv_pool_is_full_again(engine, history):
    async def scenario():
        app = make_app(engine, history, sampling={"max_tokens": 200, "temperature": 0.0})
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: idle_kv(engine), 60, "an idle engine")
            await type_and_send(pilot, "Write a long story about a cat.")
            await wait_for(pilot, lambda: engine.stats()["running"] == 1 and app.chat.message_views()[-1].source,
                           ANSWER_TIMEOUT, "the first streamed words")
            assert engine.stats()["kv_slots_locked"] > 0
            await pilot.press("escape")
            await wait_for(pilot, lambda: not app.answering, 30, "the stop")
            await wait_for(pilot, lambda: idle_kv(engine), 30, "the abort to reach the engine")
            s = engine.stats()
            # every slot in use is reusable cache: free + evictable is the whole pool
            assert s["kv_slots_used"] == s["kv_slots_cached"]
            reply = app.conversation.messages[-1]
            assert reply.finish_reason == "abort" and app.last_turn.completion_tokens < 200
            assert "(stopped)" in app.chat.message_views()[-1].header

    run(scenario())


def test_commands_over_the_real_engine(engine, history, tmp_path):
    async def scenario():
        app = make_app(engine, history, sampling=SHORT)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "Say hi.", ANSWER_TIMEOUT)
            plain = app.last_turn.prompt_tokens
            await type_and_send(pilot, "/system You answer in French.")
            await type_and_send(pilot, "/regenerate")
            await wait_for(pilot, lambda: not app.answering and app.conversation.messages[-1].role == "assistant",
                           ANSWER_TIMEOUT, "the regenerated answer")
            # the prompt answered is the system message plus the question
            asked = app.conversation.engine_messages()[:-1]
            assert asked[0] == {"role": "system", "content": "You answer in French."}
            assert app.last_turn.prompt_tokens == len(engine.apply_chat_template(asked)) != plain
            assert len(app.conversation.messages) == 2

            await type_and_send(pilot, "/edit Say bye.")
            await wait_for(pilot, lambda: not app.answering and app.conversation.messages[-1].role == "assistant",
                           ANSWER_TIMEOUT, "the edited answer")
            assert [m.content for m in app.conversation.messages if m.role == "user"] == ["Say bye."]

            out = tmp_path / "chat.json"
            await type_and_send(pilot, f"/save {out}")
            data = json.loads(out.read_text())
            assert data["system"] == "You answer in French." and len(data["messages"]) == 2
            assert Conversation.from_dict(data).messages[-1].content == app.conversation.messages[-1].content

            await type_and_send(pilot, "/clear")
            await pilot.pause()
            assert app.conversation.messages == []
            assert len(history.summaries()) == 1  # an empty conversation is not saved

    run(scenario())


def test_resume_reopens_the_conversation_and_reuses_its_kv(engine, history):
    async def first():
        app = make_app(engine, history, sampling=SHORT)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "Name a colour.", ANSWER_TIMEOUT)
        return app.conversation

    old = run(first())

    async def second():
        app = make_app(engine, history, sampling=SHORT, resume=True)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert app.conversation.id == old.id
            assert [m.content for m in app.conversation.messages] == [m.content for m in old.messages]
            await send_and_wait(pilot, "Another one.", ANSWER_TIMEOUT)
            assert app.last_turn.cached_prompt_tokens > 0

    run(second())


def test_the_model_screen_lists_the_embedded_model(engine, history):
    async def scenario():
        app = make_app(engine, history, sampling=SHORT)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("f2")
            await wait_for(pilot, lambda: type(app.screen).__name__ == "ModelScreen" and app.screen.rows, 30,
                           "the model list")
            rows = {r.name: r for r in app.screen.rows}
            assert "smollm2-135m" in rows
            row = rows["smollm2-135m"]
            assert row.source == "embedded" and row.format.startswith("GGUF") and row.size_bytes > 50e6
            table = app.screen.query_one("#models")
            assert "●" in str(table.get_row("smollm2-135m")[0])  # the model in use is marked
            await pilot.press("escape")
            await pilot.pause()
            assert type(app.screen).__name__ == "ChatScreen"

    run(scenario())
