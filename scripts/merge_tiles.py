"""Merge a partial tile sweep into a tuned-tiles file (kernels/tuned/<GPU>.json).

    python scripts/merge_tiles.py TUNED.json ROWS.json TILES.json -o MERGED.json

ROWS.json and TILES.json are scripts/probe_quant_tiles.py's --json and --tiles outputs of a
sweep run with ``--formats``/``--kinds`` (and LOCALSGL_QUANT_TILES naming an empty list, so
its "default" was the built-in tile).  Every (kind, format, rows) the sweep timed takes the
sweep's entries (a shape whose built-in tile won gets that tile); the rest of TUNED.json is kept.
scripts/probe_route.py (the "rows" and "a8" probes) merges its entries the same way, a null
tile where the GEMM won."""
from __future__ import annotations

import argparse
import json


def merge(tuned: list[dict], rows: list[dict], tiles: list[dict]) -> list[dict]:
    swept = {(r["kind"], r["label"], r["m"]) for r in rows if r.get("kind") in ("gemv", "gemm", "rows", "a8")}
    kept = [e for e in tuned if (e["kind"], e["fmt"], e["m"]) not in swept]
    return kept + [e for e in tiles if (e["kind"], e["fmt"], e["m"]) in swept]


def write(path: str, entries: list[dict]) -> None:
    """One entry a line, as kernels/tuned/*.json keep them."""
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")


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
