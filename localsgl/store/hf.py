"""Hugging Face checkpoint directories: config.json + *.safetensors (+ tokenizer files).

Weights are streamed one tensor at a time from memory-mapped safetensors files and
converted to the run dtype/device as they go, so loading never holds a second copy
of the checkpoint in host memory.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import torch

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")


class CheckpointError(ValueError):
    """A model directory that is missing or has broken files."""


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config(path: Path) -> dict:
    """config.json of a directory (or the file itself), with generation_config.json's
    eos ids merged in (chat models often list their end-of-turn ids only there)."""
    cfg_file = path if path.is_file() else path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: cannot read: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: not a JSON object")
    gen_file = cfg_file.parent / "generation_config.json"
    if gen_file.is_file():
        try:
            gen = json.loads(gen_file.read_text())
        except (OSError, json.JSONDecodeError):
            gen = {}
        cfg["eos_token_id"] = _merge_ids(cfg.get("eos_token_id"), gen.get("eos_token_id"))
    return cfg


def _merge_ids(a, b):
    ids: list[int] = []
    for x in (a, b):
        if x is None:
            continue
        for i in [x] if isinstance(x, int) else x:
            if i not in ids:
                ids.append(int(i))
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a directory: those the index names, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: cannot read: {e}") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shards named in the index are missing: {', '.join(missing[:3])}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(other[:3])}: only safetensors checkpoints are supported)" if other else ""
        raise CheckpointError(f"{path}: no *.safetensors weight files{hint}")
    return files


def _device_str(device) -> str:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(d)


def iter_weights(path: Path, dtype: torch.dtype, device) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every tensor of every shard, already in dtype on device."""
    from safetensors import safe_open

    dev = _device_str(device)
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device=dev) as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                yield name, t
                del t


def has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_FILES)


# tokenizer classes that are tokenizer.json exactly as saved: transformers applies nothing on
# top of it when loading them (model-specific classes may rebuild parts from their config)
_PLAIN_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# config keys with which transformers rewrites a loaded tokenizer.json's processing
_REWRITING_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy", "from_slow")


def plain_fast_tokenizer(path: Path) -> bool:
    """Whether the directory's tokenizer is its tokenizer.json as saved (Llama 3's, for one)."""
    cfg_file = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() or not cfg_file.is_file():
        return False
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(cfg, dict) and cfg.get("tokenizer_class") in _PLAIN_TOKENIZER_CLASSES
            and not any(k in cfg for k in _REWRITING_KEYS))


def load_tokenizer(path: Path):
    """A plain fast tokenizer loads with the ``tokenizers`` library alone (light_tokenizer.py):
    the same ids without importing transformers, which costs an 8B start on an H200 seconds
    (bench/RESULTS.md, GPU start-up); any other through transformers' AutoTokenizer."""
    if plain_fast_tokenizer(path):
        from .light_tokenizer import LightTokenizer

        return LightTokenizer.from_dir(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
