"""Sampling defaults that fit the model: precedence explicit > generation_config.json > alias >
llama.cpp, the engine applying them to unset fields only, `info` showing them, and the
embedded model answering the capital question under its defaults."""
from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from localsgl import cli
from localsgl.config import SAMPLING_SETTINGS, SETTINGS
from localsgl.engine.params import MODEL_DEFAULT_FIELDS, SamplingParams, is_unset
from localsgl.engine.sampling_defaults import (
    BUILTIN_DEFAULTS,
    GENERATION_CONFIG,
    apply_defaults,
    model_sampling_defaults,
    read_generation_config,
    resolve_defaults,
    sampling_from_generation_config,
)
from localsgl.store.resolve import ALIASES, ModelSource, alias_of, resolve_model

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "eos_token_id": 127,
}


def tiny_dir(tmp_path, generation_config: dict | None, name="tiny"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_CONFIG))
    if generation_config is not None:
        (d / GENERATION_CONFIG).write_text(json.dumps(generation_config))
    return d


@pytest.fixture
def isolated_settings(monkeypatch, tmp_path):
    for s in SETTINGS.values():
        monkeypatch.delenv(s.env, raising=False)
    for name in SAMPLING_SETTINGS:
        monkeypatch.delenv("LOCALSGL_" + name.upper(), raising=False)
    monkeypatch.delenv("LOCALSGL_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("NO_COLOR", "1")


# ----------------------------------------------------------------------------- params


def test_unset_fields_are_placeholders_until_resolved():
    p = SamplingParams(temperature=1.0, top_k=-1)  # explicit values equal to the neutral ones
    assert p.unset_fields() == ["max_tokens", "top_p", "min_p", "repetition_penalty"]
    assert not is_unset(p.temperature) and not is_unset(p.top_k)
    # a placeholder reads as its neutral value, so the core and the sampler work on it as is
    assert SamplingParams().temperature == 1.0 and SamplingParams().max_tokens == MODEL_DEFAULT_FIELDS["max_tokens"]
    SamplingParams().validate()
    # copies keep what was unset (dataclasses.replace, SamplingParams(**vars(p)))
    assert dataclasses.replace(p, seed=3).unset_fields() == p.unset_fields()
    assert SamplingParams(**vars(p)).unset_fields() == p.unset_fields()
    # explicit None for max_tokens still means "up to the context length"
    assert SamplingParams(max_tokens=None).unset_fields() == ["temperature", "top_p", "top_k", "min_p",
                                                               "repetition_penalty"]


def test_apply_defaults_fills_only_unset_fields():
    defaults = resolve_defaults({"temperature": 0.3, "top_k": 7})
    p = SamplingParams(temperature=1.0, seed=5, n=3, stop="x")
    q = apply_defaults(p, defaults)
    assert q.temperature == 1.0 and q.top_k == 7  # explicit wins even at the neutral value
    assert q.top_p == 0.95 and q.min_p == 0.05 and q.max_tokens == 256 and q.repetition_penalty == 1.0
    assert q.seed == 5 and q.n == 3 and q.stop == ["x"] and q.unset_fields() == []
    assert p.unset_fields()  # the caller's object is untouched, so it can be reused
    greedy = apply_defaults(SamplingParams(temperature=0), defaults)
    assert greedy.greedy and greedy.top_k == 7
    assert apply_defaults(q, defaults) is q  # nothing left to fill


# ----------------------------------------------------------------------------- precedence


def test_precedence_generation_config_then_alias_then_llama_cpp():
    alias_values = {"temperature": 0.2, "top_p": 0.9, "min_p": 0.0}
    d = resolve_defaults({"top_p": 0.7, "max_tokens": 512}, "some-alias", alias_values)
    assert d["top_p"] == (0.7, GENERATION_CONFIG)
    assert d["max_tokens"] == (512, GENERATION_CONFIG)
    assert d["temperature"] == (0.2, "alias some-alias")
    assert d["min_p"] == (0.0, "alias some-alias")
    assert d["top_k"] == BUILTIN_DEFAULTS["top_k"] == (40, "llama.cpp default")
    assert d["repetition_penalty"] == (1.0, "llama.cpp default")
    assert resolve_defaults() == BUILTIN_DEFAULTS
    assert {f: v for f, (v, _) in BUILTIN_DEFAULTS.items()} == {
        "max_tokens": 256, "temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.0}


def test_generation_config_parsing():
    got = sampling_from_generation_config({
        "temperature": 0.6, "top_p": 0.9, "top_k": 0, "min_p": 0.1, "repetition_penalty": 1.05,
        "max_new_tokens": 1024, "max_length": 20, "bos_token_id": 1,
    })
    assert got == {"temperature": 0.6, "top_p": 0.9, "top_k": -1, "min_p": 0.1, "repetition_penalty": 1.05,
                   "max_tokens": 1024}
    # do_sample false written out means greedy; left out it does not override the values
    assert sampling_from_generation_config({"do_sample": False, "temperature": 0.7})["temperature"] == 0.0
    assert sampling_from_generation_config({"temperature": 0.7})["temperature"] == 0.7
    # values SamplingParams would reject, and a max_new_tokens that would cut answers short, are dropped
    assert sampling_from_generation_config({"top_p": 0.0, "temperature": -1, "top_k": 2.5, "max_new_tokens": 5,
                                            "min_p": True, "repetition_penalty": "1.1"}) == {}


def test_model_sampling_defaults_from_directory(tmp_path):
    d = tiny_dir(tmp_path, {"do_sample": False, "top_p": 0.8, "max_new_tokens": 64})
    src = ModelSource(name="tiny", kind="hf", path=d, config=TINY_CONFIG)
    got = model_sampling_defaults(src)
    assert got["temperature"] == (0.0, GENERATION_CONFIG + " (do_sample: false)")
    assert got["top_p"] == (0.8, GENERATION_CONFIG) and got["max_tokens"] == (64, GENERATION_CONFIG)
    assert got["top_k"][1] == "llama.cpp default"
    # a dummy model named by its config.json reads the generation config next to it
    assert model_sampling_defaults(ModelSource("x", "dummy", d / "config.json", TINY_CONFIG))["top_p"][0] == 0.8
    # a directory without the file, or with a broken one, falls through to the built-in values
    assert model_sampling_defaults(ModelSource("y", "hf", tiny_dir(tmp_path, None, "none"), {})) == BUILTIN_DEFAULTS
    broken = tiny_dir(tmp_path, None, "broken")
    (broken / GENERATION_CONFIG).write_text("{not json")
    assert read_generation_config(broken) == ({}, False)


def test_alias_values_apply_to_the_alias_and_its_repo(tmp_path):
    entry = ALIASES["smollm2-360m"]
    assert entry.sampling == {"temperature": 0.2, "top_p": 0.9}  # the SmolLM2 model card
    # the same model named by its hub repo id gets its alias's values, behind its generation config
    src = ModelSource("HuggingFaceTB/SmolLM2-360M-Instruct", "hf", tiny_dir(tmp_path, {"top_p": 0.5}), {},
                      repo_id=entry.target)
    assert alias_of(src) == "smollm2-360m"
    got = model_sampling_defaults(src)
    assert got["temperature"] == (0.2, "alias smollm2-360m") and got["top_p"] == (0.5, GENERATION_CONFIG)
    assert alias_of(ModelSource("other", "hf", None, {}, repo_id="org/other")) is None
    # every recorded value is one SamplingParams accepts
    for name, e in ALIASES.items():
        assert set(e.sampling) <= set(MODEL_DEFAULT_FIELDS), name
        SamplingParams(**e.sampling).validate()


def test_embedded_alias_defaults():
    src = resolve_model("smollm2-135m", load_format="dummy")
    got = model_sampling_defaults(src)
    for field, value in ALIASES["smollm2-135m"].sampling.items():
        assert got[field] == (value, "alias smollm2-135m")


# ----------------------------------------------------------------------------- the engine


def test_engine_applies_generation_config_to_unset_fields_only(tmp_path):
    from localsgl import Engine

    d = tiny_dir(tmp_path, {"do_sample": False, "max_new_tokens": 16})
    with Engine(model=str(d), load_format="dummy", device="cpu", dtype="float32", kv_memory="4MiB",
                max_model_len=128) as engine:
        assert engine.sampling_defaults["temperature"] == (0.0, GENERATION_CONFIG + " (do_sample: false)")
        prompt = [5, 9, 17, 33]
        greedy = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        # unset temperature -> greedy from generation_config.json (two unseeded runs agree with it)
        for _ in range(2):
            out = engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True))
            assert out.token_ids == greedy.token_ids
        # unset max_tokens -> the file's max_new_tokens
        assert len(engine.generate(prompt, SamplingParams(ignore_eos=True)).token_ids) == 16
        # an explicit temperature wins: seeded samples differ from the greedy answer
        sampled = engine.generate([prompt] * 4, [SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True,
                                                                seed=s) for s in range(4)])
        assert any(o.token_ids != greedy.token_ids for o in sampled)
        assert engine.resolve_sampling(SamplingParams(temperature=0.5)).temperature == 0.5


