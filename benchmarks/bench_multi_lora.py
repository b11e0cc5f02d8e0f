"""Throughput as the number of distinct adapters in the batch grows.

    python benchmarks/bench_multi_lora.py [--smoke] [--out-dir DIR]

Qwen2.5-7B-Instruct shapes (``--shape``: also Qwen2.5-Coder-7B-Instruct,
Qwen3-8B), random bf16 weights (``load_format="dummy"``), rank-32 PEFT adapters on all
seven projections (drawn on the device), ``--slots`` adapter slots (16): beyond that the engine evicts (LRU)
and a request
waits for a slot. One batch of ``--batch`` requests (prompts ``--prompt-len``, exactly ``--gen`` tokens,
greedy) submitted at once; prefix caching off and the same prompts in every run, so runs differ only
in their adapters. Adapters per request, for N in ``--adapters`` distinct adapters:
- uniform: request i uses adapter i mod N;
- zipf: adapters drawn with probability proportional to 1/k (seeded), so fewer may appear;
- identical: every request uses one adapter (this is N = 1 of every popularity, run once);
- none: no adapter at all, the reference for the LoRA overhead.
Reported: prefill tokens/s (steps carrying prefill), decode tokens/s (decode-only steps), end-to-end
output tokens/s, LoRA overhead vs none; a per-step time breakdown (step_profile.py) for a few runs;
transformers + peft on the same batch (peft mixed-adapter batches, ``adapter_names``) for
``--hf-adapters``. The ``--adapters`` names are backed by ``--adapter-files`` distinct weight files
(name i uses file i mod F; the engine loads each name separately, so slots, loads and compute are
those of N different adapters; only the values repeat; the engine keeps a host copy of each name).
Each run is preceded by the same batch with 2 generated tokens, untimed (its prefill and decode
shapes compile, and its adapters are in slots where they fit: slot loads are those of the steady
state); Triton compiles inside each timed run are counted in the JSON. Nothing starts after
``--max-seconds`` (the transformers model is not even loaded); skipped runs are listed.
vLLM/SGLang: availability recorded only.
--smoke: tiny shapes on the CPU, 4 slots (so 8 adapters evict); not results.
Writes benchmarks/results/multi_lora_<device>.json after every run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from common import (
    Workload,
    add_shape_option,
    base_parser,
    baseline_availability,
    device_slug,
    environment,
    make_workload,
    model_shape,
    parse_with_smoke,
    release_memory,
    resolve_device,
    run_workload,
    save_result,
    warmup_workload,
    write_model_folder,
    write_peft_adapter,
)
from step_profile import StepProfiler, format_breakdown

if TYPE_CHECKING:
    from mcl_runtime.engine.llm_engine import Engine

BLOCK_SIZE = 16


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__)
    add_shape_option(p)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(256, 512), metavar=("MIN", "MAX"))
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--slots", type=int, default=16, help="max_loras")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--adapter-files", type=int, default=4)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument(
        "--profile",
        nargs="*",
        default=["none", "uniform-4", "uniform-32"],
        help="runs repeated under the step profiler",
    )
    p.add_argument(
        "--hf-adapters",
        type=int,
        nargs="*",
        default=[1, 4],
        help="uniform N for the transformers+peft baseline (empty: skip it)",
    )
    p.add_argument("--max-seconds", type=float, default=140.0, help="skip what would start after this")
    return parse_with_smoke(
        p,
        dict(
            batch=8,
            prompt_len=(8, 16),
            gen=3,
            adapters=[1, 2, 8],
            slots=4,
            adapter_files=2,
            max_num_batched_tokens=256,
            profile=["uniform-8"],
            hf_adapters=[2],
        ),
    )


def assignments(kind: str, n: int, batch: int, seed: int = 0) -> list[str | None]:
    """Adapter name per request for a popularity kind over ``n`` adapters."""
    names = [f"lora{i:02d}" for i in range(n)]
    if kind == "none":
        return [None] * batch
    if kind == "identical":
        return [names[0]] * batch
    if kind == "uniform":
        return [names[i % n] for i in range(batch)]
    p = 1.0 / np.arange(1, n + 1)
    picks = np.random.default_rng(seed).choice(n, size=batch, p=p / p.sum())
    return [names[k] for k in picks]


def num_names(args: argparse.Namespace) -> int:
    """Adapter names to load: enough for every run, profiled run and baseline run."""
    profiled = [int(label.partition("-")[2] or 1) for label in args.profile]
    return max(args.adapters + profiled + list(args.hf_adapters))


def run_plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """none, identical (this is N = 1 for every popularity), then uniform and zipf for each N > 1."""
    plan = [("none", 0), ("identical", 1)]
    return plan + [(kind, n) for kind in ("uniform", "zipf") for n in args.adapters if n > 1]


def build_engine(
    model_dir: Path, adapters: dict[str, Path], wl: Workload, args: argparse.Namespace, device: torch.device
) -> Engine:
    from mcl_runtime import Engine

    return Engine(
        model=model_dir,
        adapters=adapters,
        device=str(device),
        dtype=args.dtype,
        backend=args.backend,
        max_loras=args.slots,
        max_lora_rank=args.rank,
        kv_cache_blocks=wl.kv_blocks(BLOCK_SIZE) + args.batch,
        block_size=BLOCK_SIZE,
        max_num_seqs=args.batch,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
        load_format="dummy",
    )


def engine_runs(engine: Engine, base: Workload, args: argparse.Namespace, deadline: float, out: dict) -> Iterator[None]:
    """Every run of the plan on the engine, then the profiled repeats."""
    for kind, n in run_plan(args):
        label = kind if n == 0 or kind == "identical" else f"{kind}-{n}"
        if time.perf_counter() > deadline:
            out["skipped"].append(f"{label}: over --max-seconds")
            continue
        wl = Workload(base.prompts, base.max_tokens, assignments(kind, max(n, 1), args.batch))
        run_workload(engine, warmup_workload(wl, 2))
        s = run_workload(engine, wl).summary()
        s.update(label=label, popularity=kind, num_adapters=n, distinct_in_batch=len({a for a in wl.adapters if a}))
        out["runs"].append(s)
        print(
            f"{label:12s} prefill {s['prefill_tok_s']:9.1f} tok/s  decode {s['decode_tok_s'] or 0:9.1f} tok/s  "
            f"e2e {s['output_tok_s']:8.1f} tok/s  slot loads {s['adapter_slot_loads']}  "
            f"compiles {s['jit_compiles_in_run']}",
            flush=True,
        )
        yield
    for label in args.profile:
        if time.perf_counter() > deadline:
            out["skipped"].append(f"profile {label}: over --max-seconds")
            continue
        kind, _, n = label.partition("-")
        wl = Workload(base.prompts, base.max_tokens, assignments(kind, int(n or 1), args.batch))
        prof = StepProfiler(engine)
        try:
            run_workload(engine, wl)
        finally:
            prof.close()
        out["breakdown"][label] = {"decode": prof.summary("decode"), "prefill": prof.summary("prefill")}
        if prof.summary("decode"):
            print(f"profile {label:12s} decode: {format_breakdown(prof.summary('decode'))}")
        yield


def add_overheads(runs: list[dict]) -> None:
    ref = next((r for r in runs if r["label"] == "none"), None)
    for r in runs:
        for key in ("prefill_tok_s", "decode_tok_s", "output_tok_s"):
            ok = ref and ref.get(key) and r.get(key)
            r[f"{key}_overhead_pct"] = 100 * (ref[key] / r[key] - 1) if ok else None


def hf_runs(
    model_dir: Path,
    files: list[Path],
    base: Workload,
    args: argparse.Namespace,
    device: torch.device,
    deadline: float,
    out: dict,
) -> Iterator[None]:
    """transformers + peft, whole batch per generate with per-row adapters."""
    from hf_baseline import generate_mixed, load_hf_peft

    if not args.hf_adapters:
        return
    if time.perf_counter() > deadline:
        out["skipped"].append("transformers+peft baseline: over --max-seconds (not loaded)")
        return
    names = [f"lora{i:02d}" for i in range(max(args.hf_adapters))]
    t0 = time.perf_counter()
    model = load_hf_peft(
        model_dir,
        {nm: files[i % len(files)] for i, nm in enumerate(names)},
        device,
        getattr(torch, args.dtype),
        random_weights=True,
    )
    out["hf_load_s"] = time.perf_counter() - t0
    generate_mixed(model, base.prompts, assignments("uniform", len(names), args.batch), 2, 0)  # warm-up
    for n in args.hf_adapters:
        if time.perf_counter() > deadline:
            out["skipped"].append(f"transformers+peft uniform-{n}: over --max-seconds")
            continue
        secs, _ = generate_mixed(model, base.prompts, assignments("uniform", n, args.batch), args.gen, 0)
        out["hf"].append(
            {"label": f"uniform-{n}", "num_adapters": n, "seconds": secs, "output_tok_s": args.batch * args.gen / secs}
        )
        print(f"transformers+peft uniform-{n}: {args.batch * args.gen / secs:.1f} tok/s end to end")
        yield


def main() -> None:
    args = parse_args()
    device = resolve_device(args)
    start = time.perf_counter()
    deadline = start + args.max_seconds
    out = {"runs": [], "breakdown": {}, "hf": [], "skipped": []}
    with tempfile.TemporaryDirectory(prefix="mcl_multilora_") as tmp:
        cfg = model_shape(args)
        model_dir = write_model_folder(Path(tmp) / "model", cfg)
        files = [
            write_peft_adapter(Path(tmp) / f"file{i}", cfg, args.rank, 2 * args.rank, seed=i, device=device)
            for i in range(args.adapter_files)
        ]
        names = {f"lora{i:02d}": files[i % len(files)] for i in range(num_names(args))}
        base = make_workload(args.batch, tuple(args.prompt_len), (args.gen, args.gen), [None], seed=0)
        t0 = time.perf_counter()
        engine = build_engine(model_dir, names, base, args, device)
        out["engine_build_s"] = time.perf_counter() - t0
        for _ in engine_runs(engine, base, args, deadline, out):
            add_overheads(out["runs"])
            save(args, device, out, complete=False)
        del engine
        release_memory()
        for _ in hf_runs(model_dir, files, base, args, device, deadline, out):
            save(args, device, out, complete=False)
    save(args, device, out, complete=True)


def save(args: argparse.Namespace, device: torch.device, out: dict, complete: bool) -> None:
    save_result(
        f"multi_lora_{device_slug(device)}",
        {
            "benchmark": "multi_lora",
            "env": environment(device),
            "complete": complete,
            "config": {
                "model": f"{args.shape} config" + (" (shrunk for smoke)" if args.smoke else ""),
                "weights": "random (load_format=dummy)",
                "dtype": args.dtype,
                "batch": args.batch,
                "prompt_len": list(args.prompt_len),
                "gen_tokens": args.gen,
                "rank": args.rank,
                "slots": args.slots,
                "adapters": args.adapters,
                "adapter_files": args.adapter_files,
                "max_num_batched_tokens": args.max_num_batched_tokens,
                "prefix_caching": False,
                "hf_baseline": "transformers+peft mixed-adapter batch (adapter_names), left padding, greedy",
            },
            "baselines": baseline_availability(),
            **out,
        },
        args.out_dir,
        args.smoke,
    )


if __name__ == "__main__":
    main()
