"""What the model screen lists, pulls and removes: the same ``localsgl.store.manage``
functions as `localsgl list / pull / rm`, imported when the screen needs them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ModelRow:
    name: str
    format: str
    size_bytes: int | None
    params: int | None
    source: str
    last_used: float | None


def local_models() -> list[ModelRow]:
    """Every model that runs without a download."""
    from ..store.manage import list_models

    return [ModelRow(m.name, m.format or "-", m.size_bytes, m.params, m.source or "-", m.last_used)
            for m in list_models()]


def pull_model(spec: str, progress: Callable[[Any], None] | None = None) -> str:
    """Download ``spec`` (an alias or REPO[:QUANT][@REVISION]) into the HF cache; the name
    to run it by. ``progress`` gets the store's PullProgress records."""
    from ..store.manage import pull

    return pull(spec, progress=progress or False)


def remove_model(name: str) -> int:
    """Delete ``name``'s files; the bytes freed."""
    from ..store.manage import remove

    return int(remove(name))


def progress_fraction(p: Any) -> tuple[float | None, str]:
    """(fraction done or None while the size is unknown, the file being fetched)."""
    done, total = getattr(p, "done", None), getattr(p, "total", None)
    frac = min(1.0, done / total) if isinstance(done, (int, float)) and total else None
    return frac, str(getattr(p, "file", None) or "")
