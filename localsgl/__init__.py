"""localsgl: a local LLM runner with an SGLang-class engine inside.

The public names are imported on first use: the command line imports this package on
every start, and a command that needs no engine (`run` answered by a running server,
`list`, `--help`) should not pay for importing torch.
"""
from typing import TYPE_CHECKING

__all__ = ["Engine", "SamplingParams", "GenerateOutput", "StreamDelta"]
__version__ = "0.1.0"

_LAZY = {
    "Engine": "localsgl.engine.api",
    "SamplingParams": "localsgl.engine.params",
    "GenerateOutput": "localsgl.engine.params",
    "StreamDelta": "localsgl.engine.params",
}

if TYPE_CHECKING:  # pragma: no cover
    from .engine.api import Engine
    from .engine.params import GenerateOutput, SamplingParams, StreamDelta


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'localsgl' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
