"""The engine core in its own process: same outputs as in-process, and its lifecycle — it
dies with its front end, a dead core fails every open request (never a hang) and turns
/health to 503, and Ctrl-C on `run` leaves no process behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from subprocess_utils import interruptible

from localsgl import Engine, SamplingParams

TINY = dict(architectures=["LlamaForCausalLM"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=512,
            eos_token_id=63)


def tiny_dir(tmp_path) -> str:
    d = tmp_path / "tiny"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(TINY))
    return str(d)


def tiny_engine(path, in_process: bool, **kw) -> Engine:
    return Engine(model=path, device="cpu", dtype="float32", load_format="dummy", kv_memory=1 << 20,
                  max_model_len=256, in_process=in_process, **kw)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = tiny_dir(tmp_path_factory.mktemp("core"))
    thread, proc = tiny_engine(path, True), tiny_engine(path, False)
    yield thread, proc
    thread.shutdown()
    proc.shutdown()


def test_same_tokens_finishes_and_usage(engines):
    """Greedy and seeded outputs, stop ids, n > 1 and length limits are the same in both modes."""
    thread, proc = engines
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8] * 20, [9, 10]]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=9, n=3, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=30),
              SamplingParams(temperature=0.0, max_tokens=16, logprobs=True, top_logprobs=2, ignore_eos=True)]
    a, b = thread.generate(prompts, params), proc.generate(prompts, params)
    for x, y in zip(a, b):
        assert [c.token_ids for c in x.choices] == [c.token_ids for c in y.choices]
        assert [c.finish_reason for c in x.choices] == [c.finish_reason for c in y.choices]
        assert x.metrics.completion_tokens == y.metrics.completion_tokens
        assert x.metrics.prompt_tokens == y.metrics.prompt_tokens
    lp_a, lp_b = a[3].logprobs, b[3].logprobs
    assert [t.token_id for t in lp_a] == [t.token_id for t in lp_b]
    assert [t.logprob for t in lp_a] == pytest.approx([t.logprob for t in lp_b], abs=1e-4)
    # a stop id chosen from the output ends it there in both modes
    stop_tok = a[0].token_ids[5]
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_tok])
    x, y = thread.generate(prompts[0], p), proc.generate(prompts[0], p)
    assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason == "stop"


def test_stream_close_aborts_and_frees(engines):
    _, proc = engines
    it = proc.stream([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    got = [next(it) for _ in range(3)]
    assert all(d.finish_reason is None for d in got)
    it.close()
    assert proc.wait_idle(30)
    deadline = time.monotonic() + 10
    while proc.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    s = proc.stats()
    assert s["running"] == 0 and s["waiting"] == 0 and s["kv_slots_locked"] == 0


def test_a_message_the_core_cannot_handle_leaves_it_serving(engines):
    _, proc = engines
    proc.core._send(("add", [("broken",)]))  # a front end's bug: the core logs it and reads on
    assert proc.stats()["running"] == 0
    out = proc.generate([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(out.token_ids) == 3


def test_a_request_the_core_cannot_build_fails_alone(engines, monkeypatch):
    """One entry of an add message that the core cannot turn into requests (here its prompt
    bytes are cut) ends with an error naming why; the other prompt of the message runs."""
    _, proc = engines
    send = proc.core._send

    def cut_first(msg):
        kind, payload = msg
        if kind == "add":
            rid, key0, ids, params, grammar = payload[0]
            payload = [(rid, key0, ids[:-1], params, grammar)] + payload[1:]
        send((kind, payload))

    monkeypatch.setattr(proc.core, "_send", cut_first)
    outs: list = []
    t = threading.Thread(target=lambda: outs.extend(
        proc.generate([[1, 2, 3], [4, 5, 6]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))),
        daemon=True)
    t.start()
    t.join(60)
    assert outs, "the request the core could not build never finished"
    bad, good = outs
    assert bad.finish_reason == "error" and "ValueError" in bad.choices[0].error
    assert good.finish_reason == "length" and len(good.token_ids) == 3
    monkeypatch.undo()
    assert proc.stats()["kv_slots_locked"] == 0


def test_a_message_that_cannot_be_sent_fails_alone(engines, monkeypatch):
    """A message the sender cannot pickle fails by itself: a query raises at once, a request
    merged with others into one submission ends with an error while the others run, and the
    sender keeps sending (it used to die there, and every later request hung)."""
    _, proc = engines
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="could not be sent"):
        proc.core.query("stats", lambda: 0, timeout=20)  # a lambda does not pickle
    assert time.monotonic() - t0 < 10
    send = proc.core._send

    def poison_second(msg):
        kind, payload = msg
        if kind == "add" and len(payload) == 3:
            rid, key0, ids, params, grammar = payload[1]
            payload = [payload[0], (rid, key0, ids, params, lambda: 0), payload[2]]
        send((kind, payload))

    monkeypatch.setattr(proc.core, "_send", poison_second)
    p = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outs = proc.generate([[1, 2, 3], [4, 5, 6], [7, 8, 9]], p)
    monkeypatch.undo()
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert "could not be sent" in outs[1].choices[0].error
    assert proc.generate([1, 2, 3], p).token_ids == outs[0].token_ids
    assert proc.stats()["kv_slots_locked"] == 0


def test_a_message_after_stop_fails_at_once(tmp_path):
    """Once the sender has sent "stop" and ended, a message queued after it is failed on the
    spot (a query raises) instead of waiting in a queue nobody drains."""
    eng = tiny_engine(tiny_dir(tmp_path), False)
    core = eng.core
    eng.shutdown()
    assert core._sender_done and not core._sender.is_alive()
    box: list = [threading.Event()]
    core._replies[10**9] = box
    core._send(("query", (10**9, "stats", ())))
    assert box[0].is_set() and isinstance(box[1], RuntimeError) and "shut down" in str(box[1])


def test_concurrent_submitters_get_the_in_process_tokens(engines):
    """32 threads each submit one prompt at once to the core in its own process (the sender
    thread merges their submissions): each gets the tokens the in-process engine gives it."""
    thread, proc = engines
    prompts = [[(i * 7 + j * 3) % 62 + 1 for j in range(3 + i % 5)] for i in range(32)]
    assert len({tuple(p) for p in prompts}) == 32
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = [thread.generate(p, params).token_ids for p in prompts]
    got: list = [None] * len(prompts)
    errors: list = []
    start = threading.Barrier(len(prompts))

    def one(i):
        try:
            start.wait(30)
            got[i] = proc.generate(prompts[i], params)
        except BaseException as e:  # noqa: BLE001  (reported below, not lost in the thread)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not errors, errors
    assert all(g is not None for g in got), "a concurrent submission never finished"
    assert [g.finish_reason for g in got] == ["length"] * len(prompts)
    assert [g.token_ids for g in got] == want
    assert [g.prompt_token_ids for g in got] == prompts
    assert proc.stats()["kv_slots_locked"] == 0


def test_merge_adds_joins_consecutive_submissions_only():
    """The sender's batch: runs of "add" become one message with their entries in order; any
    other message stays where it was, and adds on either side of it are not joined across it."""
    from localsgl.engine.core_client import _merge_adds

    a, b, c, d, e, f = (("rid-" + x, k << 8, b"\x01\x00\x00\x00", None, False) for k, x in enumerate("abcdef"))
    batch = [("add", [a]), ("add", [b, c]), ("abort", "rid-b"), ("add", [d]),
             ("query", (7, "stats", ())), ("abort_choice", ("rid-d", 0)), ("add", [e]), ("add", [f]), ("stop", None)]
    assert _merge_adds(batch) == [("add", [a, b, c]), ("abort", "rid-b"), ("add", [d]), ("query", (7, "stats", ())),
                                  ("abort_choice", ("rid-d", 0)), ("add", [e, f]), ("stop", None)]
    assert _merge_adds([("add", [a])]) == [("add", [a])]
    assert _merge_adds([("add", [a]), ("abort", "rid-a")]) == [("add", [a]), ("abort", "rid-a")]
    assert _merge_adds([("abort", "rid-a"), ("add", [a])]) == [("abort", "rid-a"), ("add", [a])]
    assert _merge_adds([("add", [b]), ("add", [a]), ("add", [])]) == [("add", [b, a])]
    assert _merge_adds([]) == []


def test_abort_right_after_submit_ends_it_and_the_core_serves_on(engines, monkeypatch):
    """A request aborted as soon as it is submitted, its "add" and "abort" drained by the
    sender in one batch, ends with finish_reason "abort" long before its max_tokens, frees
    its KV slots, and the core then answers a new request."""
    thread, proc = engines
    conn = proc.core.conn
    busy, release = threading.Event(), threading.Event()

    class HeldConn:  # holds the sender in its first send, so that both messages queue behind it
        def send(self, msg):
            busy.set()
            release.wait(30)
            conn.send(msg)

    monkeypatch.setattr(proc.core, "conn", HeldConn())
    proc.core._send(("abort", "no-such-request"))  # a harmless message for the sender to hold
    assert busy.wait(10)
    got: list = []
    done = threading.Event()

    def on_delta(d):
        got.append(d)
        if d.finish_reason is not None:
            done.set()

    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    try:
        rid = proc.submit([1, 2, 3], long, on_delta)
        proc.abort(rid)
        assert [m[0] for m in proc.core._outbox] == ["add", "abort"]  # one batch for the sender
    finally:
        release.set()
    assert done.wait(20), "the aborted request never finished"
    monkeypatch.undo()
    last = got[-1]
    assert last.finish_reason == "abort", last
    assert [d.finish_reason for d in got[:-1]] == [None] * (len(got) - 1)
    made = sum(len(d.token_ids) for d in got)
    # the core may step once or twice between taking the add and the abort (0 or 1 token here
    # as a rule); an abort that reached it late would let the output run on toward 200
    assert made < 50 and last.metrics.completion_tokens == made
    assert proc.wait_idle(10)
    s = proc.stats()
    assert s["running"] == 0 and s["waiting"] == 0 and s["kv_slots_locked"] == 0
    short = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    out = proc.generate([4, 5, 6], short)
    assert out.finish_reason == "length" and out.token_ids == thread.generate([4, 5, 6], short).token_ids


def test_killed_core_fails_open_requests_and_health(tmp_path):
    from fastapi.testclient import TestClient

    from localsgl.engine.core_client import CoreDiedError
    from localsgl.server.app import create_app

    eng = tiny_engine(tiny_dir(tmp_path), False)
    try:
        client = TestClient(create_app(eng))
        assert client.get("/health").status_code == 200
        got = []
        eng.submit([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True), got.append)
        it = eng.stream([4, 5, 6], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
        next(it)
        eng.core.proc.kill()
        t0 = time.monotonic()
        last = None
        for d in it:
            last = d
        assert time.monotonic() - t0 < 10
        assert last is not None and last.finish_reason == "error" and "exited" in last.extra["error"]
        deadline = time.monotonic() + 10
        while not (got and got[-1].finish_reason) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got[-1].finish_reason == "error"  # every open request, not only the streamed one
        assert not eng.alive
        assert client.get("/health").status_code == 503
        with pytest.raises(CoreDiedError):
            eng.generate([1, 2], SamplingParams(max_tokens=2))
    finally:
        eng.shutdown()


def test_a_native_crash_in_the_core_leaves_its_stack_on_stderr(tmp_path, capfd):
    """A SIGSEGV in the core (a native kernel's crash) prints where the core was, beside the front
    end's "exited unexpectedly", so that the crash can be reported."""
    eng = tiny_engine(tiny_dir(tmp_path), False)
    try:
        eng.generate([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=2))
        capfd.readouterr()
        os.kill(eng.core.proc.pid, signal.SIGSEGV)
        eng.core.proc.wait(timeout=30)
        err = capfd.readouterr().err
        assert eng.core.proc.returncode == -signal.SIGSEGV
        assert "Fatal Python error: Segmentation fault" in err and "core_process.py" in err, err[-2000:]
    finally:
        eng.shutdown()


def _child_pids(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().split(")")[-1].split()[1]) == pid:
                        out.append(int(d))
            except (FileNotFoundError, ValueError, IndexError):
                pass
    return out


def test_sigkill_of_front_end_ends_core(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from localsgl import Engine
        e = Engine(model={tiny_dir(tmp_path)!r}, device="cpu", load_format="dummy", kv_memory=1 << 20,
                   max_model_len=256, in_process=False)
        print(e.core.proc.pid, flush=True)
        time.sleep(600)
    """)
    front = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        core_pid = int(front.stdout.readline())
        assert _alive(core_pid)
        front.kill()
        front.wait(10)
        assert _wait_gone(core_pid, 10), "the core process outlived its front end"
    finally:
        if front.poll() is None:
            front.kill()


def test_ctrl_c_on_run_leaves_no_process(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOCALSGL_IN_PROCESS="0")
    run = subprocess.Popen(
        [sys.executable, "-m", "localsgl.cli", "run", "--local", "--device", "cpu", "--max-tokens", "4000",
         "--temperature", "0", "Count from one to a thousand in words."],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True, text=True,
        preexec_fn=interruptible)
    try:
        deadline = time.monotonic() + 240
        kids = []
        while time.monotonic() < deadline and run.poll() is None:
            kids = _child_pids(run.pid)
            if kids:
                break
            time.sleep(0.2)
        assert kids, "run started no core process"
        os.set_blocking(run.stdout.fileno(), False)
        while time.monotonic() < deadline and run.poll() is None and not run.stdout.read(1):
            time.sleep(0.2)  # the answer is streaming: the core is generating
        os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
        assert run.wait(30) == 130
        for pid in kids:
            assert _wait_gone(pid, 10), "the core process outlived `run`"
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)


def _server_support():
    """tests/server/conftest.py (LiveServer), loaded under its own name."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "server", "conftest.py")
    spec = importlib.util.spec_from_file_location("localsgl_server_test_support", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_with_its_core(tmp_path, sig):
    """`serve` (its core in its own process by default) stops within its shutdown timeout on
    SIGTERM or a terminal's Ctrl-C (SIGINT to the front end and the core), with a stream in
    flight, and leaves no process behind."""
    import threading

    import httpx

    support = _server_support()
    kwargs = {"model": tiny_dir(tmp_path), "device": "cpu", "load_format": "dummy", "kv_memory": 1 << 20,
              "max_model_len": 4096, "in_process": False}
    srv = support.LiveServer(support.real_cfg(kwargs, api_key=None, shutdown_timeout=1.0,
                                              served_model_name="tiny"), startup_timeout=240)
    try:
        kids = _child_pids(srv.proc.pid)
        assert kids, "serve started no core process"
        first = threading.Event()

        def stream():
            body = {"model": srv.model, "prompt": [1, 2, 3], "max_tokens": 4000, "stream": True, "ignore_eos": True}
            try:
                with httpx.stream("POST", srv.base + "/v1/completions", json=body, timeout=60) as r:
                    for _ in r.iter_lines():
                        first.set()
            except httpx.HTTPError:
                pass

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        assert first.wait(60)
        if sig == signal.SIGINT:
            for pid in kids:
                os.kill(pid, signal.SIGINT)  # a terminal sends it to the whole group; the core ignores it
        # 1 s to drain, then aborts; uvicorn's 3 s grace; the core stops within a step (a shared
        # CI machine gets the rest of the 30 s)
        assert srv.stop(sig, timeout=30) == 0, "".join(srv.lines[-30:])
        for pid in kids:
            assert _wait_gone(pid, 10), "the core process outlived serve"
    finally:
        srv.kill()


@pytest.mark.parametrize("in_process", [True, False], ids=["thread", "process"])
def test_assigned_grammar_backend_compiles_the_core_grammars(tmp_path, in_process):
    """A backend assigned to Engine.grammar_backend (a benchmark gives dummy weights one built on
    a real tokenizer) is the one the core constrains with, in its own process too."""
    from localsgl.engine.grammar import GrammarBackend
    from localsgl.store.resolve import resolve_model

    tok = resolve_model("smollm2-135m", record_use=False).load_tokenizer()
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(TINY, vocab_size=len(tok), eos_token_id=tok.eos_token_id)))
    with tiny_engine(str(d), in_process) as eng:
        assert eng.tokenizer is None
        eng.grammar_backend = GrammarBackend(tok, eng.config.vocab_size, [tok.eos_token_id])
        outs = eng.generate([[1, 2, 3], [4, 5]], SamplingParams(regex="(yes|no)!", max_tokens=8, temperature=0.7, seed=1))
        for out in outs:
            assert tok.decode(out.token_ids, skip_special_tokens=True) in ("yes!", "no!"), out
            assert out.finish_reason == "stop", out
