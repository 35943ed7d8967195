"""Hub model specs and a read-only view of the Hugging Face cache.

A hub spec is ``REPO[:FILE][@REVISION]``: ``org/name``, optionally the GGUF file to use
(a quant such as ``Q4_K_M``, matched as llama.cpp's ``-hf`` does, or a file name ending in
``.gguf``), optionally a branch, tag or commit.

Finding a model that is already downloaded reads the cache layout directly
(``models--org--name/refs/<revision>`` holds a commit, ``snapshots/<commit>/`` the files)
and so does not import huggingface_hub: `localsgl run` of a cached model starts without
it. Downloads (hub_download.py) and removals (manage.py) go through huggingface_hub.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import config as settings

# what a safetensors model needs: configs, tokenizer files, chat templates, weights
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.jinja", "merges.txt", "vocab.txt"]
NO_WEIGHT_PATTERNS = [p for p in HUB_PATTERNS if p != "*.safetensors"]
# set (1/true/yes/on) to never download a missing model on first use (`localsgl run --no-pull`)
NO_PULL_ENV = "LOCALSGL_NO_PULL"

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_SPEC_RE = re.compile(
    rf"^(?P<repo>{_NAME}/{_NAME})(?::(?P<file>[A-Za-z0-9][A-Za-z0-9._/+-]*))?(?:@(?P<rev>[A-Za-z0-9._/-]+))?$"
)
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
# quant names as they appear at the end of GGUF file names (Q4_K_M, IQ3_XXS, Q8_0, BF16, ...)
_QUANT_RE = re.compile(r"(?i)(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32|MXFP4(?:_MOE)?|TQ\d_0)$")


class SpecError(ValueError):
    """A hub spec that cannot name a file (no match, several matches)."""


@dataclass(frozen=True)
class HubSpec:
    repo: str
    file: str | None = None  # quant or .gguf file name
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f":{self.file}" if self.file else "") + (f"@{self.revision}" if self.revision else "")

    def with_file(self, file: str | None) -> "HubSpec":
        return HubSpec(self.repo, file, self.revision)


def parse_hub_spec(spec: str) -> HubSpec | None:
    m = _SPEC_RE.match(spec.strip())
    if not m:
        return None
    return HubSpec(m.group("repo"), m.group("file"), m.group("rev"))


def is_commit(revision: str | None) -> bool:
    return bool(revision) and bool(_COMMIT_RE.match(revision))


# ----------------------------------------------------------------------------- file choice


def is_run_file(name: str) -> bool:
    """Whether a safetensors repo's file is one a run needs (top-level files only)."""
    return "/" not in name and any(fnmatch.fnmatch(name, p) for p in HUB_PATTERNS)


def is_weights_gguf(name: str) -> bool:
    """A .gguf file holding a language model (not a vision projector)."""
    base = name.rsplit("/", 1)[-1].lower()
    return base.endswith(".gguf") and not base.startswith("mmproj")


def quant_of(file_name: str) -> str | None:
    """The quant a GGUF file's name ends in (``Qwen2.5-7B-Instruct-Q4_K_M.gguf`` -> ``Q4_K_M``)."""
    stem = _SPLIT_RE.sub(".gguf", file_name.rsplit("/", 1)[-1])
    stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    m = _QUANT_RE.search(stem)
    return m.group(1).upper() if m else None


def choose_gguf(names: list[str], wanted: str | None, repo: str = "") -> str:
    """The GGUF file of ``names`` that ``wanted`` (a quant or a file name) picks; with
    ``wanted`` None the one file there is, else the Q4_K_M file (llama.cpp's default)."""
    ggufs = sorted(n for n in names if is_weights_gguf(n))
    where = f" in {repo}" if repo else ""
    if not ggufs:
        raise SpecError(f"no .gguf files{where}")
    if wanted is None:
        if len(ggufs) == 1:
            return ggufs[0]
        picked = [n for n in ggufs if quant_of(n) == "Q4_K_M"]
        if len(picked) != 1:
            raise SpecError(f"several .gguf files{where}: choose one with {repo or 'REPO'}:QUANT ({available_quants(ggufs)})")
        return _single(picked)
    if wanted.lower().endswith(".gguf"):
        exact = [n for n in ggufs if n == wanted or n.rsplit("/", 1)[-1] == wanted]
        if len(exact) == 1:
            return exact[0]
        raise SpecError(f"no file {wanted}{where} (.gguf files: {', '.join(ggufs[:12])})")
    picked = [n for n in ggufs if (quant_of(n) or "") == wanted.upper()]
    if not picked:
        raise SpecError(f"no {wanted} file{where} (available: {available_quants(ggufs)})")
    return _single(picked)


