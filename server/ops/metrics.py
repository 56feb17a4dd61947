"""Prometheus metrics (prometheus-client), one registry per app so several apps in a process never clash.

Counters and histograms are updated where things happen (transports, dispatcher); what is a state rather
than an event (queue depth, readiness, accelerator memory, outbox deliveries, open WebSockets) is read at
scrape time by a collector, so it is never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

disable_created_metrics()  # no `_created` series: they double the output and nobody graphs them

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)


class Metrics:
    """`task_types` and `error_codes` are the closed sets that label values come from: anything else a client
    sends is counted as `other`, so no request can add series (or put a string it chose on /metrics)."""

    def __init__(self, task_types: Iterable[str] = (), error_codes: Iterable[str] = ()) -> None:
        self._task_types = frozenset(task_types)
        self._error_codes = frozenset(error_codes)
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("k5serve_http_requests", "HTTP requests by route and status code",
                                     ["route", "status"], registry=r)
        self.ws_frames = Counter("k5serve_websocket_frames", "WebSocket frames received", registry=r)
        self.ws_frames_dropped = Counter(
            "k5serve_websocket_frames_dropped", "Result frames kept for a disconnected WebSocket session and dropped "
            "before it came back: past the session's bound (session), past the bound over all sessions (total), "
            "or older than the resume window (expired)", ["reason"], registry=r)
        self.ws_connections_opened = Counter("k5serve_websocket_connections_opened", "WebSocket connections accepted",
                                             registry=r)
        self.tasks = Counter("k5serve_tasks", "Tasks answered, by taskType and outcome (success or the error code)",
                             ["type", "outcome"], registry=r)
        self.generations = Counter("k5serve_generations", "imageInference generations finished, by outcome and "
                                   "the worker that ran them (local, or a Ray Serve replica id; unknown when it "
                                   "failed before a worker took it)", ["outcome", "replica"], registry=r)
        self.queue_wait = Histogram("k5serve_queue_wait_seconds", "Time a generation waited for the worker",
                                    buckets=_SECONDS, registry=r)
        self.generation_seconds = Histogram(
            "k5serve_generation_seconds", "Worker time per imageInference task (queue wait excluded, safety check "
            "included), by the worker that ran it", ["replica"], buckets=_SECONDS, registry=r)
        self.step_seconds = Histogram("k5serve_step_seconds", "Seconds per denoising step",
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4), registry=r)
        self.images = Counter("k5serve_images", "Images produced", registry=r)
        self.nsfw = Counter("k5serve_images_flagged_nsfw", "Images the safety classifier flagged", registry=r)
        self.passes = Counter(
            "k5serve_transformer_passes", "Transformer passes per CFG branch, computed or reused from the step "
            "cache; cache is none when the task asked for no step caching",
            ["cache", "branch", "outcome"], registry=r)
        self.prompt_cache = Counter(
            "k5serve_prompt_cache", "Prompt encodings (positive and negative) taken from the prompt cache (hit) or "
            "computed by the text encoders (miss)", ["outcome"], registry=r)
        # Per tenant: the label's values are tenant names from the tenants file (or --api-key names), never a
        # request's words or a key.
        self.tenant_tasks = Counter("k5serve_tenant_tasks", "imageInference tasks finished, per tenant",
                                    ["tenant", "outcome"], registry=r)
        self.tenant_images = Counter("k5serve_tenant_images", "Images generated, per tenant", ["tenant"], registry=r)
        self.tenant_seconds = Counter("k5serve_tenant_generation_seconds", "Worker seconds, per tenant", ["tenant"],
                                      registry=r)
        self.tenant_cost = Counter("k5serve_tenant_cost_usd", "Cost at --price-per-gpu-hour, per tenant", ["tenant"],
                                   registry=r)
        self._state: Callable[[], dict[str, Any]] | None = None
        r.register(_StateCollector(self))

    def tenant_used(self, tenant: str, failed: bool, images: int, seconds: float, cost: float) -> None:
        self.tenant_tasks.labels(tenant, "error" if failed else "success").inc()
        if images:
            self.tenant_images.labels(tenant).inc(images)
        if seconds:
            self.tenant_seconds.labels(tenant).inc(seconds)
            self.tenant_cost.labels(tenant).inc(cost)

    def watch(self, state: Callable[[], dict[str, Any]]) -> None:
        """`state()` -> {"ready", "queue_depth", "queue_limit", "memory", "outbox", "websockets"}, read per scrape."""
        self._state = state

    def task_answered(self, task_type: Any, error_code: str | None) -> None:
        known_type = task_type if isinstance(task_type, str) and task_type in self._task_types else "other"
        outcome = "success" if error_code is None else error_code if error_code in self._error_codes else "other"
        self.tasks.labels(known_type, outcome).inc()

    def generation_done(self, output) -> None:
        replica = output.worker or "unknown"
        self.generations.labels("success", replica).inc()
        self.queue_wait.observe(output.queue_seconds)
        self.generation_seconds.labels(replica).observe(output.seconds)
        for seconds in output.step_seconds:
            self.step_seconds.observe(seconds)
        self.images.inc(len(output.images))
        if output.nsfw:
            self.nsfw.inc(sum(output.nsfw))
        prompts = output.prompt_cache or {}
        self.prompt_cache.labels("hit").inc(prompts.get("hits", 0))
        self.prompt_cache.labels("miss").inc(prompts.get("misses", 0))
        stats = output.cache_stats
        if stats:
            method = stats.get("method") or "none"
            for branch, counts in stats.get("branches", {}).items():
                self.passes.labels(method, branch, "computed").inc(counts["computed"])
                self.passes.labels(method, branch, "skipped").inc(counts["skipped"])

    def generation_failed(self, worker: str = "") -> None:
        self.generations.labels("error", worker or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        state = self.metrics._state() if self.metrics._state else {}
        yield GaugeMetricFamily("k5serve_ready", "1 when /ready answers 200", value=float(state.get("ready", 0)))
        yield GaugeMetricFamily("k5serve_queue_depth", "Generations queued or running",
                                value=float(state.get("queue_depth", 0)))
        yield GaugeMetricFamily("k5serve_queue_limit", "Generations accepted before 429s",
                                value=float(state.get("queue_limit") or 0))
        yield GaugeMetricFamily("k5serve_websocket_connections", "Open WebSocket connections",
                                value=float(state.get("websockets", 0)))
        memory = GaugeMetricFamily("k5serve_gpu_memory_bytes", "Accelerator memory (CUDA only)", labels=["kind"])
        for kind, value in (state.get("memory") or {}).items():
            memory.add_metric([kind], float(value))
        yield memory
        deliveries = CounterMetricFamily("k5serve_outbound_deliveries", "Webhook and upload delivery attempts by "
                                         "outcome (delivered, retried, failed = given up)", labels=["kind", "outcome"])
        for kind, counts in (state.get("outbox") or {}).items():
            for outcome, value in counts.items():
                deliveries.add_metric([kind, outcome], float(value))
        yield deliveries
        connections = CounterMetricFamily("k5serve_connections_closed", "Connections the server closed: a request "
                                          "head not complete within --header-timeout (slow_head), or over "
                                          "--max-connections (refused, answered 503)", labels=["reason"])
        for reason, value in (state.get("connections_closed") or {}).items():
            connections.add_metric([reason], float(value))
        yield connections
        disk = GaugeMetricFamily("k5serve_disk_free_bytes", "Free bytes on the disks of the data directory and "
                                 "a folder image store", labels=["folder"])
        for folder, value in (state.get("disk_free") or {}).items():
            disk.add_metric([folder], float(value))
        yield disk
        database = state.get("database")
        if database is not None:
            yield CounterMetricFamily("k5serve_database_errors", "Task database errors (failed queries, the server "
                                      "unreachable)", value=float(database["errors"]))
            pool = GaugeMetricFamily("k5serve_database_pool_connections", "Task database connection pool: open "
                                     "connections, idle ones, requests waiting for one", labels=["state"])
            for kind in ("size", "available", "waiting"):
                pool.add_metric([kind], float(database[kind]))
            yield pool
