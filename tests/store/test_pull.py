"""`pull` against a local hub: what it fetches, progress, revisions, GGUF quants, a dropped
connection, the errors a person sees, offline mode, and a pull killed mid-file."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub_server import GGUF_REPO, TINY_REPO
from localsgl.store import hub_cache, manage, manifest
from localsgl.store.download_progress import PullProgress
from localsgl.store.errors import ModelNotFoundError
from localsgl.store.resolve import resolve_model

ROOT = Path(__file__).resolve().parents[2]
RUN_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json"}


def _snapshot(repo: str, rev: str | None = None) -> Path:
    snap = hub_cache.snapshot_dir(repo, rev)
    assert snap is not None, f"{repo}@{rev} not in the cache"
    return snap


def _shards(files: dict) -> set[str]:
    return set(json.loads(files["model.safetensors.index.json"])["weight_map"].values())


@pytest.fixture(autouse=True)
def no_xet(monkeypatch):
    """The plain HTTP path only: the fake hub advertises no Xet storage."""
    from huggingface_hub import file_download

    def refuse(*a, **k):
        raise AssertionError("xet_get called: the download took the hf_xet path")

    monkeypatch.setattr(file_download, "xet_get", refuse)


def test_pull_fetches_what_a_run_needs_with_progress(store_env, hub, tiny_files, capsys):
    events: list[PullProgress] = []
    assert manage.pull(TINY_REPO, progress=events.append) == TINY_REPO
    snap = _snapshot(TINY_REPO)
    wanted = RUN_FILES | _shards(tiny_files)
    assert set(hub_cache.snapshot_files(snap)) == wanted  # no README, .bin or consolidated copy
    for name in wanted:
        assert (snap / name).read_bytes() == tiny_files[name]
    total = sum(len(tiny_files[n]) for n in wanted)
    last = events[-1]
    assert last.finished and last.done == last.total == total and last.files_done == last.files_total == len(wanted)
    assert [e.done for e in events] == sorted(e.done for e in events)  # never goes back
    assert any(e.file and e.file.endswith(".safetensors") for e in events)
    assert capsys.readouterr().out == ""  # progress goes to the callback, nothing to stdout
    assert not any("xet" in p.lower() for _, p, _ in hub.requests)
    assert manifest.expected(snap) is None  # a finished pull leaves nothing outstanding

    # pulled again: nothing is downloaded; plain progress lines go to stderr
    before = len(hub.requests)
    assert manage.pull(TINY_REPO) == TINY_REPO
    assert [p for _, p, _ in hub.requests[before:]] == [f"/api/models/{TINY_REPO}"]
    err = capsys.readouterr().err
    assert f"pull: {TINY_REPO}: all {len(wanted)} files in the cache already" in err


def test_pin_a_revision(store_env, hub, tiny_files, monkeypatch):
    old_cfg = json.loads(tiny_files["config.json"])
    old_cfg["max_position_embeddings"] = 128
    v1 = hub.add(TINY_REPO, {**tiny_files, "config.json": json.dumps(old_cfg).encode()}, ref="v1")
    assert manage.pull(f"{TINY_REPO}@v1", progress=False) == f"{TINY_REPO}@v1"
    assert hub_cache.commit_for(TINY_REPO, "v1") == v1
    assert hub_cache.snapshot_dir(TINY_REPO, None) is None  # main was not pulled
    assert manage.pull(TINY_REPO, progress=False) == TINY_REPO
    names = {m.name: m for m in manage.list_models()}
    assert names[f"{TINY_REPO}@v1"].revision == v1 and names[TINY_REPO].revision != v1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = resolve_model(f"{TINY_REPO}@v1", load_format="dummy")
    assert src.config["max_position_embeddings"] == 128 and src.path.name == v1
    assert resolve_model(f"{TINY_REPO}@{v1}", load_format="dummy").path.name == v1  # by commit too
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model(f"{TINY_REPO}@v2")


def test_gguf_file_by_quant_or_name(store_env, hub, gguf_files, monkeypatch):
    assert manage.pull(f"{GGUF_REPO}:q8_0", progress=False) == f"{GGUF_REPO}:Q8_0"
    snap = _snapshot(GGUF_REPO)
    assert hub_cache.snapshot_files(snap) == ["Tiny-Q8_0.gguf"]  # one file: not F16, not the projector
    assert manage.pull(GGUF_REPO, file="Tiny-F16.gguf", progress=False) == f"{GGUF_REPO}:Tiny-F16.gguf"
    assert set(hub_cache.snapshot_files(snap)) == {"Tiny-Q8_0.gguf", "Tiny-F16.gguf"}
    listed = {m.name: m for m in manage.list_models()}
    q8, f16 = listed[f"{GGUF_REPO}:Q8_0"], listed[f"{GGUF_REPO}:F16"]
    assert q8.format == "GGUF Q8_0" and f16.format == "GGUF F16"
    assert q8.size_bytes == len(gguf_files["Tiny-Q8_0.gguf"]) and q8.params == f16.params > 0
    with pytest.raises(ModelNotFoundError, match=r"no Q4_K_M file in org/tiny-GGUF \(available: F16, Q8_0\)"):
        manage.pull(f"{GGUF_REPO}:Q4_K_M", progress=False)
    with pytest.raises(ModelNotFoundError, match="several .gguf files.*:QUANT"):  # no Q4_K_M default here
        manage.pull(GGUF_REPO, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = resolve_model(f"{GGUF_REPO}:Q8_0")
    assert src.kind == "gguf" and src.path == snap / "Tiny-Q8_0.gguf" and src.repo_id == GGUF_REPO


def test_resume_after_the_connection_drops_mid_file(store_env, hub, tiny_files, monkeypatch):
    import huggingface_hub.constants as hf_constants

    # bytes reach the file in chunks of this size (10 MiB by default): small, so that the
    # first attempt has written some before the drop and the second asks for the rest
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    big = max(_shards(tiny_files), key=lambda n: len(tiny_files[n]))
    hub.drop_once.add(big)
    manage.pull(TINY_REPO, progress=False)
    gets = hub.file_gets(big)
    assert len(gets) == 2, gets
    assert "range" not in gets[0] and gets[1]["range"].startswith("bytes=") and gets[1]["range"] != "bytes=0-"
    assert (_snapshot(TINY_REPO) / big).read_bytes() == tiny_files[big]


def test_error_messages(store_env, hub, tiny_files, monkeypatch):
    hub.add("org/gated", tiny_files, gated_token="hf_secret")
    with pytest.raises(ModelNotFoundError) as e:
        manage.pull("org/gated", progress=False)
    msg = str(e.value)
    assert "gated" in msg and "accept its conditions" in msg and "HF_TOKEN" in msg
    assert hub_cache.snapshot_dir("org/gated", None) is None  # no ref to a partial download
    assert "org/gated" not in {m.name for m in manage.list_models()}
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert manage.pull("org/gated", progress=False) == "org/gated"
    monkeypatch.delenv("HF_TOKEN")

    hub.add("org/private", tiny_files, private_token="hf_mine")
    with pytest.raises(ModelNotFoundError, match=r"org/private: the hub refused access \(401\).*private.*HF_TOKEN"):
        manage.pull("org/private", progress=False)
    monkeypatch.setenv("HF_TOKEN", "hf_other")
    with pytest.raises(ModelNotFoundError, match="org/private: no such repo on the hub .*or your token cannot see it"):
        manage.pull("org/private", progress=False)
    monkeypatch.setenv("HF_TOKEN", "hf_mine")
    assert manage.pull("org/private", progress=False) == "org/private"
    monkeypatch.delenv("HF_TOKEN")

    with pytest.raises(ModelNotFoundError, match="org/missing: no such repo on the hub"):
        manage.pull("org/missing", progress=False)
    with pytest.raises(ModelNotFoundError, match="no revision 'v9'"):
        manage.pull(f"{TINY_REPO}@v9", progress=False)

    # no network at all: a refused connection, not a hang
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="cannot reach the hub at http://127.0.0.1:9.*HF_HUB_OFFLINE=1"):
        manage.pull(TINY_REPO, progress=False)
    assert time.monotonic() - t0 < 30

    # offline: fails at once, asks nothing of the hub, and says how to get the model
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests)
    t0 = time.monotonic()
    for call in (lambda: manage.pull(TINY_REPO, progress=False), lambda: resolve_model(TINY_REPO)):
        with pytest.raises(ModelNotFoundError, match=f"HF_HUB_OFFLINE is set.*localsgl pull {TINY_REPO}"):
            call()
    assert time.monotonic() - t0 < 1.0 and len(hub.requests) == before


_PULL_CLI = "import sys; from localsgl.cli import app; sys.argv = ['localsgl', *sys.argv[1:]]; app()"


def test_killed_pull_leaves_nothing_that_list_shows_or_run_loads(store_env, hub, tiny_files, monkeypatch):
    shards = sorted(_shards(tiny_files))
    hub.stall.add(shards[1])  # the second shard stops half-way until released
    proc = subprocess.Popen([sys.executable, "-c", _PULL_CLI, "pull", TINY_REPO], env=store_env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert hub.stalled.wait(120), "the pull never reached the stalled file"
        time.sleep(0.2)  # its first half is being written to a temporary file
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        hub.release.set()
    assert proc.stdout.read() == b""  # no model name: the pull did not finish

    snap = hub_cache.repo_folder(TINY_REPO) / "snapshots"
    snap = next(snap.iterdir())
    assert (snap / "config.json").is_file() and (snap / shards[0]).is_file()  # part of it is there
    assert not (snap / shards[1]).exists()
    assert hub_cache.snapshot_dir(TINY_REPO, None) is None  # refs/main is written last
    assert TINY_REPO not in {m.name for m in manage.list_models()}
    partial = manage.incomplete_downloads()
    assert [p.name for p in partial] == [f"{TINY_REPO}@{snap.name}"] and "missing" in partial[0].problem
    from typer.testing import CliRunner

    from localsgl import cli

    r = CliRunner().invoke(cli.app, ["list"])
    assert r.exit_code == 0 and TINY_REPO not in r.stdout and f"{TINY_REPO}@{snap.name} is an incomplete download" in r.stderr
    # even with refs/main pointing at it (another tool's view of the cache), nothing loads it
    hub_cache.write_ref(TINY_REPO, "main", snap.name)
    assert TINY_REPO not in {m.name for m in manage.list_models()}
    with pytest.raises(ModelNotFoundError, match=f"localsgl pull {TINY_REPO}"):
        resolve_model(TINY_REPO, pull=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model(TINY_REPO)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    # pulling again finishes it
    hub.stall.clear()
    assert manage.pull(TINY_REPO, progress=False) == TINY_REPO
    assert TINY_REPO in {m.name for m in manage.list_models()} and not manage.incomplete_downloads()


def test_stale_partial_blobs_are_dropped(tmp_path):
    from localsgl.store.hub_download import STALE_PARTIAL_SECONDS, _drop_stale_partials

    blobs = tmp_path / "models--org--x" / "blobs"
    blobs.mkdir(parents=True)
    old, fresh, whole = blobs / "a.1234.incomplete", blobs / "b.5678.incomplete", blobs / "c"
    for p in (old, fresh, whole):
        p.write_bytes(b"x")
    past = time.time() - STALE_PARTIAL_SECONDS - 60
    os.utime(old, (past, past))
    os.utime(whole, (past, past))
    _drop_stale_partials(blobs.parent)
    assert not old.exists() and fresh.exists() and whole.exists()  # a live download's file stays
