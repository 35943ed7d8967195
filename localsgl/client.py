"""`localsgl run` through a `localsgl serve` already running on this machine.

Like `ollama run` with its server: when a server of the same model answers on the
configured address, `run` sends its prompts there instead of loading a second copy of the
model. A probe (GET /v1/models, 0.2 s to connect) decides; anything unexpected — nothing
listening, another program, another model, a refused API key — means "no server", and
`run` loads the engine itself.

``RemoteEngine`` offers the part of Engine's interface that `run` uses (stream,
generate, encode_prompt, the tokenizer's chat_template, a context manager), so the CLI
prints, counts and reports exactly as it does in-process. It needs only the standard
library: with a server up, `run` answers without importing torch.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("localsgl.client")

PROBE_CONNECT_TIMEOUT = 0.2  # seconds: a server on this machine accepts at once
PROBE_READ_TIMEOUT = 2.0  # a busy server's event loop still answers /v1/models quickly
REQUEST_TIMEOUT = 3600.0  # a long generation on a slow machine
MAX_PARALLEL = 64  # concurrent requests of one --batch
_ANY_ADDRESS = {"", "0.0.0.0", "::", "[::]"}


class RemoteError(RuntimeError):
    """The server refused or failed a request."""

    def __init__(self, message: str, status: int | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


class RemoteRequestError(RemoteError, ValueError):
    """A request the server rejected as invalid (HTTP 400/404/413/422): a usage error."""


# ----------------------------------------------------------------------------- connection


@dataclass
class ServerInfo:
    """A running localsgl server and the model card it returned."""

    host: str
    port: int
    api_key: str | None
    card: dict

    @property
    def model_id(self) -> str:
        return str(self.card.get("id"))

    @property
    def details(self) -> dict:
        d = self.card.get("localsgl")
        return d if isinstance(d, dict) else {}

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def connection(self, timeout: float = REQUEST_TIMEOUT) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def headers(self, body: bool = False) -> dict[str, str]:
        h = {"Accept": "application/json, text/event-stream"}
        if body:
            h["Content-Type"] = "application/json"
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


def _connect_host(host: str) -> str:
    """Where to connect for a server bound to ``host`` (all interfaces: the loopback)."""
    return "127.0.0.1" if host.strip() in _ANY_ADDRESS else host.strip().strip("[]")


def probe(host: str, port: int, api_key: str | None = None,
          connect_timeout: float = PROBE_CONNECT_TIMEOUT, read_timeout: float = PROBE_READ_TIMEOUT) -> ServerInfo | None:
    """The localsgl server at host:port with its model card, or None (not one, not reachable)."""
    host = _connect_host(host)
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as e:
        log.info("no localsgl server at %s:%s (%s)", host, port, e.strerror or e)
        return None
    info = ServerInfo(host, port, api_key, {})
    conn = info.connection(read_timeout)
    conn.sock = sock
    sock.settimeout(read_timeout)
    try:
        conn.request("GET", "/v1/models", headers=info.headers())
        resp = conn.getresponse()
        raw = resp.read(1 << 20)
        status = resp.status
    except (OSError, http.client.HTTPException) as e:
        log.info("%s:%s did not answer like a localsgl server (%s)", host, port, e)
        return None
    finally:
        conn.close()
    if status != 200:
        why = "it needs an API key (set LOCALSGL_API_KEY)" if status == 401 else f"HTTP {status}"
        log.info("the server at %s:%s did not list its models: %s", host, port, why)
        return None
    try:
        cards = json.loads(raw)["data"]
        card = next(c for c in cards if isinstance(c, dict) and c.get("owned_by") == "localsgl")
    except (ValueError, KeyError, TypeError, StopIteration):
        log.info("%s:%s is not a localsgl server", host, port)
        return None
    info.card = card
    return info


def serves(card: dict, spec: str) -> bool:
    """Whether a server's model card names the model ``spec`` (an alias, a hub repo id, or a
    path to the same .gguf file / model directory)."""
    details = card.get("localsgl") if isinstance(card.get("localsgl"), dict) else {}
    names = {str(n).lower() for n in [card.get("id"), card.get("root"), *details.get("names", [])] if n}
    if spec.strip().lower() in names:
        return True
    served = details.get("path")
    local = Path(spec).expanduser()
    if not served or not local.exists():
        return False
    try:
        local, served = local.resolve(), Path(served).resolve()
    except OSError:
        return False
    if local == served:
        return True
    # a directory holding exactly the served .gguf file
    return local.is_dir() and served.parent == local and [p.resolve() for p in local.glob("*.gguf")] == [served]


def find_server(spec: str, host: str, port: int, api_key: str | None) -> ServerInfo | None:
    """The running server of model ``spec`` at host:port, or None."""
    t0 = time.perf_counter()
    info = probe(host, port, api_key)
    if info is None:
        return None
    if not serves(info.card, spec):
        log.info("the server at %s serves %s, not %s: running in-process", info.url, info.model_id, spec)
        return None
    log.info("using the localsgl server at %s (model %s; probe %.0f ms)", info.url, info.model_id,
             (time.perf_counter() - t0) * 1000)
    return info


# ----------------------------------------------------------------------------- requests


def _raise_for(status: int, raw: bytes) -> None:
    try:
        err = json.loads(raw).get("error") or {}
        message, param = str(err.get("message") or raw[:200]), err.get("param")
    except (ValueError, AttributeError):
        message, param = raw[:200].decode("utf-8", "replace").strip(), None
    message = f"server: {message}"
    if status in (400, 404, 413, 422):
        raise RemoteRequestError(message, status, param)
    raise RemoteError(f"{message} (HTTP {status})", status, param)


def _sse_events(resp) -> Iterator[dict]:
    """The JSON events of a server-sent-event stream, until [DONE]."""
    data: list[str] = []
    while True:
        line = resp.readline()
        if not line:
            raise RemoteError("the server closed the stream before it finished")
        line = line.decode("utf-8").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
            continue
        if line or not data:
            continue  # comments, other fields, blank keep-alives
        payload = "\n".join(data)
        data = []
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if "error" in event:
            err = event["error"] or {}
            raise RemoteError(f"server: {err.get('message', 'error')}")
        yield event


@dataclass
class RemoteMetrics:
    """What `run --stats` reads, from the server's usage and the client's clock."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float | None = None
    total_time: float | None = None

    @classmethod
    def from_usage(cls, usage: dict | None, ttft: float | None, total: float) -> "RemoteMetrics":
        usage = usage or {}
        details = usage.get("prompt_tokens_details") or {}
        return cls(int(usage.get("prompt_tokens") or 0), int(details.get("cached_tokens") or 0),
                   int(usage.get("completion_tokens") or 0), ttft, total)


