"""Streaming cost: a scripted 2,000-token Markdown answer arriving at 500 tokens/s renders
without the view falling behind the engine by more than 100 ms.

The answer streams in a process of its own, as the chat runs, so what earlier tests left in
the test process (millions of objects, their threads) is not measured. The scripted engine
stamps every token when it emits it; the answer's stream reports, after each update reaches
the screen, how many characters are on it. A token's lag is the time from its emission to the
first screen update that holds it. A wall-clock bound only means something when the test
has a core to itself: where a short spin before and after shows the UI thread getting less
than 80% of a core, or where the kernel's scheduler statistics show it waited for a CPU
during more than 10% of the answer, the test reports its figures and skips the bound."""
from __future__ import annotations

import asyncio
import bisect
import json
import subprocess
import sys
import threading
import time

import pytest

from chat_pilot import make_app, type_and_send, wait_for
from scripted_engine import ScriptedEngine, tokens_of

TOKENS = 2000
RATE = 500.0
MAX_LAG = 0.100
MIN_CPU_SHARE = 0.8  # below this the machine is oversubscribed and wall-clock lag measures the others
MAX_RUN_QUEUE_SHARE = 0.1  # above this the thread spent its answer waiting for a CPU the machine gave others

# A typical long technical answer: headings, prose, lists, code and a small table.
_ANSWER = """## How the scheduler admits a request

When a request arrives, the engine does not start computing right away. It first looks for
the longest prefix of the prompt that is already in the **radix cache**, because every token
found there is a token whose keys and values do not have to be computed again. In a chat,
that prefix is usually the whole conversation so far, so only the newest message is new.

The admission itself happens in three steps:

1. Match the prompt against the radix cache and *lock* the matched prefix, so that it
   cannot be evicted while the request still needs it.
2. Allocate KV slots for the remaining tokens, evicting unlocked leaves in LRU order when
   the pool is short.
3. Add the request to the next prefill batch, split into chunks if the prompt is long.

Here is the core of it, simplified:

```python
def admit(request, cache, pool):
    prefix = cache.match(request.tokens)
    cache.lock(prefix)
    needed = len(request.tokens) - len(prefix)
    if pool.free < needed:
        pool.evict(needed - pool.free)
    slots = pool.allocate(needed)
    return Admitted(request, prefix, slots)
```

### What it costs

Matching walks the tree once per prompt, and allocation is proportional to the number of
new tokens, so admission stays cheap next to the forward pass it feeds:

| step | cost | notes |
|------|------|-------|
| match | O(prompt) | one walk down the tree |
| evict | O(evicted) | only when the pool is short |
| allocate | O(new tokens) | a free-list pop per token |

A few practical consequences follow from this design:

- Long system prompts are almost free after the first request that uses them.
- Regenerating an answer reuses the whole prompt, so the first token comes quickly.
- When memory runs short, the oldest unlocked prefixes go first, and a running request
  is never evicted; it may be retracted and resumed later instead.

If you want to see this at work, run two turns of a chat and watch the status line: the
second turn's cache figure shows how many prompt tokens came from the first.

"""


