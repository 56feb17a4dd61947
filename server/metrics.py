"""Prometheus metrics (prometheus-client), one registry per app so several apps in a process never clash."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tasks = Counter("k5serve_image_tasks", "imageInference tasks finished, by outcome",
                             ["outcome"], registry=self.registry)
        self.generation_seconds = Histogram(
            "k5serve_generation_seconds", "Accelerator time per imageInference task (queue wait excluded)",
            buckets=(0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300), registry=self.registry)
        self.passes = Counter(
            "k5serve_transformer_passes", "Transformer passes per CFG branch, computed or reused from the step "
            "cache; cache is none when the task asked for no step caching",
            ["cache", "branch", "outcome"], registry=self.registry)

    def task_done(self, seconds: float, cache_stats: dict | None) -> None:
        self.tasks.labels("success").inc()
        self.generation_seconds.observe(seconds)
        if cache_stats:
            method = cache_stats.get("method") or "none"
            for branch, counts in cache_stats.get("branches", {}).items():
                self.passes.labels(method, branch, "computed").inc(counts["computed"])
                self.passes.labels(method, branch, "skipped").inc(counts["skipped"])

    def task_failed(self) -> None:
        self.tasks.labels("error").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
