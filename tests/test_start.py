"""A fast start for `localsgl run`: what it imports, the conversion cache of GGUF files,
the tokenizer read without transformers, and `run` answered by a running `localsgl serve`.

Tests of the cache's mechanics use their own $XDG_CACHE_HOME and a tiny GGUF file; those
that run the embedded model start from the user's cache, filled by ``warm_cache`` if cold.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from localsgl.store import convert_cache, gguf_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HEAVY = ["fastapi", "uvicorn", "textual", "transformers", "huggingface_hub.file_download"]

# Runs the CLI like the console script and writes the modules it imported to $MODULES_OUT.
_CLI = (
    "import atexit, json, os, sys\n"
    "atexit.register(lambda: open(os.environ['MODULES_OUT'], 'w').write(json.dumps(sorted(sys.modules))))\n"
    "from localsgl.cli import app\n"
    "app()\n"
)


def run_cli(args: list[str], env: dict, tmp: Path, stdin: str = "", timeout: float = 300):
    """(completed process, modules the process imported)."""
    out = tmp / f"modules-{len(list(tmp.glob('modules-*')))}.json"
    e = {**env, "MODULES_OUT": str(out)}
    p = subprocess.run([sys.executable, "-c", _CLI, *args], input=stdin, capture_output=True, text=True,
                       env=e, cwd=str(ROOT), timeout=timeout)
    mods = set(json.loads(out.read_text())) if out.exists() else set()
    return p, mods


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCALSGL_")}
    env.update(HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(cache), LOCALSGL_CONFIG=str(cache / "none.toml"),
               NO_COLOR="1", PYTHONUNBUFFERED="1")
    (cache / "none.toml").parent.mkdir(parents=True, exist_ok=True)
    (cache / "none.toml").write_text("")
    env["LOCALSGL_PORT"] = str(free_port())  # nothing listens there: never a stray server
    return env


def _embedded():
    from localsgl.store.resolve import ModelNotFoundError, embedded_gguf_path

    try:
        return embedded_gguf_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(autouse=True)
def fresh_process_caches(monkeypatch):
    """Each test sees the on-disk cache only, as a new process would."""
    monkeypatch.setattr(gguf_file, "_models", {})
    monkeypatch.setattr(gguf_file, "_tokenizers", {})
    monkeypatch.setattr(convert_cache, "_keys", {})


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    """The environment of a `run` whose conversion cache holds the embedded model. The cache
    is the user's (as for the Hugging Face cache: content-keyed, checked before use, shared
    with the other tests' engines); a first `run` fills it if it is cold."""
    _embedded()
    tmp = tmp_path_factory.mktemp("start")
    env = base_env(tmp)
    env.pop("XDG_CACHE_HOME")
    if os.environ.get("XDG_CACHE_HOME"):
        env["XDG_CACHE_HOME"] = os.environ["XDG_CACHE_HOME"]
    p, _ = run_cli(["run", "--local", "--max-tokens", "1", "Hi"], env, tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    entry = convert_cache.cache_root() / convert_cache.file_key(_embedded())  # this process has the same env
    assert list(entry.glob("weights-*.safetensors")), f"no converted weights cached in {entry}"
    return entry, env


# ----------------------------------------------------------------------------- imports


def test_cli_import_does_not_load_torch_or_servers():
    code = "import json, sys, localsgl.cli; print(json.dumps(sorted(sys.modules)))"
    mods = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         check=True, cwd=str(ROOT)).stdout))
    assert not ({"torch", *HEAVY} & mods), sorted({"torch", *HEAVY} & mods)


def test_the_checkout_root_does_not_shadow_a_kernels_package():
    """From the checkout's root (``python -m`` puts it on sys.path) ``import kernels`` must not
    find our kernel folder as a regular package: it would shadow Hugging Face's ``kernels``,
    which transformers imports when it is installed.  ``localsgl_kernels`` still imports (a
    namespace package over kernels/)."""
    code = ("import importlib.util, json, localsgl_kernels.pdl as p; s = importlib.util.find_spec('kernels'); "
            "print(json.dumps([s.origin if s else None, p.__file__]))")
    origin, pdl = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True, cwd=str(ROOT)).stdout)
    assert origin is None or Path(origin).resolve().parent != (ROOT / "kernels").resolve(), origin
    assert Path(pdl).resolve().parent == (ROOT / "kernels").resolve()


