"""Tuned tiles of the quantized kernels, per GPU model: the tile scripts/probe_quant_tiles.py
measured fastest for each weight format, shape and row count, kept as JSON.

Looked up, in order: the file named by LOCALSGL_QUANT_TILES, then ``tuned/<device name>.json``
beside this module (e.g. tuned/NVIDIA_H200.json; scripts/tune_tiles.sh writes one for the GPU it
runs on); the kernels' built-in defaults apply where neither has an entry.  An entry is {"kind":
"gemv" | "gemm" | "rows" | "a8", "fmt": WeightFormat.label(), "n": N, "k": K, "m": rows (1 for
gemv; 16 or 64 for gemm and a8; 2, 4 or 8 for rows, quant_rows.py, which runs only where such an
entry exists, as a8 does), "tile": the kernel's Config fields}.  A weight whose exact shape is
missing takes the entry of the same format, K and rows with the nearest N (Llama-shaped models
differ mostly in N)."""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch


class TunedTilesError(ValueError):
    """The tuned-tiles file cannot be read: a setting to fix, not a failure inside a kernel."""


def tiles_file(device_index: int) -> Path | None:
    """The file the lookups on CUDA device ``device_index`` read: LOCALSGL_QUANT_TILES's, else
    the packaged ``tuned/<device name>.json``; None where neither applies (built-in tiles)."""
    path = os.environ.get("LOCALSGL_QUANT_TILES")
    if path:
        return Path(path)
    name = torch.cuda.get_device_name(device_index).replace(" ", "_")
    path = Path(__file__).with_name("tuned") / f"{name}.json"
    return path if path.exists() else None


def tiles_summary(device_index: int) -> dict:
    """What ``localsgl info`` shows: the file and its entry count (None: the built-in tiles)."""
    path = tiles_file(device_index)
    entries = _entries(device_index, os.environ.get("LOCALSGL_QUANT_TILES")) if path is not None else ()
    return {"file": str(path) if path is not None else None, "entries": len(entries)}


@functools.lru_cache(maxsize=None)
def _entries(device_index: int, path: str | None) -> tuple:
    """The entries of ``path`` (LOCALSGL_QUANT_TILES), else of the device's tuned file."""
    file = Path(path) if path else tiles_file(device_index)
    if file is None:
        return ()
    try:
        with open(file) as f:
            entries = json.load(f)
        if not isinstance(entries, list) or not all(isinstance(e, dict) and _KEYS <= e.keys() for e in entries):
            raise ValueError(f"not a list of entries with the keys {sorted(_KEYS)}")
    except (OSError, ValueError) as e:
        origin = "LOCALSGL_QUANT_TILES" if path else "this GPU's packaged file"
        raise TunedTilesError(f"tuned tiles file {file} ({origin}) cannot be used: {e}") from None
    return tuple(entries)


_KEYS = frozenset(("kind", "fmt", "n", "k", "m", "tile"))


def lookup(kind: str, w, m: int, device: torch.device) -> tuple | None:
    """The tuned tile for weight ``w`` at ``m`` rows on ``device`` (CUDA), or None; remembered
    on the weight, since eager steps ask once per launch.  An entry whose tile is null says the
    route it would switch on ("rows", "a8") lost to the GEMM there: None, for that N and for
    the Ns that would borrow it (an LM head takes its nearest shape's verdict)."""
    entry = lookup_entry(kind, w, m, device)
    return entry[0] if entry is not None else None


def lookup_entry(kind: str, w, m: int, device: torch.device) -> tuple[tuple, int] | None:
    """lookup's (tile, the N it was tuned for): that N differs from ``w``'s where the entry is
    the nearest one, and a caller may adapt what depends on N (quant_gemm's split-K)."""
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    memo = w.__dict__.setdefault("_tuned_tiles", {})
    path = os.environ.get("LOCALSGL_QUANT_TILES")
    key = (kind, m, idx, path)
    if key not in memo:
        fmt, n, k = w.fmt.label(), w.out_features, w.in_features
        best = None
        for e in _entries(idx, path):
            if e["kind"] == kind and e["fmt"] == fmt and e["k"] == k and e["m"] == m:
                d = abs(math.log(e["n"] / n))
                if best is None or d < best[0]:
                    best = (d, tuple(e["tile"]) if e["tile"] is not None else None, e["n"])
        memo[key] = best[1:] if best and best[1] is not None else None
    return memo[key]
