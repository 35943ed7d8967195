"""What the model screen lists, pulls and removes, through the same ``localsgl.store``
functions as `localsgl list / pull / rm` (``localsgl.store.manage``). Imported lazily:
where that module is absent, the list holds the embedded model and pulling goes through
``localsgl.store.pull``, and removing says it is not available."""
from __future__ import annotations

import importlib
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


def _manage():
    try:
        return importlib.import_module("localsgl.store.manage")
    except ModuleNotFoundError as e:
        if e.name == "localsgl.store.manage":
            return None
        raise


def _row(m: Any) -> ModelRow:
    return ModelRow(
        name=str(getattr(m, "name", "?")),
        format=str(getattr(m, "format", "") or "-"),
        size_bytes=getattr(m, "size_bytes", None),
        params=getattr(m, "params", None),
        source=str(getattr(m, "source", "") or "-"),
        last_used=getattr(m, "last_used", None),
    )


def _embedded_row() -> list[ModelRow]:
    from ..store import resolve

    try:
        path = resolve.embedded_gguf_path()
    except Exception:  # noqa: BLE001 - no embedded package: nothing to list
        return []
    name = next((a.name for a in resolve.list_aliases() if a.target.startswith("embedded:")), "smollm2-135m")
    return [ModelRow(name, "GGUF Q4_1", path.stat().st_size, None, "embedded", None)]


def local_models() -> list[ModelRow]:
    """Every model that runs without a download."""
    manage = _manage()
    if manage is None:
        return _embedded_row()
    return [_row(m) for m in manage.list_models()]


def pull_model(spec: str, progress: Callable[[Any], None] | None = None) -> str:
    """Download ``spec`` (REPO[:QUANT][@REVISION]) into the HF cache; the name to run it by.
    ``progress`` gets the store's progress records (``done``, ``total``, ``file``)."""
    manage = _manage()
    if manage is not None:
        return manage.pull(spec, progress=progress or False)
    from ..store.hub_cache import parse_hub_spec
    from ..store.pull import pull_hub

    parsed = parse_hub_spec(spec)
    if parsed is None:
        raise ValueError(f"{spec!r} is not a hub repo id (org/name[:QUANT][@REVISION])")
    return pull_hub(parsed, progress=progress or False).name


def remove_model(name: str) -> int:
    """Delete ``name``'s files; the bytes freed."""
    manage = _manage()
    if manage is None:
        raise RuntimeError("removing models is not available in this build (localsgl.store.manage is missing)")
    return int(manage.remove(name))


def progress_fraction(p: Any) -> tuple[float | None, str]:
    """(fraction done or None, a short label) from a progress record or a (done, total) pair."""
    if isinstance(p, tuple) and len(p) >= 2:
        done, total, file = p[0], p[1], None
    else:
        done, total, file = getattr(p, "done", None), getattr(p, "total", None), getattr(p, "file", None)
    frac = (min(1.0, done / total) if total else None) if isinstance(done, (int, float)) else None
    return frac, str(file or "")