# ----------------------------------------------------------------------------- info


def test_info_json_and_text_show_values_and_sources(isolated_settings, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli.app, ["info", "--json", "--device", "cpu", "--kv-memory", "64MiB"])
    assert r.exit_code == 0, r.output
    sampling = json.loads(r.stdout)["sampling"]
    assert set(sampling) == set(MODEL_DEFAULT_FIELDS)
    for field, value in ALIASES["smollm2-135m"].sampling.items():
        assert sampling[field] == {"value": value, "source": "alias smollm2-135m"}
    assert sampling["max_tokens"] == {"value": 256, "source": "localsgl default"}

    d = tiny_dir(tmp_path, {"temperature": 0.45, "top_k": 12})
    r = runner.invoke(cli.app, ["info", "--json", "-m", str(d), "--load-format", "dummy", "--device", "cpu",
                                "--kv-memory", "8MiB"])
    assert r.exit_code == 0, r.output
    sampling = json.loads(r.stdout)["sampling"]
    assert sampling["temperature"] == {"value": 0.45, "source": GENERATION_CONFIG}
    assert sampling["top_k"] == {"value": 12, "source": GENERATION_CONFIG}
    assert sampling["min_p"] == {"value": 0.05, "source": "llama.cpp default"}

    r = runner.invoke(cli.app, ["info", "-m", str(d), "--load-format", "dummy", "--device", "cpu", "--kv-memory", "8MiB"])
    assert r.exit_code == 0, r.output
    text = r.stdout[r.stdout.index("Sampling defaults"):]
    assert "temperature" in text and "0.45" in text and GENERATION_CONFIG in text and "llama.cpp default" in text


