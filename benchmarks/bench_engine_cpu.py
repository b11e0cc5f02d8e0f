"""The engine against transformers + peft on the CPU, demo model, four agent adapters.

    python benchmarks/bench_engine_cpu.py [--smoke] [--out-dir DIR]

64 requests spread over the demo model's four adapters (16 each), random token-id prompts, greedy,
exactly ``--gen`` tokens each (EOS ignored). Ours: every request submitted at once (one continuous
batch mixing all adapters). Baseline: transformers + peft the way a user batches it, one
``generate`` per adapter group (``set_adapter``, left padding). Both float32, same threads, same
prompts; the rounds alternate the two and use fresh prompts each round (no prefix-cache reuse).
Engine: 4 adapter slots of rank 32 (the demo adapters' largest); a last, untimed run of ours under
the step profiler records where the step time goes. Each round also runs ours with the other
CPU attention (``CPUBackend.attention_kernel``: the C++ kernel where the default is the padded
path, and the other way round) on the same prompts with another first token (no prefix-cache
reuse): the kernel-vs-padded ratio of whole runs (``bench_cpu_routing.py`` measures the crossovers
behind ``CPUBackend``'s thresholds).
Target: ours >= 3x the baseline's output tokens/s.
Writes benchmarks/results/engine_cpu.json (--smoke: only with --out-dir).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import TYPE_CHECKING

import torch
from common import (
    AGENTS,
    Workload,
    base_parser,
    environment,
    make_workload,
    parse_with_smoke,
    run_workload,
    save_result,
)
from hf_baseline import generate_grouped, load_hf_peft
from step_profile import StepProfiler, format_breakdown

if TYPE_CHECKING:
    from mcl_runtime.engine.llm_engine import Engine


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__)
    p.set_defaults(dtype="float32")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(128, 512), metavar=("MIN", "MAX"))
    p.add_argument("--gen", type=int, default=64, help="tokens generated per request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--max-loras", type=int, default=4, help="adapter slots (the four agents)")
    p.add_argument("--max-lora-rank", type=int, default=32, help="the largest demo adapter rank")
    return parse_with_smoke(p, dict(requests=8, prompt_len=(16, 32), gen=4, rounds=1))


def engine_round(engine: Engine, wl: Workload) -> tuple[float, list[list[int]]]:
    """Seconds and tokens of one workload on the engine (all requests in one continuous batch)."""
    from mcl_runtime import SamplingParams

    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in wl.max_tokens]
    t0 = time.perf_counter()
    outs = engine.generate(wl.prompts, params, adapter=wl.adapters)
    return time.perf_counter() - t0, [o.token_ids for o in outs]


def attention_rounds(engine: Engine, wl: Workload, ours_s: float) -> dict:
    """Seconds of ``wl`` with the C++ CPU attention kernel and with the padded path: ``ours_s`` for
    the engine's default, one more run for the other ({} without the kernel)."""
    backend = engine.backend
    if getattr(backend, "attention_kernel", False) is False:
        return {}
    default = "kernel" if torch.get_num_threads() <= backend.KERNEL_MAX_THREADS else "padded"
    other = "padded" if default == "kernel" else "kernel"
    shifted = dataclasses.replace(wl, prompts=[[(p[0] + 1) % 509] + p[1:] for p in wl.prompts])
    backend.attention_kernel = other == "kernel"
    try:
        other_s = engine_round(engine, shifted)[0]
    finally:
        backend.attention_kernel = None
    return {f"{default}_s": ours_s, f"{other}_s": other_s}