@dataclass
class RemoteDelta:
    """StreamDelta's fields that `run` reads."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    metrics: RemoteMetrics | None = None


@dataclass
class RemoteOutput:
    """GenerateOutput's fields that `run --batch` reads."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    metrics: RemoteMetrics


class _Template:
    """Stands in for the tokenizer: `run` asks only whether the model has a chat template."""

    def __init__(self, has_template: bool):
        self.chat_template = "(the server's)" if has_template else None


def request_fields(params) -> dict[str, Any]:
    """SamplingParams -> OpenAI request fields: every value the caller set. Fields left to
    the model's defaults are omitted (the server fills them from the same defaults), except
    max_tokens, whose HTTP default (the whole context) differs from the engine's."""
    try:
        from .engine.params import is_unset
    except ImportError:  # no model-default placeholders in this build: every value is set
        def is_unset(value) -> bool:
            return False

    body: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        v = getattr(params, name)
        if not is_unset(v):
            body[name] = v
    for name, neutral in (("min_tokens", 0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0),
                          ("seed", None), ("ignore_eos", False), ("regex", None), ("grammar", None),
                          ("skip_special_tokens", True), ("json_whitespace", "compact")):
        v = getattr(params, name)
        if v != neutral:
            body[name] = v
    if params.stop:
        body["stop"] = list(params.stop)
    if params.stop_token_ids:
        body["stop_token_ids"] = list(params.stop_token_ids)
    if params.json_schema is not None:
        schema = params.json_schema
        if isinstance(schema, str):
            schema = json.loads(schema)
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    if params.n != 1:
        body["n"] = params.n
    if params.max_tokens is not None and not is_unset(params.max_tokens):
        body["max_tokens"] = int(params.max_tokens)
    return body


