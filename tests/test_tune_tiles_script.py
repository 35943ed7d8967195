"""scripts/tune_tiles.sh's orchestration, without a GPU: the probes it calls are replaced by stand-ins
that write recognisable entries (and say which file each one read), so the test checks what the
script itself decides: the order of the routes (each probe builds on the file the one before
wrote), the merge of a partial sweep into the tuned file, a probe stopped by its time limit, and
its TUNE_* settings.  The probes' own logic is tested in tests/kernels/test_quant_tiles.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU = "Fake_GPU"
LABELS = {"int4g128": "int4 g128 asym", "int4g32": "int4 g32 asym", "int8g16": "int8 g16", "int8": "int8 per-row"}

# probe_quant_tiles.py: one timed row and one tile per (format, kind), the tile naming the sweep
PROBE_TILES = f'''
import argparse, json, os
ap = argparse.ArgumentParser()
ap.add_argument("--formats", nargs="*"); ap.add_argument("--kinds", nargs="*")
ap.add_argument("--json"); ap.add_argument("--tiles"); ap.add_argument("--words"); ap.add_argument("--jobs")
a = ap.parse_args()
labels = {LABELS!r}
rows, tiles = [], []
for f in a.formats:
    for kind in a.kinds:
        for m in ([1] if kind == "gemv" else [16, 64]):
            rows.append({{"kind": kind, "label": labels[f], "n": 4096, "k": 4096, "m": m}})
            tiles.append({{"kind": kind, "fmt": labels[f], "n": 4096, "k": 4096, "m": m, "tile": ["swept", kind]}})
            print(labels[f], kind, m)
json.dump(rows, open(a.json, "w")); json.dump(tiles, open(a.tiles, "w"))
with open(os.environ["PROBE_LOG"], "a") as log:
    log.write(json.dumps(["tiles", a.kinds, os.environ.get("LOCALSGL_QUANT_TILES")]) + "\\n")
'''

# probe_quant_rows.py / probe_quant_a8.py: read this GPU's tuned file, write it back with one entry more
PROBE_ROUTE = '''
import argparse, json, os, sys
ap = argparse.ArgumentParser(); ap.add_argument("--out"); a = ap.parse_args()
route = os.path.basename(sys.argv[0])[len("probe_quant_"):-3]
path = os.path.join("kernels", "tuned", "Fake_GPU.json")
entries = json.load(open(path))
with open(os.environ["PROBE_LOG"], "a") as log:
    log.write(json.dumps([route, sorted({e["kind"] for e in entries})]) + "\\n")
entries.append({"kind": route, "fmt": "int4 g128 asym", "n": 4096, "k": 4096, "m": 4, "tile": [route]})
json.dump(entries, open(a.out, "w"))
print(route, "probed")
'''


def _tree(tmp_path: Path, base: list[dict] | None) -> Path:
    """A checkout with the real script and merge_tiles.py, stand-in probes, and ``python3`` that
    names the GPU Fake_GPU when asked."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "kernels" / "tuned").mkdir(parents=True)
    for name in ("tune_tiles.sh", "merge_tiles.py"):
        shutil.copy(ROOT / "scripts" / name, root / "scripts" / name)
    (root / "scripts" / "probe_quant_tiles.py").write_text(PROBE_TILES)
    for route in ("rows", "a8"):
        (root / "scripts" / f"probe_quant_{route}.py").write_text(PROBE_ROUTE)
    if base is not None:
        (root / "kernels" / "tuned" / f"{GPU}.json").write_text(json.dumps(base))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python3"
    shim.write_text(f'#!/bin/sh\ncase "$2" in *get_device_name*) echo {GPU}; exit 0;; esac\nexec {sys.executable} "$@"\n')
    shim.chmod(0o755)
    return root


