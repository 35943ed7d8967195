"""Downloads from the Hugging Face hub into its cache, through huggingface_hub.

A pull asks the hub for the repo's file list at the revision (one ``model_info`` call,
which also pins the commit), picks the files a run needs, and fetches each with
``hf_hub_download`` at that commit, so every file of one pull comes from one commit:

  * a safetensors repo: the weight index (when there is one), configs, tokenizer files
    and chat templates, then the weights: the shards the index names (a repo may also
    carry a consolidated copy), else every top-level *.safetensors file;
  * a GGUF repo: the one .gguf file that ``REPO:QUANT`` or ``--file`` picks (hub_cache).

huggingface_hub writes each file under a temporary name and renames it into the cache
when it is whole, and resumes a file whose connection dropped with an HTTP Range request.
Before the weights are fetched, the manifest records every file the snapshot must end up
with; the revision's ref (``refs/main``) is written only when all are there. So a pull
that fails or is killed leaves a snapshot that list and run recognise as incomplete and a
ref (if any) that still names the last whole download.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import config as settings
from . import hub_cache, manifest
from .download_progress import Display, PullTracker, display_for
from .errors import ModelNotFoundError
from .hub_cache import HubSpec, SpecError

log = logging.getLogger(__name__)

TOKEN_HELP = ("create a read token at https://huggingface.co/settings/tokens and set HF_TOKEN=<token> "
              "(or run `hf auth login`)")
INDEX = "model.safetensors.index.json"
STALE_PARTIAL_SECONDS = 3600  # a partial blob unchanged this long belongs to a pull that died


@dataclass
class PullResult:
    spec: HubSpec  # as asked, with the GGUF file chosen (if any)
    name: str  # the name to run it by (`localsgl run -m NAME`)
    path: Path  # the snapshot directory, or the .gguf file in it
    commit: str
    downloaded: int  # bytes fetched by this pull (0: all was in the cache)


def endpoint() -> str:
    """The hub's address: $HF_ENDPOINT (read now, so a change after import counts)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline_error(spec: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{spec} is not in the Hugging Face cache ({settings.hf_hub_cache()}) and HF_HUB_OFFLINE is set, "
        f"so it cannot be downloaded: unset HF_HUB_OFFLINE and run `localsgl pull {spec}`"
    )


def pull_hub(spec: HubSpec, *, progress=None, weights: bool = True) -> PullResult:
    """Download what running ``spec`` needs into the HF cache (what is there already is
    kept); ``weights=False`` fetches configs and tokenizer files only."""
    if settings.hf_offline():
        raise offline_error(str(spec))
    cache = settings.hf_hub_cache()
    with _hub_errors(spec):
        from huggingface_hub import HfApi

        info = HfApi(endpoint=endpoint()).model_info(spec.repo, revision=spec.revision, files_metadata=True)
    commit = info.sha
    if not commit:
        raise ModelNotFoundError(f"{spec}: the hub gave no commit for this revision")
    remote = {s.rfilename: s.size for s in (info.siblings or [])}
    snapshot = hub_cache.repo_folder(spec.repo, cache) / "snapshots" / commit

    try:
        if _is_gguf_pull(spec, remote):
            chosen = hub_cache.choose_gguf(list(remote), spec.file, spec.repo)
            small, big = {}, {chosen: remote[chosen]}
            spec = spec.with_file(_file_label(chosen, list(remote), spec.file))
        else:
            small = {n: s for n, s in remote.items() if hub_cache.is_run_file(n) and not n.endswith(".safetensors")}
            big = {n: s for n, s in remote.items() if hub_cache.is_run_file(n) and n.endswith(".safetensors")}
            if "config.json" not in small:
                raise SpecError("no config.json and no .gguf files: not a model localsgl can run")
            if weights and not big:
                raise SpecError("no *.safetensors weights (only safetensors and GGUF models can be run)")
            if not weights:
                big = {}
    except SpecError as e:
        raise ModelNotFoundError(f"{spec}: {e}") from None

    fetched = 0
    if big and INDEX in small:  # first the index, which says which weight files there are
        fetched = _fetch(spec, commit, {INDEX: small[INDEX]}, snapshot, cache, PullTracker(str(spec), {}, Display()))
        big = _indexed_shards(snapshot, big)
    tracker = PullTracker(str(spec), {**small, **big}, display_for(progress))
    tracker.start()
    ok = False
    try:
        fetched += _fetch(spec, commit, small, snapshot, cache, tracker)
        if big and not spec.file:
            manifest.record_expected(snapshot, {**small, **big})
        fetched += _fetch(spec, commit, big, snapshot, cache, tracker)
        ok = True
    finally:
        tracker.finish(ok)
    if spec.revision != commit:
        hub_cache.write_ref(spec.repo, spec.revision or "main", commit, cache)
    manifest.clear_expected(snapshot)
    _drop_stale_partials(hub_cache.repo_folder(spec.repo, cache))
    path = snapshot / next(iter(big)) if spec.file else snapshot
    return PullResult(spec, str(spec), path, commit, fetched)


