"""The model store: naming models, the Hugging Face cache, downloads, GGUF files, aliases.

The functions the CLI's model commands and the chat app's model screen share are
importable from here (loaded on first use; ``localsgl run`` imports none of them):
``list_models``, ``show_model``, ``pull``, ``remove``, ``find_model``, ``LocalModel``
(store/manage.py) and ``resolve_model`` (store/resolve.py).
"""
from typing import TYPE_CHECKING

_LAZY = {
    "list_models": "manage",
    "show_model": "manage",
    "pull": "manage",
    "remove": "manage",
    "find_model": "manage",
    "LocalModel": "manage",
    "resolve_model": "resolve",
}

if TYPE_CHECKING:  # pragma: no cover
    from .manage import LocalModel, find_model, list_models, pull, remove, show_model
    from .resolve import resolve_model


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'localsgl.store' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
