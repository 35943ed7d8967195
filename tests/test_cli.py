"""The CLI: argument handling and exit codes in-process (a fake engine where no model is
needed), then a few end-to-end runs of the real embedded model in subprocesses."""
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from subprocess_utils import interruptible
from typer.testing import CliRunner

from localsgl import cli, cli_run
from localsgl.config import SETTINGS
from localsgl.engine.params import GenerateOutput, PromptTooLongError, RequestMetrics, StreamDelta

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch, tmp_path):
    for s in SETTINGS.values():
        monkeypatch.delenv(s.env, raising=False)
    for var in ("LOCALSGL_CONFIG", "LOCALSGL_DEBUG", "LOCALSGL_SYSTEM", "LOCALSGL_TEMPERATURE", "LOCALSGL_MAX_TOKENS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("NO_COLOR", "1")


# ----------------------------------------------------------------------------- a fake engine


class FakeTokenizer:
    chat_template = "{{ messages }}"


class FakeEngine:
    """Answers each prompt with a fixed text, echoing which prompt it was."""

    max_model_len = 100

    def __init__(self, template=True, fail=None, error_finish=None):
        self.tokenizer = FakeTokenizer() if template else None
        self.fail = fail
        self.error_finish = error_finish  # the engine's message when the answer ends with "error"
        self.calls = []
        self.closed_streams = 0
        self.shut = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def shutdown(self):
        self.shut = True

    def stream(self, prompt, params=None):
        self.calls.append(("stream", prompt, params))
        try:
            for i, piece in enumerate(["Hello", " world"]):
                if self.fail and i == 1:
                    raise self.fail
                yield StreamDelta(index=0, text=piece, token_ids=[i])
            m = RequestMetrics(prompt_tokens=5, cached_prompt_tokens=2, completion_tokens=2,
                               time_to_first_token=0.01, total_time=0.05)
            if self.error_finish:
                yield StreamDelta(0, "", [], "error", None, m, {"error": self.error_finish})
                return
            yield StreamDelta(index=0, text="", token_ids=[], finish_reason="stop", metrics=m)
        finally:
            self.closed_streams += 1

    def encode_prompt(self, prompt):
        text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        return [ord(c) for c in text]

    def generate(self, prompts, params=None):
        self.calls.append(("generate", prompts, params))
        outs = []
        for ids in prompts:
            text = "answer to " + "".join(map(chr, ids))
            m = RequestMetrics(prompt_tokens=len(ids), completion_tokens=3, time_to_first_token=0.02, total_time=0.1)
            if self.error_finish and len(outs) == 1:
                outs.append(GenerateOutput(text, [1], "error", None, m, [], error=self.error_finish))
                continue
            outs.append(GenerateOutput(text, [1, 2, 3], "length", None, m, []))
        return outs


@pytest.fixture
def fake(monkeypatch):
    holder = {}

    def install(**kw):
        eng = FakeEngine(**kw)
        holder["kwargs"] = None

        def load(kwargs):
            holder["kwargs"] = kwargs
            return eng

        monkeypatch.setattr(cli_run, "_load_engine", load)
        monkeypatch.setattr(cli_run, "_running_server", lambda *a, **k: None)  # never a real server on :8000
        eng.holder = holder
        return eng

    return install


def invoke(args, input=None, env=None):
    return runner.invoke(cli.app, args, input=input, env=env)


# ----------------------------------------------------------------------------- usage errors (no model)


@pytest.mark.parametrize(
    "args, input, pattern",
    [
        (["run"], None, "no prompt"),
        (["run", "hi", "--temperature", "-1"], None, "temperature"),
        (["run", "hi", "--top-p", "0"], None, "top_p"),
        (["run", "hi", "--top-p", "1.5"], None, "top_p"),
        (["run", "hi", "--min-p", "2"], None, "min_p"),
        (["run", "hi", "--max-tokens", "0"], None, "max_tokens"),
        (["run", "hi", "--kv-memory", "lots"], None, "--kv-memory"),
        (["run", "hi", "--dtype", "int3"], None, "--dtype"),
        (["run", "--batch"], "\n  \n", "--batch"),
        (["run", "hi", "--json-schema", "{bad"], None, "--json-schema"),
        (["run", "hi", "--json-schema", "@/no/such/schema.json"], None, "cannot read"),
        (["run", "hi", "--regex", "a+", "--grammar", "g"], None, "at most one"),
    ],
)
def test_usage_errors_exit_2(args, input, pattern):
    r = invoke(args, input=input)
    assert r.exit_code == 2, r.output
    assert "error:" in r.stderr and pattern in r.stderr
    assert r.stdout == ""
    assert "Traceback" not in r.output


def test_click_type_errors_exit_2():
    r = invoke(["run", "hi", "--max-tokens", "many"])
    assert r.exit_code == 2 and "max-tokens" in r.output


def test_env_sampling_flag_is_validated(monkeypatch):
    r = invoke(["run", "hi"], env={"LOCALSGL_TEMPERATURE": "-3"})
    assert r.exit_code == 2 and "temperature" in r.stderr


def test_unknown_model_lists_aliases():
    r = invoke(["run", "hi", "-m", "no-such-model-xyz"])
    assert r.exit_code == 2, r.output
    assert "no-such-model-xyz" in r.stderr and "smollm2-135m" in r.stderr
    assert r.stderr.count("\n") == 1  # one line


def test_every_model_command_has_the_engine_flags():
    for cmd in ("run", "info", "serve", "bench"):
        r = invoke([cmd, "--help"])
        assert r.exit_code == 0
        for flag in ("--model", "--dtype", "--max-model-len", "--kv-memory", "--gpu-memory", "--max-running",
                     "--chunk-size", "--attention-backend", "--disable-cuda-graph", "--disable-overlap",
                     "--disable-radix-cache", "--load-format", "--device", "--tp"):
            assert flag in r.stdout, (cmd, flag)


def test_version():
    r = invoke(["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("localsgl ")


# ----------------------------------------------------------------------------- run, with a fake engine


def test_single_prompt_streams_answer_only(fake):
    eng = fake()
    r = invoke(["run", "Hi there", "--system", "Be brief", "--temperature", "0", "--stop", "X", "--stop", "Y",
                "-m", "some-model", "--max-running", "3", "--disable-radix-cache"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "Hello world\n"
    kind, prompt, params = eng.calls[0]
    assert kind == "stream"
    assert prompt == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi there"}]
    assert params.temperature == 0 and params.stop == ["X", "Y"]
    assert eng.holder["kwargs"] == {"model": "some-model", "max_running": 3, "disable_radix_cache": True}
    assert eng.shut and eng.closed_streams == 1


def test_structured_output_flags_reach_sampling_params(fake, tmp_path):
    eng = fake()
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "integer"}}}')
    r = invoke(["run", "Q", "--json-schema", f"@{schema}"])
    assert r.exit_code == 0, r.output
    assert eng.calls[-1][2].json_schema == {"type": "object", "properties": {"a": {"type": "integer"}}}
    r = invoke(["run", "Q", "--regex", "[0-9]+"])
    assert r.exit_code == 0 and eng.calls[-1][2].regex == "[0-9]+"


def test_stdin_is_prompt_or_appended(fake):
    eng = fake()
    r = invoke(["run"], input="from stdin\n")
    assert r.exit_code == 0
    assert eng.calls[-1][1][-1]["content"] == "from stdin"
    r = invoke(["run", "Summarise:"], input="line one\nline two\n")
    assert r.exit_code == 0
    assert eng.calls[-1][1][-1]["content"] == "Summarise:\n\nline one\nline two"


def test_text_that_is_not_utf8_is_replaced_with_a_warning(fake, tmp_path):
    """A binary or Latin-1 pipe or argument reaches the model with U+FFFD in place of the
    undecodable bytes (and a warning), not as a tokenizer TypeError; an @file is refused."""
    eng = fake()
    r = invoke(["run"], input=b"caf\xe9 \xff\xfe ok\n")
    assert r.exit_code == 0, r.output
    assert eng.calls[-1][1][-1]["content"] == "caf\ufffd \ufffd\ufffd ok"
    assert "warning: stdin is not all UTF-8 text: 3 undecodable byte sequences replaced with U+FFFD" in r.stderr
    r = invoke(["run"], input="caf\u00e9 \ufffd\n".encode())  # valid UTF-8, a real U+FFFD in it: no warning
    assert r.exit_code == 0 and eng.calls[-1][1][-1]["content"] == "caf\u00e9 \ufffd" and "warning" not in r.stderr
    r = invoke(["run", "--batch"], input=b"a\x80\nb\n")
    assert r.exit_code == 0 and "1 undecodable byte sequence replaced" in r.stderr
    arg = b"caf\xe9".decode("utf-8", errors="surrogateescape")  # what Python makes of such an argv byte
    r = invoke(["run", arg])
    assert r.exit_code == 0, r.output
    assert eng.calls[-1][1][-1]["content"] == "caf\ufffd" and "the prompt argument is not all UTF-8" in r.stderr
    bad = tmp_path / "g.lark"
    bad.write_bytes(b"start: \"\xe9\"\n")
    r = invoke(["run", "Q", "--grammar", f"@{bad}"])
    assert r.exit_code == 2 and f"--grammar: {bad} is not UTF-8 text (byte 0xe9 at offset 8)" in r.stderr


def test_no_chat_template_prepends_system(fake):
    eng = fake(template=False)
    r = invoke(["run", "Q?", "--system", "S"])
    assert r.exit_code == 0
    assert eng.calls[0][1] == "S\n\nQ?"
    assert "chat template" in r.stderr


def test_single_jsonl_and_stats(fake):
    fake()
    r = invoke(["run", "Q", "--jsonl", "--stats"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["index"] == 0 and rec["prompt"] == "Q" and rec["text"] == "Hello world"
    assert rec["finish_reason"] == "stop"
    assert rec["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "cached_tokens": 2}
    for word in ("prompt tokens 5", "cached 2", "completion tokens 2", "TTFT", "tok/s"):
        assert word in r.stderr
    assert "TTFT" not in r.stdout


def test_batch_runs_all_at_once_in_order(fake):
    eng = fake()
    r = invoke(["run", "--batch", "--stats"], input="first\n\n  second  \nthird\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == "answer to first\n\nanswer to second\n\nanswer to third\n"
    gens = [c for c in eng.calls if c[0] == "generate"]
    assert len(gens) == 1 and len(gens[0][1]) == 3  # one concurrent submission
    assert "3 requests" in r.stderr


def test_batch_jsonl(fake):
    fake()
    r = invoke(["run", "--batch", "--jsonl"], input="a\nb\nc\n")
    assert r.exit_code == 0
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["index"] for x in recs] == [0, 1, 2]
    assert [x["prompt"] for x in recs] == ["a", "b", "c"]
    assert [x["text"] for x in recs] == ["answer to a", "answer to b", "answer to c"]
    assert recs[0]["usage"]["completion_tokens"] == 3


def test_batch_prompt_too_long_names_the_line(fake):
    fake()
    r = invoke(["run", "--batch"], input="short\n" + "x" * 150 + "\n")
    assert r.exit_code == 2
    assert "prompt 2" in r.stderr and "150" in r.stderr and "100" in r.stderr


def test_ctrl_c_shuts_the_engine_down(fake):
    eng = fake(fail=KeyboardInterrupt())
    r = invoke(["run", "Q"])
    assert r.exit_code == 130
    assert eng.shut and eng.closed_streams == 1
    assert "interrupted" in r.stderr


def test_runtime_error_is_one_line_exit_1(fake, monkeypatch):
    eng = fake(fail=RuntimeError("the GPU caught fire"))
    r = invoke(["run", "Q"])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1] == "error: the GPU caught fire"
    assert "Traceback" not in r.stderr and eng.shut
    fake(fail=RuntimeError("again"))
    r = invoke(["run", "Q"], env={"LOCALSGL_DEBUG": "1"})
    assert r.exit_code == 1 and "Traceback" in r.stderr


def test_prompt_too_long_from_engine_exits_2(fake):
    fake(fail=PromptTooLongError(300, 64))
    r = invoke(["run", "Q"])
    assert r.exit_code == 2
    assert "300" in r.stderr and "64" in r.stderr


# ----------------------------------------------------------------------------- serve, bench, info


def test_serve_passes_resolved_settings(monkeypatch):
    import types

    seen = {}
    mod = types.ModuleType("localsgl.server.app")
    mod.serve = lambda engine_kwargs, host, port, api_key: seen.update(kw=engine_kwargs, host=host, port=port, key=api_key)
    monkeypatch.setitem(sys.modules, "localsgl.server.app", mod)
    r = invoke(["serve", "--api-key", "k", "--tp", "1"], env={"LOCALSGL_PORT": "9123", "LOCALSGL_DTYPE": "fp16"})
    assert r.exit_code == 0, r.output
    assert seen == {"kw": {"model": "smollm2-135m", "dtype": "float16", "tp": 1}, "host": "127.0.0.1", "port": 9123, "key": "k"}


def test_bench_missing_or_present(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "localsgl.bench", None)  # as if the module were absent
    r = invoke(["bench", "latency"])
    assert r.exit_code == 1 and "localsgl.bench" in r.stderr
    seen = {}
    mod = types.ModuleType("localsgl.bench")
    mod.main = lambda kind, kwargs, args, json_output=False: seen.update(kind=kind, kwargs=kwargs, args=args, json=json_output)
    monkeypatch.setitem(sys.modules, "localsgl.bench", mod)
    r = invoke(["bench", "throughput", "--num-prompts", "5", "--json", "--load-format", "dummy"])
    assert r.exit_code == 0, r.output
    assert seen == {"kind": "throughput", "kwargs": {"model": "smollm2-135m", "load_format": "dummy"},
                    "args": ["--num-prompts", "5"], "json": True}


def test_info_json_plans_without_loading():
    r = invoke(["info", "--json", "--kv-memory", "512MiB", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["device"]["kind"] == "cpu" and info["device"]["cores"] >= 1
    assert isinstance(info["device"]["bf16"], bool)
    assert info["dtype"] in ("float32", "bfloat16")
    m, p = info["model"], info["plan"]
    assert m["name"] == "smollm2-135m" and m["architecture"] == "LlamaForCausalLM"
    assert 130e6 < m["params"] < 140e6
    assert m["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * (4 if info["dtype"] == "float32" else 2)
    assert p["kv_tokens"] == 512 * 2**20 // m["kv_bytes_per_token"]
    assert p["max_model_len"] == 8192 and p["chunk_size"] == 512 and p["cuda_graph_bs"] == []


def test_info_text_and_dummy_config():
    r = invoke(["info", "-m", "llama-3.2-1b", "--load-format", "dummy", "--device", "cpu", "--dtype", "bf16"])
    assert r.exit_code == 0, r.output
    for word in ("Device", "Model", "Memory plan", "KV cache", "max running", "bfloat16", "LlamaForCausalLM"):
        assert word in r.stdout
    r = invoke(["info", "-m", "llama-3.1-8b", "--load-format", "dummy", "--device", "cpu", "--dtype", "float32"],
               env={"LOCALSGL_KV_MEMORY": "1TiB"})
    assert r.exit_code == 2 and "RAM" in r.stderr  # 32 GB of weights + 1 TiB of KV do not fit


def test_info_text_names_the_quantized_tiles_on_cuda(capsys):
    """On a GPU, info says which tuned-tiles file the quantized kernels read, or that they run
    their built-in tiles and how to tune them (the report's fields, printed as text)."""
    from localsgl.cli_info import _print_info

    r = invoke(["info", "--json", "--kv-memory", "512MiB", "--device", "cpu"])
    report = json.loads(r.stdout)
    cuda = dict(kind="cuda", name="NVIDIA GeForce RTX 4090", torch_device="cuda:0", count=1, total_memory=24 << 30,
                free_memory=23 << 30, sm_count=128, capability="8.9", bf16=True)
    for tiles, expected in (({"file": None, "entries": 0}, "built-in (no tuned file for this GPU: scripts/tune_tiles.sh"),
                            ({"file": "/x/RTX.json", "entries": 88}, "/x/RTX.json (88 entries)")):
        _print_info(dict(report, device=dict(cuda, quant_tiles=tiles)))
        line = next(ln for ln in capsys.readouterr().out.splitlines() if "quantized tiles" in ln)
        assert expected in line, line


def test_an_unusable_tiles_file_is_a_usage_error(capsys):
    """LOCALSGL_QUANT_TILES naming a bad file is a setting to fix: exit 2 and the message alone."""
    import typer

    from localsgl.cli_common import ExitCode, _guard
    from localsgl_kernels.quant_tiles import TunedTilesError

    def body():
        raise TunedTilesError("tuned tiles file /x.json (LOCALSGL_QUANT_TILES) cannot be used: gone")

    with pytest.raises(typer.Exit) as e:
        _guard(body)
    assert e.value.exit_code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "error: tuned tiles file /x.json (LOCALSGL_QUANT_TILES) cannot be used: gone" in err and "Error:" not in err


# ----------------------------------------------------------------------------- end to end (real model)


def run_cli(args, input=None, timeout=600):
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "localsgl.cli", *args], input=input, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT,
                          stdin=None if input is not None else subprocess.DEVNULL)


SMALL = ["--kv-memory", "256MiB", "--device", "cpu"]


def test_e2e_capital_of_france():
    r = run_cli(["run", "--temperature", "0", "--max-tokens", "32", "--stats", *SMALL],
                input="What is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert r.stdout.endswith("\n") and "stats" not in r.stdout
    assert "prompt tokens" in r.stderr and "tok/s" in r.stderr


def test_e2e_batch_keeps_input_order():
    words = ["apple", "banana", "cherry"]
    r = run_cli(["run", "--batch", "--jsonl", "--temperature", "0", "--max-tokens", "24", *SMALL],
                input="".join(f"Repeat the word {w}.\n" for w in words))
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["index"] for x in recs] == [0, 1, 2]
    assert [x["prompt"] for x in recs] == [f"Repeat the word {w}." for w in words]
    for w, x in zip(words, recs):
        assert w in x["text"].lower(), recs
        assert x["finish_reason"] in ("stop", "length") and x["usage"]["completion_tokens"] >= 1


def test_e2e_prompt_longer_than_context():
    r = run_cli(["run", "--max-model-len", "64", *SMALL], input="tell me about this word " * 40)
    assert r.returncode == 2, r.stderr
    m = re.search(r"prompt is (\d+) tokens but the context holds 64", r.stderr)
    assert m and int(m.group(1)) > 64, r.stderr
    assert r.stdout == ""


def test_e2e_ctrl_c_exits_130():
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "localsgl.cli", "run", "Write a very long story about a dragon.", "--max-tokens", "4000",
         "--temperature", "0", *SMALL],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
        preexec_fn=interruptible,
    )
    try:
        ready, _, _ = select.select([p.stdout], [], [], 300)
        assert ready, "no output within 300 s"
        assert p.stdout.read(1)  # the answer has started streaming
        p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, err
        assert b"interrupted" in err and b"Traceback" not in err
        assert time.monotonic() - t0 < 60
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_an_answer_that_fails_in_the_engine_exits_1_with_the_message(fake):
    fake(error_finish="RuntimeError: injected fault")
    r = invoke(["run", "hi"])
    assert r.exit_code == 1
    assert r.stdout.startswith("Hello world")  # what was generated before the failure is kept
    assert "injected fault" in r.stderr
    fake(error_finish="OutOfMemoryError: step")
    r = invoke(["run", "--batch"], input="a\nb\nc\n")
    assert r.exit_code == 1
    assert r.stdout.count("answer to") == 3  # every answer is written, in order
    assert "prompt 2: OutOfMemoryError: step" in r.stderr


def test_a_file_that_is_not_gguf_is_a_usage_error(tmp_path):
    """A .gguf path that holds something else is bad input: exit 2 and the reader's message,
    before any model loads."""
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 8)
    for cmd in (["run", "-m", str(bad), "hi"], ["show", str(bad)], ["info", "-m", str(bad)]):
        r = invoke(cmd)
        assert r.exit_code == 2, (cmd, r.output)
        assert f"error: {bad}: not a readable GGUF file: " in r.stderr and "GGUFError" not in r.stderr
    cut = tmp_path / "cut.gguf"  # a GGUF header whose tensors end past the end of the file
    with open(cut, "wb") as f:
        f.write(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + (0).to_bytes(8, "little"))
    r = invoke(["run", "-m", str(cut), "hi"])
    assert r.exit_code == 2 and f"{cut}: not a readable GGUF file (truncated, or still downloading?): " in r.stderr


def test_a_native_crash_prints_where_it_happened():
    """A SIGSEGV in a native kernel ends the process; the CLI leaves Python's traceback of it on
    stderr to report, rather than nothing."""
    code = "from localsgl import cli; cli._crash_traceback(); import ctypes; ctypes.string_at(0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Segmentation fault" in r.stderr and 'File "<string>", line 1' in r.stderr


def test_triton_attention_without_a_gpu_is_a_usage_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = invoke(["run", "hi", "--attention-backend", "triton", "--device", "cpu", "--local", "--max-tokens", "1"])
    assert r.exit_code == 2, r.output
    assert "error: the triton attention backend needs a CUDA device; use --attention-backend torch" in r.stderr
    assert "ValueError" not in r.stderr
