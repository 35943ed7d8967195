"""Merge a partial tile sweep into a tuned-tiles file (kernels/tuned/<GPU>.json).

    python scripts/merge_tiles.py TUNED.json ROWS.json TILES.json -o MERGED.json

ROWS.json and TILES.json are scripts/probe_quant_tiles.py's --json and --tiles outputs of a
sweep run with ``--formats``/``--kinds`` (and LOCALSGL_QUANT_TILES naming an empty list, so
its "default" was the built-in tile).  Every (kind, format, shape, rows) the sweep timed takes
the sweep's entry (a shape whose built-in tile won gets that tile, one where no tile ran none);
the rest of TUNED.json is kept, so a sweep cut short by its time limit merges the shapes it
finished.  scripts/probe_route.py (the "rows" and "a8" probes) merges its entries the same way,
a null tile where the GEMM won."""
from __future__ import annotations

import argparse
import json
import os


def merge(tuned: list[dict], rows: list[dict], tiles: list[dict]) -> list[dict]:
    """``rows``: the shapes timed (kind, label, n, k, m); ``tiles``: their entries (kind, fmt, n, k, m, tile)."""
    swept = {(r["kind"], r["label"], r["n"], r["k"], r["m"]) for r in rows
             if r.get("kind") in ("gemv", "gemm", "rows", "a8")}
    key = lambda e: (e["kind"], e["fmt"], e["n"], e["k"], e["m"])  # noqa: E731
    return [e for e in tuned if key(e) not in swept] + [e for e in tiles if key(e) in swept]


def write(path: str, entries: list[dict]) -> None:
    """One entry a line, as kernels/tuned/*.json keep them; written whole or not at all (a probe
    that writes after each shape may be stopped by its time limit mid-write)."""
    write_json(path, "[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")


def write_json(path: str, text: str) -> None:
    """``text`` to ``path`` through a temporary file and a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tuned")
    ap.add_argument("rows")
    ap.add_argument("tiles")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    load = lambda p: json.load(open(p))  # noqa: E731
    out = merge(load(a.tuned), load(a.rows), load(a.tiles))
    write(a.out, out)
    print(f"{len(out)} tiles -> {a.out}")


if __name__ == "__main__":
    main()
