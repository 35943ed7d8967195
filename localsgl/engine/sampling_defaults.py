"""Sampling defaults that fit the model: the value each unset SamplingParams field takes, and why.

A small model sampled at temperature 1 over its whole vocabulary babbles, so a field the
caller leaves unset takes, field by field, the first of
  1. the model's own generation_config.json (a Hugging Face directory or hub snapshot): what
     its authors ship, and what vLLM applies by default;
  2. the values recorded with its alias (store.resolve.ALIASES: the model card's, or values
     measured on the file an alias names);
  3. llama.cpp's defaults: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, no repetition
     penalty; and localsgl's max_tokens of 256.
Above all three rank a person's own defaults (LOCALSGL_<FIELD>, the config file's [sampling]
table, ``Engine(default_sampling=...)``), and a value set with the request itself (CLI flag,
HTTP field, SamplingParams argument) wins over everything: only placeholders
(``params.is_unset``) are replaced.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from .params import MODEL_DEFAULT_FIELDS, InvalidRequestError, SamplingParams, is_unset

log = logging.getLogger("localsgl")

GENERATION_CONFIG = "generation_config.json"
LLAMA_CPP = "llama.cpp default"

# field -> (value, source): the last resort for every field
BUILTIN_DEFAULTS: dict[str, tuple[Any, str]] = {
    "max_tokens": (256, "localsgl default"),
    "temperature": (0.8, LLAMA_CPP),
    "top_p": (0.95, LLAMA_CPP),
    "top_k": (40, LLAMA_CPP),
    "min_p": (0.05, LLAMA_CPP),
    "repetition_penalty": (1.0, LLAMA_CPP),
}

# generation_config.json key -> SamplingParams field
_GENERATION_CONFIG_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
# a max_new_tokens below this is a leftover (a test, a one-word task) that would cut answers short
MIN_SENSIBLE_MAX_TOKENS = 16

SamplingDefaults = dict[str, tuple[Any, str]]


def _checked(field: str, value: Any) -> Any | None:
    """``value`` as the type of ``field`` if SamplingParams accepts it there, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(MODEL_DEFAULT_FIELDS[field], int):
        if value != int(value):
            return None
        value = int(value)
    else:
        value = float(value)
    try:
        SamplingParams(**{field: value}).validate()
    except InvalidRequestError:
        return None
    return value


def sampling_from_generation_config(raw: dict) -> dict[str, Any]:
    """The SamplingParams fields a parsed generation_config.json sets.

    ``do_sample: false`` (written out) means greedy, as in transformers; a missing do_sample
    does not, because many files set temperature/top_p without it and mean them.  top_k 0 is
    transformers' "off" (-1 here).  Values SamplingParams would reject are dropped."""
    out: dict[str, Any] = {}
    for key, field in _GENERATION_CONFIG_KEYS.items():
        if key not in raw or raw[key] is None:
            continue
        value = raw[key]
        if field == "top_k" and value == 0 and not isinstance(value, bool):
            value = -1
        checked = _checked(field, value)
        if checked is None or (field == "max_tokens" and checked < MIN_SENSIBLE_MAX_TOKENS):
            log.warning("%s: ignoring %s=%r", GENERATION_CONFIG, key, raw[key])
            continue
        out[field] = checked
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def read_generation_config(directory: Path | str | None) -> tuple[dict[str, Any], bool]:
    """(the sampling fields set by ``directory``/generation_config.json, whether it says
    do_sample: false); ({}, False) when there is no such file or it is not valid JSON."""
    if directory is None:
        return {}, False
    path = Path(directory) / GENERATION_CONFIG
    if not path.is_file():
        return {}, False
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable, ignored (%s)", path, e)
        return {}, False
    if not isinstance(raw, dict):
        return {}, False
    return sampling_from_generation_config(raw), raw.get("do_sample") is False


def check_user_defaults(user: SamplingDefaults | None) -> SamplingDefaults:
    """A person's own defaults ({field: (value, source)}: LOCALSGL_<FIELD>, the config file's
    [sampling] table, or ``Engine(default_sampling=...)``, where a bare value means "engine
    argument"), each checked; a value SamplingParams would reject is a usage error naming it."""
    out: SamplingDefaults = {}
    for field, entry in (user or {}).items():
        value, source = entry if isinstance(entry, tuple) else (entry, "engine argument")
        if field not in BUILTIN_DEFAULTS:
            raise InvalidRequestError(f"{source}: {field} is not a sampling default "
                                      f"(one of {', '.join(BUILTIN_DEFAULTS)})", field)
        checked = _checked(field, value)
        if checked is None:
            raise InvalidRequestError(f"{source}: invalid {field} {value!r}", field)
        out[field] = (checked, source)
    return out


def resolve_defaults(generation_config: dict[str, Any] | None = None, alias: str | None = None,
                     alias_sampling: dict[str, Any] | None = None, greedy_by_config: bool = False,
                     user: SamplingDefaults | None = None) -> SamplingDefaults:
    """Field -> (value, source) by precedence user settings > generation_config.json > alias > built-in."""
    user = check_user_defaults(user)
    layers = [
        (generation_config or {}, GENERATION_CONFIG),
        (alias_sampling or {}, f"alias {alias}"),
    ]
    out: SamplingDefaults = {}
    for field, builtin in BUILTIN_DEFAULTS.items():
        out[field] = builtin
        if field in user:
            out[field] = user[field]
            continue
        for values, source in layers:
            if field in values:
                value = _checked(field, values[field])
                if value is not None:
                    if field == "temperature" and source == GENERATION_CONFIG and greedy_by_config:
                        source += " (do_sample: false)"
                    out[field] = (value, source)
                    break
    return out


def _config_dir(source) -> Path | None:
    """The directory whose generation_config.json belongs to the model (None for a GGUF file)."""
    path = getattr(source, "path", None)
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        return path
    if path.suffix == ".json":  # a dummy model named by its config.json
        return path.parent
    return None


def model_sampling_defaults(source, user: SamplingDefaults | None = None) -> SamplingDefaults:
    """The sampling defaults of a resolved model (a store.resolve.ModelSource), under a
    person's own defaults ``user`` (see check_user_defaults)."""
    from ..store.resolve import ALIASES, alias_of

    generation, greedy = read_generation_config(_config_dir(source))
    alias = alias_of(source)
    defaults = resolve_defaults(generation, alias, ALIASES[alias].sampling if alias else None, greedy, user)
    log.debug("sampling defaults of %s: %s", getattr(source, "name", "?"),
              ", ".join(f"{k}={v} ({s})" for k, (v, s) in defaults.items()))
    return defaults


def apply_defaults(params: SamplingParams, defaults: SamplingDefaults) -> SamplingParams:
    """A copy of ``params`` with every unset field taken from ``defaults`` (``params`` itself
    when nothing is unset, so callers may reuse one object across engines)."""
    changes = {f: defaults[f][0] for f in MODEL_DEFAULT_FIELDS if f in defaults and is_unset(getattr(params, f))}
    return dataclasses.replace(params, **changes) if changes else params


def defaults_as_dict(defaults: SamplingDefaults) -> dict[str, dict[str, Any]]:
    """{field: {"value": ..., "source": ...}}: the JSON shape of ``info --json``."""
    return {f: {"value": v, "source": s} for f, (v, s) in defaults.items()}
