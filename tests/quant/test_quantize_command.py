"""`localsgl quantize` on the embedded SmolLM2-135M (CPU): each method's output is listed, loads
by its name, answers the capital question with "Paris" (greedy) and keeps the perplexity of a
fixed slice of pydoc_data.topics close to the unquantized (dequantized Q4_1) model's; an
interrupted quantize leaves nothing that `list` shows or `run` loads.

Measured ratios (bench/RESULTS.md, "quantize"): int8 1.001, fp8 1.017, int4 group 128 1.41.  The
issue's int4 target (<= 1.08) is not met on this model: it is itself 4-bit with groups of 32,
and regrouping its values by 64/128 costs what the bound below allows (group 32 reproduces it
exactly)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from localsgl import cli
from localsgl.engine.layers.quant import QuantizedWeight
from localsgl.engine.models.config import ModelConfig
from localsgl.engine.models.loader import load_model
from localsgl.engine.weight_estimate import estimate
from localsgl.store import quantized_checkpoint
from localsgl.store.errors import ModelStoreError
from localsgl.store.resolve import ModelNotFoundError, embedded_gguf_path, resolve_model

BOUNDS = {"int8": 1.03, "fp8": 1.03, "int4": 1.5}  # perplexity ratio to the unquantized model
runner = CliRunner()


@pytest.fixture(scope="module")
def data_home(tmp_path_factory):
    try:
        embedded_gguf_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("xdg")
    mp.setenv("XDG_DATA_HOME", str(home))
    yield home
    mp.undo()


@pytest.fixture(scope="module")
def reference(data_home):
    from pydoc_data.topics import topics

    src = resolve_model("smollm2-135m", record_use=False)
    tok = src.load_tokenizer()
    ids = tok.encode(topics["assert"][:1500])[:256]
    question = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True)
    model = load_model(src, torch.float32, "cpu")
    return tok, ids, question, _perplexity(model, ids)


def _perplexity(model, ids) -> float:
    from model_utils import prefill_logits

    lp = torch.log_softmax(prefill_logits(model, ids)[:-1].double(), -1)
    return math.exp(float(-lp.gather(1, torch.tensor(ids[1:])[:, None]).mean()))


def _greedy(model, ids, n=8) -> list[int]:
    from model_utils import prefill_logits

    out = []
    for _ in range(n):
        out.append(int(prefill_logits(model, ids + out)[-1].argmax()))
    return out


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
def test_quantized_model_answers_and_keeps_perplexity(method, reference, data_home):
    tok, ids, question, base_ppl = reference
    name = f"smol-{method}"
    r = runner.invoke(cli.app, ["quantize", "smollm2-135m", "--method", method, "-o", name, "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == name
    out = data_home / "localsgl" / "models" / name
    manifest = json.loads((out / "localsgl-quantization.json").read_text())
    assert manifest["method"] == method and manifest["source"] == "smollm2-135m" and manifest["date"]
    assert manifest["group_size"] == (128 if method == "int4" else 0)
    listed = {m["name"]: m for m in json.loads(runner.invoke(cli.app, ["list", "--json"]).stdout)}
    assert listed[name]["source"] == "quantized" and listed[name]["format"].startswith(method)

    src = resolve_model(name, record_use=False)
    stored = dict(quantized_checkpoint.iter_weights(out, src.config, torch.float32, "cpu"))
    w = stored["model.layers.0.mlp.down_proj.weight"]
    assert isinstance(w, QuantizedWeight) and w.fmt.kind == method
    if method == "int4":  # 1536 inputs: groups of 128; 576 inputs take groups of 64
        assert w.group == 128 and stored["model.layers.0.self_attn.q_proj.weight"].group == 64
    assert not isinstance(stored["model.embed_tokens.weight"], QuantizedWeight)
    # `info --weights keep` counts each weight (scales and mins with it) under the format it was stored in
    est = estimate(src, ModelConfig.from_hf(src.config), "float32", "cpu", "keep")  # scales as stored (fp16)
    labels = {"int4": {"int4 g64 asym", "int4 g128 asym"}, "int8": {"int8 per-row"}, "fp8": {"fp8 per-row"}}[method]
    assert set(est.by_format) == labels | {"float32"}, est.by_format
    stored_bytes = sum(q.nbytes if isinstance(q, QuantizedWeight) else 0 for q in stored.values())
    assert sum(est.by_format[lab] for lab in labels) == stored_bytes
    model = load_model(src, torch.float32, "cpu")  # the CPU default: dequantized, the same values
    assert torch.equal(model.layers[0].mlp.down_proj.weight, w.dequantize())
    ratio = _perplexity(model, ids) / base_ppl
    assert 0.97 < ratio <= BOUNDS[method], ratio
    assert "Paris" in tok.decode(_greedy(model, question))


def test_interrupted_quantize_leaves_nothing_loadable(reference, data_home, monkeypatch):
    from localsgl.store import quantize as Q
    from localsgl.store.manage import scan

    calls = []
    real = QuantizedWeight.quantize

    def flaky(w, fmt):
        calls.append(1)
        if len(calls) > 20:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the tensors
        return real(w, fmt)

    monkeypatch.setattr(QuantizedWeight, "quantize", staticmethod(flaky))
    with pytest.raises(KeyboardInterrupt):
        Q.quantize_model("smollm2-135m", "int8", name="smol-cut", device="cpu")
    root = data_home / "localsgl" / "models"
    assert not (root / "smol-cut").exists() and not list(root.glob(".tmp-*"))
    # a killed run leaves its hidden work directory: never listed, never resolved, and removed by
    # the next quantize once its owner is gone
    stale = root / ".tmp-smol-killed-x1"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (stale / ".owner").write_text("999999999")
    assert all(m.name not in ("smol-cut", ".tmp-smol-killed-x1") for m in scan()[0])
    for spec in ("smol-cut", ".tmp-smol-killed-x1"):
        with pytest.raises((ModelStoreError, ValueError)):
            resolve_model(spec, record_use=False)
    monkeypatch.setattr(QuantizedWeight, "quantize", staticmethod(real))
    (root / "taken").mkdir()
    with pytest.raises(Q.QuantizeError, match="already exists"):
        Q.quantize_model("smollm2-135m", "int8", name="taken", device="cpu")
    with pytest.raises(Q.QuantizeError, match="output name"):
        Q.quantize_model("smollm2-135m", "int8", name="../elsewhere", device="cpu")
    for alias in ("smollm2-135m", "Llama-3.1-8B"):  # aliases resolve first, in any case: never runnable
        with pytest.raises(Q.QuantizeError, match="built-in model alias"):
            Q.quantize_model("smollm2-135m", "int8", name=alias, device="cpu")
    assert not (root / "smollm2-135m").exists() and not (root / "Llama-3.1-8B").exists()
    with pytest.raises(Q.QuantizeError, match="already exists"):  # refused before the source is looked up
        Q.quantize_model("no-such-org/no-such-model", "int8", name="taken", device="cpu")
    Q._remove_stale(root)  # what a run does first
    assert not stale.exists()


def test_group_the_kernels_cannot_tile_is_refused(data_home):
    """A group that is not a power of two (or below the kernels' 32 for int4) is a usage error that
    writes nothing, not a silently different group."""
    root = data_home / "localsgl" / "models"
    before = sorted(p.name for p in root.iterdir()) if root.exists() else []
    for group in ("100", "16"):
        r = runner.invoke(cli.app, ["quantize", "smollm2-135m", "--method", "int4", "--group-size", group,
                                    "-o", "odd", "--device", "cpu"])
        assert r.exit_code == 2 and "power of two" in r.output, r.output
    assert (sorted(p.name for p in root.iterdir()) if root.exists() else []) == before


def test_default_names_tell_group_sizes_apart():
    from localsgl.engine.layers.quant import parse_format
    from localsgl.store.quantize import default_name

    names = {default_name("HuggingFaceTB/SmolLM2-135M-Instruct", parse_format(m, g))
             for m, g in (("int4", None), ("int4", 32), ("int8", None), ("int8", 32), ("fp8", None), ("fp8", 64))}
    assert names == {"SmolLM2-135M-Instruct-int4-g128", "SmolLM2-135M-Instruct-int4-g32", "SmolLM2-135M-Instruct-int8",
                     "SmolLM2-135M-Instruct-int8-g32", "SmolLM2-135M-Instruct-fp8", "SmolLM2-135M-Instruct-fp8-g64"}
    assert default_name("a b/c d?", parse_format("int8")) == "c-d-int8"


def test_a_device_that_is_not_here_is_refused_before_any_work(data_home, monkeypatch):
    """--device cuda without a CUDA GPU (or an unknown device) is the engine's usage error, not
    torch's AssertionError, and it comes before the source is looked up."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in (("cuda", "--device cuda: no CUDA GPU is available here (use --device cpu)"),
                            ("cuda:1", "--device cuda:1: no CUDA GPU is available here"),
                            ("tpu", "unknown device 'tpu' (use cuda, cuda:N or cpu)")):
        r = runner.invoke(cli.app, ["quantize", "no-such-org/no-such-model", "--method", "int8", "--device", device])
        assert r.exit_code == 2 and message in r.output, r.output
