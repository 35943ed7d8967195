"""Tuned tiles (kernels/quant_tiles.py): the lookup's matching rules on a table of our own, and
the packaged per-GPU tables hold tiles the kernels accept."""
import json
from pathlib import Path

import pytest
import torch

from localsgl.engine.layers.quant import QuantizedWeight, WeightFormat
from localsgl_kernels import quant_a8 as QA
from localsgl_kernels import quant_gemm as QM
from localsgl_kernels import quant_gemv as QV
from localsgl_kernels import quant_rows as QR
from localsgl_kernels import quant_tiles

TUNED = sorted((Path(quant_tiles.__file__).parent / "tuned").glob("*.json"))


def _w(n, k, fmt=WeightFormat("int4", 128, False)):
    return QuantizedWeight.quantize(torch.randn(n, k) * 0.02, fmt)


@pytest.fixture
def table(tmp_path, monkeypatch):
    rows = [dict(kind="gemv", fmt="int4 g128 asym", n=6144, k=4096, m=1, tile=[8, 1024, 4, 1]),
            dict(kind="gemv", fmt="int4 g128 asym", n=28672, k=4096, m=1, tile=[16, 256, 4, 2]),
            dict(kind="gemm", fmt="int4 g128 asym", n=28672, k=4096, m=64, tile=[64, 64, 128, 4, 2, 4, 1]),
            dict(kind="rows", fmt="int4 g128 asym", n=6144, k=4096, m=8, tile=[16, 1024, 4, 2]),
            dict(kind="rows", fmt="int4 g128 asym", n=28672, k=4096, m=8, tile=None)]
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(rows))
    monkeypatch.setenv("LOCALSGL_QUANT_TILES", str(path))
    quant_tiles._entries.cache_clear()
    yield
    quant_tiles._entries.cache_clear()


def test_lookup_rules(table):
    cuda = torch.device("cuda", 0)
    w = _w(6144, 4096)
    assert quant_tiles.lookup("gemv", w, 1, cuda) == (8, 1024, 4, 1)
    # the nearest N of the same format, K and rows: 14336 is nearer 28672 than 6144 in ratio
    assert quant_tiles.lookup("gemv", _w(14336, 4096), 1, cuda) == (16, 256, 4, 2)
    # a null tile: the route lost to the GEMM there, for its own N and for the Ns nearest it
    assert quant_tiles.lookup("rows", _w(6144, 4096), 8, cuda) == (16, 1024, 4, 2)
    assert quant_tiles.lookup("rows", _w(4096, 4096), 8, cuda) == (16, 1024, 4, 2)
    assert quant_tiles.lookup("rows", _w(28672, 4096), 8, cuda) is None
    assert quant_tiles.lookup("rows", _w(128256, 4096), 8, cuda) is None
    assert quant_tiles.lookup("gemv", _w(4096, 8192), 1, cuda) is None  # no entry with this K
    assert quant_tiles.lookup("gemm", w, 16, cuda) is None  # no 16-row entry
    assert quant_tiles.lookup("gemm", w, 64, cuda) == (64, 64, 128, 4, 2, 4, 1)
    assert quant_tiles.lookup("gemv", _w(6144, 4096, WeightFormat("int8", 0, True)), 1, cuda) is None
    assert quant_tiles.lookup("gemv", w, 1, torch.device("cpu")) is None


def test_lookup_follows_the_variable(table, tmp_path, monkeypatch):
    """Naming another file in LOCALSGL_QUANT_TILES takes effect at the next lookup, for a weight
    that was looked up before too (benchmarks compare two files in one process)."""
    cuda = torch.device("cuda", 0)
    w = _w(6144, 4096)
    assert quant_tiles.lookup("gemv", w, 1, cuda) == (8, 1024, 4, 1)
    other = tmp_path / "other.json"
    other.write_text(json.dumps([dict(kind="gemv", fmt="int4 g128 asym", n=6144, k=4096, m=1, tile=[8, 1024, 8, 1, 1, 3])]))
    monkeypatch.setenv("LOCALSGL_QUANT_TILES", str(other))
    assert quant_tiles.lookup("gemv", w, 1, cuda) == (8, 1024, 8, 1, 1, 3)
    assert quant_tiles.lookup("gemv", _w(14336, 4096), 1, cuda) == (8, 1024, 8, 1, 1, 3)


