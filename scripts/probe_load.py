"""Where a safetensors checkpoint's load to the GPU spends its time (issue 13's start-up).

  python3 scripts/probe_load.py [--dir /tmp/start-llama8b] [--repeat 2]

The engine streams shards through store/safetensors_stream.py: reader threads ``pread``
chunks into a ring of pinned buffers, the loading thread copies each chunk to the device.
Its floor is the slower of two links, so this times each alone and then the stream:

  * page cache -> pinned memory: the same reads into the same ring, no device copies;
  * pinned memory -> device: one pinned buffer copied again and again (the host-to-device
    link's rate);
  * the stream itself (``iter_to_device``) over a few chunk sizes and ring depths, tensors
    consumed and dropped;
  * the model's whole load (``load_model``), as the engine runs it.

Run bench_start_gpu.py first: it writes the checkpoint (a random Llama-3.1-8B, 16 GB).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from localsgl.store import safetensors_stream as S  # noqa: E402


def _files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def reads_only(files: list[Path], chunk: int, threads: int) -> float:
    """Seconds to pread every shard into ``threads`` pinned buffers of ``chunk`` bytes."""
    bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(threads)]
    jobs = [(f, off, min(chunk, f.stat().st_size - off)) for f in files for off in range(0, f.stat().st_size, chunk)]
    fds = {f: os.open(f, os.O_RDONLY) for f in files}

    def reader(i: int) -> None:  # thread i reads jobs i, i + threads, ... into its own buffer
        for k in range(i, len(jobs), threads):
            f, off, n = jobs[k]
            S._pread_into(fds[f], bufs[i][:n], off)

    t = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(reader, range(threads)))
    finally:
        for fd in fds.values():
            os.close(fd)
    return time.perf_counter() - t


def h2d_rate(nbytes: int = 1 << 30, reps: int = 8) -> float:
    """GB/s of one pinned buffer copied to the device ``reps`` times."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return nbytes * reps / (time.perf_counter() - t) / 1e9


def stream(files: list[Path], chunk: int, depth: int) -> float:
    t = time.perf_counter()
    for _name, tensor in S.iter_to_device(files, torch.bfloat16, torch.device("cuda"), chunk, depth):
        del tensor
    torch.cuda.synchronize()
    return time.perf_counter() - t


def whole_load(d: Path) -> float:
    from localsgl.engine.models.loader import load_model
    from localsgl.store.resolve import resolve_model

    src = resolve_model(str(d))
    t = time.perf_counter()
    model = load_model(src, torch.bfloat16, torch.device("cuda"))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    del model
    torch.cuda.empty_cache()
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/start-llama8b")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    d = Path(a.dir)
    files = _files(d)
    if not files:
        print(f"no safetensors under {d}: run scripts/bench_start_gpu.py first", file=sys.stderr)
        return 2
    gb = sum(f.stat().st_size for f in files) / 1e9
    torch.cuda.init()
    print(f"{len(files)} shards, {gb:.2f} GB; host-to-device {h2d_rate():.1f} GB/s (1 GiB pinned buffer)")
    rows = []
    for threads in (8, 16):
        for chunk_mb in (32, 64):
            ts = [reads_only(files, chunk_mb << 20, threads) for _ in range(a.repeat)]
            rows.append((f"reads only, {threads} threads x {chunk_mb} MB", min(ts)))
    for chunk_mb, depth in ((32, 8), (64, 8), (32, 16), (16, 16), (64, 16)):
        ts = [stream(files, chunk_mb << 20, depth) for _ in range(a.repeat)]
        rows.append((f"iter_to_device, {chunk_mb} MB x {depth}", min(ts)))
    rows.append(("load_model (the engine's load)", min(whole_load(d) for _ in range(a.repeat))))
    print(f"{'what':44s} {'s':>6s} {'GB/s':>6s}")
    for what, s in rows:
        print(f"{what:44s} {s:6.2f} {gb / s:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
