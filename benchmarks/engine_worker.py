"""One engine in its own process for ``bench_vs_vllm.py``: load, one warm-up, then the timed scenarios.

    python benchmarks/engine_worker.py SPEC.json OUT.json

Runs under our environment (``"engine": "ours"``) or under vLLM's virtualenv (``"engine": "vllm"``), so it
imports nothing but the standard library at module level. SPEC names the model folder, the adapters, the
dtype (``auto``: the engine's own choice, reported), the torch threads, the KV budget (bytes, or null for
the engine's default), the warm-up workload and the scenarios (each: prompts as token ids, max_tokens,
adapter per request or null). Every request is submitted at once, greedy, EOS ignored. OUT gets, per
scenario, the wall time, the output tokens and each request's token ids, plus what the engine says of its KV
cache. With ``"profile_dir"`` in SPEC each scenario runs under a profiler (ours: the step profiler and
torch.profiler; vLLM: its own torch profiler), whose tables go to that folder (``profile_cpu.py``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

Run = Callable[[dict], list[list[int]]]


def ours(spec: dict) -> tuple[Run, dict]:
    import torch

    from mcl_runtime import Engine, SamplingParams

    torch.set_num_threads(spec["threads"])
    options = {"kv_cache_memory": spec["kv_cache_memory"]} if spec["kv_cache_memory"] is not None else {}
    engine = Engine(
        spec["model"],
        adapters=spec["adapters"],
        device=spec["device"],
        dtype=spec["dtype"],
        **options,
        **spec["ours_options"],
    )

    def run(wl: dict) -> list[list[int]]:
        params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in wl["max_tokens"]]
        outs = engine.generate(wl["prompts"], params, adapter=wl["adapters"])
        return [list(o.token_ids) for o in outs]

    def run_profiled(wl: dict, out_dir: Path, name: str) -> list[list[int]]:
        """``run`` stepping by hand under the step profiler (time per category, decode and prefill steps
        apart) and torch.profiler (time per op and input shapes); both go to ``out_dir``."""
        from step_profile import StepProfiler
        from torch.profiler import ProfilerActivity, profile

        steps = StepProfiler(engine)
        ids = [
            engine.add_request(None, p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True), a)
            for p, m, a in zip(wl["prompts"], wl["max_tokens"], wl["adapters"])
        ]
        done: dict[str, list[int]] = {}
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            while engine.has_unfinished_requests():
                done.update({o.request_id: list(o.token_ids) for o in engine.step() if o.finished})
        steps.close()
        write_profile(prof, out_dir / f"ours_{name}")
        summary = {kind: steps.summary(kind) for kind in ("decode", "prefill")}
        (out_dir / f"ours_{name}_steps.json").write_text(json.dumps(summary, indent=2))
        return [done[i] for i in ids]

    run.profiled = run_profiled

    info = {
        "version": _version("mcl_runtime"),
        "torch": torch.__version__,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "kv_cache_tokens": engine.block_manager.num_blocks * engine.block_size,
        "kv_cache_bytes": engine.kv_cache.numel() * engine.kv_cache.element_size(),
        "max_num_seqs": engine.scheduler.max_num_seqs,
        "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
    }
    return run, info


def vllm(spec: dict) -> tuple[Run, dict]:
    import torch
    import vllm as vllm_package
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    options = dict(spec["vllm_options"])
    if spec["kv_cache_memory"] is not None:
        options["kv_cache_memory_bytes"] = spec["kv_cache_memory"]
    if spec["adapters"]:
        options.update(enable_lora=True, max_loras=len(spec["adapters"]), max_lora_rank=spec["lora_rank"])
    if spec.get("profile_dir"):
        options["profiler_config"] = {
            "profiler": "torch",
            "torch_profiler_dir": spec["profile_dir"],
            "torch_profiler_with_stack": False,
            "torch_profiler_record_shapes": True,
            "torch_profiler_use_gzip": True,
        }
    llm = LLM(model=spec["model"], dtype=spec["dtype"], seed=0, **options)
    loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(spec["adapters"].items())}

    def run(wl: dict) -> list[list[int]]:
        params = [
            SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, detokenize=False) for m in wl["max_tokens"]
        ]
        prompts = [TokensPrompt(prompt_token_ids=p) for p in wl["prompts"]]
        lora = [loras[a] if a else None for a in wl["adapters"]] if loras else None
        outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def run_profiled(wl: dict, out_dir: Path, name: str) -> list[list[int]]:
        """``run`` under vLLM's torch profiler (its worker writes the op table; renamed after ``name``)."""
        llm.start_profile()
        tokens = run(wl)
        llm.stop_profile()
        for table in Path(out_dir).glob("*.profiler_out.txt"):
            table.rename(Path(out_dir) / f"vllm_{name}.txt")
        for trace in Path(out_dir).glob("rank*.pt.trace.json.gz"):
            trace.rename(Path(out_dir) / f"vllm_{name}.trace.json.gz")
        return tokens

    run.profiled = run_profiled
    cache = llm.llm_engine.vllm_config.cache_config
    info = {
        "version": vllm_package.__version__,
        "torch": torch.__version__,
        "dtype": str(llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch."),
        "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
        "block_size": cache.block_size,
        "max_num_seqs": llm.llm_engine.vllm_config.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens,
        "compilation_mode": str(llm.llm_engine.vllm_config.compilation_config.mode),
    }
    return run, info


def write_profile(prof, stem: Path) -> None:
    """torch.profiler's op table (self time, by op and input shapes) as text and JSON rows."""
    averages = prof.key_averages(group_by_input_shape=True)
    stem.with_suffix(".txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=80))
    rows = [
        {"op": e.key, "shapes": str(e.input_shapes), "self_us": e.self_cpu_time_total, "calls": e.count}
        for e in averages
    ]
    stem.with_suffix(".json").write_text(json.dumps(sorted(rows, key=lambda r: -r["self_us"])))


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    spec_path, out_path = map(Path, sys.argv[1:3])
    spec = json.loads(spec_path.read_text())
    t0 = time.perf_counter()
    run, info = {"ours": ours, "vllm": vllm}[spec["engine"]](spec)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(spec["warmup"])
    result = {
        "engine": spec["engine"],
        "python": platform.python_version(),
        "pid": os.getpid(),
        "info": info,
        "load_s": load_s,
        "warmup_s": time.perf_counter() - t0,
        "scenarios": {},
    }
    profile_dir = spec.get("profile_dir")
    for name, wl in spec["scenarios"].items():
        t0 = time.perf_counter()
        tokens = run.profiled(wl, Path(profile_dir), name) if profile_dir else run(wl)
        wall = time.perf_counter() - t0
        result["scenarios"][name] = {"wall_s": wall, "output_tokens": sum(map(len, tokens)), "tokens": tokens}
    result["self_peak_rss_mib"] = _rss_mib(resource.RUSAGE_SELF)
    result["children_peak_rss_mib"] = _rss_mib(resource.RUSAGE_CHILDREN)
    out_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
