"""Prometheus metrics of one server (its own registry, so several apps can live in one
process, as tests do).

Engine-side numbers (queue lengths, KV pool, prefix cache, token totals) are read from
``engine.stats()`` at scrape time by a custom collector; request latencies are measured
here, as the client sees them: TTFT from request arrival to the first token, ITL between
successive tokens of a choice, e2e from arrival to the last byte of the answer.
"""
from __future__ import annotations

import bisect
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("localsgl.server")

PREFIX = "localsgl"

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


def observe_times(hist, amount: float, times: int) -> None:
    """``hist.observe(amount)`` ``times`` times, as one update of its sum and one bucket (a
    chunk of k tokens is k inter-token gaps; the stream path runs this per chunk).  Falls back
    to the loop where prometheus_client's histogram child lacks the fields it updates."""
    buckets = getattr(hist, "_buckets", None)
    bounds = getattr(hist, "_upper_bounds", None)
    total = getattr(hist, "_sum", None)
    if buckets is None or bounds is None or total is None or len(buckets) != len(bounds):
        for _ in range(times):
            hist.observe(amount)
        return
    total.inc(amount * times)
    buckets[bisect.bisect_left(bounds, amount)].inc(times)


class _EngineCollector(Collector):
    def __init__(self, engine, model: str):
        self.engine = engine
        self.model = model

    def collect(self):
        try:
            s = self.engine.stats()
        except Exception:  # a scrape must never fail because the engine is busy or gone
            log.debug("engine.stats() failed during scrape", exc_info=True)
            return
        labels = ["model"]
        vals = [self.model]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            g.add_metric(vals, float(value))
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            c.add_metric(vals, float(value))
            return c

        total = s.get("kv_slots_total", 0) or 0
        used = s.get("kv_slots_used", 0) or 0
        q = s.get("cache_query_tokens", 0) or 0
        hit = s.get("cache_hit_tokens", 0) or 0
        yield gauge("num_requests_running", "Requests in the running batch", s.get("running", 0))
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled", s.get("waiting", 0))
        yield gauge("kv_slots_total", "KV pool size in tokens", total)
        yield gauge("kv_slots_used", "KV slots in use (running requests + radix cache)", used)
        yield gauge("kv_slots_locked", "KV slots held by running requests (not evictable)",
                    s.get("kv_slots_locked", 0))
        if "kv_slots_cached" in s:
            yield gauge("kv_slots_cached", "KV slots held by the radix cache", s["kv_slots_cached"])
        yield gauge("kv_usage_ratio", "Fraction of the KV pool in use", used / total if total else 0.0)
        yield gauge("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up",
                    hit / q if q else 0.0)
        yield counter("prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", hit)
        yield counter("prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache", q)
        yield counter("prompt_tokens", "Prompt tokens processed", s.get("prompt_tokens_total", 0))
        yield counter("generation_tokens", "Tokens generated", s.get("generation_tokens_total", 0))
        yield counter("retractions", "Decodes retracted for lack of KV memory", s.get("retractions_total", 0))


class ServerMetrics:
    def __init__(self, engine, model: str):
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from request arrival to first token",
                              ["model"], buckets=_TTFT_BUCKETS, registry=r).labels(model)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between successive tokens of a choice",
                             ["model"], buckets=_ITL_BUCKETS, registry=r).labels(model)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Time from request arrival to its end",
                             ["model"], buckets=_E2E_BUCKETS, registry=r).labels(model)
        self.requests = Counter(f"{PREFIX}_requests", "Finished generation requests by endpoint and outcome",
                                ["model", "endpoint", "finish_reason"], registry=r)
        self.http_errors = Counter(f"{PREFIX}_http_errors", "Requests answered with an error status",
                                   ["model", "status"], registry=r)
        self.inflight = Gauge(f"{PREFIX}_http_requests_inflight", "Generation requests being served",
                              ["model"], registry=r).labels(model)
        self.pending = Gauge(f"{PREFIX}_http_requests_pending", "Generation requests not yet given a first token "
                             "(what --max-queue bounds)", ["model"], registry=r).labels(model)
        self.rejected = Counter(f"{PREFIX}_requests_rejected_overload", "Requests refused with 503 (queue full)",
                                ["model"], registry=r).labels(model)
        self.client_disconnects = Counter(f"{PREFIX}_client_disconnects", "Requests aborted because the client left",
                                          ["model"], registry=r).labels(model)
        r.register(_EngineCollector(engine, model))

    def finished(self, endpoint: str, finish_reason: str | None) -> None:
        self.requests.labels(self.model, endpoint, finish_reason or "none").inc()

    def error(self, status: int) -> None:
        self.http_errors.labels(self.model, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
