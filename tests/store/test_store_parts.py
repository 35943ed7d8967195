"""The model store's small parts: hub specs and GGUF file choice, the GGUF header reader,
the manifest, the alias table, and list's formatting helpers."""
from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest

from localsgl.store import hub_cache, manifest
from localsgl.store.aliases import ALIASES, aliases_of_repo
from localsgl.store.gguf_header import FILE_TYPES, GGML_TYPES, GGUFHeaderError, read_header
from localsgl.store.hub_cache import HubSpec, SpecError, choose_gguf, parse_hub_spec, quant_of
from localsgl.store.manage import describe_last_used, format_params


def test_hub_specs():
    assert parse_hub_spec("org/name") == HubSpec("org/name")
    assert parse_hub_spec("org/name-GGUF:Q4_K_M@v1.0") == HubSpec("org/name-GGUF", "Q4_K_M", "v1.0")
    assert parse_hub_spec("org/name:model-f16.gguf") == HubSpec("org/name", "model-f16.gguf")
    assert parse_hub_spec("org/name@refs/pr/3") == HubSpec("org/name", None, "refs/pr/3")
    assert str(HubSpec("a/b", "Q8_0", "main")) == "a/b:Q8_0@main"
    for bad in ("name", "org/", "/x", "org/name/extra", "org/na me", "smollm2-135m", "./org/name"):
        assert parse_hub_spec(bad) is None, bad


