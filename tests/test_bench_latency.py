"""`localsgl bench latency`: the decode step is timed from the request whose first token came
last (its remaining tokens come one a step once every prompt is prefilled), as
llama-batched-bench times its generation phase."""
from __future__ import annotations

import json
import statistics
from types import SimpleNamespace

import pytest

from localsgl import bench

ENGINE = {"model": "smollm2-135m", "device": "cpu", "kv_memory": "256MiB", "max_model_len": 1024}


def _out(ttft, total, tokens):
    return SimpleNamespace(metrics=SimpleNamespace(time_to_first_token=ttft, total_time=total, completion_tokens=tokens))


def test_decode_step_reads_the_last_started_request():
    # the second request's first token came last: 9 tokens after it in 0.9 s
    outs = [_out(0.2, 1.0, 10), _out(0.5, 1.4, 10), _out(0.3, 1.2, 10)]
    assert bench._decode_step(outs) == pytest.approx(0.1)
    assert bench._decode_step([_out(0.2, 0.2, 1)]) is None  # one token: no decode step
    assert bench._decode_step([_out(None, None, 0)]) is None


def test_latency_rows_use_the_measured_steps(monkeypatch, capsys):
    monkeypatch.setenv("LOCALSGL_IN_PROCESS", "0")  # the benchmark keeps its core in this process anyway
    seen = []
    real = bench._decode_step

    def record(outputs):
        assert len(outputs) == 4 and all(len(o.token_ids) == 8 for o in outputs)
        seen.append(real(outputs))
        return seen[-1]

    monkeypatch.setattr(bench, "_decode_step", record)
    rc = bench.main("latency", dict(ENGINE), ["--batch", "4", "--input-len", "32", "--output-len", "8", "--runs", "3"],
                    json_output=True)
    assert rc == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["workload"]: r for r in info["rows"]}
    decode = rows["decode bs4 (32 in/8 out)"]
    total = rows["total bs4 (32 in/8 out)"]
    assert len(seen) == 3 and all(s is not None and s > 0 for s in seen)
    assert decode["measured"] == pytest.approx(statistics.median(seen) * 1e3)
    assert decode["tok_s"] == pytest.approx(4 / statistics.median(seen))
    # 7 steps of the last-started request lie inside the whole run
    assert 7 * decode["measured"] / 1e3 < 4 * 8 / total["measured"]


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "argument --batch: must be at least 1, got 0"),
    (["--batch", "2", "-1"], "argument --batch: must be at least 1, got -1"),
    (["--input-len", "0"], "argument --input-len: must be at least 1, got 0"),
    (["--output-len", "-3"], "argument --output-len: must be at least 1, got -3"),
    (["--runs", "0"], "argument --runs: must be at least 1, got 0"),
    (["--num-prompts", "0"], "argument --num-prompts: must be at least 1, got 0"),
    (["--prefix-len", "0"], "argument --prefix-len: must be at least 1, got 0"),
    (["--runs", "two"], "argument --runs: invalid integer value: 'two'"),
])
def test_bad_arguments_are_refused_before_an_engine_starts(monkeypatch, capsys, args, message):
    monkeypatch.setattr(bench, "Engine", lambda **kw: pytest.fail("an engine was started"))
    with pytest.raises(SystemExit) as e:
        bench.main("latency", dict(ENGINE), args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_an_unknown_benchmark_is_refused_before_its_options_are_read(monkeypatch, capsys):
    monkeypatch.setattr(bench, "Engine", lambda **kw: pytest.fail("an engine was started"))
    assert bench.main("speed", dict(ENGINE), ["--bogus"]) == 2
    assert "unknown benchmark 'speed'" in capsys.readouterr().err


def test_throughput_counts_the_requests_that_got_all_their_tokens(monkeypatch, capsys):
    """The throughput row says how many requests produced every token asked for (the issue's
    "runs the workload to the end") beside the retractions; a run cut short would count less."""
    monkeypatch.setenv("LOCALSGL_IN_PROCESS", "0")
    rc = bench.main("throughput", {**ENGINE, "load_format": "dummy"},
                    ["--workload", "fixed", "--num-prompts", "3", "--input-len", "16", "--output-len", "6"], json_output=True)
    assert rc == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (row,) = info["rows"]
    assert row["completed"] == 3 and row["retractions"] == 0
    assert info["gpu_memory"] is None  # on a GPU: the allocator's peak and the device's memory in use

    real = bench._timed_outputs

    def one_short(engine, prompts, outs, penalties=None):
        t, outputs = real(engine, prompts, outs, penalties)
        outputs[1].token_ids = outputs[1].token_ids[:-1]
        return t, outputs

    monkeypatch.setattr(bench, "_timed_outputs", one_short)
    assert bench.main("throughput", {**ENGINE, "load_format": "dummy"},
                      ["--workload", "fixed", "--num-prompts", "3", "--input-len", "16", "--output-len", "6"],
                      json_output=True) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert row["completed"] == 2


def test_mixed_lengths_are_the_workload_of_every_benchmark():
    """bench throughput, bench serving and scripts/probe_memory.py draw the same mixed lengths."""
    import random

    from localsgl import bench_serving

    a = SimpleNamespace(seed=3, workload="mixed", num_prompts=50)
    ins, outs = bench_serving.make_workload(a)
    assert list(zip(ins, outs)) == bench.mixed_lengths(random.Random(3), 50)
    assert all(128 <= i <= 1024 and 128 <= o <= 512 for i, o in zip(ins, outs)) and len(set(ins)) > 10
