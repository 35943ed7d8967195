"""architectures (config.json) -> model class."""
from __future__ import annotations

from .config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from .llama import LlamaForCausalLM

_MODELS = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def model_class(cfg: ModelConfig):
    try:
        return _MODELS[cfg.architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture {cfg.architecture!r}; supported: {', '.join(_MODELS)}"
        ) from None
