"""Problems per hour of the MapCoder-Lite agent pipeline: our engine batching the calls of
``--workers`` problems at once (``AsyncEngine``, every agent's adapter in the same batches) vs
transformers + peft answering one request at a time and switching adapters (``set_adapter``).

    python benchmarks/bench_pipeline.py [--smoke] [--setup demo|qwen2.5-7b] [--workers 16]
        [--problems N] [--baseline-problems M] [--device cpu|cuda] [--out-dir DIR]

Setups: ``demo``: the embedded demo model and its four adapters (float32, the CPU unless told);
``qwen2.5-7b``: random weights with Qwen2.5-7B-Instruct's shapes (``Engine(load_format="dummy")``
and ``AutoModelForCausalLM.from_config``) and four random rank-16 adapters on all seven
projections, bfloat16, on the GPU (the default setup when one is present). ``--smoke`` shrinks the
shapes and lengths so the same code path runs in seconds on the CPU (numbers are not results).

The fake workload, identical for both sides: per problem (the first HumanEval problems shipped
with the package), the calls MapCoder makes when the best plan needs two debugging rounds:
retrieval, k=3 x (planning, verification), coding, 2 x debugging: 10 dependent calls. Prompts are
the pipeline's own (``mcl_runtime.agents.prompts``) rendered with the chat template; the earlier
answers they quote are filler text of the length those answers would have, and every call
generates exactly its token budget (greedy, EOS ignored), so the work does not depend on what the
model says. Sandbox time is left out: both sides would pay it alike. The baseline runs fewer
problems (it is strictly sequential, so its rate does not depend on how many). The speed-up is
ours / baseline in problems per hour.

Writes ``benchmarks/results/pipeline_<setup>_<device>.json`` (``--smoke``: only with ``--out-dir``).
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (
    QWEN25_7B_INSTRUCT,
    base_parser,
    environment,
    release_memory,
    save_result,
    shrink_config,
    write_model_folder,
    write_peft_adapter,
)
from hf_baseline import generate_grouped, load_hf_peft

from mcl_runtime.agents import prompts
from mcl_runtime.agents.datasets import load_problems
from mcl_runtime.agents.parsers import Exemplar

AGENTS = prompts.AGENTS
FULL_TOKENS = {"retrieval": 384, "planning": 160, "verification": 48, "coding": 256, "debugging": 256}
SMOKE_TOKENS = {"retrieval": 12, "planning": 6, "verification": 3, "coding": 8, "debugging": 8}
K, DEBUG_ROUNDS = 3, 2


@dataclass(frozen=True)
class Call:
    agent: str
    prompt: list[int]
    max_tokens: int


def filler(tokens: int) -> str:
    """Stand-in for an earlier answer of about ``tokens`` tokens."""
    text = "check the input, update the running answer, and return it when the loop ends. "
    return (text * (4 * tokens // len(text) + 1))[: 4 * tokens]


def problem_calls(problem, tokenizer, budget: dict[str, int]) -> list[Call]:
    exemplar = Exemplar(
        filler(budget["retrieval"] // 6), filler(budget["retrieval"] // 6), filler(budget["retrieval"] // 6)
    )
    algorithm, plan, code = filler(budget["retrieval"] // 4), filler(budget["planning"]), filler(budget["coding"])
    report = prompts.clip(filler(budget["debugging"] // 2), prompts.MAX_REPORT)
    steps = [("retrieval", prompts.retrieval_messages(problem, K), budget["retrieval"])]
    for _ in range(K):
        steps.append(("planning", prompts.planning_messages(problem, exemplar, algorithm), budget["planning"]))
        steps.append(("planning", prompts.verification_messages(problem, plan), budget["verification"]))
    steps.append(("coding", prompts.coding_messages(problem, plan, algorithm), budget["coding"]))
    steps += [
        ("debugging", prompts.debugging_messages(problem, plan, code, report, algorithm), budget["debugging"])
    ] * DEBUG_ROUNDS
    return [
        Call(agent, tokenizer.encode(tokenizer.apply_chat_template(msgs, add_generation_prompt=True)), n)
        for agent, msgs, n in steps
    ]


def make_workload(n: int, tokenizer, budget: dict[str, int]) -> list[list[Call]]:
    return [problem_calls(p, tokenizer, budget) for p in load_problems("humaneval", limit=n)]


async def _run_ours(aengine, workload: list[list[Call]], workers: int) -> float:
    from mcl_runtime import SamplingParams

    pending = list(reversed(workload))

    async def worker() -> None:
        while pending:
            for call in pending.pop():
                params = SamplingParams(max_tokens=call.max_tokens, temperature=0.0, ignore_eos=True)
                async for _ in aengine.generate(call.prompt, params, adapter=call.agent):
                    pass

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - start


def run_ours(engine_kwargs: dict, workload: list[list[Call]], workers: int) -> dict:
    """Build the engine, run the workload with ``workers`` problems in flight, free the engine."""
    from mcl_runtime import AsyncEngine, Engine

    aengine = AsyncEngine(Engine(**engine_kwargs))
    try:
        asyncio.run(_run_ours(aengine, workload[:1], 1))  # warm-up
        before = aengine.engine.stats()
        seconds = asyncio.run(_run_ours(aengine, workload, workers))
        after = aengine.engine.stats()
    finally:
        aengine.shutdown()
        del aengine
        release_memory()
    steps = after["steps"] - before["steps"]
    return {
        "problems": len(workload),
        "workers": workers,
        "seconds": seconds,
        "problems_per_hour": 3600 * len(workload) / seconds,
        "engine_steps": steps,
        "mean_batch_tokens": (after["batched_tokens_total"] - before["batched_tokens_total"]) / max(steps, 1),
        "max_batch_size_seen": after["max_batch_size_seen"],
    }


def run_baseline(model, workload: list[list[Call]], pad_id: int) -> dict:
    generate_grouped(model, [workload[0][0].prompt[:16]], [AGENTS[0]], 2, pad_id)  # warm-up
    seconds = 0.0
    for calls in workload:
        for call in calls:
            seconds += generate_grouped(model, [call.prompt], [call.agent], call.max_tokens, pad_id)[0]
    return {"problems": len(workload), "seconds": seconds, "problems_per_hour": 3600 * len(workload) / seconds}


def model_setup(args, dtype: str, tmp: Path) -> tuple[Path, dict[str, Path], bool, dict]:
    """(model folder, adapter folders, random weights?, config) of the chosen setup."""
    if args.setup == "demo":
        from mcl_runtime.demo import demo_adapter_dirs, demo_model_dir

        return demo_model_dir() / "base", demo_adapter_dirs(), False, {}
    cfg = shrink_config(QWEN25_7B_INSTRUCT) if args.smoke else dict(QWEN25_7B_INSTRUCT)
    folder = write_model_folder(tmp / "model", cfg)
    adapters = {
        a: write_peft_adapter(tmp / a, cfg, rank=16, alpha=32, seed=i, dtype=getattr(torch, dtype))
        for i, a in enumerate(AGENTS)
    }
    return folder, adapters, True, cfg


def kv_blocks_needed(workload: list[list[Call]], workers: int, block_size: int = 16) -> int:
    longest = max(len(c.prompt) + c.max_tokens for calls in workload for c in calls)
    return int(workers * math.ceil(longest / block_size) * 1.5) + 64


def parse_args():
    p = base_parser(__doc__)
    p.add_argument(
        "--setup", choices=["demo", "qwen2.5-7b"], default=None, help="default: qwen2.5-7b on a GPU, demo otherwise"
    )
    p.add_argument("--workers", type=int, default=16, help="problems in flight on our engine")
    p.add_argument("--problems", type=int, default=None, help="problems for our engine (default 2 x workers)")
    p.add_argument("--baseline-problems", type=int, default=2, help="problems for the baseline")
    args = p.parse_args()
    if args.setup is None:
        args.setup = "qwen2.5-7b" if torch.cuda.is_available() and not args.smoke else "demo"
    if args.smoke:
        args.workers, args.problems, args.baseline_problems = 4, 4, 1
    args.problems = args.problems or 2 * args.workers
    if args.workers < 1 or args.problems < 1 or args.baseline_problems < 1:
        raise SystemExit("--workers, --problems and --baseline-problems must be positive")
    return args


def main() -> None:
    from common import resolve_device

    from mcl_runtime.tokenizer import Tokenizer

    args = parse_args()
    device = resolve_device(args)
    dtype = "float32" if args.setup == "demo" or device.type == "cpu" else args.dtype
    budget = SMOKE_TOKENS if args.smoke else FULL_TOKENS
    with tempfile.TemporaryDirectory(prefix="mcl_bench_pipeline_") as tmp:
        folder, adapters, random_weights, cfg = model_setup(args, dtype, Path(tmp))
        load_format = "dummy" if random_weights else "auto"
        tokenizer = Tokenizer.from_pretrained(folder)
        workload = make_workload(max(args.problems, args.baseline_problems), tokenizer, budget)
        engine_kwargs = {
            "model": folder,
            "adapters": adapters,
            "device": str(device),
            "dtype": dtype,
            "backend": args.backend,
            "load_format": load_format,
            "kv_cache_blocks": kv_blocks_needed(workload, args.workers),
        }
        ours = run_ours(engine_kwargs, workload[: args.problems], args.workers)
        pad_id = tokenizer.pad_token_id or 0
        hf = load_hf_peft(folder, adapters, device, getattr(torch, dtype), random_weights=random_weights)
        base = run_baseline(hf, workload[: args.baseline_problems], pad_id)
    ratio = ours["problems_per_hour"] / base["problems_per_hour"]
    calls = workload[0]
    report = {
        "setup": args.setup,
        "device": str(device),
        "dtype": dtype,
        "model_config": cfg or "mcl-demo-tiny",
        "workload": {
            "calls_per_problem": len(calls),
            "tokens_per_call": budget,
            "k": K,
            "debug_rounds": DEBUG_ROUNDS,
            "prompt_tokens_first_problem": sum(len(c.prompt) for c in calls),
        },
        "ours": ours,
        "baseline_transformers_peft_sequential": base,
        "speedup": ratio,
        "environment": environment(device),
    }
    print(
        f"ours ({args.workers} workers): {ours['problems_per_hour']:.1f} problems/h; "
        f"transformers+peft one at a time: {base['problems_per_hour']:.1f} problems/h; ratio {ratio:.2f}x"
    )
    save_result(f"pipeline_{args.setup}_{device.type}", report, args.out_dir, args.smoke)


if __name__ == "__main__":
    main()