def test_config_file_and_env_defaults_rank_above_the_model(isolated_settings, monkeypatch, tmp_path):
    from localsgl.config import resolve_engine_kwargs

    cfg = tmp_path / "config" / "localsgl" / "config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('[sampling]\ntemperature = 0.33\ntop-k = 7\n')
    kwargs = resolve_engine_kwargs({})
    assert kwargs["default_sampling"]["temperature"][0] == 0.33
    assert "[sampling]" in kwargs["default_sampling"]["temperature"][1]
    monkeypatch.setenv("LOCALSGL_TEMPERATURE", "0.7")  # the environment beats the file
    kwargs = resolve_engine_kwargs({})
    assert kwargs["default_sampling"]["temperature"] == (0.7, "LOCALSGL_TEMPERATURE")
    assert kwargs["default_sampling"]["top_k"][0] == 7

    d = tiny_dir(tmp_path, {"temperature": 0.45, "top_k": 12, "top_p": 0.8})
    defaults = model_sampling_defaults(resolve_model(str(d), load_format="dummy"), kwargs["default_sampling"])
    assert defaults["temperature"] == (0.7, "LOCALSGL_TEMPERATURE")
    assert defaults["top_k"][0] == 7 and "[sampling]" in defaults["top_k"][1]
    assert defaults["top_p"] == (0.8, GENERATION_CONFIG)  # fields the person left alone keep the model's

    r = CliRunner().invoke(cli.app, ["info", "--json", "-m", str(d), "--load-format", "dummy", "--device", "cpu",
                                     "--kv-memory", "8MiB"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sampling"]["top_k"]["value"] == 7


def test_bad_user_sampling_defaults_are_usage_errors(isolated_settings, monkeypatch, tmp_path):
    from localsgl import Engine
    from localsgl.config import ConfigError, resolve_engine_kwargs
    from localsgl.engine.params import InvalidRequestError

    monkeypatch.setenv("LOCALSGL_TOP_P", "lots")
    with pytest.raises(ConfigError, match="LOCALSGL_TOP_P"):
        resolve_engine_kwargs({})
    monkeypatch.delenv("LOCALSGL_TOP_P")
    with pytest.raises(InvalidRequestError, match="top_p"):
        Engine(model="smollm2-135m", device="cpu", default_sampling={"top_p": 3.0})
    with pytest.raises(InvalidRequestError, match="not a sampling default"):
        Engine(model="smollm2-135m", device="cpu", default_sampling={"seed": 3})
    r = CliRunner().invoke(cli.app, ["info", "--device", "cpu"], env={"LOCALSGL_MIN_P": "2"})
    assert r.exit_code == 2, r.output


# ----------------------------------------------------------------------------- the embedded model


def test_capital_question_answers_paris_under_default_sampling():
    """20 seeds, default sampling, chat template: the first answer a new user sees makes sense."""
    from localsgl import Engine

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with Engine(model="smollm2-135m", device="cpu", dtype="float32", kv_memory="32MiB", max_model_len=256) as engine:
        params = [SamplingParams(max_tokens=24, seed=seed) for seed in range(20)]
        outs = engine.generate([messages] * 20, params)  # one concurrent batch
    answers = [o.text for o in outs]
    assert sum("Paris" in a for a in answers) >= 17, answers
