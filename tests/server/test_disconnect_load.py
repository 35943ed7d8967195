"""Client disconnects free their KV; 200 concurrent streams finish with no error and
leave the KV pool full (nothing locked, everything used is evictable cache)."""
from __future__ import annotations

import asyncio
import time

import httpx
from conftest import assert_kv_pool_full

LONG = 400  # tokens: far more than the test waits for, so only an abort can end these requests


def _body(server, i: int, **kw) -> dict:
    body = {"model": server.model, "messages": [{"role": "user", "content": f"Count slowly, request {i}."}],
            "max_tokens": LONG, "temperature": 1.0, "seed": i, "ignore_eos": True}
    body.update(kw)
    return body


def test_streaming_clients_hang_up(server):
    server.wait_idle()
    before = server.metrics()

    async def hang_up(i: int) -> int:
        async with httpx.AsyncClient(base_url=server.base, headers=server.headers, timeout=120) as c:
            async with c.stream("POST", "/v1/chat/completions", json=_body(server, i, stream=True)) as r:
                assert r.status_code == 200
                chunks = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        chunks += 1
                        if chunks >= 3 + i % 3:
                            break
                return chunks

    async def run():
        return await asyncio.wait_for(asyncio.gather(*[hang_up(i) for i in range(20)]), 180)

    got = asyncio.run(run())
    assert all(g >= 3 for g in got)
    t0 = time.monotonic()
    m = server.wait_idle(timeout=30)
    assert_kv_pool_full(m)
    assert m["localsgl_client_disconnects_total"] - before.get("localsgl_client_disconnects_total", 0) == 20
    # generated far fewer tokens than the 20 * LONG the requests asked for
    gen = m["localsgl_generation_tokens_total"] - before.get("localsgl_generation_tokens_total", 0)
    assert gen < 20 * LONG / 2, gen
    assert time.monotonic() - t0 < 30


def test_non_streaming_client_gives_up_while_waiting(server):
    server.wait_idle()
    before = server.metrics()

    async def give_up(i: int):
        async with httpx.AsyncClient(base_url=server.base, headers=server.headers, timeout=0.5) as c:
            try:
                await c.post("/v1/chat/completions", json=_body(server, 100 + i))
            except httpx.TimeoutException:
                return True
            return False

    async def run():
        return await asyncio.gather(*[give_up(i) for i in range(5)])

    assert all(asyncio.run(run()))
    m = server.wait_idle(timeout=30)
    assert_kv_pool_full(m)
    assert m["localsgl_client_disconnects_total"] - before.get("localsgl_client_disconnects_total", 0) == 5


def test_200_concurrent_streams(server):
    server.wait_idle()
    client = server.async_openai(timeout=300)
    shared = "You are a helpful assistant. Answer in one short sentence. "

    async def one(i: int):
        stream = await client.chat.completions.create(
            model=server.model,
            messages=[{"role": "system", "content": shared},
                      {"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"}],
            max_tokens=6 + i % 4, temperature=0.8, seed=i, stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage = "", None, None
        async for ch in stream:
            if ch.usage is not None:
                usage = ch.usage
            for c in ch.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        return text, finish, usage

    async def run():
        try:
            return await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(200)], return_exceptions=True), 300)
        finally:
            await client.close()

    t0 = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} errors, first: {errors[0]!r}"
    for i, (text, finish, usage) in enumerate(results):
        assert finish in ("stop", "length"), (i, finish)
        assert usage is not None and 1 <= usage.completion_tokens <= 6 + i % 4
    m = server.wait_idle(timeout=60)
    assert_kv_pool_full(m)
    assert m["localsgl_http_requests_pending"] == 0
    print(f"200 streams in {elapsed:.1f}s")