@pytest.mark.parametrize("path", TUNED, ids=[p.stem for p in TUNED])
def test_packaged_tables_are_valid(path):
    rows = json.loads(path.read_text())
    assert rows
    keys = {(r["kind"], r["fmt"], r["n"], r["k"], r["m"]) for r in rows}
    assert len(keys) == len(rows), "one tile per kind, format, shape and row count"
    for r in rows:
        kind, *rest = r["fmt"].split()
        fmt = WeightFormat(kind, 0 if rest[0] == "per-row" else int(rest[0][1:]), "asym" not in rest)
        w = QuantizedWeight(fmt, *_shapes(fmt, r["n"], r["k"]), in_features=r["k"])
        if r["kind"] == "gemv":
            cfg = QV.Config(*r["tile"])
            assert r["m"] == 1 and QV.block_k(w, cfg.block_k) == cfg.block_k and r["n"] % (2 * cfg.block_r) == 0
        elif r["kind"] == "rows":  # a null tile: the GEMM there (quant_tiles.lookup)
            assert r["m"] in (2, 4, 8) and (r["tile"] is None or QR.applies(w, r["m"], QR.Config(*r["tile"])))
        elif r["kind"] == "a8":
            assert r["m"] in (16, 64) and (r["tile"] is None or QA.applies(w, r["m"], QA.Config(*r["tile"])))
        else:
            cfg = QM.Config(*r["tile"])
            assert r["kind"] == "gemm" and r["m"] in (16, 64) and cfg.block_m <= r["m"]
            assert QV.block_k(w, cfg.block_k) is not None