def _single(picked: list[str]) -> str:
    splits = [n for n in picked if _SPLIT_RE.search(n)]
    if splits:
        raise SpecError(f"{splits[0]} is one of {len(splits)} parts of a split GGUF file, which localsgl cannot load "
                        "(merge them with llama.cpp's gguf-split --merge and pass the merged file)")
    if len(picked) > 1:
        raise SpecError(f"several files match: {', '.join(picked[:6])}; pass one by name")
    return picked[0]


def available_quants(ggufs: list[str]) -> str:
    quants = sorted({quant_of(n) or n for n in ggufs if is_weights_gguf(n)})
    return ", ".join(quants) if quants else "none"


# ----------------------------------------------------------------------------- the cache


def repo_folder(repo: str, cache: Path | None = None) -> Path:
    return (cache or settings.hf_hub_cache()) / ("models--" + repo.replace("/", "--"))


def commit_for(repo: str, revision: str | None, cache: Path | None = None) -> str | None:
    """The commit the cache holds for ``revision`` (a ref it has recorded, or a commit it has)."""
    folder = repo_folder(repo, cache)
    rev = revision or "main"
    if is_commit(rev):
        return rev if (folder / "snapshots" / rev).is_dir() else None
    try:
        commit = (folder / "refs" / rev).read_text().strip()
    except (OSError, ValueError):
        return None
    return commit or None


def snapshot_dir(repo: str, revision: str | None, cache: Path | None = None) -> Path | None:
    commit = commit_for(repo, revision, cache)
    if commit is None:
        return None
    path = repo_folder(repo, cache) / "snapshots" / commit
    return path if path.is_dir() else None


def refs_of(folder: Path) -> dict[str, list[str]]:
    """commit -> the refs (branches, tags) that point to it."""
    out: dict[str, list[str]] = {}
    refs = folder / "refs"
    if not refs.is_dir():
        return out
    for p in sorted(refs.rglob("*")):
        if p.is_file():
            try:
                out.setdefault(p.read_text().strip(), []).append(p.relative_to(refs).as_posix())
            except (OSError, ValueError):
                continue
    return out


def snapshot_files(snapshot: Path) -> list[str]:
    """Every file of a snapshot whose content is there (a pointer whose blob exists)."""
    out = []
    for root, _dirs, files in os.walk(snapshot):
        for f in files:
            p = Path(root) / f
            if p.exists():
                out.append(p.relative_to(snapshot).as_posix())
    return sorted(out)


def missing_files(snapshot: Path, expected: dict[str, int | None]) -> list[str]:
    """The expected files (name -> size) a snapshot lacks or holds at another size."""
    missing = []
    for name, size in expected.items():
        try:
            st = (snapshot / name).stat()
        except OSError:
            missing.append(name)
            continue
        if size is not None and st.st_size != size:
            missing.append(name)
    return missing


def safetensors_problem(snapshot: Path, expected: dict[str, int | None] | None = None) -> str | None:
    """Why a snapshot is not a whole safetensors model, or None when it is one.

    With the file list a pull recorded (manifest.expected) every file must be there; without
    one (a download by another tool) config.json and the weights the index names (or some
    *.safetensors file) must be."""
    if expected:
        missing = missing_files(snapshot, expected)
        if missing:
            return f"{len(missing)} of {len(expected)} files missing ({', '.join(missing[:3])})"
    if not (snapshot / "config.json").is_file():
        return "no config.json"
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "unreadable model.safetensors.index.json"
        missing = sorted(s for s in shards if not (snapshot / s).is_file())
        if missing:
            return f"weight shards missing ({', '.join(missing[:3])})"
        return None
    if not any(p.is_file() for p in snapshot.glob("*.safetensors")):
        return "no *.safetensors weights"
    return None


def write_ref(repo: str, revision: str, commit: str, cache: Path | None = None) -> None:
    """Point ``refs/<revision>`` at ``commit`` (as huggingface_hub does after a download), in
    one rename so a reader never sees a half-written ref."""
    ref = repo_folder(repo, cache) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    try:
        if ref.read_text().strip() == commit:
            return
    except OSError:
        pass
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)
