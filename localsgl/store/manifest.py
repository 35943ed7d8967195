"""What localsgl remembers about the models on disk, in one small JSON file.

``$XDG_DATA_HOME/localsgl/manifests/models.json`` maps a model's path (a hub snapshot
directory, a .gguf file, a quantized output directory) to

    last_used   when the engine last loaded it (seconds since the epoch)
    expected    while a pull runs, and after one was interrupted: {file name: size} of
                every file it fetches, so a snapshot that lacks one is not taken for a
                model (a finished pull clears it)

Every change is a read-modify-write under an advisory lock, written to a temporary file
and renamed into place: a reader sees the old file or the new one, never half of one.
Entries whose path is gone are dropped on each write. The manifest is a convenience: a
failure to read or write it is logged and otherwise ignored.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from .. import config as settings

log = logging.getLogger(__name__)

FILE_NAME = "models.json"


def manifest_path() -> Path:
    return settings.manifests_dir() / FILE_NAME


def key(path: str | os.PathLike) -> str:
    """The manifest key of a model path: absolute, symlinks kept (a GGUF pointer in the hub
    cache is a symlink to its blob; the pointer names the model)."""
    return os.path.abspath(os.fspath(path))


def read() -> dict[str, dict]:
    try:
        data = json.loads(manifest_path().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.debug("manifest %s unreadable (%s): starting afresh", manifest_path(), e)
        return {}
    models = data.get("models") if isinstance(data, dict) else None
    return {k: v for k, v in (models or {}).items() if isinstance(v, dict)}


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock beside the manifest (none where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(k: str, entry: dict) -> bool:
    """Whether an entry still describes something: its path exists, or it records a pull
    whose repo folder still exists (the snapshot directory appears with the first file)."""
    if not entry:
        return False
    if os.path.lexists(k):
        return True
    return "expected" in entry and os.path.isdir(os.path.dirname(os.path.dirname(k)))


def _update(change: Callable[[dict[str, dict]], None]) -> None:
    path = manifest_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            models = read()
            change(models)
            models = {k: v for k, v in models.items() if _alive(k, v)}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".models-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": 1, "models": models}, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as e:
        log.debug("cannot write the manifest %s: %s", path, e)


def record_use(path: str | os.PathLike, when: float | None = None) -> None:
    """Note that the model at ``path`` was loaded now."""
    k = key(path)
    stamp = time.time() if when is None else when
    _update(lambda m: m.setdefault(k, {}).__setitem__("last_used", stamp))


def last_used(path: str | os.PathLike, models: dict[str, dict] | None = None) -> float | None:
    entry = (read() if models is None else models).get(key(path)) or {}
    value = entry.get("last_used")
    return float(value) if isinstance(value, (int, float)) else None


def record_expected(path: str | os.PathLike, files: dict[str, int | None]) -> None:
    """Before a pull: the files (name -> size) the snapshot at ``path`` must end up with."""
    k = key(path)
    _update(lambda m: m.setdefault(k, {}).__setitem__("expected", dict(files)))


def clear_expected(path: str | os.PathLike) -> None:
    """After a pull that fetched every file: nothing is outstanding any more."""
    k = key(path)
    _update(lambda m: (m.get(k) or {}).pop("expected", None))


def expected(path: str | os.PathLike, models: dict[str, dict] | None = None) -> dict[str, int | None] | None:
    entry = (read() if models is None else models).get(key(path)) or {}
    files = entry.get("expected")
    return dict(files) if isinstance(files, dict) else None


def forget(path: str | os.PathLike) -> None:
    """Drop everything recorded about ``path`` (the model was removed)."""
    k = key(path)
    _update(lambda m: m.pop(k, None))
