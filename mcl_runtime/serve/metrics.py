"""Prometheus metrics of one server app, in a registry of its own (no global state).

Engine-side values (running/waiting requests, KV blocks, token totals, steps, batch sizes) come from
the engine's ``stats()`` dict handed to ``render``; request counts per model and time to first token are
recorded by the server as requests arrive and produce their first token.

Batching is shown by ``mcl_batch_size_max`` (most sequences in one engine step so far) and
``mcl_batch_size_mean`` (sequences per engine step on average).

Router-standard names: the gauges that the Gateway API Inference Extension's model-server protocol
(llm-d, KServe and vLLM's production stack route on it) reads from vLLM, with vLLM's names, labels and
meaning (as vLLM 0.32 defines them in ``vllm/v1/metrics/loggers.py``; ``model_name`` is the served
base model):

- ``vllm:num_requests_running``, ``vllm:num_requests_waiting``: sequences in the running batch / queued;
- ``vllm:kv_cache_usage_perc``: KV-cache blocks in use as a fraction (1 = full);
- ``vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}``: device adapter
  slots, and the comma-separated adapters with running / waiting requests; its value is the time of the
  scrape (Unix seconds), which the protocol uses to pick the newest sample.

``merge_replicas`` makes one exposition of several replicas' (the Ray Serve application's ``/metrics``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
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


VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"
VLLM_LORA_INFO = "vllm:lora_requests_info"
_ROUTER_DOCS = {
    VLLM_RUNNING: "Number of requests in model execution batches.",
    VLLM_WAITING: "Number of requests waiting to be processed.",
    VLLM_KV_USAGE: "KV-cache usage. 1 means 100 percent usage.",
    VLLM_LORA_INFO: "Running stats on lora requests.",
}


class _EngineCollector(Collector):
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        for key, (name, kind, doc) in _ENGINE_METRICS.items():
            if isinstance(stats.get(key), (int, float)):
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, doc, value=stats[key])
        yield from _derived(stats)
        yield from _extra(stats)
        yield from _router_standard(stats, self.model_name)


def _gauge(name: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, _ROUTER_DOCS[name], labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _router_standard(stats: dict[str, Any], model_name: str) -> Iterator[Metric]:
    """The vLLM gauges a Kubernetes LLM router reads (see the module docstring)."""
    labels = {"model_name": model_name}
    total, free = stats.get("kv_blocks_total"), stats.get("kv_blocks_free")
    if isinstance(stats.get("num_running"), int) and isinstance(stats.get("num_waiting"), int):
        yield _gauge(VLLM_RUNNING, labels, stats["num_running"])
        yield _gauge(VLLM_WAITING, labels, stats["num_waiting"])
    if isinstance(total, int) and isinstance(free, int):
        yield _gauge(VLLM_KV_USAGE, labels, (total - free) / total if total else 0.0)
    if isinstance(stats.get("max_loras"), int):
        info = {
            "max_lora": str(stats["max_loras"]),
            "running_lora_adapters": ",".join(sorted(stats.get("lora_running", {}))),
            "waiting_lora_adapters": ",".join(sorted(stats.get("lora_waiting", {}))),
        }
        yield _gauge(VLLM_LORA_INFO, info, time.time())


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

    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._engine = _EngineCollector(model_name)
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


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_replicas(expositions: dict[str, str]) -> bytes:
    """One Prometheus exposition of several replicas' (replica id -> its ``/metrics`` text).

    Every ``mcl_*`` sample is kept per replica, with a ``replica`` label. The router-standard ``vllm:``
    gauges describe the whole application, one sample each: running and waiting requests are summed;
    KV-cache usage is the pooled fraction (blocks used over blocks, all replicas together, which is
    the mean when the pools are equal); ``vllm:lora_requests_info`` has the union of the running and
    of the waiting adapters, the largest ``max_lora``, and the newest time.
    """
    families: dict[str, Metric] = {}
    sums = {VLLM_RUNNING: 0.0, VLLM_WAITING: 0.0, "used": 0.0, "total": 0.0}
    lora: dict[str, Any] = {"max_lora": None, "running": set(), "waiting": set(), "time": 0.0}
    model_names: set[str] = set()
    for replica, text in sorted(expositions.items()):
        for family in text_string_to_metric_families(text):
            if family.name.startswith("vllm:"):
                _accumulate(family, sums, lora, model_names)
                continue
            if family.name in ("mcl_kv_blocks_used", "mcl_kv_blocks_total"):
                key = "used" if family.name.endswith("used") else "total"
                sums[key] += sum(sample.value for sample in family.samples)
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value, sample.timestamp)
    labels = {"model_name": ",".join(sorted(model_names))}
    aggregate = [_gauge(VLLM_RUNNING, labels, sums[VLLM_RUNNING]), _gauge(VLLM_WAITING, labels, sums[VLLM_WAITING])]
    aggregate.append(_gauge(VLLM_KV_USAGE, labels, sums["used"] / sums["total"] if sums["total"] else 0.0))
    if lora["max_lora"] is not None:
        info = {
            "max_lora": str(lora["max_lora"]),
            "running_lora_adapters": ",".join(sorted(lora["running"])),
            "waiting_lora_adapters": ",".join(sorted(lora["waiting"])),
        }
        aggregate.append(_gauge(VLLM_LORA_INFO, info, lora["time"]))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), *aggregate]))
    return generate_latest(registry)


def _accumulate(family: Metric, sums: dict[str, float], lora: dict[str, Any], model_names: set[str]) -> None:
    for sample in family.samples:
        if "model_name" in sample.labels:
            model_names.add(sample.labels["model_name"])
        if family.name in (VLLM_RUNNING, VLLM_WAITING):
            sums[family.name] += sample.value
        elif family.name == VLLM_LORA_INFO:
            max_lora = int(sample.labels.get("max_lora") or 0)
            lora["max_lora"] = max(max_lora, lora["max_lora"] or 0)
            for key, label in (("running", "running_lora_adapters"), ("waiting", "waiting_lora_adapters")):
                lora[key].update(a for a in sample.labels.get(label, "").split(",") if a)
            lora["time"] = max(lora["time"], sample.value)