def test_piped_run_imports_no_server_tui_hub_download_or_transformers(warm_cache, tmp_path):
    _, env = warm_cache
    p, mods = run_cli(["run", "--local", "--max-tokens", "2"], env, tmp_path, stdin="What is 2+2?\n")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip(), "no answer"
    assert "torch" in mods  # the process did run the engine
    assert not (set(HEAVY) & mods), sorted(set(HEAVY) & mods)


# ----------------------------------------------------------------------------- conversion cache


def _tiny_gguf(path: Path):
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from test_gguf import write_tiny_gguf
    from test_loader import make_hf_model

    gguf = pytest.importorskip("gguf")
    write_tiny_gguf(path, make_hf_model("llama-tied", seed=5), "llama", gguf.GGMLQuantizationType.Q8_0)


def _load(path: Path, dtype=torch.float32, weights: str | None = None):
    from localsgl.engine.models.loader import load_model
    from localsgl.store.resolve import resolve_model

    gguf_file._models.clear()
    convert_cache._keys.clear()
    src = resolve_model(str(path))
    model = load_model(src, dtype, "cpu", weights=weights)
    return {k: v.clone() for k, v in model.state_dict().items()}, gguf_file.open_gguf(path)


def test_kept_quantized_load_maps_the_tensors_without_parsing_the_header(tmp_path, monkeypatch):
    """With the cache's tensor index a load that keeps the weights quantized maps the tensors
    straight from the file: the same weights, no header parse; an entry without the index
    (an older cache) gets it on the next load."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path)
    first, m = _load(path, torch.bfloat16, "keep")
    assert any(k.endswith("qweight") for k in first)  # kept quantized
    second, m2 = _load(path, torch.bfloat16, "keep")
    assert m2._reader is None
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    meta = m2.cache.read_meta()
    del meta["tensors"]  # as an entry written before the index existed
    m2.cache.meta_path.write_text(json.dumps(meta))
    third, m3 = _load(path, torch.bfloat16, "keep")
    assert m3._reader is not None and all(torch.equal(first[k], third[k]) for k in first)
    assert "tensors" in m3.cache.read_meta()
    m3.cache.meta_path.write_text(json.dumps(dict(meta, tensors=[["token_embd.weight", 8, [1], 1, 10**12, 0, "|u1",
                                                                    [10**12]]])))
    fourth, m4 = _load(path, torch.bfloat16, "keep")  # a bad index: the header is parsed instead
    assert m4._reader is not None and all(torch.equal(first[k], fourth[k]) for k in first)
    assert len(m4.cache.read_meta()["tensors"]) > 1  # and the index is written anew


def test_second_load_comes_from_the_cache_with_identical_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path)
    first, m = _load(path)
    weights = m.cache.weights_path("float32")
    assert weights.is_file() and m.cache.meta_path.is_file()
    assert not list(weights.parent.glob(".*.tmp")), "temporary files left behind"

    def no_dequant(*a, **k):
        raise AssertionError("dequantized although the cache holds the weights")

    monkeypatch.setattr(gguf_file, "dequantize_tensor", no_dequant)
    second, m2 = _load(path)
    assert m2._reader is None  # the header was not parsed either
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # another dtype is another file; the config comes from the cache meanwhile
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bf16, m3 = _load(path, torch.bfloat16)
    assert m3.cache.weights_path("bfloat16").is_file()
    assert all(torch.equal(first[k].bfloat16(), bf16[k]) for k in first)


@pytest.mark.parametrize("damage", ["truncate", "header", "foreign", "meta"])
def test_damaged_cache_is_rebuilt_not_loaded(damage, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path)
    first, m = _load(path)
    weights = m.cache.weights_path("float32")
    size = weights.stat().st_size
    if damage == "truncate":  # e.g. a disk that filled up while another tool copied the cache
        with open(weights, "r+b") as f:
            f.truncate(size - 100)
    elif damage == "header":
        with open(weights, "r+b") as f:
            f.write(b"\xff" * 64)
    elif damage == "foreign":  # a whole file, but of other tensors
        other = convert_cache.WeightsWriter(weights, [("x", (2, 2))], "float32",
                                            {"format": str(convert_cache.FORMAT_VERSION), "key": m.cache.key,
                                             "dtype": "float32"})
        other.write("x", torch.zeros(2, 2))
        other.commit()
    else:
        m.cache.meta_path.write_text("{not json")
    calls = []
    real = gguf_file.dequantize_tensor
    monkeypatch.setattr(gguf_file, "dequantize_tensor", lambda *a, **k: calls.append(1) or real(*a, **k))
    second, m2 = _load(path)
    if damage == "meta":  # the header is parsed again and meta.json rewritten; the weights still match it
        assert m2.cache.read_meta() is not None
    else:
        assert calls, "the damaged cache file was loaded instead of rebuilt"
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert weights.stat().st_size == size  # rebuilt whole
    calls.clear()
    third, _ = _load(path)
    assert not calls and all(torch.equal(first[k], third[k]) for k in first)


def test_interrupted_conversion_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path)
    m = gguf_file.open_gguf(path)
    it = m.iter_weights(torch.float32, "cpu")
    next(it), next(it)
    it.close()  # e.g. the load failed or was interrupted half way
    d = m.cache.weights_path("float32").parent
    assert not m.cache.weights_path("float32").exists()
    assert not list(d.glob(".*.tmp"))


def test_stale_temporary_files_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path)
    m = gguf_file.open_gguf(path)
    d = m.cache.dir
    d.mkdir(parents=True, exist_ok=True)
    stale, live = d / ".weights-float32.safetensors.dead.tmp", d / ".weights-float32.safetensors.live.tmp"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    old = stale.stat().st_mtime - convert_cache.STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    for _ in m.iter_weights(torch.float32, "cpu"):
        pass
    assert not stale.exists() and live.exists()  # a killed writer's file goes, a live writer's stays


def test_cache_key_follows_content_not_name(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(os.urandom(9 << 20))
    b = tmp_path / "b.bin"
    b.write_bytes(a.read_bytes())
    assert convert_cache.file_key(a) == convert_cache.file_key(b)
    data = bytearray(a.read_bytes())
    data[-10] ^= 1  # inside the last sampled block
    b.write_bytes(bytes(data))
    assert convert_cache.file_key(a) != convert_cache.file_key(b)


# ----------------------------------------------------------------------------- tokenizer


CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another, with émoji 🎨?"}],
]
TEXTS = ["Hello, world!", "  leading spaces and\ttabs\n\nnewlines", "naïve café — 中文 日本語 🎉",
         "<|im_start|>user\nhi<|im_end|>", "1234567890 3.14159 x**2", ""]
# a template using what transformers' environment offers (namespace, tojson, loop controls,
# generation blocks, raise_exception)
TEMPLATE = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}"
    "{% endif %}{% set ns.n = ns.n + 1 %}{% if loop.index > 5 %}{% break %}{% endif %}"
    "{% if m.role == 'assistant' %}{% generation %}<a>{{ m.content }}</a>{% endgeneration %}"
    "{% else %}<{{ m.role }}>{{ m.content | tojson }}</{{ m.role }}>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<a>{{ ns.n }}{{ bos_token }}{% endif %}"
)


def test_light_tokenizer_matches_transformers(warm_cache, monkeypatch):
    transformers = pytest.importorskip("transformers")
    _, env = warm_cache
    if "XDG_CACHE_HOME" in env:
        monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    path = _embedded()
    ours = gguf_file.load_tokenizer(path)
    assert type(ours).__name__ == "LightTokenizer"  # read from the cache, not converted again
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id, len(ours)) == (
        ref.eos_token_id, ref.bos_token_id, ref.pad_token_id, len(ref))
    assert ours.chat_template == ref.chat_template
    for text in TEXTS:
        for special in (True, False):
            assert ours(text, add_special_tokens=special)["input_ids"] == ref(text, add_special_tokens=special)["input_ids"]
        ids = ref.encode(text + "<|im_end|>", add_special_tokens=False)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    for chat in CHATS:
        for gen in (True, False):
            kw = dict(add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(chat, **kw) == ref.apply_chat_template(chat, **kw)
            assert ours.apply_chat_template(chat, chat_template=TEMPLATE, **kw) == ref.apply_chat_template(
                chat, chat_template=TEMPLATE, **kw)
        assert ours.apply_chat_template(chat, add_generation_prompt=True) == ref.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    with pytest.raises(Exception, match="no tools"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=TEMPLATE, tokenize=False)
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):  # the sandbox holds
        ours.apply_chat_template(CHATS[0], chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}", tokenize=False)
    assert ours.apply_chat_template(CHATS[0], chat_template="{{ messages.__class__ }}.", tokenize=False) == "."


# ----------------------------------------------------------------------------- run -> serve


def _live_server(cfg: dict, env: dict):
    spec = importlib.util.spec_from_file_location("_start_server_helpers", HERE / "server" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.LiveServer(cfg, env=env, startup_timeout=300.0)


def test_run_uses_a_running_fake_server(tmp_path):
    env = base_env(tmp_path / "cache")
    srv = _live_server({"fake": {}, "serve": {"host": "127.0.0.1", "port": 0}}, env)
    try:
        env["LOCALSGL_PORT"] = str(srv.port)
        p, mods = run_cli(["run", "-m", "fake-echo", "--max-tokens", "7", "--stats"], env, tmp_path, "hello there\n")
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() and "completion tokens 7" in p.stderr, p.stderr
        assert "torch" not in mods and "localsgl.engine.api" not in mods  # no engine in this process
        p, _ = run_cli(["run", "-m", "fake-echo", "--batch", "--jsonl", "--max-tokens", "3"], env, tmp_path, "a\nb\nc\n")
        assert p.returncode == 0, p.stderr
        records = [json.loads(line) for line in p.stdout.splitlines()]
        assert [r["prompt"] for r in records] == ["a", "b", "c"] and [r["index"] for r in records] == [0, 1, 2]
        assert all(r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3 for r in records)
        # a request the server rejects is a usage error, as it is in-process
        p, _ = run_cli(["run", "-m", "fake-echo"], env, tmp_path, "x" * 2000 + "\n")  # over max_model_len 512
        assert p.returncode == 2 and "server:" in p.stderr, p.stderr
        # another model: not this server (and the fake model cannot load in-process)
        p, _ = run_cli(["-v", "run", "-m", "other-model", "--max-tokens", "1"], env, tmp_path, "x\n")
        assert p.returncode == 2 and "serves fake-echo, not other-model" in p.stderr, p.stderr
    finally:
        srv.stop()


def test_run_needs_the_servers_api_key(tmp_path):
    env = base_env(tmp_path / "cache")
    srv = _live_server({"fake": {}, "serve": {"host": "127.0.0.1", "port": 0, "api_key": "k-123"}}, env)
    try:
        env["LOCALSGL_PORT"] = str(srv.port)
        p, _ = run_cli(["-v", "run", "-m", "fake-echo", "--max-tokens", "2"], env, tmp_path, "x\n")
        assert p.returncode == 2 and "API key" in p.stderr, p.stderr  # fell back to in-process
        p, _ = run_cli(["run", "-m", "fake-echo", "--max-tokens", "2"], {**env, "LOCALSGL_API_KEY": "k-123"},
                       tmp_path, "x\n")
        assert p.returncode == 0 and len(p.stdout.rstrip("\n")) == 2, p.stderr  # the fake's 2 bytes, maybe spaces
    finally:
        srv.stop()


def test_run_answers_through_a_real_server_like_in_process(warm_cache, tmp_path):
    _, env = warm_cache
    engine_kwargs = {"model": "smollm2-135m", "device": "cpu", "max_model_len": 1024, "kv_memory": "64MiB"}
    srv = _live_server({"fake": None, "engine_kwargs": engine_kwargs, "serve": {"host": "127.0.0.1", "port": 0}}, env)
    try:
        env = {**env, "LOCALSGL_PORT": str(srv.port)}
        args = ["run", "--temperature", "0", "--max-tokens", "8", "--system", "Answer briefly."]
        remote, mods = run_cli(["-v", *args], env, tmp_path, "What is 2+2?\n")
        assert remote.returncode == 0, remote.stderr
        assert "using the localsgl server" in remote.stderr
        assert "torch" not in mods and "localsgl.engine.core" not in mods
        local, mods = run_cli(["-v", *args, "--local"], env, tmp_path, "What is 2+2?\n")
        assert local.returncode == 0, local.stderr
        assert "localsgl.engine.core" in mods and "from the conversion cache" in local.stderr
        assert not (set(HEAVY) & mods), sorted(set(HEAVY) & mods)  # in-process: only what `run` needs
        assert remote.stdout.strip() and remote.stdout == local.stdout  # greedy: the same answer
    finally:
        srv.stop()
