"""Prometheus metrics of one server app, in a registry of its own (no global state).

Engine-side values (running/waiting requests, KV blocks, token totals, steps, batch sizes) come from
the engine's ``stats()`` dict handed to ``render``; request counts per model and time to first token are
recorded by the server as requests arrive and produce their first token.

Batching is shown by ``mcl_batch_size_max`` (most sequences in one engine step so far) and
``mcl_batch_size_mean`` (sequences per engine step on average).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# stats() key -> (metric name, kind, help); kind "counter" exposes name + "_total".
_ENGINE_METRICS: dict[str, tuple[str, str, str]] = {
    "num_running": ("mcl_num_requests_running", "gauge", "Requests being processed by the engine."),
    "num_waiting": ("mcl_num_requests_waiting", "gauge", "Requests waiting to be scheduled."),
    "kv_blocks_total": ("mcl_kv_blocks_total", "gauge", "KV-cache blocks in the pool."),
    "kv_blocks_free": ("mcl_kv_blocks_free", "gauge", "KV-cache blocks free."),
    "kv_blocks_used": ("mcl_kv_blocks_used", "gauge", "KV-cache blocks in use."),
    "prompt_tokens_total": ("mcl_prompt_tokens", "counter", "Prompt tokens processed."),
    "generation_tokens_total": ("mcl_generation_tokens", "counter", "Tokens generated."),
    "steps": ("mcl_engine_steps", "counter", "Engine steps run."),
    "requests_total": ("mcl_engine_requests", "counter", "Requests the engine accepted."),
    "batched_tokens_total": ("mcl_batched_tokens", "counter", "Tokens run through the model, over all steps."),
    "max_batch_size_seen": ("mcl_batch_size_max", "gauge", "Most requests batched in one engine step."),
}


class _EngineCollector(Collector):
    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        for key, (name, kind, doc) in _ENGINE_METRICS.items():
            if isinstance(stats.get(key), (int, float)):
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, doc, value=stats[key])
        yield from _derived(stats)
        yield from _extra(stats)


def _derived(stats: dict[str, Any]) -> Iterator[Metric]:
    total, free = stats.get("kv_blocks_total"), stats.get("kv_blocks_free")
    if isinstance(total, int) and isinstance(free, int):
        if "kv_blocks_used" not in stats:
            yield GaugeMetricFamily("mcl_kv_blocks_used", "KV-cache blocks in use.", value=total - free)
        yield GaugeMetricFamily(
            "mcl_kv_cache_usage_ratio",
            "Fraction of KV-cache blocks in use.",
            value=(total - free) / total if total else 0.0,
        )
    steps = stats.get("steps")
    # Sequences per step when the engine counts them, else generated tokens per step (one per decode).
    batched = stats.get("batched_seqs_total")
    if isinstance(steps, int) and isinstance(batched, int):
        yield GaugeMetricFamily(
            "mcl_batch_size_mean",
            "Mean number of sequences per engine step so far.",
            value=batched / steps if steps else 0.0,
        )


def _extra(stats: dict[str, Any]) -> Iterator[Metric]:
    """Other numeric stats the engine reports, as ``mcl_engine_<key>`` gauges."""
    for key, value in stats.items():
        if key in _ENGINE_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = "mcl_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
        yield GaugeMetricFamily(name, f"Engine statistic {key!r}.", value=value)


class ServerMetrics:
    """The metrics of one app; ``render()`` gives the Prometheus text exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._engine = _EngineCollector()
        self.registry.register(self._engine)
        self.requests = Counter(
            "mcl_requests", "Requests accepted, per model (base or adapter).", ["model"], registry=self.registry
        )
        self.finished = Counter(
            "mcl_requests_finished",
            "Requests finished, per model and reason.",
            ["model", "finish_reason"],
            registry=self.registry,
        )
        self.errors = Counter(
            "mcl_request_errors",
            "Requests answered with an error, per HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "mcl_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )

    def render(self, engine_stats: dict[str, Any]) -> bytes:
        self._engine.stats = engine_stats
        return generate_latest(self.registry)
