"""Safetensors shards straight to the GPU: parallel reads into pinned buffers, async copies.

Reading a checkpoint through memory maps faults every page into the process one at a
time and copies each tensor from pageable memory, one tensor after another.  Here a few
threads ``pread`` fixed-size chunks of the shards' data regions into a ring of pinned
buffers while the loading thread issues each chunk's host-to-device copies into the
tensors it overlaps; a buffer is read into again once the event recorded after its copies
has passed.  Reads of chunk i+1.. overlap the copies of chunk i, and a tensor is handed
to the caller as soon as its last byte is on its way (the caller's copies queue behind it
on the same stream).  Peak extra memory: the pinned ring plus the tensors in flight.
Floor: the slower of the file reads (page cache or disk) and the host-to-device link.
"""
from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

CHUNK_BYTES = 32 << 20
# pinned chunks (and reads) in flight: the file reads bound the stream, and 16 in flight read an
# 8B checkpoint ~1.4x as fast as 8 (bench/RESULTS.md, "The checkpoint's load, link by link")
RING_DEPTH = 16

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


class UnsupportedShardError(ValueError):
    """A shard this reader cannot stream (an unknown dtype or a malformed header)."""


@dataclass
class _Entry:
    name: str
    start: int  # byte range inside the file's data region
    end: int
    dtype: torch.dtype
    shape: list[int]


@dataclass
class _Shard:
    path: Path
    data_start: int  # file offset of the data region
    data_len: int
    entries: list[_Entry]  # by start offset


def read_header(path: Path) -> _Shard:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise UnsupportedShardError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise UnsupportedShardError(f"{path}: bad header: {e}") from None
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        dt = _DTYPES.get(info.get("dtype"))
        if dt is None:
            raise UnsupportedShardError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}")
        s, e = info["data_offsets"]
        entries.append(_Entry(name, int(s), int(e), dt, list(info["shape"])))
    entries.sort(key=lambda x: x.start)
    data_len = max((x.end for x in entries), default=0)
    return _Shard(Path(path), 8 + n, data_len, entries)


def _pread_into(fd: int, buf: torch.Tensor, offset: int) -> None:
    view = memoryview(buf.numpy())
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at offset {offset + done}")
        done += got


def iter_to_device(files: list[Path], dtype: torch.dtype, device: torch.device,
                   chunk_bytes: int = CHUNK_BYTES, depth: int = RING_DEPTH) -> Iterator[tuple[str, torch.Tensor]]:
    """An iterator of (name, tensor on ``device``) over every tensor of every shard,
    floating-point tensors cast to ``dtype``.  Reads the headers now: raises
    UnsupportedShardError when a shard cannot be streamed (the caller falls back to
    safetensors' own reader)."""
    shards = [read_header(Path(f)) for f in files]
    return _stream(shards, dtype, torch.device(device), chunk_bytes, depth)


def _stream(shards: list[_Shard], dtype, device, chunk_bytes: int, depth: int) -> Iterator[tuple[str, torch.Tensor]]:
    chunks = [(i, off, min(chunk_bytes, s.data_len - off))
              for i, s in enumerate(shards) for off in range(0, s.data_len, chunk_bytes)]
    depth = max(1, min(depth, len(chunks)))
    fds = [os.open(s.path, os.O_RDONLY) for s in shards]
    try:
        for fd in fds:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except (AttributeError, OSError):  # pragma: no cover  (not on every OS)
                pass
        cuda = device.type == "cuda"  # elsewhere (tests): plain buffers, synchronous copies
        ring = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(depth)]
        freed = [None] * depth  # event recorded after the copies out of each buffer

        def read(k: int, slot: int) -> None:
            ev = freed[slot]
            if ev is not None:
                ev.synchronize()
            i, off, n = chunks[k]
            _pread_into(fds[i], ring[slot][:n], shards[i].data_start + off)

        with ThreadPoolExecutor(depth, thread_name_prefix="safetensors-read") as pool:
            pending = {k: pool.submit(read, k, k) for k in range(depth)}
            # zero-byte tensors need no read
            for s in shards:
                for e in s.entries:
                    if e.end == e.start:
                        yield e.name, _finish(torch.empty(0, dtype=torch.uint8, device=device), e, dtype)
            cursor = [0] * len(shards)  # next entry of each shard not yet finished
            raw: dict[str, torch.Tensor] = {}
            for k, (i, off, n) in enumerate(chunks):
                slot = k % depth
                pending.pop(k).result()
                buf = ring[slot]
                entries = shards[i].entries
                done = []
                j = cursor[i]
                while j < len(entries) and entries[j].start < off + n:
                    e = entries[j]
                    if e.end > off and e.end > e.start:
                        t = raw.get(e.name)
                        if t is None:
                            t = raw[e.name] = torch.empty(e.end - e.start, dtype=torch.uint8, device=device)
                        a, b = max(e.start, off), min(e.end, off + n)
                        t[a - e.start:b - e.start].copy_(buf[a - off:b - off], non_blocking=True)
                    if e.end <= off + n:
                        if e.end > e.start:
                            done.append((e, raw.pop(e.name)))
                        j += 1
                    else:
                        break  # continues in the next chunk
                cursor[i] = j
                if cuda:
                    ev = torch.cuda.Event()
                    ev.record(torch.cuda.current_stream(device))
                    freed[slot] = ev
                if k + depth < len(chunks):
                    pending[k + depth] = pool.submit(read, k + depth, slot)
                for e, t in done:
                    yield e.name, _finish(t, e, dtype)
            if cuda:
                torch.cuda.current_stream(device).synchronize()  # the ring may be freed now
    finally:
        for fd in fds:
            os.close(fd)


def _finish(raw: torch.Tensor, e: _Entry, dtype: torch.dtype) -> torch.Tensor:
    t = raw.view(e.dtype).view(e.shape)
    if t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t