def _run(tmp_path: Path, root: Path, **env) -> tuple[subprocess.CompletedProcess, list, list[dict]]:
    log = tmp_path / "probes.log"
    log.write_text("")
    full = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
            "PROBE_LOG": str(log), "TUNE_BENCH": "0", **env}
    r = subprocess.run(["bash", str(root / "scripts" / "tune_tiles.sh")], capture_output=True, text=True, env=full,
                       timeout=120)
    tuned = root / "kernels" / "tuned" / f"{GPU}.json"
    entries = json.loads(tuned.read_text()) if tuned.exists() else []
    return r, [json.loads(line) for line in log.read_text().splitlines()], entries


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_route_builds_on_the_file_the_one_before_wrote(tmp_path):
    old = {"kind": "gemv", "fmt": "fp8 per-row", "n": 4096, "k": 4096, "m": 1, "tile": ["kept"]}
    root = _tree(tmp_path, [old])
    r, calls, entries = _run(tmp_path, root, TUNE_GEMV_FORMATS="int4g128", TUNE_GEMM_FORMATS="int4g128 int8g16")
    assert r.returncode == 0, r.stdout + r.stderr
    empty = str(tmp_path / "out" / "empty.json")
    # the sweeps time against the built-in tiles (an empty file); rows then a8 read the file as it stands
    assert calls == [["tiles", ["gemv"], empty], ["tiles", ["gemm"], empty],
                     ["rows", ["gemm", "gemv"]], ["a8", ["gemm", "gemv", "rows"]]]
    kinds = [(e["kind"], e["fmt"], e["m"]) for e in entries]
    assert entries[0] == old  # a format no sweep timed keeps its entries
    assert kinds[1:] == [("gemv", "int4 g128 asym", 1), ("gemm", "int4 g128 asym", 16), ("gemm", "int4 g128 asym", 64),
                         ("gemm", "int8 g16", 16), ("gemm", "int8 g16", 64), ("rows", "int4 g128 asym", 4),
                         ("a8", "int4 g128 asym", 4)]
    assert json.loads((tmp_path / "out" / f"{GPU}.json").read_text()) == entries  # copied out
    assert json.loads((tmp_path / "out" / "before.json").read_text()) == [old]  # what the timing compares against


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_sweep_replaces_the_entries_it_timed_and_the_settings_pick_the_routes(tmp_path):
    stale = {"kind": "gemm", "fmt": "int4 g128 asym", "n": 4096, "k": 4096, "m": 16, "tile": ["stale"]}
    gemv = {"kind": "gemv", "fmt": "int4 g128 asym", "n": 4096, "k": 4096, "m": 1, "tile": ["kept"]}
    root = _tree(tmp_path, [gemv, stale])
    # no GEMV probe (its entries kept), the gemm route alone
    r, calls, entries = _run(tmp_path, root, TUNE_GEMV_FORMATS="", TUNE_ROUTES="gemm", TUNE_GEMM_FORMATS="int4g128")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [c[:2] for c in calls] == [["tiles", ["gemm"]]]
    assert gemv in entries and stale not in entries
    assert [e["tile"] for e in entries if e["kind"] == "gemm"] == [["swept", "gemm"]] * 2
    # TUNE_BASE: the timing's "before" is that file, not the GPU's
    base = tmp_path / "base.json"
    base.write_text("[]")
    r, calls, _ = _run(tmp_path, root, TUNE_GEMV_FORMATS="", TUNE_ROUTES="", TUNE_BASE=str(base))
    assert r.returncode == 0 and calls == []
    assert json.loads((tmp_path / "out" / "before.json").read_text()) == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_failed_probe_leaves_the_file_as_it_was(tmp_path):
    gemv = {"kind": "gemv", "fmt": "int4 g128 asym", "n": 4096, "k": 4096, "m": 1, "tile": ["kept"]}
    root = _tree(tmp_path, [gemv])
    (root / "scripts" / "probe_quant_tiles.py").write_text("import sys; sys.exit(3)\n")
    # a route probe that dies after writing part of its output
    (root / "scripts" / "probe_quant_rows.py").write_text(
        "import sys; open(sys.argv[sys.argv.index('--out') + 1], 'w').write('[]'); sys.exit(4)\n")
    r, _, entries = _run(tmp_path, root, TUNE_GEMV_FORMATS="int4g128", TUNE_ROUTES="gemm rows")
    assert "rc 3" in r.stdout and "rc 4" in r.stdout and entries == [gemv]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_probe_stopped_by_its_time_limit_leaves_the_shapes_it_finished(tmp_path):
    """The probes write their files after every shape; `timeout` stops them with rc 124, and the
    shapes they finished are taken (a crash, any other rc, takes nothing: test above)."""
    kept = {"kind": "gemv", "fmt": "int4 g128 asym", "n": 6144, "k": 4096, "m": 1, "tile": ["kept"]}
    redone = {"kind": "gemv", "fmt": "int4 g128 asym", "n": 4096, "k": 4096, "m": 1, "tile": ["old"]}
    root = _tree(tmp_path, [kept, redone])
    # one shape of two finished, then the time limit: timeout's rc
    (root / "scripts" / "probe_quant_tiles.py").write_text(
        "import json, sys\n"
        "a = sys.argv\n"
        "row = {'kind': 'gemv', 'label': 'int4 g128 asym', 'n': 4096, 'k': 4096, 'm': 1}\n"
        "tile = {'kind': 'gemv', 'fmt': 'int4 g128 asym', 'n': 4096, 'k': 4096, 'm': 1, 'tile': ['swept']}\n"
        "json.dump([tile], open(a[a.index('--tiles') + 1], 'w'))\n"
        "json.dump([row], open(a[a.index('--json') + 1], 'w'))\n"
        "open(a[a.index('--json') + 1] + '.tmp4242', 'w').write('[')\n"  # stopped before its next rename
        "sys.exit(124)\n")
    rows_entry = {"kind": "rows", "fmt": "int4 g128 asym", "n": 4096, "k": 4096, "m": 2, "tile": ["route"]}
    (root / "scripts" / "probe_quant_rows.py").write_text(
        "import json, sys\n"
        "path = 'kernels/tuned/Fake_GPU.json'\n"
        f"json.dump(json.load(open(path)) + [{rows_entry!r}], open(sys.argv[sys.argv.index('--out') + 1], 'w'))\n"
        "sys.exit(124)\n")
    r, _, entries = _run(tmp_path, root, TUNE_GEMV_FORMATS="int4g128", TUNE_ROUTES="rows")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gemv: stopped by TUNE_TIMEOUT" in r.stdout and "rows: stopped by TUNE_TIMEOUT" in r.stdout
    swept = dict(redone, tile=["swept"])
    assert entries == [kept, swept, rows_entry]  # the unfinished shape keeps its entry; the finished one is replaced
    assert not list((tmp_path / "out").glob("*.tmp*"))  # the stopped write's temporary is not left in $OUT
    # a stop before the first shape: nothing written, the file as it was
    root = _tree(tmp_path / "again", [kept])
    (root / "scripts" / "probe_quant_tiles.py").write_text("import sys; sys.exit(124)\n")
    r, _, entries = _run(tmp_path / "again", root, TUNE_GEMV_FORMATS="int4g128", TUNE_ROUTES="")
    assert "rc 124" in r.stdout and "stopped by" not in r.stdout and entries == [kept]
