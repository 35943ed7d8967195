"""Debug switches: read from LOCALSGL_DEBUG_* when an engine is built, handed down per engine
(two engines in one process follow their own), never read from the retired names."""
import json
import logging
import threading

import pytest
import torch

from localsgl.engine import debug_switches as ds
from localsgl.engine.debug_switches import DebugSwitches
from localsgl.engine.params import SamplingParams


def test_from_env_reads_the_debug_names_only(caplog):
    assert DebugSwitches.from_env({}) == DebugSwitches()
    env = {"LOCALSGL_DEBUG_NO_CPU_DECODE": "1", "LOCALSGL_DEBUG_PROFILE_STEPS": "yes",
           "LOCALSGL_DEBUG_NO_PDL": "0", "LOCALSGL_DEBUG_NO_CASCADE": "off", "LOCALSGL_DEBUG_NO_KERNELS": ""}
    s = DebugSwitches.from_env(env)
    assert s.changed() == {"cpu_decode": False, "profile_steps": True}
    for f in ("kernels", "fused_decode", "cascade", "pdl", "compile_ahead", "gpu_sampling_kernels", "int8_activations",
              "fp32_sums", "attention_int8_epilogue", "fp16_products"):
        assert getattr(DebugSwitches.from_env({ds.variable(f): "1"}), f) is False
    # piecewise graphs are automatic (None) unless the variable forces them on (1) or off (0)
    pw = ds.variable("piecewise_graphs")
    assert [DebugSwitches.from_env(e).piecewise_graphs for e in ({}, {pw: ""}, {pw: "1"}, {pw: "0"}, {pw: "off"})] \
        == [None, None, True, False, False]
    with caplog.at_level(logging.WARNING, logger="localsgl.engine"):
        old = DebugSwitches.from_env({"LOCALSGL_DISABLE_CPU_DECODE": "1", "LOCALSGL_DEBUG_NO_CPUDECODE": "1",
                                      "LOCALSGL_DEBUG": "1"})
    assert old == DebugSwitches()  # the retired name and a misspelling change nothing ...
    text = caplog.text
    assert "LOCALSGL_DISABLE_CPU_DECODE is no longer read" in text and "LOCALSGL_DEBUG_NO_CPU_DECODE" in text
    assert "LOCALSGL_DEBUG_NO_CPUDECODE is not a debug switch" in text  # ... but are reported
    assert "LOCALSGL_DEBUG is not" not in text  # the CLI's traceback switch is not one of these


def test_switches_reach_the_model_layers_and_the_runner():
    import sys

    sys.path.insert(0, "tests")
    from tiny import tiny_core

    core = tiny_core(debug=DebugSwitches(kernels=False, cascade=False, gpu_sampling_kernels=False))
    try:
        m = core.model
        assert ds.of(m).kernels is False and core.runner.debug.cascade is False
        assert not core.gpu_sampling_kernels and core.profile is None
        flags = [mod.use_kernels for mod in m.modules() if hasattr(mod, "use_kernels")]
        assert len(flags) == 2 * 2 + 1 + 2 + 1 and not any(flags)  # norms, final norm, MLPs, rotary
    finally:
        core.shutdown()
    core = tiny_core(debug=DebugSwitches(profile_steps=True))
    try:
        assert core.profile is not None and core.runner.debug.cascade
        assert all(mod.use_kernels for mod in core.model.modules() if hasattr(mod, "use_kernels"))
    finally:
        core.shutdown()