def test_quant_of_and_choose_gguf():
    assert quant_of("Qwen2.5-7B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_of("SmolLM2-135M-Instruct.Q4_1.gguf") == "Q4_1"
    assert quant_of("model-iq3_xxs.gguf") == "IQ3_XXS"
    assert quant_of("Llama-3.2-1B-Instruct-f16.gguf") == "F16"
    assert quant_of("x-Q4_K_M-00001-of-00002.gguf") == "Q4_K_M"
    assert quant_of("model.gguf") is None
    files = ["README.md", "m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m-Q8_0.gguf", "mmproj-m-f16.gguf"]
    assert choose_gguf(files, "q4_k_m") == "m-Q4_K_M.gguf"
    assert choose_gguf(files, None) == "m-Q4_K_M.gguf"  # llama.cpp's default when there are several
    assert choose_gguf(files, "m-Q8_0.gguf") == "m-Q8_0.gguf"
    assert choose_gguf(["only-Q2_K.gguf", "mmproj-x.gguf"], None) == "only-Q2_K.gguf"
    with pytest.raises(SpecError, match="available: Q4_K_M, Q4_K_S, Q8_0"):
        choose_gguf(files, "Q5_K_M")
    with pytest.raises(SpecError, match="several .gguf files"):
        choose_gguf(["a-Q8_0.gguf", "a-F16.gguf"], None)
    with pytest.raises(SpecError, match="split GGUF"):
        choose_gguf(["b-Q8_0-00001-of-00002.gguf", "b-Q8_0-00002-of-00002.gguf"], "Q8_0")
    with pytest.raises(SpecError, match="no .gguf files"):
        choose_gguf(["config.json"], None)


def test_gguf_header_tables_match_the_gguf_package():
    gguf = pytest.importorskip("gguf")
    for type_id, (name, block, size) in GGML_TYPES.items():
        q = gguf.GGMLQuantizationType(type_id)
        assert q.name == name and tuple(gguf.GGML_QUANT_SIZES[q]) == (block, size), name
    for file_type, name in FILE_TYPES.items():
        assert gguf.LlamaFileType(file_type).name.split("_", 1)[1] == name, name


def test_gguf_header_reads_what_gguf_reader_reads(gguf_files, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_files["Tiny-Q8_0.gguf"])
    h = read_header(path)
    ref = gguf.GGUFReader(str(path))
    assert h.architecture == "llama" and h.context_length == 256
    assert [t.name for t in h.tensors] == [t.name for t in ref.tensors]
    assert [t.n_elements for t in h.tensors] == [int(t.n_elements) for t in ref.tensors]
    assert [t.n_bytes for t in h.tensors] == [int(t.n_bytes) for t in ref.tensors]
    assert h.quant == "Q8_0"  # no general.file_type in this file: the type holding most bytes
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(GGUFHeaderError, match="ends early"):
        read_header(truncated)
    (tmp_path / "x.gguf").write_bytes(b"nope" * 10)
    with pytest.raises(GGUFHeaderError, match="not a GGUF file"):
        read_header(tmp_path / "x.gguf")


def _record_many(args):
    data_home, paths = args
    os.environ["XDG_DATA_HOME"] = data_home
    for p in paths:
        manifest.record_use(p, when=1.0)


def test_manifest_records_prunes_and_survives_concurrent_writers(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    models = [tmp_path / f"m{i}" for i in range(8)]
    for m in models:
        m.mkdir()
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_record_many, [(str(tmp_path / "data"), [str(m)]) for m in models] * 2)
    records = manifest.read()
    assert all(manifest.last_used(m, records) == 1.0 for m in models)  # no writer lost another's entry
    assert not [p for p in manifest.manifest_path().parent.iterdir() if p.suffix == ".tmp"]
    manifest.record_expected(models[0], {"a.safetensors": 3})
    assert manifest.expected(models[0]) == {"a.safetensors": 3}
    manifest.clear_expected(models[0])
    assert manifest.expected(models[0]) is None and manifest.last_used(models[0]) == 1.0
    models[1].rmdir()
    manifest.forget(models[2])
    records = manifest.read()
    assert manifest.key(models[1]) not in records and manifest.key(models[2]) not in records  # pruned / forgotten
    manifest.manifest_path().write_text("{broken")
    assert manifest.read() == {}
    manifest.record_use(models[3])
    assert abs(manifest.last_used(models[3]) - time.time()) < 60


def test_alias_table_rows():
    for name, e in ALIASES.items():
        assert name == name.lower() and " " not in name
        if not e.embedded:
            spec = parse_hub_spec(e.hub_spec)
            assert spec is not None and spec.repo == e.repo, name
    assert "qwen2.5-7b" in aliases_of_repo("qwen/qwen2.5-7b-instruct")
    assert aliases_of_repo("Qwen/Qwen2.5-7B-Instruct", "Q4_K_M") == []


def test_formatting_helpers():
    assert format_params(134_515_008) == "135M" and format_params(7_615_616_512) == "7.6B" and format_params(None) == "-"
    now = 1_000_000.0
    assert describe_last_used(None) == "never"
    assert describe_last_used(now - 5, now) == "just now"
    assert describe_last_used(now - 120, now) == "2 minutes ago"
    assert describe_last_used(now - 86400, now) == "1 day ago"


def test_snapshot_completeness(tmp_path):
    snap = tmp_path / "snap"
    snap.mkdir()
    assert hub_cache.safetensors_problem(snap) == "no config.json"
    (snap / "config.json").write_text("{}")
    assert "no *.safetensors" in hub_cache.safetensors_problem(snap)
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    (snap / "s1.safetensors").write_bytes(b"x")
    assert "s2.safetensors" in hub_cache.safetensors_problem(snap)
    (snap / "s2.safetensors").write_bytes(b"y")
    assert hub_cache.safetensors_problem(snap) is None
    # a pull's recorded file list wins: a missing tokenizer or a short file is incomplete
    assert "tokenizer.json" in hub_cache.safetensors_problem(snap, {"tokenizer.json": 10, "config.json": 2})
    assert hub_cache.safetensors_problem(snap, {"s1.safetensors": 5}) is not None
    assert hub_cache.safetensors_problem(snap, {"s1.safetensors": 1, "config.json": 2}) is None


def _simulate_hub(tracker, files: dict[str, int]):
    """Drive a tracker the way huggingface_hub drives ``tqdm_class``: one bar per file, bytes
    in chunks, and one restart from zero (a negative update) as after a refused Range."""
    for name, size in files.items():
        with tracker.bar_class(name)(total=size, initial=0, desc=name, unit="B") as bar:
            bar.update(size // 2)
            bar.update_transfer(size // 2)
            if name.endswith(".safetensors"):
                bar.update(-(size // 2))
                bar.update(size // 2)
            bar.update(size - size // 2)
        tracker.file_finished(name, size)


@pytest.mark.parametrize("kind", ["callback", "lines", "rich"])
def test_progress_displays(kind):
    import io

    from rich.console import Console

    from localsgl.store.download_progress import LineDisplay, PullTracker, RichDisplay, display_for

    files = {"config.json": 700, "model.safetensors": 3_000_000}
    events, out = [], io.StringIO()
    display = {"callback": lambda: display_for(events.append), "lines": lambda: LineDisplay(out, every=0.0),
               "rich": lambda: RichDisplay(Console(file=out, force_terminal=True, width=120))}[kind]()
    tracker = PullTracker("org/m", files, display)
    tracker.start()
    _simulate_hub(tracker, files)
    tracker.finish(True)
    if kind == "callback":
        assert events[0].done == 0 and events[0].total == sum(files.values())
        assert events[-1].finished and events[-1].done == sum(files.values()) and events[-1].files_done == 2
        assert all(0 <= e.done <= e.total for e in events)
    else:
        text = out.getvalue()
        assert "org/m" in text and "model.safetensors" in text
        if kind == "lines":
            assert "pull: org/m: 2 files, 2.86 MiB in" in text and "\x1b[" not in text
        else:
            assert "2.9/2.9 MiB" in text.rsplit("org/m", 1)[1]  # the last frame: all bytes of the total
