"""`localsgl quantize`: a model's linear weights rounded to int4 / int8 / fp8, written as a local
model under ``$XDG_DATA_HOME/localsgl/models/NAME`` that every model-taking command accepts.

Round-to-nearest per group (layers/quant.py ``QuantizedWeight.quantize``), or with
``--calibrate`` GPTQ over a shipped calibration text (calibrate.py): every linear layer
(q/k/v/o, gate/up/down, and an untied LM head) is quantized; the embedding, the norms and
biases stay dense.  A layer whose input size is not a whole number of groups takes the
largest power-of-two group that divides it (WeightFormat.fitted: group 64 for an input of
576 under --group-size 128), or stays dense when none does.

Output: ``config.json`` (the source's, plus ``quantization_config`` = {"quant_method": METHOD,
"localsgl": {format, group_size, symmetric}}), safetensors shards in
quantized_checkpoint.py's "localsgl" layout, the tokenizer files, and the manifest
``localsgl-quantization.json`` (method, group size, source and revision, date).  Everything is
written into a hidden ``.tmp-NAME-*`` directory beside the destination and renamed into place
only when complete: an interrupted run leaves nothing that `list` shows or `run` loads (a
killed run's hidden directory is removed by the next quantize).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from .. import config as settings
from ..engine.layers.quant import QuantizedWeight, WeightFormat, parse_format
from ..engine.plan import PlanError, detect_device
from .aliases import ALIASES
from .errors import ModelStoreError
from .quantized_checkpoint import MANIFEST_NAME

log = logging.getLogger(__name__)

SHARD_BYTES = 2 << 30
_LINEAR = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_STALE_SECONDS = 24 * 3600  # hidden work directories older than this are a killed run's
_EXTRA_FILES = ("special_tokens_map.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
                "added_tokens.json", "merges.txt")


class QuantizeError(ModelStoreError):
    """The model or the arguments cannot be quantized as asked (a usage error)."""


@dataclass
class QuantizeResult:
    name: str
    path: Path
    method: str
    group_size: int
    quantized: int  # linear weights quantized
    dense: int  # tensors kept dense
    bytes: int
    seconds: float


def default_name(source_name: str, fmt: WeightFormat) -> str:
    """<model>-<method>, with -g<group> where the scales are grouped (int4 always; int8 and fp8
    when asked), so that two group sizes of one model get two names."""
    base = re.sub(r"[^A-Za-z0-9._+-]+", "-", source_name.split("/")[-1]).strip("-.") or "model"
    return f"{base}-{fmt.kind}" + (f"-g{fmt.group_size}" if fmt.group_size else "")


def _check_name(name: str) -> Path:
    """The directory output ``name`` would take; QuantizeError where it cannot be one: not a plain
    name, a built-in alias (aliases resolve first, in any case, so the output could be neither run
    nor removed), or an output that exists."""
    if not _NAME.match(name):
        raise QuantizeError(f"output name {name!r}: use letters, digits and . _ + - (no path)")
    if name.lower() in ALIASES:
        raise QuantizeError(f"output name {name!r} is a built-in model alias; pick another -o")
    dest = settings.quantized_dir() / name
    if dest.exists():
        raise QuantizeError(f"{name} already exists ({dest}); remove it with `localsgl rm {name}` or pick another -o")
    return dest


def quantize_model(spec: str, method: str, group_size: int | None = None, name: str | None = None,
                   device: str | None = None, progress: Callable[[int, int, str], None] | None = None,
                   calibrate: bool = False) -> QuantizeResult:
    """Quantize ``spec`` (any model spec) and write it as the local model ``name``.
    ``calibrate``: GPTQ over the shipped calibration text (calibrate.py) instead of rounding
    each weight to nearest (int4 / int8).  ``progress(done, total, what)`` is called as
    the work advances."""
    from .resolve import resolve_model

    try:
        fmt = parse_format(method, group_size)
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    dest = _check_name(name) if name is not None else None  # a bad name is refused before any download
    try:  # and a device that is not here, as the engine refuses it
        dev = torch.device(detect_device(device).torch_device)
    except PlanError as e:
        raise QuantizeError(str(e)) from None
    source = resolve_model(spec, record_use=False)
    if source.kind not in ("hf", "gguf"):
        raise QuantizeError(f"{spec}: only checkpoint directories and GGUF files can be quantized")
    if dest is None:
        name = default_name(source.name, fmt)
        dest = _check_name(name)
    root = dest.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        (work / ".owner").write_text(str(os.getpid()))
        if calibrate and fmt.kind == "fp8":
            raise QuantizeError("fp8 is rounded to nearest (no calibration)")
        if calibrate:
            from .calibrate import calibrated_weights

            items = calibrated_weights(source, fmt, dev, progress)
        else:
            items = source.iter_weights(torch.float32, dev)
        counts = _write(source, items, fmt, work, None if calibrate else progress)
        _write_config(source, fmt, work, counts["dense_dtype"])
        _write_tokenizer(source, work)
        manifest = {
            "method": fmt.kind, "group_size": fmt.group_size, "symmetric": fmt.symmetric,
            "calibration": "gptq" if calibrate else "round-to-nearest",
            "source": spec, "source_name": source.name, "source_path": str(source.path) if source.path else None,
            "repo": source.repo_id, "revision": source.revision,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "quantized_tensors": counts["quantized"], "dense_tensors": counts["dense"], "bytes": counts["bytes"],
        }
        from .. import __version__

        manifest["localsgl_version"] = __version__
        (work / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        (work / ".owner").unlink()
        _fsync_dir(work)
        os.rename(work, dest)  # atomic: the model appears whole or not at all
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return QuantizeResult(name, dest, fmt.kind, fmt.group_size, counts["quantized"], counts["dense"], counts["bytes"],
                          time.perf_counter() - t0)


def _dense_dtype(source) -> torch.dtype:
    want = str(source.config.get("torch_dtype") or "").lower()
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(want, torch.float16)


def _format_for(name: str, tensor: torch.Tensor, fmt: WeightFormat, tied: bool) -> WeightFormat | None:
    """The format a tensor is written in, None for one kept dense (not a linear weight, or no
    group fits its inputs)."""
    if tensor.dim() != 2 or not (_LINEAR.search(name) or (name == "lm_head.weight" and not tied)):
        return None
    return fmt.fitted(tensor.shape[1])


def _write(source, items, fmt: WeightFormat, work: Path, progress) -> dict:
    """Every tensor of the source, quantized or dense, into safetensors shards of ~SHARD_BYTES.
    Dense tensors go in the output's dense dtype (fp32 for one whose values fp16 cannot hold)."""
    from safetensors.torch import save_file

    dense_dtype = _dense_dtype(source)
    tied = bool(source.config.get("tie_word_embeddings"))
    total = _tensor_count(source)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    files: list[tuple[str, list[str]]] = []
    counts = {"quantized": 0, "dense": 0, "bytes": 0, "dense_dtype": dense_dtype}

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(work / fname), metadata={"format": "pt"})
            files.append((fname, list(shard)))
            shard, shard_bytes = {}, 0

    for done, (hf_name, t) in enumerate(items, 1):
        q = t if isinstance(t, QuantizedWeight) and t.fmt.kind == fmt.kind else None  # calibrated already
        if isinstance(t, QuantizedWeight) and q is None:
            t = t.dequantize(torch.float32)  # a quantized source: requantized from its values
        tensor_fmt = _format_for(hf_name, t, fmt, tied) if q is None else q.fmt
        if tensor_fmt is not None:
            q = q if q is not None else QuantizedWeight.quantize(t, tensor_fmt)
            prefix = hf_name.removesuffix(".weight")
            parts = {f"{prefix}.qweight": q.qweight, f"{prefix}.scales": q.scales}
            if q.mins is not None:
                parts[f"{prefix}.mins"] = q.mins
            counts["quantized"] += 1
        else:
            if t.is_floating_point():
                fits = dense_dtype != torch.float16 or float(t.abs().max()) <= 60000.0
                t = t.to(dense_dtype if fits else torch.float32)
            parts = {hf_name: t}
            counts["dense"] += 1
        for k, v in parts.items():
            v = v.contiguous().cpu()
            shard[k] = v
            b = v.numel() * v.element_size()
            shard_bytes += b
            counts["bytes"] += b
        del t, parts
        if shard_bytes >= SHARD_BYTES:
            flush()
        if progress is not None:
            progress(done, total, hf_name)
    flush()
    if counts["quantized"] == 0:
        raise QuantizeError(f"{source.name}: no linear weights to quantize")
    if len(files) == 1:
        os.rename(work / files[0][0], work / "model.safetensors")
    else:
        index = {"metadata": {"total_size": counts["bytes"]},
                 "weight_map": {k: fname for fname, names in files for k in names}}
        (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return counts


def _tensor_count(source) -> int:
    if source.kind == "gguf":
        from .gguf_file import open_gguf

        specs = open_gguf(source.path).weight_specs
        return len(specs) if specs else 0
    from .hf import safetensors_files
    from .quantized_checkpoint import scheme_of

    if scheme_of(source.config) is not None:
        return 0  # several stored tensors per weight: unknown up front
    import struct

    n = 0
    for f in safetensors_files(source.path):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            n += sum(1 for k in json.loads(fh.read(size)) if k != "__metadata__")
    return n


def _write_config(source, fmt: WeightFormat, work: Path, dense_dtype: torch.dtype) -> None:
    cfg = {k: v for k, v in source.config.items() if k not in ("gguf", "quantization_config", "_name_or_path")}
    cfg["torch_dtype"] = str(dense_dtype).removeprefix("torch.")
    cfg["quantization_config"] = {
        "quant_method": fmt.kind,
        "localsgl": {"format": fmt.kind, "group_size": fmt.group_size, "symmetric": fmt.symmetric},
    }
    (work / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _write_tokenizer(source, work: Path) -> None:
    from .hf import TOKENIZER_FILES

    if source.kind == "hf":
        for fname in TOKENIZER_FILES + _EXTRA_FILES:
            if (source.path / fname).is_file():
                shutil.copy2(source.path / fname, work / fname)
        return
    tok = source.load_tokenizer()
    if tok is None:
        return
    from .gguf_file import open_gguf

    entry = open_gguf(source.path).cache
    if entry is not None and entry.has_tokenizer():
        for f in entry.tokenizer_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, work / f.name)
    elif hasattr(tok, "save_pretrained"):
        tok.save_pretrained(str(work))
    _write_generation_defaults(source, work)


def _write_generation_defaults(source, work: Path) -> None:
    """A GGUF source's sampling defaults (e.g. the alias table's for the embedded model) as
    generation_config.json, so the output samples as its source did."""
    if (work / "generation_config.json").exists():
        return
    try:
        from ..engine.sampling_defaults import model_sampling_defaults

        defaults = model_sampling_defaults(source)
    except Exception as e:  # noqa: BLE001 - defaults are a convenience
        log.debug("no sampling defaults for %s: %s", source.name, e)
        return
    gen = {k: v for k, (v, origin) in defaults.items() if origin.startswith("alias") and v is not None}
    if gen:
        (work / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _remove_stale(root: Path) -> None:
    now = time.time()
    for p in root.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_SECONDS or not _pid_alive(p):
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _pid_alive(p: Path) -> bool:
    """Whether the run that owns a work directory may still be writing (no record: assume so)."""
    owner = p / ".owner"
    try:
        pid = int(owner.read_text())
    except (OSError, ValueError):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


