"""Unit tests of the engine-thread -> event-loop bridge: the coalescing mailbox delivers
every delta in order (including deltas posted from another thread while a delivery runs),
and merged deltas keep text, tokens, logprobs and the finish reason."""
import asyncio
import threading

from localsgl.engine.params import StreamDelta, TokenLogprob
from localsgl.server.streaming import LoopMailbox, _merge_pending


def test_mailbox_delivers_everything_in_order_from_threads():
    async def main():
        loop = asyncio.get_running_loop()
        box = LoopMailbox(loop)
        queues = [asyncio.Queue() for _ in range(4)]
        n = 2000

        def producer():
            for i in range(n):
                box.post(queues[i % 4], i)

        th = threading.Thread(target=producer)
        th.start()
        got = [[] for _ in range(4)]
        for j, q in enumerate(queues):
            while len(got[j]) < n // 4:  # each delivery hands a queue its items as one list
                got[j].extend(await asyncio.wait_for(q.get(), 10))
        th.join()
        return got

    got = asyncio.run(main())
    for j in range(4):
        assert got[j] == list(range(j, 2000, 4))


def test_merge_pending_joins_same_choice_until_finish():
    lp = lambda t: TokenLogprob(t, str(t), -0.5, [])  # noqa: E731
    items = [
        (0, StreamDelta(0, "a", [1], None, [lp(1)])),
        (0, StreamDelta(0, "b", [2], None, [lp(2)])),
        (0, StreamDelta(1, "x", [9])),
        (0, StreamDelta(1, "y", [8], "stop")),
        (0, StreamDelta(1, "z", [7])),  # after a finish: never merged into it
        (1, StreamDelta(1, "p", [5])),
    ]
    out = _merge_pending(items)
    assert [(p, d.index, d.text, d.token_ids, d.finish_reason) for p, d in out] == [
        (0, 0, "ab", [1, 2], None),
        (0, 1, "xy", [9, 8], "stop"),
        (0, 1, "z", [7], None),
        (1, 1, "p", [5], None),
    ]
    assert [x.token_id for x in out[0][1].logprobs] == [1, 2]
    assert out[1][1].logprobs is None


def test_sse_choice_equals_full_serialization():
    import json

    from localsgl.server.streaming import sse, sse_choice, sse_choice_prefix

    for base in ({"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m\u00e9", "usage": None},
                 {"id": "x"}):
        choice = {"index": 1, "text": 'a "quoted"\n\u00fc\U0001f600', "logprobs": None, "finish_reason": None}
        got = sse_choice(sse_choice_prefix(base), choice)
        assert got == sse({**base, "choices": [choice]})
        assert json.loads(got[6:].decode()) == {**base, "choices": [choice]}


def test_merge_pending_keeps_the_error_of_a_failed_choice():
    items = [(0, StreamDelta(0, "a", [1], None)),
             (0, StreamDelta(0, "", [], "error", None, None, {"error": "RuntimeError: boom"}))]
    merged = _merge_pending(items)
    assert len(merged) == 1
    assert merged[0][1].finish_reason == "error" and merged[0][1].extra == {"error": "RuntimeError: boom"}


def test_observe_times_equals_repeated_observe():
    """The stream path's one-update histogram count equals observing each gap alone."""
    import pytest
    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from localsgl.server.metrics import observe_times

    buckets = (0.001, 0.005, 0.01, 0.1)
    a, b = CollectorRegistry(), CollectorRegistry()
    ha = Histogram("itl", "x", buckets=buckets, registry=a)
    hb = Histogram("itl", "x", buckets=buckets, registry=b)
    for amount, times in ((0.0005, 3), (0.001, 2), (0.0011, 1), (0.05, 4), (7.0, 5), (0.1, 1)):
        observe_times(ha, amount, times)
        for _ in range(times):
            hb.observe(amount)

    def samples(reg):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(generate_latest(reg).decode())
                for s in fam.samples if not s.name.endswith("_created")}

    got, want = samples(a), samples(b)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k
