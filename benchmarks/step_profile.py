"""Per-step time breakdown of the engine: scheduling, metadata, attention, base GEMMs, LoRA, the rest
of the forward, sampling and engine bookkeeping.

Nothing is installed on the normal path: ``StepProfiler(engine)`` wraps the engine's backend (a
delegating ``ProfilingBackend``), adds forward hooks to the model and its LoRA-aware linears, and
shadows ``engine.step`` / ``scheduler.schedule`` / ``runner.run`` with timing wrappers, all removed
by ``close()``. On CUDA the device-side spans are timed with CUDA events (read once per step after
the step's own synchronisation); on the CPU with ``perf_counter``. The profiled run is slower than a
plain one (one event pair per call); the report gives its step time next to the breakdown.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from common import StepComposition, patch

if TYPE_CHECKING:
    from mcl_runtime.engine.llm_engine import Engine
    from mcl_runtime.engine.scheduler import ScheduledBatch
    from mcl_runtime.model.backends import AttentionMeta, Backend, LoRAMeta

CATEGORIES = ("scheduling", "metadata", "attention", "base_gemm", "lora", "other_forward", "sampling", "engine_other")


class Clock:
    """Marks on the device timeline (CUDA events) or the host clock (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> float | torch.cuda.Event:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


class ProfilingBackend:
    """Delegates to the engine's backend and times its calls: KV store + attention, and LoRA."""

    def __init__(self, inner: Backend, profiler: StepProfiler) -> None:
        self.inner, self.prof, self.name = inner, profiler, inner.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prepare(self, attn: AttentionMeta, lora: LoRAMeta | None) -> None:
        self.inner.prepare(attn, lora)

    def store_kv(self, *args) -> None:
        with self.prof.span("attention"):
            self.inner.store_kv(*args)

    def attention(self, *args) -> torch.Tensor:
        with self.prof.span("attention"):
            return self.inner.attention(*args)

    def apply_lora(self, *args) -> None:
        with self.prof.span("lora"):
            self.inner.apply_lora(*args)


class StepProfiler:
    """Collects one breakdown (seconds per category) per engine step until ``close()``."""

    def __init__(self, engine: Engine) -> None:
        from mcl_runtime.model.layers import LinearWithLoRA

        self.clock = Clock(engine.device)
        self.steps: list[dict] = []
        self._spans: list[tuple[str, object, object]] = []
        self._host: dict[str, float] = defaultdict(float)
        self._comp = StepComposition(engine)
        runner = engine.runner
        self._step, self._schedule, self._run = engine.step, engine.scheduler.schedule, runner.run
        self._undo = [
            patch(engine, "step", self._timed_step),
            patch(engine.scheduler, "schedule", self._timed_schedule),
            patch(runner, "run", self._timed_run),
            patch(runner, "backend", ProfilingBackend(runner.backend, self)),
        ]
        self._hooks = [
            engine.model.register_forward_pre_hook(lambda m, a: self._open("forward")),
            engine.model.register_forward_hook(lambda m, a, o: self._close("forward")),
        ]
        for module in engine.model.modules():
            if isinstance(module, LinearWithLoRA):
                self._hooks += [
                    module.register_forward_pre_hook(lambda m, a: self._open("linear")),
                    module.register_forward_hook(lambda m, a, o: self._close("linear")),
                ]
        self._open_marks: dict[str, object] = {}

    # spans on the device timeline
    def _open(self, name: str) -> None:
        self._open_marks[name] = self.clock.mark()

    def _close(self, name: str) -> None:
        self._spans.append((name, self._open_marks.pop(name), self.clock.mark()))

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = self.clock.mark()
        yield
        self._spans.append((name, start, self.clock.mark()))

    # wrappers
    def _timed_schedule(self) -> ScheduledBatch:
        t0 = time.perf_counter()
        batch = self._schedule()
        self._host["scheduling"] += time.perf_counter() - t0
        return batch

    def _timed_run(self, batch: ScheduledBatch, *args: Any) -> Any:
        with self.span("run"):
            return self._run(batch, *args)

    def _timed_step(self, *args: Any, **kwargs: Any) -> list:
        t0 = time.perf_counter()
        outs = self._step(*args, **kwargs)
        total = time.perf_counter() - t0
        if self._spans:
            self._finish_step(total)
        self._spans.clear()
        self._host.clear()
        return outs

    def _finish_step(self, total: float) -> None:
        if self.clock.cuda:
            torch.cuda.synchronize()
        sums: dict[str, float] = defaultdict(float)
        marks: dict[str, tuple] = {}
        for name, start, end in self._spans:
            sums[name] += self.clock.seconds(start, end)
            marks.setdefault(name, (start, end))
        run_start, run_end = marks["run"]
        fwd_start, fwd_end = marks["forward"]
        prefill, decode = self._comp.last
        self.steps.append(
            {
                "total": total,
                "prefill_tokens": prefill,
                "decode_tokens": decode,
                "scheduling": self._host["scheduling"],
                "metadata": self.clock.seconds(run_start, fwd_start),
                "attention": sums["attention"],
                "lora": sums["lora"],
                "base_gemm": sums["linear"] - sums["lora"],
                "other_forward": sums["forward"] - sums["linear"] - sums["attention"],
                "sampling": self.clock.seconds(fwd_end, run_end),
                "engine_other": total - sums["run"] - self._host["scheduling"],
            }
        )

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._comp.close()
        for h in self._hooks:
            h.remove()

    def summary(self, kind: str = "decode") -> dict | None:
        """Mean seconds per category over the decode-only (or prefill-carrying) steps."""
        steps = [s for s in self.steps if (s["prefill_tokens"] == 0) == (kind == "decode")]
        if not steps:
            return None
        out = {c: statistics.fmean(s[c] for s in steps) for c in CATEGORIES + ("total",)}
        out["num_steps"] = len(steps)
        out["tokens_per_step"] = statistics.fmean(s["prefill_tokens"] + s["decode_tokens"] for s in steps)
        return out


def format_breakdown(summary: dict) -> str:
    total = summary["total"]
    parts = [f"{c} {1e3 * summary[c]:.2f} ms ({100 * summary[c] / total:.0f}%)" for c in CATEGORIES]
    return f"step {1e3 * total:.2f} ms = " + ", ".join(parts)
