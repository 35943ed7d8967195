"""Fixtures for the model store's tests: a local hub (hub_server.FakeHub) serving a tiny
safetensors model and a tiny GGUF repo, and a process environment of temporary homes.

Every test gets its own HF_HOME, XDG data and cache dirs and HF_ENDPOINT pointing at its
own hub; huggingface_hub's import-time constants (offline mode, token file) are patched to
match, since the suite runs with HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # test_loader's and test_gguf's model builders
sys.path.append(str(Path(__file__).resolve().parent))  # hub_server (appended: never shadows another dir's conftest)

from hub_server import GGUF_REPO, TINY_REPO, FakeHub  # noqa: E402
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOOLS_TEMPLATE = "{% if tools %}<|tools|> {{ tools | tojson }} {% endif %}" + CHAT_TEMPLATE


def _tokenizer_files(vocab_size: int) -> dict[str, bytes]:
    """A word-level tokenizer of ``vocab_size`` tokens, as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    words = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(specials)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 256, "chat_template": TOOLS_TEMPLATE}
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(config).encode()}


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, bytes]:
    """The files of a tiny Llama repo: sharded safetensors + index, config, tokenizer, and files
    a pull must leave alone (README.md, a .bin copy, a consolidated copy outside the index)."""
    from test_loader import make_hf_model

    d = tmp_path_factory.mktemp("tiny-model")
    model = make_hf_model("llama-tied", seed=3)
    model.save_pretrained(d, safe_serialization=True, max_shard_size="60KB")
    files = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    assert "model.safetensors.index.json" in files and sum(n.endswith(".safetensors") for n in files) >= 2
    files.update(_tokenizer_files(model.config.vocab_size))
    files["README.md"] = b"# tiny\n"
    files["pytorch_model.bin"] = b"\0" * 1000
    files["consolidated.safetensors"] = b"\0" * 3000
    return files


@pytest.fixture(scope="session")
def gguf_files(tmp_path_factory) -> dict[str, bytes]:
    """A GGUF repo: the same tiny model at Q8_0 and F16, a vision projector, a README."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import write_tiny_gguf
    from test_loader import make_hf_model

    d = tmp_path_factory.mktemp("tiny-gguf")
    model = make_hf_model("llama-tied", seed=4)
    out = {}
    for name, qtype in (("Tiny-Q8_0.gguf", gguf.GGMLQuantizationType.Q8_0), ("Tiny-F16.gguf", gguf.GGMLQuantizationType.F16)):
        write_tiny_gguf(d / name, model, "llama", qtype)
        out[name] = (d / name).read_bytes()
    out["mmproj-Tiny-F16.gguf"] = out["Tiny-F16.gguf"]
    out["README.md"] = b"# tiny gguf\n"
    return out


@pytest.fixture
def hub(tiny_files, gguf_files):
    h = FakeHub().start()
    h.add(TINY_REPO, tiny_files)
    h.add(GGUF_REPO, gguf_files)
    yield h
    h.stop()


@pytest.fixture
def store_env(tmp_path, monkeypatch, hub):
    """Temporary homes and the local hub, for this process and for subprocesses (``env``)."""
    import huggingface_hub.constants as hf_constants

    env = {
        "HF_HOME": str(tmp_path / "hf"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_COLOR": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
              "LOCALSGL_NO_PULL", "LOCALSGL_CONFIG", "LOCALSGL_MODEL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    sub = {k: v for k, v in os.environ.items() if not k.startswith(("LOCALSGL_", "HF_"))}
    sub.update(env)
    sub["PYTHONUNBUFFERED"] = "1"
    return sub