def test_weight_switches_reach_every_quantized_weight():
    """int8_activations and fp16_products are handed to each QuantizedWeight, a RowStack's blocks
    included, which is where the batch-1 GEMVs read them when they choose a tile
    (quant_gemv.default_config) and the dense GEMVs' products (quant_gemv._fp16)."""
    from localsgl.engine.layers.quant import QuantizedWeight, RowStack, WeightFormat

    model = torch.nn.Module()
    model.a = QuantizedWeight.random(WeightFormat("int4", 32, False), 8, 64)
    model.b = RowStack([QuantizedWeight.random(WeightFormat("int4", 32, False), 8, 64),
                        QuantizedWeight.random(WeightFormat("int8", 16, True), 4, 64)])
    weights = [model.a, *model.b.parts]
    for name in ("int8_activations", "fp16_products"):
        assert all(getattr(w, name) for w in weights)
        ds.apply_to_model(model, DebugSwitches(**{name: False}))
        assert not any(getattr(w, name) for w in weights)
        ds.apply_to_model(model, DebugSwitches())
        assert all(getattr(w, name) for w in weights)


def test_pdl_setting_is_per_thread():
    pdl = pytest.importorskip("localsgl_kernels.pdl")
    seen = {}

    def other():
        seen["other"] = pdl._ENABLED.get()

    pdl.set_enabled(False)
    try:
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert pdl._ENABLED.get() is False and seen["other"] is True
    finally:
        pdl.set_enabled(True)


@pytest.mark.in_process_only  # counts calls of this process's model code
def test_two_engines_in_one_process_follow_their_own_switches(tmp_path, monkeypatch):
    """One engine built with LOCALSGL_DEBUG_NO_CPU_DECODE=1 and one without, run side by side:
    the same greedy tokens, and only the second takes the lean CPU decode step."""
    from localsgl import Engine
    import localsgl.engine.models.llama as llama

    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=256)))
    lean_calls: dict[int, int] = {}
    real = llama.cpu_forward_decode

    def counting(model, *a):
        lean_calls[id(model)] = lean_calls.get(id(model), 0) + 1
        return real(model, *a)

    monkeypatch.setattr(llama, "cpu_forward_decode", counting)
    opts = dict(model=str(d), device="cpu", dtype="float32", load_format="dummy", max_running=4, kv_memory=1 << 20,
                in_process=True)  # reads the models
    monkeypatch.setenv("LOCALSGL_DEBUG_NO_CPU_DECODE", "1")
    off = Engine(**opts)
    monkeypatch.delenv("LOCALSGL_DEBUG_NO_CPU_DECODE")
    on = Engine(**opts)
    try:
        assert off.debug_switches.cpu_decode is False and on.debug_switches.cpu_decode is True
        prompts = [[(7 * i + j) % 60 + 1 for j in range(5 + 3 * i)] for i in range(4)]
        p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        results = {}

        def run(name, eng):
            results[name] = [o.token_ids for o in eng.generate(prompts, p)]

        threads = [threading.Thread(target=run, args=(n, e)) for n, e in (("off", off), ("on", on))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results["off"] == results["on"] and all(len(t) == 12 for t in results["on"])
        assert lean_calls.get(id(on.model), 0) > 0
        assert lean_calls.get(id(off.model), 0) == 0
    finally:
        off.shutdown()
        on.shutdown()
    explicit = Engine(**opts, debug_switches=DebugSwitches(cpu_decode=False))
    try:
        assert ds.of(explicit.model).cpu_decode is False
    finally:
        explicit.shutdown()


def test_fused_decode_switch_is_per_model(monkeypatch):
    import localsgl.engine.layers.fused_decode as fd
    import sys

    sys.path.insert(0, "tests")
    from tiny import tiny_model

    monkeypatch.setattr(fd, "_FORCE_ON_CPU", True)
    a, b = tiny_model(), tiny_model()
    ds.apply_to_model(b, DebugSwitches(fused_decode=False))
    one_row = torch.zeros(1, dtype=torch.int64)
    assert fd._one_row_on(a, one_row) and not fd._one_row_on(b, one_row)


def test_every_switch_is_documented():
    """docs/switches.md has a row for each variable the engine reads."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "switches.md").read_text()
    assert [var for var in sorted(ds._KNOWN) if f"`{var}=" not in doc] == []
