"""Long-context correctness: the rotary table covers every position the engine can reach,
`localsgl info` plans exactly as the engine does, and a model whose layers slide (which
the engine does not implement) is never run past its window."""
import json

import pytest
import torch

from localsgl.engine import plan as plan_mod
from localsgl.engine.layers.rotary import RotaryEmbedding
from localsgl.engine.models.config import ModelConfig
from localsgl.engine.params import InvalidRequestError, PromptTooLongError, SamplingParams
from localsgl.engine.plan import GiB, DeviceInfo, PlanError, make_plan, plan_options

H100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", total_memory=80 * 10**9, free_memory=79 * 10**9,
                  sm_count=132, capability=(9, 0), bf16=True)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=512, eos_token_id=63)


def hf_config(arch: str, **extra) -> dict:
    return {"architectures": [arch], **TINY, **extra}


def config_dir(tmp_path, **cfg) -> str:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


# ----------------------------------------------------------------------------- sliding windows in configs


@pytest.mark.parametrize("arch,extra,window", [
    ("MistralForCausalLM", dict(sliding_window=4096), 4096),  # Mistral-7B-v0.1: every layer slides
    ("MistralForCausalLM", dict(sliding_window=None), None),  # v0.2+: full attention
    ("Qwen2ForCausalLM", dict(sliding_window=131072, use_sliding_window=False), None),  # Qwen2.5 as shipped
    ("Qwen2ForCausalLM", dict(sliding_window=256, use_sliding_window=True, max_window_layers=1), 256),
    ("Qwen2ForCausalLM", dict(sliding_window=256, use_sliding_window=True, max_window_layers=2), None),  # no layer >= 2
    ("Qwen2ForCausalLM", dict(use_sliding_window=True, max_window_layers=0), 4096),  # transformers' default window
    ("Qwen3ForCausalLM", dict(sliding_window=300, use_sliding_window=True,
                              layer_types=["full_attention", "sliding_attention"]), 300),
    ("Qwen3ForCausalLM", dict(sliding_window=300, use_sliding_window=True,
                              layer_types=["full_attention", "full_attention"]), None),
    ("Qwen3ForCausalLM", dict(sliding_window=300, use_sliding_window=False,
                              layer_types=["sliding_attention", "sliding_attention"]), None),
    ("LlamaForCausalLM", dict(sliding_window=128), None),  # transformers' Llama ignores the key
])
def test_sliding_window_read_as_transformers_does(arch, extra, window):
    assert ModelConfig.from_hf(hf_config(arch, **extra)).sliding_window == window


# ----------------------------------------------------------------------------- the plan


def mistral(window, max_pos=32768):
    return ModelConfig.from_hf(dict(
        architectures=["MistralForCausalLM"], hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=max_pos,
        sliding_window=window))


def test_plan_caps_the_context_at_the_window():
    p = make_plan(mistral(4096), H100, "bfloat16")
    assert p.max_model_len == 4096 and p.kv_tokens > 4096
    assert "4,096" in p.context_limit and "sliding window" in p.context_limit
    assert any("capped" in n and "4,096" in n for n in p.notes)
    assert make_plan(mistral(4096), H100, "bfloat16", max_model_len=4096).max_model_len == 4096
    short = make_plan(mistral(4096), H100, "bfloat16", max_model_len=1000)
    assert short.max_model_len == 1000 and short.context_limit is None
    full = make_plan(mistral(None), H100, "bfloat16")
    assert full.max_model_len == 32768 and full.context_limit is None
    # a window beyond the positions changes nothing
    wide = make_plan(mistral(65536), H100, "bfloat16")
    assert wide.max_model_len == 32768 and wide.context_limit is None


def test_max_model_len_beyond_the_window_is_refused():
    with pytest.raises(PlanError, match="sliding window of 4,096 tokens"):
        make_plan(mistral(4096), H100, "bfloat16", max_model_len=4097)


def test_disable_cuda_graph_plans_alike_through_plan_options():
    flags = {"disable_cuda_graph": True, "gpu_memory": 24 * GiB}
    p = make_plan(mistral(None), H100, "bfloat16", **plan_options(flags))
    assert p.cuda_graph_bs == [] and p.graph_reserve_bytes == 0
    with_graphs = make_plan(mistral(None), H100, "bfloat16", **plan_options({"gpu_memory": 24 * GiB}))
    assert with_graphs.cuda_graph_bs and with_graphs.kv_tokens < p.kv_tokens


# ----------------------------------------------------------------------------- the rotary table


def test_rotary_resize_matches_a_fresh_table_and_checks_coverage():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    r = RotaryEmbedding(16, 100, 500000.0, scaling)
    r.check_covers(100)
    with pytest.raises(ValueError, match="100 positions but max_model_len is 101"):
        r.check_covers(101)
    r.resize(300)
    fresh = RotaryEmbedding(16, 300, 500000.0, scaling)
    assert r.max_positions == 300 and torch.equal(r.cos_sin, fresh.cos_sin)
    r.resize(50)
    assert torch.equal(r.cos_sin, fresh.cos_sin[:50])


def test_core_refuses_a_table_shorter_than_max_model_len():
    from tiny import tiny_core, tiny_model

    m = tiny_model()
    m.rotary.resize(100)
    with pytest.raises(ValueError, match="rotary table holds 100 positions"):
        tiny_core(max_model_len=128, model=m)


