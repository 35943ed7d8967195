"""`localsgl bench serving`: online serving benchmark against the OpenAI-compatible server.

By default an Engine is built from the engine flags, the offline throughput of the
workload is measured on it first (``engine.generate`` on all prompts at once, as
``bench throughput`` does), then the app from ``create_app(engine)`` is served by
uvicorn in a background thread on a free loopback port and the same workload (same
lengths, fresh random token ids per run so the radix cache gives no hits) is sent as
streaming ``/v1/completions`` requests at each ``--request-rate`` (Poisson arrivals;
``inf`` sends everything at once) and each ``--max-concurrency`` bound.  With
``--url`` an already running loopback server is measured instead (no offline figure:
its engine is not ours).

Requests carry the prompt as token ids, ``temperature 0``, ``max_tokens`` and the
``ignore_eos`` extension, so every request produces exactly its output length; the
token count comes from the final usage chunk (``stream_options.include_usage``).

Per request: TTFT (send -> first SSE chunk with text, or any token chunk: a server
without a tokenizer streams empty-text chunks), ITL (gaps between successive such chunks;
one chunk may carry more than one token when the detokenizer holds back an incomplete
character), e2e (send -> end of stream).  The timer starts when the request is sent, i.e.
after it got a ``--max-concurrency`` slot.

The HTTP client (bench_serving_client.py: bare asyncio HTTP/1.1 by default, ``--http-client
httpx`` for comparison) runs in a spawned child process (``--client process``, default with
the embedded server) so its Python work does not share the GIL with the server and the
engine's scheduler; ``--client thread`` runs it in this process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from urllib.parse import urlsplit

from .bench_serving_client import client_run

MAX_PROMPTS = 20000
COLUMNS = ["rate", "conc", "done", "fail", "req/s", "out tok/s", "TTFT p50", "TTFT p99",
           "ITL p50", "ITL p99", "e2e p50", "x offline"]


# ---------------------------------------------------------------- statistics
def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for an empty list."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(res: dict, label: dict) -> dict:
    """Per-run figures from the client's per-request records."""
    reqs = res["requests"]
    ok = [r for r in reqs if r and r["ok"]]
    failed = len(reqs) - len(ok)
    dur = max(res["duration"], 1e-9)
    out_tok = sum(r["out_tokens"] for r in ok)
    in_tok = sum(r["in_tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [g for r in ok for g in r["itl"]]
    e2e = [r["e2e"] for r in ok]
    tpot = [(r["e2e"] - r["ttft"]) / (r["out_tokens"] - 1) for r in ok
            if r["ttft"] is not None and r["out_tokens"] > 1]
    errors: dict[str, int] = {}
    for r in reqs:
        if not (r and r["ok"]):
            msg = (r or {}).get("error") or "not finished within --max-seconds"
            errors[msg] = errors.get(msg, 0) + 1
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    return {
        **label,
        "completed": len(ok), "failed": failed, "duration_s": dur,
        "short_outputs": sum(1 for r in ok if r["out_tokens"] != r["want_tokens"]),
        "request_throughput": len(ok) / dur, "output_throughput": out_tok / dur,
        "input_throughput": in_tok / dur, "output_tokens": out_tok,
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
        "ttft_ms_mean": ms(sum(ttft) / len(ttft)) if ttft else None,
        "itl_ms_p50": ms(percentile(itl, 50)), "itl_ms_p99": ms(percentile(itl, 99)),
        "tpot_ms_p50": ms(percentile(tpot, 50)),
        "e2e_ms_p50": ms(percentile(e2e, 50)), "e2e_ms_p99": ms(percentile(e2e, 99)),
        "ttft_le_e2e": all(r["ttft"] is None or r["ttft"] <= r["e2e"] for r in ok),
        "errors": errors,
    }


# ---------------------------------------------------------------- embedded server
class EmbeddedServer:
    """uvicorn serving ``create_app(engine)`` in a daemon thread on a free 127.0.0.1 port."""

    def __init__(self, engine, api_key: str | None, max_queue: int):
        import socket
        import threading

        import uvicorn

        from .server.app import create_app

        self.app = create_app(engine, api_key=api_key, max_queue=max_queue)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on",
                                timeout_keep_alive=30, timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="localsgl-bench-uvicorn", daemon=True)

    def start(self, timeout: float = 60.0) -> None:
        import httpx

        self.thread.start()
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if not self.thread.is_alive():
                raise RuntimeError("the embedded server exited during startup")
            try:
                if httpx.get(self.url + "/health", timeout=2.0, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the embedded server did not answer /health within {timeout:g} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- workload
def make_workload(a) -> tuple[list[int], list[int]]:
    rng = random.Random(a.seed)
    if a.workload == "mixed":
        from .bench import mixed_lengths  # here: bench imports torch and the engine

        reqs = mixed_lengths(rng, a.num_prompts)
    else:
        reqs = [(a.input_len, a.output_len)] * a.num_prompts
    return [i for i, _ in reqs], [o for _, o in reqs]


def token_prompts(lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo, hi = min(100, vocab // 4), max(min(100, vocab // 4) + 1, vocab - 100)
    return [[rng.randrange(lo, hi) for _ in range(n)] for n in lens]


def _device_name(engine) -> str:
    import platform

    import torch

    if engine.device.type == "cuda":
        return torch.cuda.get_device_name(engine.device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def offline_throughput(engine, lens: list[int], outs: list[int], seed: int) -> dict:
    """engine.generate on all prompts of the workload at once (temperature 0, ignore_eos)."""
    from .bench import _timed

    vocab = engine.config.vocab_size
    warm = token_prompts([min(x, 64) for x in lens[:8]], vocab, seed + 7919)
    _timed(engine, warm, [4])
    t = _timed(engine, token_prompts(lens, vocab, seed + 104729), outs)
    return {"seconds": t, "output_throughput": sum(outs) / t, "request_throughput": len(outs) / t,
            "output_tokens": sum(outs)}


def _jsonable(x):
    """inf rates as the string "inf" (JSON has no infinity)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    w = [6, 5, 5, 5, 8, 10, 9, 9, 8, 8, 9, 9]
    lines = ["  ".join(c.rjust(x) for c, x in zip(COLUMNS, w))]
    for r in rows:
        rate = "inf" if not math.isfinite(r["request_rate"]) else format(r["request_rate"], "g")
        cells = [rate, str(r["max_concurrency"] or "-"), str(r["completed"]), str(r["failed"]),
                 _fmt(r["request_throughput"], ".2f"), _fmt(r["output_throughput"], ".1f"),
                 _fmt(r["ttft_ms_p50"], ".1f"), _fmt(r["ttft_ms_p99"], ".1f"),
                 _fmt(r["itl_ms_p50"], ".2f"), _fmt(r["itl_ms_p99"], ".2f"),
                 _fmt(r["e2e_ms_p50"], ".1f"), _fmt(r.get("vs_offline"), ".2f")]
        lines.append("  ".join(c.rjust(x) for c, x in zip(cells, w)))
    return "\n".join(lines)


def _rate(s: str) -> float:
    v = float(s)
    if not (v > 0):
        raise argparse.ArgumentTypeError("request rates must be > 0 (inf = all at once)")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="localsgl bench serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="measure this running server (loopback only), e.g. http://127.0.0.1:8000; "
                                 "default: serve the engine flags' model in-process on a free port")
    p.add_argument("--api-key", default=None, help="Bearer key for --url (default $LOCALSGL_API_KEY; the embedded server uses none)")
    p.add_argument("--model", dest="served_model", default=None, help="model name to send (default: /v1/models)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="token ids are drawn below this (--url only; default 32000, in-process: the model's)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--workload", choices=["fixed", "mixed"], default="fixed",
                   help="mixed: input U[128,1024], output U[128,512] per request")
    p.add_argument("--request-rate", type=_rate, nargs="+", default=[math.inf],
                   help="requests/s, Poisson arrivals; inf sends all at once (a sweep: 1 4 16 inf)")
    p.add_argument("--max-concurrency", type=int, nargs="+", default=[0],
                   help="at most this many requests in flight (0 = unbounded); several values sweep")
    p.add_argument("--warmup", type=int, default=2, help="short requests sent before the sweep (not measured)")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="time limit per run; unfinished = failed")
    p.add_argument("--request-timeout", type=float, default=600.0, help="longest wait for the next chunk")
    p.add_argument("--client", choices=["process", "thread"], default="process",
                   help="where the HTTP client runs with the embedded server (a spawned process by default)")
    p.add_argument("--http-client", choices=["raw", "httpx"], default="raw",
                   help="the client's HTTP: a bare asyncio HTTP/1.1 reader (default; https URLs use httpx) or httpx")
    p.add_argument("--skip-offline", action="store_true", help="do not measure offline engine.generate throughput")
    p.add_argument("--output-json", default=None, metavar="PATH",
                   help="also write the results, with per-request TTFT/e2e/tokens, to this file")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(engine_kwargs: dict, args: list[str], json_output: bool = False) -> int:
    p = _parser()
    a = p.parse_args(args)
    if not (1 <= a.num_prompts <= MAX_PROMPTS):
        print(f"--num-prompts must be in [1, {MAX_PROMPTS}]", file=sys.stderr)
        return 2
    if a.workload == "fixed" and (a.input_len < 1 or a.output_len < 1):
        print("--input-len and --output-len must be >= 1", file=sys.stderr)
        return 2
    if any(c < 0 for c in a.max_concurrency):
        print("--max-concurrency must be >= 0", file=sys.stderr)
        return 2
    if a.url:
        host = urlsplit(a.url).hostname or ""
        if urlsplit(a.url).scheme not in ("http", "https") or not (
                host in ("localhost", "::1") or host.startswith("127.")):
            print(f"--url must be an http(s) loopback address (127.x, ::1, localhost), not {a.url!r}",
                  file=sys.stderr)
            return 2
    log = lambda *m: print(*m, file=sys.stderr, flush=True)  # noqa: E731

    engine = server = pool = None
    try:
        offline = None
        if a.url:
            import httpx

            url, api_key = a.url.rstrip("/"), a.api_key or os.environ.get("LOCALSGL_API_KEY") or None
            if url.endswith("/v1"):
                url = url[:-3]
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            r = httpx.get(url + "/v1/models", headers=headers, timeout=10.0, trust_env=False)
            if r.status_code != 200:
                log(f"GET {url}/v1/models answered {r.status_code}: {r.text[:200]}")
                return 1
            card = r.json()["data"][0]
            model = a.served_model or card["id"]
            max_len = card.get("max_model_len")
            vocab = a.vocab_size or 32000
            device = f"server at {url} (device not known to the client)"
            lens, outs = make_workload(a)
        else:
            from .engine.api import Engine

            kwargs = dict(engine_kwargs)
            if not os.environ.get("LOCALSGL_IN_PROCESS"):  # as `serve` builds it: the core in its own process
                kwargs.setdefault("in_process", False)
            engine = Engine(**kwargs)
            engine.wait_graphs()  # the large decode graphs are captured after start-up: not inside a timed run
            model, max_len, api_key = engine.model_name, engine.max_model_len, None
            vocab = engine.config.vocab_size
            device = _device_name(engine)
            log(f"engine ready in {engine.load_seconds:.1f} s; {engine.plan.describe()}")
            lens, outs = make_workload(a)
        too_long = [i + o for i, o in zip(lens, outs) if max_len and i + o > max_len]
        if too_long:
            log(f"{len(too_long)} request(s) need up to {max(too_long)} tokens but max_model_len is {max_len}; "
                "raise --max-model-len or shorten the workload")
            return 2
        if engine is not None:
            if not a.skip_offline:
                log(f"offline: engine.generate on {len(lens)} prompts ...")
                if getattr(engine.core, "profile", None) is not None:
                    from .engine.step_profile import StepProfile

                    engine.core.profile = StepProfile(engine.device)
                offline = offline_throughput(engine, lens, outs, a.seed)
                if getattr(engine.core, "profile", None) is not None:
                    log(f"  step profile: {json.dumps(engine.core.profile.summary())}")
                log(f"offline: {offline['output_throughput']:.1f} out tok/s in {offline['seconds']:.2f} s")
            server = EmbeddedServer(engine, api_key=None, max_queue=max(1024, len(lens) + a.warmup + 8))
            server.start()
            url = server.url
            core = "on a thread of this process" if getattr(engine, "in_process", True) else "in its own process"
            log(f"serving {model} on {url} (server in this process, engine core {core})")

        if engine is not None and a.client == "process":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            run_client = lambda cfg: pool.submit(client_run, cfg).result()  # noqa: E731
        else:
            run_client = client_run

        base = {"url": url, "api_key": api_key, "model": model, "max_seconds": a.max_seconds,
                "request_timeout": a.request_timeout, "http_client": a.http_client}
        if a.warmup > 0:
            wl = [min(x, 64) for x in lens[: a.warmup]] + [min(lens[0], 64)] * max(0, a.warmup - len(lens))
            client_run_res = run_client({**base, "prompts": token_prompts(wl, vocab, a.seed + 15485863),
                                         "outs": [4] * len(wl), "rate": math.inf, "concurrency": None, "seed": 0})
            bad = [r["error"] for r in client_run_res["requests"] if not r["ok"]]
            if bad:
                log(f"warm-up request failed: {bad[0]}")
                return 1

        rows, per_request = [], []
        run_idx = 0
        for conc in a.max_concurrency:
            for rate in a.request_rate:
                run_idx += 1
                prompts = token_prompts(lens, vocab, a.seed + 1000003 * run_idx)
                prof = getattr(getattr(engine, "core", None), "profile", None)
                if prof is not None:  # LOCALSGL_DEBUG_PROFILE_STEPS=1: per-run engine step profile
                    from .engine.step_profile import StepProfile

                    engine.core.profile = StepProfile(engine.device)
                res = run_client({**base, "prompts": prompts, "outs": outs, "rate": rate,
                                  "concurrency": conc or None, "seed": a.seed + run_idx})
                if prof is not None:
                    log(f"  step profile: {json.dumps(engine.core.profile.summary())}")
                row = summarize(res, {"request_rate": rate, "max_concurrency": conc or None})
                per_request.append([{k: r[k] for k in ("in_tokens", "want_tokens", "out_tokens", "ttft", "e2e", "ok",
                                                       "error")} for r in res["requests"]])
                if offline:
                    row["vs_offline"] = row["output_throughput"] / offline["output_throughput"]
                rows.append(row)
                log(f"rate {rate:g} conc {conc or '-'}: {row['completed']}/{len(prompts)} done, "
                    f"{row['output_throughput']:.1f} out tok/s in {row['duration_s']:.2f} s")
                if row["short_outputs"]:
                    log(f"  warning: {row['short_outputs']} request(s) returned fewer/more tokens than max_tokens")
                for msg, k in row["errors"].items():
                    log(f"  {k} failed: {msg}")

        # saturation: the highest rate, then the highest (unbounded = highest) concurrency
        sat = max(rows, key=lambda r: (r["request_rate"], r["max_concurrency"] or math.inf))
        workload = ({"kind": "mixed", "input": "U[128,1024]", "output": "U[128,512]"} if a.workload == "mixed"
                    else {"kind": "fixed", "input_len": a.input_len, "output_len": a.output_len})
        info = {"device": device, "model": model, "url": url, "in_process": engine is not None,
                "engine_core": None if engine is None else ("thread" if getattr(engine, "in_process", True) else "process"),
                "client": a.client if engine is not None else "thread", "http_client": a.http_client,
                "workload": {**workload, "num_prompts": len(lens), "input_tokens": sum(lens),
                             "output_tokens": sum(outs), "seed": a.seed},
                "offline": offline, "rows": rows,
                "saturation": {"request_rate": sat["request_rate"], "max_concurrency": sat["max_concurrency"],
                               "output_throughput": sat["output_throughput"],
                               "vs_offline": sat.get("vs_offline")}}
        if engine is not None:
            info["plan"] = engine.plan.to_dict()
            info["load_seconds"] = engine.load_seconds
            info["ready_after_weights_seconds"] = engine.ready_after_weights_seconds
            info["graphs_ready_after_weights_seconds"] = engine.graphs_ready_after_weights_seconds
        if a.output_json:
            full = {**info, "rows": [{**r, "requests": q} for r, q in zip(rows, per_request)]}
            with open(a.output_json, "w") as f:
                json.dump(_jsonable(full), f, default=str)
        if json_output:
            print(json.dumps(_jsonable(info), default=str))
        else:
            wl = ("mixed in U[128,1024] out U[128,512]" if a.workload == "mixed"
                  else f"{a.input_len} in / {a.output_len} out")
            print(f"# {device}  model {model}  {len(lens)} prompts, {wl}  "
                  f"({sum(lens)} in / {sum(outs)} out tokens)  times in ms")
            print(format_table(rows))
            if offline:
                print(f"offline engine.generate (same engine, same workload): {offline['output_throughput']:.1f} "
                      f"out tok/s in {offline['seconds']:.2f} s")
                srate = "inf" if not math.isfinite(sat["request_rate"]) else f"{sat['request_rate']:g}"
                print(f"serving at rate {srate}, conc {sat['max_concurrency'] or '-'}: "
                      f"{sat['output_throughput']:.1f} out tok/s = {sat['vs_offline']:.2f}x offline")
            else:
                print("offline comparison: n/a (" + ("--skip-offline" if engine is not None else
                                                     "external server") + ")")
        return 0 if all(r["completed"] for r in rows) else 1
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if server is not None:
            server.stop()
        if engine is not None:
            engine.shutdown()
