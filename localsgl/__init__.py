"""localsgl: a local LLM runner with an SGLang-class engine inside."""
from .engine.api import Engine
from .engine.params import GenerateOutput, SamplingParams, StreamDelta

__all__ = ["Engine", "SamplingParams", "GenerateOutput", "StreamDelta"]
__version__ = "0.1.0"
