"""A local stand-in for the Hugging Face hub: just the requests huggingface_hub's downloads make.

  GET  /api/models/{repo}[/revision/{rev}]    model info: sha (the commit) and siblings
                                              (rfilename, size) — `?blobs=true` or not
  HEAD /{repo}/resolve/{rev}/{file}           X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{file}           the bytes; `Range: bytes=N-` answers 206

Errors carry the hub's X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo), which huggingface_hub turns into its exception types. Nothing advertises Xet
storage (no X-Xet-* headers, no xetHash), so downloads take the plain HTTP path.

Test knobs: ``gated_token`` repos answer 401 GatedRepo to file requests without that token,
``private_token`` repos 401 RepoNotFound to every request;
``drop_once`` files lose the connection half-way through their first GET; ``stall`` files
send half their bytes and then wait until ``release`` is set (for killing a client
mid-file); every request is logged in ``requests`` (method, path, headers by lower-case name).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

TINY_REPO = "org/tiny"  # the tiny safetensors model the tests serve (conftest.tiny_files)
GGUF_REPO = "org/tiny-GGUF"  # its GGUF repo (conftest.gguf_files)


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]  # commit -> {file name: content}
    refs: dict[str, str]  # branch / tag -> commit
    gated_token: str | None = None  # files need "Authorization: Bearer <token>"
    private_token: str | None = None  # everything needs it; without it the repo "does not exist" (401)


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)
    stall: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def add(self, repo: str, files: dict[str, bytes], commit: str | None = None, ref: str = "main",
            gated_token: str | None = None, private_token: str | None = None) -> str:
        """Add a commit holding ``files`` to ``repo`` and point ``ref`` at it; the commit id."""
        commit = commit or hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items()))
                                        .encode() + repo.encode() + ref.encode()).hexdigest()
        r = self.repos.setdefault(repo, Repo({}, {}))
        r.commits[commit] = dict(files)
        r.refs[ref] = commit
        if gated_token is not None:
            r.gated_token = gated_token
        if private_token is not None:
            r.private_token = private_token
        return commit

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def file_gets(self, name: str) -> list[dict]:
        return [h for m, p, h in self.requests if m == "GET" and "/resolve/" in p and p.endswith("/" + name)]


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>.+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # -- helpers ----------------------------------------------------------------
    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _commit(self, repo: Repo, rev: str | None) -> str | None:
        rev = unquote(rev or "main")
        if rev in repo.commits:
            return rev
        return repo.refs.get(rev)

    # -- verbs ------------------------------------------------------------------
    def do_GET(self):
        self._serve()

    def do_HEAD(self):
        self._serve()

    def _serve(self):
        path = urlparse(self.path).path
        self.hub.requests.append((self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        m = _INFO.match(path)
        if m and self.command == "GET":
            return self._model_info(m.group("repo"), m.group("rev"))
        m = _RESOLVE.match(path)
        if m:
            return self._resolve(m.group("repo"), m.group("rev"), unquote(m.group("file")))
        self._error(404, None, "not found")

    def _hidden(self, repo: Repo) -> bool:
        """A private repo asked for without its token: the hub answers 401 RepoNotFound."""
        if repo.private_token and self.headers.get("Authorization") != f"Bearer {repo.private_token}":
            self._error(401, "RepoNotFound", "Repository not found")
            return True
        return False

    def _model_info(self, name: str, rev: str | None):
        repo = self.hub.repos.get(name)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if self._hidden(repo):
            return
        commit = self._commit(repo, rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        files = repo.commits[commit]
        siblings = [{"rfilename": n, "size": len(b), "blobId": hashlib.sha1(b).hexdigest()} for n, b in sorted(files.items())]
        self._json({"id": name, "modelId": name, "sha": commit, "private": False,
                    "gated": "auto" if repo.gated_token else False, "siblings": siblings})

    def _resolve(self, name: str, rev: str, file: str):
        repo = self.hub.repos.get(name)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if self._hidden(repo):
            return
        commit = self._commit(repo, rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        if repo.gated_token and self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            return self._error(401, "GatedRepo", "Access to model is restricted and you are not in the authorized list")
        data = repo.commits[commit].get(file)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found", commit)
        etag = hashlib.sha256(data).hexdigest()
        start = 0
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if self.command == "HEAD":
            return
        half = len(body) // 2
        if file in self.hub.drop_once and not start:
            self.hub.drop_once.discard(file)
            self.wfile.write(body[:half])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the connection drops mid-file
            return
        if file in self.hub.stall:
            self.wfile.write(body[:half])
            self.wfile.flush()
            self.hub.stalled.set()
            self.hub.release.wait(60)
            self.close_connection = True
            return
        self.wfile.write(body)
