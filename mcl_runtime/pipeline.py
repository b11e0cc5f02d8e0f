"""``python -m mcl_runtime.pipeline``: run the MapCoder-Lite agents over a benchmark.

Backends: ``--endpoint URL`` (any OpenAI-compatible server; each agent's ``model`` is its adapter
name unless ``--agent-model AGENT=NAME`` says otherwise), ``--model DIR --lora NAME=DIR ...``
(the in-process engine), or neither (the in-process engine with the embedded demo model).

With ``--endpoint``, each call carries its problem's id as ``X-Session-ID`` (a replicated server keeps
a problem on one replica), and calls that fail with a connection error or a 5xx are retried with
backoff (``--retries``). ``--out`` is also the resume point: a run over an existing results file skips
the problems it holds and redoes those that ended in an error, so every problem is written once.

Defaults are MapCoder's published settings: k and t per dataset (HumanEval and HumanEval-ET k=5,
t=5; the others k=3, t=5), 4096 tokens per call, MapCoder's debugging loop (the t-th fix is not
tested); ``--test-last-fix`` is our variant. Differences from MapCoder: docs/mapcoder_differences.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path

from mcl_runtime.agents.datasets import BUILTIN, load_problems
from mcl_runtime.agents.evaluate import ResumeMismatch, evaluate, summary_path
from mcl_runtime.agents.judge import Judge
from mcl_runtime.agents.llm import DEFAULT_RETRIES, EngineChatClient, OpenAIChatClient
from mcl_runtime.agents.mapcoder import MAPCODER_MAX_TOKENS, MapCoder, MapCoderConfig, published_k_t
from mcl_runtime.agents.prompts import AGENTS
from mcl_runtime.agents.sandbox import Limits, Sandbox
from mcl_runtime.engine.cli_args import (
    add_execution_mode_args,
    add_kv_cache_args,
    execution_mode_options,
    kv_cache_options,
)


def parse_pairs(values: list[str], flag: str, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """``NAME=VALUE`` command-line values as a dict; ``names`` restricts the NAMEs."""
    pairs = {}
    for value in values:
        name, sep, target = value.partition("=")
        if not sep or not name or not target:
            raise SystemExit(f"{flag} expects NAME=VALUE, got {value!r}")
        if names is not None and name not in names:
            raise SystemExit(f"{flag}: unknown agent {name!r}; agents are {', '.join(names)}")
        pairs[name] = target
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mcl_runtime.pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", required=True, help=f"{'|'.join(BUILTIN)} or a JSONL file of those schemas")
    backend = p.add_mutually_exclusive_group()
    backend.add_argument("--endpoint", help="OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    backend.add_argument(
        "--model", help="base model folder or hub id for the in-process engine (default: the demo model)"
    )
    p.add_argument(
        "--lora", action="append", default=[], metavar="NAME=DIR", help="adapter folder or hub id (repeatable)"
    )
    p.add_argument(
        "--agent-model",
        action="append",
        default=[],
        metavar="AGENT=NAME",
        help="served model or adapter for an agent (default: the agent's name)",
    )
    p.add_argument(
        "--k",
        type=int,
        help="recalled problems, hence plans (default: MapCoder's for the "
        "dataset: 5 for humaneval and humaneval-et, else 3)",
    )
    p.add_argument("--t", type=int, help="debugging rounds per plan (default: MapCoder's, 5)")
    p.add_argument(
        "--test-last-fix",
        action="store_true",
        help="also test the t-th fix (our variant; MapCoder's loop keeps it untested)",
    )
    p.add_argument("--limit", type=int, help="only the first N problems")
    p.add_argument("--workers", type=int, default=1, help="problems solved concurrently")
    p.add_argument("--max-tokens", type=int, default=MAPCODER_MAX_TOKENS, help="per model call (MapCoder's: 4096)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--structured-output",
        action="store_true",
        help="constrain each agent's answer to its format (grammar-constrained decoding)",
    )
    p.add_argument("--max-calls", type=int, help="call budget per problem (default 1 + 2k + k(1 + t))")
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per test run (at least the problem's own time limit)"
    )
    p.add_argument("--out", required=True, type=Path, help="results JSONL; the summary goes to OUT.summary.json")
    p.add_argument("--trajectories", type=Path, help="also write every agent call per problem (JSONL)")
    p.add_argument("--device", help="in-process engine device (cpu, cuda)")
    p.add_argument("--dtype", help="in-process engine dtype")
    add_execution_mode_args(p)
    add_kv_cache_args(p)
    p.add_argument("--api-key", default="EMPTY", help="for --endpoint")
    p.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help="retries of a call that fails with a connection error, a timeout, a 429 or a 5xx (--endpoint)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_agent_names(names: dict[str, str]) -> None:
    unknown = set(names) - set(AGENTS)
    if unknown:
        raise SystemExit(f"--agent-model: unknown agent(s) {sorted(unknown)}; agents are {list(AGENTS)}")


async def _endpoint_client(args: argparse.Namespace, names: dict[str, str]) -> OpenAIChatClient:
    client = OpenAIChatClient(args.endpoint, names, api_key=args.api_key, max_retries=args.retries)
    served = await client.served_models()
    missing = sorted({client.model_for(a) for a in AGENTS} - set(served))
    if missing:
        warnings.warn(f"{args.endpoint} does not list {missing} (served: {served}); those calls may fail", stacklevel=2)
    return client


def _engine_client(args: argparse.Namespace, names: dict[str, str]):
    from mcl_runtime import AsyncEngine, Engine

    adapters = parse_pairs(args.lora, "--lora")
    options = {"device": args.device, "dtype": args.dtype, **execution_mode_options(args), **kv_cache_options(args)}
    if args.model:
        engine = Engine(model=args.model, adapters=adapters, **options)
    else:
        from mcl_runtime.demo import demo_adapter_dirs, demo_engine

        adapters = {**demo_adapter_dirs(), **adapters}
        engine = demo_engine(adapters=adapters, **options)
    missing = sorted({names.get(a, a) for a in AGENTS} - set(engine.adapters))
    if missing and (names or adapters):
        warnings.warn(f"no adapter named {missing}; those agents use the base model", stacklevel=2)
    aengine = AsyncEngine(engine)
    return EngineChatClient(
        aengine, {a: names.get(a, a) if names.get(a, a) in engine.adapters else None for a in AGENTS}
    ), aengine


async def _run(args: argparse.Namespace, names: dict[str, str]) -> dict:
    problems = load_problems(args.dataset, args.limit)
    config = MapCoderConfig(
        k=args.k,
        t=args.t,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        max_calls=args.max_calls,
        test_last_fix=args.test_last_fix,
        structured_output=args.structured_output,
    )
    judge = Judge(Sandbox(Limits(timeout_s=args.timeout)))
    aengine = None
    if args.endpoint:
        client = await _endpoint_client(args, names)
    else:
        client, aengine = _engine_client(args, names)
    run_config = {
        "dataset": args.dataset,
        "backend": args.endpoint or args.model or "demo (in-process)",
        "k": args.k,
        "t": args.t,
        "loop": config.loop,
        "k_t_from": args.k_t_from,
        "workers": args.workers,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "call_budget": config.call_budget,
        "structured_output": args.structured_output,
        "isolation": judge.sandbox.isolation.describe(),
    }
    try:
        with ExitStack() as stack:
            traj = None
            if args.trajectories:
                args.trajectories.parent.mkdir(parents=True, exist_ok=True)
                traj = stack.enter_context(open(args.trajectories, "a" if args.out.exists() else "w"))
            return await evaluate(
                problems,
                MapCoder(client, judge, config),
                args.out,
                args.workers,
                run_config,
                progress=not args.no_progress,
                trajectories=traj,
            )
    finally:
        await client.close()
        if aengine is not None:
            aengine.shutdown()


def apply_protocol_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill k and t left unset with MapCoder's published values for the dataset."""
    k, t = published_k_t(args.dataset)
    args.k_t_from = "MapCoder's published runs" if args.k is None and args.t is None else "command line"
    args.k, args.t = (k if args.k is None else args.k), (t if args.t is None else args.t)
    return args


def main(argv: list[str] | None = None) -> int:
    args = apply_protocol_defaults(build_parser().parse_args(argv))
    if args.lora and args.endpoint:
        raise SystemExit("--lora goes with --model (or the demo model), not with --endpoint")
    for flag in ("k", "workers", "max_tokens", "timeout"):
        if getattr(args, flag) <= 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be positive")
    if args.t < 0 or args.retries < 0 or (args.limit is not None and args.limit < 0):
        raise SystemExit("--t, --retries and --limit must not be negative")
    names = parse_pairs(args.agent_model, "--agent-model")
    _check_agent_names(names)
    parse_pairs(args.lora, "--lora")
    try:
        summary = asyncio.run(_run(args, names))
    except ResumeMismatch as exc:
        raise SystemExit(f"mcl_runtime.pipeline: {exc}") from None
    print(json.dumps(summary, indent=2))
    print(
        f"pass@1 {summary['pass@1']:.4f} ({summary['passed']}/{summary['problems']}); "
        f"results: {args.out}; summary: {summary_path(args.out)}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
