"""A hub model named but not downloaded: find it in the cache, or pull it on first use.

`run`, `chat`, `serve` and ``Engine(model=...)`` accept hub specs and hub aliases. A model
the cache holds whole is used from there (reading the cache layout only: neither torch nor
huggingface_hub is imported here). One that is missing is pulled after a one-line notice on
stderr, unless HF_HUB_OFFLINE or LOCALSGL_NO_PULL (`--no-pull`) is set: then the error says
how to pull it. Front ends call ``ensure_local`` before they draw anything of their own, so
the download's progress is not drawn under a spinner or a full-screen app.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import config as settings
from . import hub_cache, manifest
from .aliases import ALIASES
from .dummy_configs import DUMMY_CONFIGS
from .errors import ModelNotFoundError
from .hub_cache import NO_PULL_ENV, HubSpec, SpecError, parse_hub_spec


def pull_allowed() -> bool:
    """Whether a hub model missing from the cache may be downloaded on first use."""
    return os.environ.get(NO_PULL_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def local_hub_model(hub: HubSpec, *, weights: bool = True) -> Path | None:
    """The cached snapshot directory (or, for a GGUF spec, the .gguf file) holding everything
    a run of ``hub`` needs, or None."""
    snapshot = hub_cache.snapshot_dir(hub.repo, hub.revision)
    if snapshot is None:
        return None
    if hub.file is None and (snapshot / "config.json").is_file():
        if not weights:
            return snapshot
        return None if hub_cache.safetensors_problem(snapshot, manifest.expected(snapshot)) else snapshot
    names = [n for n in hub_cache.snapshot_files(snapshot) if hub_cache.is_weights_gguf(n)]
    try:
        return snapshot / hub_cache.choose_gguf(names, hub.file)
    except SpecError:
        return None


def pull_missing(hub: HubSpec, shown: str, weights: bool, allowed: bool = True) -> Path:
    """Pull a hub model the cache lacks (``shown`` is how the person named it), or say why not."""
    from .hub_download import endpoint, offline_error, pull_hub

    if not allowed:
        raise ModelNotFoundError(f"{shown} is not downloaded: `localsgl pull {shown}` downloads it")
    if settings.hf_offline():
        raise offline_error(shown)
    if not pull_allowed():
        raise ModelNotFoundError(
            f"{shown} is not in the Hugging Face cache ({settings.hf_hub_cache()}) and pulling is off "
            f"(--no-pull / {NO_PULL_ENV}): download it with `localsgl pull {shown}`"
        )
    print(f"localsgl: {shown} is not downloaded yet: pulling it from {endpoint()} "
          f"(`localsgl pull {shown}` does the same)", file=sys.stderr, flush=True)
    return pull_hub(hub, weights=weights).path


def ensure_local(spec: str, load_format: str = "auto") -> None:
    """Pull ``spec`` now if it is a hub model (or hub alias) missing from the cache; nothing
    for other specs (paths, the embedded model, quantized outputs, unknown names)."""
    hub, shown = hub_spec_of(str(spec).strip(), load_format)
    weights = load_format != "dummy"
    if hub is not None and local_hub_model(hub, weights=weights) is None:
        pull_missing(hub, shown, weights=weights)


def hub_spec_of(spec: str, load_format: str = "auto") -> tuple[HubSpec | None, str]:
    """(the hub spec a model spec means, how to show it), or (None, spec) when it is no hub model."""
    key = spec.lower()
    if load_format == "dummy" and key in DUMMY_CONFIGS:
        return None, spec
    if key in ALIASES:
        entry = ALIASES[key]
        return (None if entry.embedded else parse_hub_spec(entry.hub_spec)), key
    if not spec or Path(spec).expanduser().exists() or quantized_output(spec) is not None:
        return None, spec
    return parse_hub_spec(spec), spec


def quantized_output(name: str) -> Path | None:
    """A local quantized output by its name (an entry of the quantized-models directory)."""
    if not name or "/" in name or os.sep in name or name.startswith("."):
        return None
    path = settings.quantized_dir() / name
    return path if path.exists() else None