def _is_gguf_pull(spec: HubSpec, remote: dict) -> bool:
    if spec.file:
        return True
    has_safetensors = any(hub_cache.is_run_file(n) and n.endswith(".safetensors") for n in remote)
    return not has_safetensors and any(hub_cache.is_weights_gguf(n) for n in remote)


def _file_label(chosen: str, names: list[str], asked: str | None) -> str:
    """How the spec names the chosen file: as asked, else its quant when that picks it, else its name."""
    if asked:
        return asked.upper() if not asked.lower().endswith(".gguf") else asked
    quant = hub_cache.quant_of(chosen)
    try:
        if quant and hub_cache.choose_gguf(names, quant) == chosen:
            return quant
    except SpecError:
        pass
    return chosen


def _indexed_shards(snapshot: Path, weights: dict[str, int | None]) -> dict[str, int | None]:
    """The weight files to fetch: those the index names (a repo may also carry a
    consolidated copy of the same weights), else all of them."""
    try:
        shards = set(json.loads((snapshot / INDEX).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return weights
    named = {n: s for n, s in weights.items() if n in shards}
    return named or weights


def _fetch(spec: HubSpec, commit: str, files: dict[str, int | None], snapshot: Path, cache: Path,
           tracker: PullTracker) -> int:
    """hf_hub_download each file at ``commit``; the bytes fetched (files already there cost nothing)."""
    from huggingface_hub import hf_hub_download

    fetched = 0
    for name, size in files.items():
        existing = snapshot / name
        if existing.is_file() and (size is None or existing.stat().st_size == size):
            tracker.already_there(name, existing.stat().st_size)
            continue
        with _hub_errors(spec, name):
            path = hf_hub_download(spec.repo, name, revision=commit, cache_dir=str(cache), endpoint=endpoint(),
                                   tqdm_class=tracker.bar_class(name))
        got = Path(path).stat().st_size
        tracker.file_finished(name, got)
        fetched += got
    return fetched


def _drop_stale_partials(folder: Path) -> None:
    """Delete partial blobs (``*.incomplete``) that no download has written to for an hour:
    huggingface_hub names each attempt's file uniquely, so a killed pull's never comes back."""
    now = time.time()
    for p in (folder / "blobs").glob("*.incomplete"):
        try:
            if now - p.stat().st_mtime > STALE_PARTIAL_SECONDS:
                p.unlink()
        except OSError:
            pass


# ----------------------------------------------------------------------------- errors


def _network_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "ProxyError",
                         "ConnectionError", "OfflineModeIsEnabled", "RemoteProtocolError", "ReadError"})


@contextlib.contextmanager
def _hub_errors(spec: HubSpec, file: str | None = None):
    """Turns huggingface_hub's exceptions into a ModelNotFoundError that says what to do."""
    try:
        yield
    except ModelNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one message
        raise ModelNotFoundError(_message(e, spec, file)) from None


def _message(e: Exception, spec: HubSpec, file: str | None) -> str:
    from huggingface_hub import errors as hfe

    shown, repo = str(spec), spec.repo
    status = getattr(getattr(e, "response", None), "status_code", None)
    token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    if isinstance(e, hfe.GatedRepoError):
        how = "the token in use has not been granted access yet" if token else f"then {TOKEN_HELP}"
        return f"{repo} is a gated repo: accept its conditions at {endpoint()}/{repo} (logged in), {how}"
    if isinstance(e, hfe.RepositoryNotFoundError):
        if status == 401 and not token:
            return (f"{repo}: the hub refused access (401): the repo does not exist or is private; "
                    f"check the name, and for a private or gated repo {TOKEN_HELP}")
        return f"{repo}: no such repo on the hub ({endpoint()}), or your token cannot see it; check the name"
    if isinstance(e, hfe.RevisionNotFoundError):
        return f"{repo}: no revision {spec.revision!r} (a branch, tag or commit of the repo)"
    entry = getattr(hfe, "RemoteEntryNotFoundError", None) or getattr(hfe, "EntryNotFoundError")
    if isinstance(e, entry):
        return f"{shown}: the hub has no file {file!r} at this revision"
    if isinstance(e, hfe.HfHubHTTPError) and status in (401, 403):
        if status == 401 and token:
            return f"{shown}: the hub rejected the token in HF_TOKEN (401); {TOKEN_HELP}"
        return f"{shown}: access denied ({status}); {TOKEN_HELP}"
    if _network_error(e) or isinstance(e, getattr(hfe, "LocalEntryNotFoundError", ())):
        return (f"{shown}: cannot reach the hub at {endpoint()} ({_first_line(e)}); check the network, "
                "or set HF_HUB_OFFLINE=1 to run only models already in the cache")
    if isinstance(e, hfe.HfHubHTTPError):
        return f"{shown}: the hub answered an error: {_first_line(e)}"
    return f"{shown}: download failed: {type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
