"""Converted copies of GGUF files in ``$XDG_CACHE_HOME/localsgl/gguf/<key>/``.

Reading a GGUF file costs every start the same work: parsing a header whose vocabulary
arrays hold ~10^5 strings, converting the tokenizer through transformers, and
dequantizing every weight. The results depend only on the file's content (and the run
dtype), so they are kept here, once per file:

    meta.json                     the HF-style config, the display name, the weights' HF
                                  names and shapes in file order
    tokenizer.json, tokenizer_config.json, chat_template.jinja
                                  the tokenizer as transformers converts it
    weights-<dtype>.safetensors   every weight dequantized to <dtype> (HF names and layout)

``<key>`` is a sha256 of the file's size and of sampled byte ranges (the first 4 MiB,
which holds the header with the vocabulary and the tensor table, 16 blocks of 64 KiB
spread over the tensor data, and the last 64 KiB): reading ~5 MiB identifies a model
file without hashing gigabytes on every start, and any two different files that agree on
all of it would have to share header, tensor table and every sampled block. Copying or
touching the file keeps its key; editing it changes the key.

Every file is written under a temporary name, flushed to disk and renamed into place, so
a reader sees a whole file or none. A weights file is checked against meta.json before it
is used (version, dtype, names, shapes, byte ranges that cover the file exactly); one that
fails is deleted and rebuilt, never loaded. The data itself is memory-mapped (a private
mapping: the file's pages come from the page cache, nothing is read twice).

The directory is a cache: it can be deleted at any time; a failure to write it only
costs the conversion on the next start.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when what is stored (or how) changes: old entries are then ignored
_HEAD_BYTES = 4 << 20
_SAMPLES = 16
_SAMPLE_BYTES = 64 << 10
STALE_TEMP_SECONDS = 3600.0  # a temporary file untouched this long belongs to a dead writer

# safetensors dtype names of the run dtypes
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}

_key_lock = threading.Lock()
_keys: dict[tuple[str, int, int], str] = {}


class CacheError(Exception):
    """A cache file that is missing, partial or does not match what it should hold."""


def cache_root() -> Path:
    from ..config import cache_dir

    return cache_dir() / "gguf"


def file_key(path: str | os.PathLike) -> str:
    """The content key of a file (see the module docstring); memoized per (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    with _key_lock:
        key = _keys.get(memo)
    if key is not None:
        return key
    size = st.st_size
    h = hashlib.sha256(f"localsgl-gguf-v{FORMAT_VERSION}:{size}:".encode())
    with open(p, "rb") as f:
        h.update(f.read(_HEAD_BYTES))
        if size > _HEAD_BYTES:
            span = size - _HEAD_BYTES
            for i in range(_SAMPLES):
                f.seek(_HEAD_BYTES + span * i // _SAMPLES)
                h.update(f.read(_SAMPLE_BYTES))
            f.seek(max(_HEAD_BYTES, size - _SAMPLE_BYTES))
            h.update(f.read(_SAMPLE_BYTES))
    key = h.hexdigest()[:32]
    with _key_lock:
        _keys[memo] = key
    return key


# ----------------------------------------------------------------------------- atomic writes


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A file written under a temporary name in its final directory and renamed into
    place by ``commit()`` (after an fsync); ``abort()`` (or leaving the ``with`` block by
    an exception) removes the temporary file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=str(self.path.parent))
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")

    def write(self, data) -> None:
        self.file.write(data)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None or not self.file.closed:
            self.abort()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with AtomicFile(path) as f:
        f.write(data)
        f.commit()


# ----------------------------------------------------------------------------- safetensors


def _safetensors_header(specs: list[tuple[str, tuple[int, ...]]], st_dtype: str, metadata: dict[str, str]) -> tuple[dict, int]:
    """The safetensors header of tensors ``specs`` stored back to back, and the data size."""
    item = _ITEMSIZE[st_dtype]
    header: dict = {"__metadata__": metadata}
    off = 0
    for name, shape in specs:
        n = item
        for d in shape:
            n *= int(d)
        header[name] = {"dtype": st_dtype, "shape": [int(d) for d in shape], "data_offsets": [off, off + n]}
        off += n
    return header, off


def _encode_header(header: dict) -> bytes:
    """Length-prefixed JSON, padded with spaces so the data starts 8-byte aligned."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


class WeightsWriter:
    """Streams tensors into a safetensors file in the order of ``specs`` (the header is
    known up front from names and shapes, so no tensor is held back in memory)."""

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...]]], dtype: str, metadata: dict[str, str]):
        self.specs = specs
        self.st_dtype = _ST_DTYPES[dtype]
        self.out = AtomicFile(path)
        header, self.data_bytes = _safetensors_header(specs, self.st_dtype, metadata)
        self.out.write(_encode_header(header))
        self._next = 0

    def write(self, name: str, tensor) -> None:
        want_name, want_shape = self.specs[self._next]
        if name != want_name or tuple(tensor.shape) != tuple(want_shape):
            raise CacheError(f"cache writer: expected {want_name} {want_shape}, got {name} {tuple(tensor.shape)}")
        import torch

        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self.out.write(memoryview(t.view(torch.uint8).numpy()))
        self._next += 1

    def commit(self) -> None:
        if self._next != len(self.specs):
            raise CacheError(f"cache writer: {len(self.specs) - self._next} tensors were not written")
        self.out.commit()

    def abort(self) -> None:
        self.out.abort()


def read_weights(path: Path, specs: list[tuple[str, tuple[int, ...]]], dtype: str, key: str) -> dict:
    """name -> tensor (CPU, memory-mapped, private) from a file that WeightsWriter wrote
    for exactly these specs, dtype and key; raises CacheError for anything else."""
    import torch

    st_dtype = _ST_DTYPES[dtype]
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise CacheError(f"{path}: shorter than a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(size - 8, 100 << 20):
                raise CacheError(f"{path}: header length {n} does not fit the file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CacheError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: unreadable header: {e}") from None
    meta = header.get("__metadata__") or {}
    if meta.get("format") != str(FORMAT_VERSION) or meta.get("key") != key or meta.get("dtype") != dtype:
        raise CacheError(f"{path}: written for another file, dtype or format")
    expected, data_bytes = _safetensors_header(specs, st_dtype, meta)
    if header != expected:
        raise CacheError(f"{path}: tensors do not match the converted file's tensor list")
    if size != 8 + n + data_bytes:
        raise CacheError(f"{path}: {size} bytes, expected {8 + n + data_bytes} (partial or padded file)")
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    tdtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[st_dtype]
    base = 8 + n
    out = {}
    for name, shape in specs:
        b, e = header[name]["data_offsets"]
        out[name] = flat[base + b : base + e].view(tdtype).reshape(shape)
    return out


# ----------------------------------------------------------------------------- entries


class CacheEntry:
    """The cache directory of one GGUF file (by content key)."""

    def __init__(self, source: Path, key: str, root: Path | None = None):
        self.source = source
        self.key = key
        self.dir = (root or cache_root()) / key

    @classmethod
    def for_file(cls, path: str | os.PathLike) -> "CacheEntry | None":
        """The entry of ``path``, or None when the file cannot be read."""
        try:
            p = Path(path).resolve()
            return cls(p, file_key(p))
        except OSError as e:
            log.debug("no conversion cache for %s: %s", path, e)
            return None

    # meta.json ------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    def read_meta(self) -> dict | None:
        try:
            meta = json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", self.meta_path, e)
            return None
        if not (isinstance(meta, dict) and meta.get("format") == FORMAT_VERSION and meta.get("key") == self.key
                and isinstance(meta.get("config"), dict) and isinstance(meta.get("weights"), list)):
            return None
        return meta

    def write_meta(self, config: dict, name: str, weights: list[tuple[str, tuple[int, ...]]],
                   tensors: list | None = None) -> None:
        """``tensors``: the file's tensor index (gguf_file.tensor_index), so a later load that
        reads the tensors themselves (weights kept quantized) need not parse the header."""
        meta = {
            "format": FORMAT_VERSION,
            "key": self.key,
            "source": str(self.source),
            "name": name,
            "config": config,
            "weights": [[n, list(s)] for n, s in weights],
        }
        if tensors is not None:
            meta["tensors"] = tensors
        self._try(lambda: write_bytes_atomic(self.meta_path, json.dumps(meta, indent=1).encode()), "meta.json")

    # tokenizer -------------------------------------------------------------------
    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    def has_tokenizer(self) -> bool:
        return (self.tokenizer_dir / "tokenizer.json").is_file() and (self.tokenizer_dir / "tokenizer_config.json").is_file()

    def write_tokenizer(self, files: dict[str, bytes]) -> bool:
        """Write the tokenizer's files; tokenizer_config.json last, so its presence means
        the others are complete."""
        def write():
            for name in sorted(files, key=lambda n: n == "tokenizer_config.json"):
                write_bytes_atomic(self.tokenizer_dir / name, files[name])

        return self._try(write, "the tokenizer")

    # weights ---------------------------------------------------------------------
    def weights_path(self, dtype: str) -> Path:
        return self.dir / f"weights-{dtype}.safetensors"

    def load_weights(self, dtype: str, specs: list[tuple[str, tuple[int, ...]]]) -> dict | None:
        """The cached weights, or None (after deleting a file that fails its checks)."""
        path = self.weights_path(dtype)
        if not path.exists():
            return None
        try:
            return read_weights(path, specs, dtype, self.key)
        except CacheError as e:
            log.warning("rebuilding the converted weights: %s", e)
            try:
                path.unlink()
            except OSError:
                pass
            return None

    def store_while_yielding(self, dtype: str, specs, tensors: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
        """Pass ``tensors`` through unchanged while writing them to the weights file; the
        file is committed only when every tensor went through (else it is discarded)."""
        writer = None
        self._remove_stale_temporaries()
        try:
            writer = WeightsWriter(self.weights_path(dtype), specs, dtype,
                                   {"format": str(FORMAT_VERSION), "key": self.key, "dtype": dtype})
        except (OSError, KeyError) as e:
            log.info("not caching converted weights (%s)", e)
        ok = False
        try:
            for name, t in tensors:
                if writer is not None:
                    try:
                        writer.write(name, t)
                    except (OSError, CacheError) as e:
                        log.info("not caching converted weights (%s)", e)
                        writer.abort()
                        writer = None
                yield name, t
            ok = True
        finally:
            if writer is not None:
                if ok:
                    self._try(writer.commit, "the converted weights")
                else:
                    writer.abort()

    def _remove_stale_temporaries(self, older_than: float = STALE_TEMP_SECONDS) -> None:
        """Delete temporary files that a killed process left behind (a live writer's file
        is younger: it is written at disk speed)."""
        now = time.time()
        for p in self.dir.glob(".*.tmp"):
            try:
                if now - p.stat().st_mtime > older_than:
                    p.unlink()
            except OSError:
                pass

    def _try(self, fn, what: str) -> bool:
        try:
            fn()
            return True
        except (OSError, CacheError) as e:
            log.info("could not cache %s in %s: %s", what, self.dir, e)
            return False