def _shapes(fmt, n, k):
    """Empty buffers of the right shapes (meta tensors: no memory for vocabulary-wide weights)."""
    g = fmt.group(k)
    q = torch.empty((n, k // 2 if fmt.kind == "int4" else k), dtype=torch.uint8, device="meta")
    s = torch.empty((n, k // g), dtype=torch.float16, device="meta")
    return q, s, (None if fmt.symmetric else torch.empty_like(s))


def test_merge_of_a_partial_sweep():
    """scripts/merge_tiles.py: the (kind, format, shape, rows) a sweep timed take its entries alone
    (a timed shape without one, where no tile ran, loses its old entry); everything else is kept,
    the shapes a sweep stopped before included."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "merge_tiles.py"
    spec = importlib.util.spec_from_file_location("merge_tiles", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    e = lambda kind, fmt, n, m, tile: dict(kind=kind, fmt=fmt, n=n, k=4096, m=m, tile=tile)  # noqa: E731
    tuned = [e("gemv", "int4 g128 asym", 6144, 1, [8, 1024, 4, 1]), e("gemv", "int4 g128 asym", 4096, 1, [4, 256, 4, 1]),
             e("gemm", "int4 g128 asym", 6144, 16, [16, 32, 256, 4, 4, 1, 1]), e("gemv", "int8 g16", 6144, 1, [32, 512, 4, 2])]
    rows = [dict(kind="gemv", label="int4 g128 asym", n=6144, k=4096, m=1),
            dict(kind="gemv", label="int4 g128 asym", n=4096, k=4096, m=1), dict(kind="prefill", m=2048)]
    tiles = [e("gemv", "int4 g128 asym", 6144, 1, [8, 512, 4, 1, 1, 2])]
    merged = mod.merge(tuned, rows, tiles)
    assert tiles[0] in merged and tuned[0] not in merged
    assert tuned[1] not in merged  # timed, and no entry from the sweep
    assert tuned[2] in merged and tuned[3] in merged  # not part of the sweep
    assert len(merged) == 3
    # a sweep stopped after its first shape: the second keeps its old entry
    assert mod.merge(tuned, rows[:1], tiles) == tuned[1:] + tiles
    # scripts/probe_route.py's entries (the few-row and a8 probes): those of the formats and rows it
    # timed replace the old ones (a shape where the GEMM won gets a null tile); other formats' and rows' stay
    old = [e("rows", "int4 g128 asym", 6144, 2, [8, 1024, 4, 1]), e("rows", "int4 g128 asym", 4096, 2, [8, 1024, 4, 1]),
           e("rows", "int4 g128 asym", 6144, 8, [16, 1024, 4, 1]), e("rows", "int8 g16", 6144, 2, [8, 512, 4, 1])]
    new = [e("rows", "int4 g128 asym", 6144, 2, [8, 2048, 4, 2]), e("rows", "int4 g128 asym", 4096, 2, None)]
    timed_rows = lambda entries: [dict(e, label=e["fmt"]) for e in entries]  # noqa: E731
    merged = mod.merge(tuned + old, timed_rows(new), new)
    assert new[0] in merged and new[1] in merged and old[0] not in merged and old[1] not in merged
    assert old[2] in merged and old[3] in merged and all(t in merged for t in tuned)
    assert len(merged) == len(tuned) + 4
    a8 = [e("a8", "int4 g128 asym", 4096, 64, [64, 64, 4, 2, 1, 4])]
    merged = mod.merge(merged + [e("a8", "int4 g128 asym", 4096, 64, None)],
                       timed_rows(a8), a8)
    assert a8[0] in merged and len(merged) == len(tuned) + 5


def test_a_sweep_pins_every_timed_shape():
    """scripts/probe_quant_tiles.py --tiles: a GEMV or GEMM shape whose built-in tile won gets
    that tile (else quant_tiles.lookup would give it its nearest shape's winner, which was never
    timed there); another tile only where it beat the built-in one by 3 %."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "probe_quant_tiles.py"
    spec = importlib.util.spec_from_file_location("probe_quant_tiles", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    won = dict(kind="gemv", best=(8, 1024, 8, 1, 1, 3), best_us=7.1, default_us=8.1, default_tile=(8, 1024, 4, 1, 1, 3))
    lost = dict(won, best_us=7.9)
    assert mod._winner(won) == (8, 1024, 8, 1, 1, 3)
    assert mod._winner(lost) == (8, 1024, 4, 1, 1, 3)
    gemm = dict(kind="gemm", best=(16, 64, 128, 4, 4, 1, 0), best_us=9.9, default_us=10.0,
                default_tile=(16, 64, 128, 4, 3, 1, 1, 0, 1))
    assert mod._winner(gemm) == (16, 64, 128, 4, 3, 1, 1, 0, 1)
    assert mod._winner(dict(gemm, best_us=9.0)) == (16, 64, 128, 4, 4, 1, 0)


def test_the_sweep_files_after_each_shape(tmp_path, monkeypatch):
    """probe_quant_tiles.py writes --tiles then --json after every shape, each through a rename:
    --json names the shapes merge_tiles.py replaces, so a stop between the two writes leaves a
    finished shape's old entry, never a timed shape without its new one."""
    import importlib.util
    import json
    from types import SimpleNamespace

    path = Path(__file__).resolve().parents[2] / "scripts" / "probe_quant_tiles.py"
    spec = importlib.util.spec_from_file_location("probe_quant_tiles", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    row = dict(kind="gemv", label="int4 g128 asym", n=6144, k=4096, m=1, best=(8, 1024, 8, 1, 1, 3), best_us=7.1,
               default_us=8.1, default_tile=(8, 1024, 4, 1, 1, 3))
    prefill = dict(kind="prefill", shape="qkv", m=2048)
    args = SimpleNamespace(json=str(tmp_path / "rows.json"), tiles=str(tmp_path / "tiles.json"))
    order = []
    real = mod.write_json
    monkeypatch.setattr(mod, "write_json", lambda p, text: (order.append(Path(p).name), real(p, text)))
    assert mod._write_outputs(args, [row, prefill]) == 1
    assert order == ["tiles.json", "rows.json"]
    assert json.loads((tmp_path / "tiles.json").read_text()) == [
        dict(kind="gemv", fmt="int4 g128 asym", n=6144, k=4096, m=1, tile=[8, 1024, 8, 1, 1, 3])]
    assert [r["kind"] for r in json.loads((tmp_path / "rows.json").read_text())] == ["gemv", "prefill"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json", "tiles.json"]  # no temporary left


def _probe_quant():
    import importlib.util
    import sys

    scripts = Path(__file__).resolve().parents[2] / "scripts"
    sys.path.insert(0, str(scripts))
    try:
        spec = importlib.util.spec_from_file_location("probe_quant", scripts / "probe_quant.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(scripts))
    return mod


def test_probes_time_weights_from_memory():
    """The tile probes time a weight over copies that together exceed L2 three times
    (probe_quant.cold_copies): a weight smaller than L2 timed alone is read from L2 after its
    first call, which a decode step's distinct layers never are.  The copies hold the same
    values in storage of their own; a weight as large as that already is timed alone."""
    mod = _probe_quant()
    w = QuantizedWeight.quantize(torch.randn(64, 256), WeightFormat("int4", 128, False))
    l2 = 10 * w.nbytes + 1  # three times that: 31 weights' bytes, rounded up to whole copies
    ws = mod.cold_copies(w, l2_bytes=l2)
    assert len(ws) == 31 and ws[0] is w
    assert sum(c.nbytes for c in ws) >= mod.COLD_L2_FACTOR * l2 > sum(c.nbytes for c in ws[1:])
    for c in ws[1:]:
        assert c.fmt == w.fmt and c.qweight.data_ptr() != w.qweight.data_ptr()
        assert c.scales.data_ptr() != w.scales.data_ptr() and c.mins.data_ptr() != w.mins.data_ptr()
        assert torch.equal(c.dequantize(torch.float32), w.dequantize(torch.float32))
    assert mod.cold_copies(w, l2_bytes=w.nbytes // 4) == [w]
    assert mod.cold_copies(w, cold=False, l2_bytes=l2) == [w]
    # per_copy: one call a copy, each on its own copy
    seen = [c() for c in mod.per_copy(ws, lambda wi: wi)]
    assert len(seen) == len(ws) and all(a is b for a, b in zip(seen, ws))


@pytest.mark.gpu
def test_timed_calls_each_copy_in_turn():
    """probe_quant.timed over a list of calls captures every one of them, in turn."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    mod = _probe_quant()
    counts = [torch.zeros(1, device="cuda") for _ in range(3)]
    calls = [lambda c=c: c.add_(1) for c in counts]
    mod.timed(calls, 4)  # 4 rounded up to 6: two calls of each in the graph, replayed 5 times
    assert [int(c.item()) for c in counts] == [2 + 2 * 5] * 3


def test_tiles_file_and_summary(table, monkeypatch):
    """The file the lookups read (what `localsgl info` shows): LOCALSGL_QUANT_TILES's first, else
    the packaged file of the GPU's name, else none (the built-in tiles)."""
    path = Path(quant_tiles.os.environ["LOCALSGL_QUANT_TILES"])
    assert quant_tiles.tiles_file(0) == path
    assert quant_tiles.tiles_summary(0) == {"file": str(path), "entries": 5}
    monkeypatch.delenv("LOCALSGL_QUANT_TILES")
    for name in ("NVIDIA H200", "NVIDIA GeForce RTX 4090"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None, name=name: name)
        packaged = Path(quant_tiles.__file__).parent / "tuned" / f"{name.replace(' ', '_')}.json"
        want = packaged if packaged.exists() else None
        assert quant_tiles.tiles_file(0) == want, name
        quant_tiles._entries.cache_clear()
        summary = quant_tiles.tiles_summary(0)
        assert summary["file"] == (str(want) if want else None)
        assert (summary["entries"] > 0) == (want is not None)
    quant_tiles._entries.cache_clear()


@pytest.mark.parametrize("text, why", [(None, "No such file"), ("{not json", "Expecting"),
                                       ('{"kind": "gemv"}', "not a list of entries"),
                                       ('[{"kind": "gemv", "fmt": "int4 g128 asym"}]', "not a list of entries")])
def test_an_unusable_tiles_file_is_a_clear_error(tmp_path, monkeypatch, text, why):
    """LOCALSGL_QUANT_TILES naming a missing or malformed file: an error that names the file and
    the variable at the first lookup, not a KeyError deep in a kernel launcher."""
    path = tmp_path / "tiles.json"
    if text is not None:
        path.write_text(text)
    monkeypatch.setenv("LOCALSGL_QUANT_TILES", str(path))
    quant_tiles._entries.cache_clear()
    try:
        with pytest.raises(quant_tiles.TunedTilesError, match="LOCALSGL_QUANT_TILES") as e:
            quant_tiles.lookup("gemv", _w(6144, 4096), 1, torch.device("cuda", 0))
        assert str(path) in str(e.value) and why in str(e.value)
    finally:
        quant_tiles._entries.cache_clear()