def scripted_answer(n_tokens: int) -> str:
    """Markdown of exactly ``n_tokens`` scripted tokens: the typical answer, repeated."""
    block_tokens = len(tokens_of(_ANSWER))
    text = "".join(tokens_of(_ANSWER * (n_tokens // block_tokens + 2))[:n_tokens])
    assert len(tokens_of(text)) == n_tokens
    return text


def lags(emitted: list[tuple[int, float]], rendered: list[tuple[int, float]]) -> list[float]:
    """Each emitted token's wait until a render showed it (inf if none did)."""
    rendered = sorted(rendered, key=lambda r: r[1])
    best: list[tuple[int, float]] = []  # (chars, time) with chars rising
    for chars, t in rendered:
        if not best or chars > best[-1][0]:
            best.append((chars, t))
    shown = [c for c, _ in best]
    out = []
    for chars, t_emit in emitted:
        i = bisect.bisect_left(shown, chars)
        out.append(best[i][1] - t_emit if i < len(best) else float("inf"))
    return out


def cpu_share(seconds: float = 0.3) -> float:
    """The part of a core this thread gets now: CPU time over wall time while spinning."""
    t0, c0 = time.perf_counter(), time.thread_time()
    while time.perf_counter() - t0 < seconds:
        pass
    return (time.thread_time() - c0) / (time.perf_counter() - t0)


def run_queue_seconds() -> float | None:
    """How long this thread has waited, runnable, for a CPU (None where the kernel does not say)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def test_lags_measures_the_wait_until_a_render_holds_the_token():
    emitted = [(3, 1.0), (6, 1.1), (9, 1.2)]
    rendered = [(2, 1.05), (6, 1.15), (9, 1.5)]
    assert [round(x, 3) for x in lags(emitted, rendered)] == [0.15, 0.05, 0.3]
    assert lags([(10, 0.0)], [(9, 1.0)]) == [float("inf")]


def measure(history_path: str) -> dict:
    """The scenario in this process: the answer streamed into a pilot-driven app, and the figures."""
    from localsgl.tui.history import ChatHistory

    answer = scripted_answer(TOKENS)
    engine = ScriptedEngine([answer], tokens_per_second=RATE)
    rendered: list[tuple[int, float]] = []
    costs: dict[str, float | None] = {}

    async def scenario():
        app = make_app(engine, ChatHistory(history_path),
                       on_rendered=lambda chars, t: rendered.append((chars, t)))
        async with app.run_test(size=(100, 40)) as pilot:
            await pilot.pause()
            t0, c0, q0 = time.perf_counter(), time.thread_time(), run_queue_seconds()
            await type_and_send(pilot, "explain admission")
            await wait_for(pilot, lambda: not app.answering and app.conversation.messages[-1].role == "assistant",
                           TOKENS / RATE + 60, "the whole answer")
            q1 = run_queue_seconds()
            costs.update(wall=time.perf_counter() - t0, cpu=time.thread_time() - c0,
                         queued=None if q0 is None or q1 is None else q1 - q0)
            m = app.conversation.messages[-1]
            return m.content, app.chat.message_views()[-1].source

    share_before = cpu_share()
    content, source = asyncio.run(scenario())
    waits = sorted(lags(engine.emitted, rendered))
    return dict(answer_intact=content == answer and source == answer, emitted=len(engine.emitted),
                emit_span=engine.emitted[-1][1] - engine.emitted[0][1], renders=len(rendered),
                median=waits[len(waits) // 2], p99=waits[int(0.99 * (len(waits) - 1))], worst=waits[-1],
                share=min(share_before, cpu_share()), **costs)


def test_a_2000_token_answer_at_500_per_second_renders_within_100ms(tmp_path):
    # in a process of its own, as the chat runs: not in one that earlier tests left holding
    # millions of objects and their threads
    out = subprocess.run([sys.executable, __file__, str(tmp_path / "chats.sqlite3")], capture_output=True, text=True,
                         timeout=TOKENS / RATE + 120)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["answer_intact"] and r["emitted"] == TOKENS
    assert r["emit_span"] >= 0.9 * TOKENS / RATE  # the engine kept its rate: the test measured the UI
    cpu_seconds, wall_seconds, queued = r["cpu"], r["wall"], r["queued"]
    # the bound holds for 99% of the tokens: a single pause of the shared CI machine (another
    # process) must not decide the test, while a view that cannot keep up with the stream still fails it
    p99 = r["p99"]
    report = (f"{TOKENS} tokens at {RATE:.0f}/s: {r['renders']} renders, lag median {r['median'] * 1000:.0f} ms, "
              f"p99 {p99 * 1000:.0f} ms, worst {r['worst'] * 1000:.0f} ms, "
              f"UI thread CPU {cpu_seconds:.2f} s over {wall_seconds:.2f} s, "
              f"{cpu_seconds / max(1, r['renders']) * 1000:.0f} ms a render"
              + ("" if queued is None else f", {queued * 1000:.0f} ms waiting for a CPU"))
    print("\n" + report)
    if r["share"] < MIN_CPU_SHARE:
        pytest.skip(f"this thread got {r['share']:.0%} of a core: a wall-clock bound says nothing here ({report})")
    if queued is not None and queued > MAX_RUN_QUEUE_SHARE * wall_seconds:
        pytest.skip(f"this thread waited {queued / wall_seconds:.0%} of the answer for a CPU: "
                    f"a wall-clock bound says nothing here ({report})")
    assert p99 <= MAX_LAG, f"the view fell {p99 * 1000:.0f} ms behind the engine at the 99th percentile ({report})"


if __name__ == "__main__":  # the measuring process: its figures as the last line of output
    print(json.dumps(measure(sys.argv[1])))