def profile_engine(engine: Engine, args: argparse.Namespace) -> dict:
    """Where our step time goes: one more (untimed) run of the workload under the step profiler."""
    wl = make_workload(args.requests, tuple(args.prompt_len), (args.gen, args.gen), list(AGENTS), seed=args.rounds)
    prof = StepProfiler(engine)
    try:
        run_workload(engine, wl)
    finally:
        prof.close()
    out = {"decode": prof.summary("decode"), "prefill": prof.summary("prefill")}
    for phase, summary in out.items():
        if summary:
            print(f"ours, {phase} steps: {format_breakdown(summary)}")
    return out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from mcl_runtime import Engine
    from mcl_runtime.demo import demo_adapter_dirs, demo_model_dir

    base, adapter_dirs = demo_model_dir() / "base", demo_adapter_dirs()
    engine = Engine(
        model=base,
        adapters=adapter_dirs,
        device="cpu",
        dtype="float32",
        backend=args.backend,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
    )
    hf = load_hf_peft(base, adapter_dirs, torch.device("cpu"), torch.float32)
    pad = engine.tokenizer.pad_token_id or 0
    warm = make_workload(4, (8, 16), (2, 2), list(AGENTS), seed=999)
    engine_round(engine, warm)
    generate_grouped(hf, warm.prompts, warm.adapters, 2, pad)

    rounds = []
    for r in range(args.rounds):
        wl = make_workload(args.requests, tuple(args.prompt_len), (args.gen, args.gen), list(AGENTS), seed=r)
        ours_s, ours_tok = engine_round(engine, wl)
        attention = attention_rounds(engine, wl, ours_s)
        vs_padded = (
            {"cpu_attention_s": attention, "cpu_kernel_vs_padded": attention["padded_s"] / attention["kernel_s"]}
            if attention
            else {}
        )
        hf_s, hf_tok = generate_grouped(hf, wl.prompts, wl.adapters, args.gen, pad)
        n_out = args.requests * args.gen
        same = sum(a == b for a, b in zip(ours_tok, hf_tok))
        rounds.append(
            {
                "ours_s": ours_s,
                "hf_s": hf_s,
                "ours_tok_s": n_out / ours_s,
                "hf_tok_s": n_out / hf_s,
                "ratio": hf_s / ours_s,
                "identical_outputs": same,
                "prompt_tokens": wl.num_prompt_tokens,
                **vs_padded,
            }
        )
        print(
            f"round {r}: ours {n_out / ours_s:8.1f} tok/s   transformers+peft {n_out / hf_s:8.1f} tok/s   "
            f"ratio {hf_s / ours_s:5.2f}x   identical outputs {same}/{args.requests}"
            + (f"   CPU attention kernel vs padded {vs_padded['cpu_kernel_vs_padded']:.2f}x" if vs_padded else "")
        )
    summary = {k: statistics.median(x[k] for x in rounds) for k in ("ours_tok_s", "hf_tok_s", "ratio")}
    if all("cpu_kernel_vs_padded" in x for x in rounds):
        summary["cpu_kernel_vs_padded"] = statistics.median(x["cpu_kernel_vs_padded"] for x in rounds)
        print(f"CPU attention kernel vs padded path: {summary['cpu_kernel_vs_padded']:.2f}x (median)")
    breakdown = profile_engine(engine, args)
    print(
        f"median: ours {summary['ours_tok_s']:.1f} tok/s, transformers+peft {summary['hf_tok_s']:.1f} tok/s, "
        f"ratio {summary['ratio']:.2f}x (target >= 3x)"
    )
    save_result(
        "engine_cpu",
        {
            "benchmark": "engine_cpu",
            "env": environment("cpu"),
            "torch_threads": torch.get_num_threads(),
            "config": {
                "model": "mcl-demo-tiny",
                "adapters": list(AGENTS),
                "requests": args.requests,
                "prompt_len": list(args.prompt_len),
                "gen_tokens": args.gen,
                "dtype": "float32",
                "backend": engine.backend.name,
                "max_loras": args.max_loras,
                "max_lora_rank": args.max_lora_rank,
                "baseline": "transformers+peft, one generate per adapter "
                "group (set_adapter), left padding, greedy, min_new_tokens=max_new_tokens",
            },
            "rounds": rounds,
            "median": summary,
            "target_ratio": 3.0,
            "breakdown": {"ours": breakdown},
        },
        args.out_dir,
        args.smoke,
    )


if __name__ == "__main__":
    main()