# ----------------------------------------------------------------------------- engines (tiny configs, CPU)


@pytest.mark.in_process_only  # reads the engine's model and patches this process's planning
def test_rotary_table_follows_the_final_plan(tmp_path, monkeypatch):
    """The pre-load plan is an estimate; when the final plan allows a longer context, the table
    follows it, and a request filling that context runs with every position in the table."""
    from localsgl import Engine

    real, calls = plan_mod.make_plan, []

    def estimate_then_plan(*args, **kwargs):
        calls.append(kwargs)
        p = real(*args, **kwargs)
        if len(calls) == 1:  # the engine's pre-load plan: as if the estimate left less room
            p.max_model_len = 40
        return p

    monkeypatch.setattr(plan_mod, "make_plan", estimate_then_plan)
    path = config_dir(tmp_path, **hf_config("LlamaForCausalLM"))
    with Engine(model=path, device="cpu", load_format="dummy", max_running=2, kv_memory=1 << 20,
                in_process=True) as eng:  # reads the model
        assert len(calls) == 2 and eng.max_model_len == 512
        rotary = eng.model.rotary
        assert rotary.max_positions == eng.max_model_len
        seen = []
        tables = rotary._tables
        rotary._tables = lambda pos: seen.append(int(pos.max())) or tables(pos)
        out = eng.generate([1 + i % 60 for i in range(499)], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
        assert out.finish_reason == "length" and len(out.token_ids) == 512 - 499
        assert max(seen) < eng.max_model_len


@pytest.mark.in_process_only  # patches this process's make_plan
def test_engine_plans_as_info_does(tmp_path, monkeypatch):
    from localsgl import Engine
    from localsgl.cli_info import _info_report

    path = config_dir(tmp_path, **hf_config("LlamaForCausalLM"))
    flags = dict(model=path, device="cpu", load_format="dummy", disable_cuda_graph=True, max_running=3,
                 kv_memory=1 << 20)
    calls = []
    real = plan_mod.make_plan
    monkeypatch.setattr(plan_mod, "make_plan", lambda *a, **k: calls.append(dict(k)) or real(*a, **k))
    report = _info_report(dict(flags))
    with Engine(**flags, in_process=True) as eng:  # the patched make_plan is this process's
        assert eng.plan.to_dict() == report["plan"]
    info_kwargs, engine_kwargs = calls[0], calls[1:]
    assert len(engine_kwargs) == 2
    for k in engine_kwargs:
        k.pop("free_memory_after_weights", None)
        assert k == info_kwargs
    assert info_kwargs["cuda_graph"] is False


@pytest.mark.in_process_only  # reads the engine's model
def test_sliding_window_model_stops_at_its_window(tmp_path):
    from localsgl import Engine

    path = config_dir(tmp_path, **hf_config("MistralForCausalLM", sliding_window=48))
    with Engine(model=path, device="cpu", load_format="dummy", max_running=2, in_process=True) as eng:  # reads the model
        assert eng.max_model_len == 48 and eng.model.rotary.max_positions == 48
        with pytest.raises(PromptTooLongError, match="sliding window of 48 tokens"):
            eng.generate([1 + i % 60 for i in range(48)], SamplingParams(max_tokens=1))
        out = eng.generate([1 + i % 60 for i in range(39)], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
        assert out.finish_reason == "length" and 39 + len(out.token_ids) == 48
    with pytest.raises(PlanError, match="--max-model-len 64 is beyond the model's sliding window of 48 tokens"):
        Engine(model=path, device="cpu", load_format="dummy", max_model_len=64, in_process=True)
    assert issubclass(PromptTooLongError, InvalidRequestError)


def test_cli_refuses_max_model_len_beyond_the_window(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from localsgl import cli

    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = config_dir(tmp_path, **hf_config("MistralForCausalLM", sliding_window=48))
    base = ["info", "-m", path, "--load-format", "dummy", "--device", "cpu", "--json"]
    r = CliRunner().invoke(cli.app, base + ["--max-model-len", "64"])
    assert r.exit_code == 2 and "sliding window of 48 tokens" in r.stderr
    r = CliRunner().invoke(cli.app, base)
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)["plan"]
    assert p["max_model_len"] == 48 and "sliding window" in p["context_limit"]


def test_http_names_the_window_when_a_prompt_passes_it():
    import sys

    sys.path.insert(0, "tests/server")
    from fake_engine import FakeEngine
    from fastapi.testclient import TestClient

    from localsgl.engine.plan import sliding_window_limit
    from localsgl.server import app as server_app

    for window in (None, 16):
        eng = FakeEngine(max_model_len=16)
        eng.plan.context_limit = sliding_window_limit(window) if window else None
        try:
            with TestClient(server_app.create_app(eng)) as c:
                r = c.post("/v1/completions", json={"model": "fake-echo", "prompt": list(range(1, 21)), "max_tokens": 1})
                assert r.status_code == 400, r.text
                msg = r.json()["error"]["message"]
                assert "maximum context length is 16 tokens" in msg
                assert ("sliding window of 16 tokens" in msg) == (window is not None)
        finally:
            eng.shutdown()