class RemoteEngine:
    """The Engine interface `run` uses, answered by a running server."""

    def __init__(self, server: ServerInfo):
        self.server = server
        self.model_name = server.model_id
        self.tokenizer = _Template(bool(server.details.get("chat_template", True)))
        self.max_model_len = None  # the server checks prompt lengths

    def __enter__(self) -> "RemoteEngine":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def encode_prompt(self, prompt):
        return prompt  # tokenized by the server

    def _body(self, prompt, params, stream: bool) -> tuple[str, dict]:
        body = {"model": self.server.model_id, **request_fields(params), "stream": stream}
        if "max_tokens" not in body:
            default = self.server.details.get("max_tokens")
            if isinstance(default, int) and default > 0:
                body["max_tokens"] = default
        if stream:
            body["stream_options"] = {"include_usage": True}
        if isinstance(prompt, str):
            return "/v1/completions", {**body, "prompt": prompt}
        return "/v1/chat/completions", {**body, "messages": prompt}

    def _post(self, conn, path: str, body: dict):
        conn.request("POST", path, body=json.dumps(body).encode(), headers=self.server.headers(body=True))
        resp = conn.getresponse()
        if resp.status != 200:
            _raise_for(resp.status, resp.read())
        return resp

    def stream(self, prompt, params) -> Iterator[RemoteDelta]:
        """Text deltas as the server streams them; the last carries finish_reason and metrics.
        Closing the iterator closes the connection, which aborts the request on the server."""
        path, body = self._body(prompt, params, stream=True)
        conn = self.server.connection()
        t0 = time.perf_counter()
        ttft = None
        finish = None
        try:
            resp = self._post(conn, path, body)
            usage = None
            for event in _sse_events(resp):
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content") or ""
                    if text and ttft is None:
                        ttft = time.perf_counter() - t0
                    if choice.get("finish_reason") is not None:
                        finish = choice["finish_reason"]
                    if text:
                        yield RemoteDelta(text=text)
            yield RemoteDelta(finish_reason=finish,
                              metrics=RemoteMetrics.from_usage(usage, ttft, time.perf_counter() - t0))
        except (OSError, http.client.HTTPException) as e:
            raise RemoteError(f"lost the connection to the server at {self.server.url}: {e}") from None
        finally:
            conn.close()

    def _complete(self, prompt, params) -> RemoteOutput:
        path, body = self._body(prompt, params, stream=False)
        conn = self.server.connection()
        t0 = time.perf_counter()
        try:
            raw = self._post(conn, path, body).read()
        except (OSError, http.client.HTTPException) as e:
            raise RemoteError(f"lost the connection to the server at {self.server.url}: {e}") from None
        finally:
            conn.close()
        total = time.perf_counter() - t0
        out = json.loads(raw)
        choice = out["choices"][0]
        text = choice.get("text")
        if text is None:
            text = (choice.get("message") or {}).get("content") or ""
        return RemoteOutput(text, [], choice.get("finish_reason"), RemoteMetrics.from_usage(out.get("usage"), None, total))

    def generate(self, prompts, params):
        """A list of prompts -> outputs in input order, sent concurrently."""
        if not isinstance(prompts, list) or not prompts or isinstance(prompts[0], dict):
            return self._complete(prompts, params)
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(prompts)), thread_name_prefix="localsgl-run") as pool:
            futures = [pool.submit(self._complete, p, params) for p in prompts]
            return [f.result() for f in futures]


def server_address(settings: dict) -> tuple[str, int, str | None]:
    """host, port and API key of the server `run` looks for: [server] settings, the
    LOCALSGL_HOST/PORT/API_KEY variables, else serve's defaults."""
    host = settings.get("host") or "127.0.0.1"
    port = int(settings.get("port") or 8000)
    return host, port, settings.get("api_key") or os.environ.get("LOCALSGL_API_KEY") or None
