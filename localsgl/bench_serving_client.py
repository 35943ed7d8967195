"""The serving benchmark's HTTP client: a workload sent as streaming ``/v1/completions``
requests, each timed as its SSE events arrive (bench_serving.py builds the workload and
reports the figures).

``run_workload`` starts the requests at Poisson arrival times (rate inf: all at once),
within an optional concurrency bound, and records per request the send time, TTFT, the gaps
between chunks, e2e, the output tokens (from the final usage chunk) and any error;
``client_run`` is its synchronous entry point, which the spawned client process runs.

The client speaks HTTP/1.1 over bare asyncio connections (``http_client`` "raw", for http
URLs), reading the SSE events from the chunked body itself: httpx costs the client ~30 µs of
CPU per streamed token, more than the server's side of it (bench/RESULTS.md, "the serving
benchmark's own client").  ``http_client`` "httpx" keeps httpx for comparison.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from urllib.parse import urlsplit

MAX_CONNECTIONS = 4096


async def _one(client, url: str, headers: dict, body: dict, rec: dict) -> None:
    """Send one streaming completion; fill rec with timings (perf_counter seconds)."""
    t0 = time.perf_counter()
    rec["sent"] = t0
    tally = _Tally(rec, t0)
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                raw = (await resp.aread())[:300].decode("utf-8", "replace")
                rec["error"] = f"HTTP {resp.status_code}: {raw}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                if not tally.event(json.loads(data), now):
                    return
        tally.done()
    except asyncio.CancelledError:
        rec["error"] = "not finished within --max-seconds"
        raise
    except Exception as e:  # noqa: BLE001 - a failed request is a figure, not a crash
        rec["error"] = f"{type(e).__name__}: {e}"[:300]


class _Tally:
    """One request's record as its SSE events arrive (both clients)."""

    __slots__ = ("rec", "t0", "last", "chunks", "usage_tokens")

    def __init__(self, rec: dict, t0: float):
        self.rec, self.t0 = rec, t0
        self.last = self.usage_tokens = None
        self.chunks = 0

    def event(self, obj: dict, now: float) -> bool:
        """Count one event; False (and the record's error set) for a stream error."""
        rec = self.rec
        if "error" in obj:
            rec["error"] = f"stream error: {str(obj['error'])[:200]}"
            return False
        if obj.get("usage"):
            self.usage_tokens = obj["usage"].get("completion_tokens")
        for ch in obj.get("choices") or ():
            # a chunk with text, or a token chunk of a server without a tokenizer (dummy weights)
            if ch.get("text") or ch.get("finish_reason") is None:
                self.chunks += 1
                if self.last is None:
                    rec["ttft"] = now - self.t0
                else:
                    rec["itl"].append(now - self.last)
                self.last = now
        return True

    def done(self) -> None:
        """The stream ended with [DONE]."""
        rec = self.rec
        rec["e2e"] = time.perf_counter() - self.t0
        rec["out_tokens"] = self.usage_tokens if self.usage_tokens is not None else self.chunks
        rec["ok"] = True


async def _one_raw(host: str, port: int, path: str, headers: dict, body: dict, rec: dict, timeout: float) -> None:
    """_one over a bare asyncio connection: HTTP/1.1, one request, its chunked SSE body read event
    by event: a loopback benchmark's client must cost the server's side little (module docstring)."""
    t0 = time.perf_counter()
    rec["sent"] = t0
    tally = _Tally(rec, t0)
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30.0)
        payload = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
        writer.write(head.encode() + payload)
        status = int((await asyncio.wait_for(reader.readline(), timeout)).split()[1])
        chunked, length = False, None
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "content-length":
                length = int(value)

        async def body_parts():
            if not chunked:
                whole = reader.readexactly(length) if length is not None else reader.read()
                yield await asyncio.wait_for(whole, timeout)
                return
            while True:
                size = int((await asyncio.wait_for(reader.readline(), timeout)).split(b";")[0], 16)
                if size == 0:
                    return
                yield (await asyncio.wait_for(reader.readexactly(size + 2), timeout))[:-2]

        if status != 200:
            raw = b"".join([part async for part in body_parts()])[:300].decode("utf-8", "replace")
            rec["error"] = f"HTTP {status}: {raw}"
            return
        buf = b""
        async for part in body_parts():
            buf += part
            while True:
                end = buf.find(b"\n\n")
                if end < 0:
                    break
                event, buf = buf[:end], buf[end + 2:]
                if not event.startswith(b"data:"):
                    continue
                data = event[5:].strip()
                if data == b"[DONE]":
                    tally.done()
                    return
                if not tally.event(json.loads(data), time.perf_counter()):
                    return
        rec["error"] = "the stream ended without [DONE]"
    except asyncio.CancelledError:
        rec["error"] = "not finished within --max-seconds"
        raise
    except Exception as e:  # noqa: BLE001 - a failed request is a figure, not a crash
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        if writer is not None:
            writer.close()


async def run_workload(cfg: dict) -> dict:
    """cfg: url, api_key, model, prompts (token id lists), outs, rate (float, inf allowed),
    concurrency (int or None), seed, max_seconds, request_timeout."""
    import httpx

    prompts, outs = cfg["prompts"], cfg["outs"]
    n = len(prompts)
    rate = float(cfg["rate"])
    conc = cfg.get("concurrency")
    sem = asyncio.Semaphore(conc) if conc else None
    rng = random.Random(cfg.get("seed", 0))
    url = cfg["url"].rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {cfg['api_key']}"} if cfg.get("api_key") else {}
    recs = [{"ok": False, "error": None, "ttft": None, "itl": [], "e2e": None, "out_tokens": 0,
             "in_tokens": len(p), "want_tokens": o, "sent": None} for p, o in zip(prompts, outs)]
    nconn = max(1, min(MAX_CONNECTIONS, conc or n, n))
    limits = httpx.Limits(max_connections=nconn, max_keepalive_connections=nconn)
    timeout = httpx.Timeout(connect=30.0, read=cfg.get("request_timeout", 600.0), write=30.0, pool=None)

    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:

        parts = urlsplit(url)
        raw = cfg.get("http_client", "raw") == "raw" and parts.scheme == "http"

        async def one(body: dict, rec: dict) -> None:
            if raw:
                await _one_raw(parts.hostname, parts.port or 80, parts.path, headers, body, rec,
                               cfg.get("request_timeout", 600.0))
            else:
                await _one(client, url, headers, body, rec)

        async def send(i: int) -> None:
            body = {"model": cfg["model"], "prompt": prompts[i], "max_tokens": outs[i], "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            if sem is None:
                await one(body, recs[i])
            else:
                async with sem:
                    await one(body, recs[i])

        async def dispatch() -> None:
            tasks = []
            for i in range(n):
                tasks.append(asyncio.create_task(send(i)))
                if math.isfinite(rate) and i + 1 < n:
                    await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks)

        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(dispatch(), timeout=cfg.get("max_seconds", 1800.0))
        except asyncio.TimeoutError:
            pass
        ends = [r["sent"] + r["e2e"] for r in recs if r["ok"]]
        t_end = max(ends) if ends else time.perf_counter()
    return {"requests": recs, "duration": t_end - t0}


def client_run(cfg: dict) -> dict:
    """Synchronous entry point (also what the spawned client process runs)."""
    _raise_fd_limit()
    return asyncio.run(run_workload(cfg))


def _raise_fd_limit() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except Exception:  # noqa: BLE001
        pass
