"""``python -m mcl_runtime.train {collect,correct,sft}``: MapCoder-Lite's three training pillars.

  collect   run the pipeline with a teacher endpoint over a problem file; keep, per agent, the
            parsed answers of trajectories that pass the hidden tests (resumable)
  correct   repair one step of each failed trajectory with a supervisor endpoint; keep the
            corrected answer when the re-run trajectory passes (resumable)
  sft       fine-tune one LoRA adapter (``--data``) or one per agent (``--data-dir``) with TRL's
            SFTTrainer and peft; ``accelerate launch -m mcl_runtime.train sft ...`` for several
            processes or GPUs

Endpoints are OpenAI base URLs (``http://127.0.0.1:8000/v1``). A teacher's model for an agent is
``--agent-model AGENT=NAME``, else ``--teacher-model``, else the agent's own name (its adapter on
our server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from mcl_runtime.agents.datasets import BUILTIN, load_problems
from mcl_runtime.agents.judge import Judge
from mcl_runtime.agents.mapcoder import MapCoderConfig
from mcl_runtime.agents.prompts import AGENTS
from mcl_runtime.agents.sandbox import Limits, Sandbox
from mcl_runtime.pipeline import parse_pairs
from mcl_runtime.train.clients import Endpoint, RoutedClient, TolerantClient
from mcl_runtime.train.sft import REPORT_TO

PROG = "python -m mcl_runtime.train"


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    return parse_pairs(values, flag, tuple(AGENTS))


def _teacher_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--teacher",
        required=required,
        metavar="URL",
        help="teacher endpoint for every agent" + ("" if required else " (default: the collect run's)"),
    )
    p.add_argument("--teacher-model", help="teacher model name for every agent (default: the agent's name)")
    p.add_argument(
        "--agent-teacher", action="append", default=[], metavar="AGENT=URL", help="a different endpoint for one agent"
    )
    p.add_argument(
        "--agent-model", action="append", default=[], metavar="AGENT=NAME", help="a different model name for one agent"
    )
    p.add_argument("--api-key", default="EMPTY")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder (resumed when it exists)")
    p.add_argument("--workers", type=int, default=1, help="trajectories in flight")
    p.add_argument("--timeout", type=float, help="seconds per test run (default 5, or the collect run's)")
    p.add_argument("--no-progress", action="store_true")


def _collect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="pass-based trajectory distillation")
    p.add_argument("--problems", required=True, help=f"{'|'.join(BUILTIN)} or a JSONL problem file")
    p.add_argument("--limit", type=int, help="only the first N problems")
    _teacher_args(p, required=True)
    _run_args(p)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--t", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-calls", type=int)
    p.add_argument("--rounds", type=int, default=1, help="attempts per problem until one passes")
    p.add_argument(
        "--structured-output",
        action="store_true",
        help="constrain every teacher answer to its agent's format (vLLM's structured_outputs grammar), "
        "as the pipeline's --structured-output does",
    )
    p.add_argument(
        "--drop-failed-code",
        action="store_true",
        help="also drop coding/debugging answers whose code failed the sample tests",
    )


def _correct_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("correct", help="supervisor-guided correction of failed trajectories")
    p.add_argument("--collected", required=True, type=Path, help="a collect output folder")
    p.add_argument("--supervisor", required=True, metavar="URL", help="supervisor endpoint")
    p.add_argument("--supervisor-model", required=True, help="supervisor model name")
    p.add_argument("--problems", help="problem file (default: the collect run's)")
    _teacher_args(p, required=False)
    _run_args(p)
    p.add_argument("--max-tokens", type=int, help="supervisor answer limit (default: the collect run's)")
    p.add_argument("--temperature", type=float, default=0.0, help="supervisor temperature")


def _sft_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="agent-wise LoRA fine-tuning")
    p.add_argument("--base", required=True, type=Path, help="HF base model folder or hub id (org/name)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", action="append", type=Path, help="training JSONL (repeatable): one adapter")
    data.add_argument(
        "--data-dir",
        action="append",
        type=Path,
        help="folder with <agent>.jsonl files (repeatable): one adapter per agent, in OUT/<agent>",
    )
    p.add_argument("--out", required=True, type=Path, help="adapter folder (with --data-dir: their parent)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=64.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--target-modules", nargs="+", help="default: all seven linear projections")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-length", type=int, default=4096, help="longer examples are skipped")
    p.add_argument("--packing", action="store_true", help="padding-free packing of each batch (TRL's bfd)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-steps", type=int, metavar="N", help="a checkpoint in OUT/checkpoint-N every N steps")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="DIR",
        help="continue from the last checkpoint in --out (or from checkpoint folder DIR)",
    )
    held_out = p.add_mutually_exclusive_group()
    held_out.add_argument("--eval-fraction", type=float, default=0.0, metavar="F", help="hold out F of the data")
    held_out.add_argument("--eval-data", action="append", type=Path, metavar="FILE", help="eval JSONL (repeatable)")
    p.add_argument("--eval-steps", type=int, metavar="N", help="default: at each checkpoint and at the end")
    p.add_argument("--report-to", choices=REPORT_TO, default="none")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on with CUDA)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="base weights (default: bf16 with --bf16)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    _collect_parser(sub)
    _correct_parser(sub)
    _sft_parser(sub)
    return p


# ---------------------------------------------------------------- commands


def endpoints_from_args(args: argparse.Namespace, default: dict[str, dict] | None = None) -> dict[str, Endpoint]:
    """Each agent's teacher endpoint from the flags, or ``default`` (a collect run's) without ``--teacher``."""
    if args.teacher is None:
        if default is None:
            raise SystemExit("--teacher is required: the collect run recorded no teacher endpoints")
        endpoints = {a: Endpoint(**default[a]) for a in AGENTS}
    else:
        endpoints = {a: Endpoint(args.teacher, args.teacher_model) for a in AGENTS}
    urls, models = _pairs(args.agent_teacher, "--agent-teacher"), _pairs(args.agent_model, "--agent-model")
    for agent in AGENTS:
        url = urls.get(agent, endpoints[agent].url)
        endpoints[agent] = Endpoint(url, models.get(agent, endpoints[agent].model))
    return endpoints


def _judge(timeout: float) -> Judge:
    return Judge(Sandbox(Limits(timeout_s=timeout)))


def _report(stats: dict, what: str) -> int:
    print(json.dumps(stats, indent=2))
    left = stats["pending"]
    if left or stats["errors"]:
        print(
            f"{PROG} {what}: {left} left unfinished ({len(stats['errors'])} errors); run the same command "
            "again to resume",
            file=sys.stderr,
        )
        return 1
    return 0


async def _collect(args: argparse.Namespace) -> int:
    from mcl_runtime.train.collect import CollectOptions, collect

    problems = load_problems(args.problems, args.limit)
    endpoints = endpoints_from_args(args)
    options = CollectOptions(
        MapCoderConfig(
            args.k,
            args.t,
            args.max_tokens,
            args.temperature,
            args.max_calls,
            structured_output=args.structured_output,
            test_last_fix=True,  # correct needs every fix's sample run
        ),
        args.rounds,
        args.workers,
        args.drop_failed_code,
        not args.no_progress,
    )
    timeout = args.timeout or 5.0
    settings = {
        "problems": args.problems,
        "limit": args.limit,
        "timeout": timeout,
        "teacher_endpoints": {a: e.to_dict() for a, e in endpoints.items()},
    }
    client = TolerantClient(RoutedClient(endpoints, api_key=args.api_key))
    try:
        stats = await collect(
            problems,
            client,
            args.out,
            {a: e.label(a) for a, e in endpoints.items()},
            options,
            _judge(timeout),
            settings,
        )
    finally:
        await client.close()
    return _report(stats, "collect")


async def _correct(args: argparse.Namespace) -> int:
    from mcl_runtime.train.correct import SUPERVISOR, CorrectOptions, collected_settings, correct

    earlier = collected_settings(args.collected)
    source = args.problems or earlier.get("problems")
    if source is None:
        raise SystemExit("--problems is required: the collect run recorded no problem source")
    problems = load_problems(source, earlier.get("limit") if args.problems is None else None)
    teacher = TolerantClient(
        RoutedClient(endpoints_from_args(args, earlier.get("teacher_endpoints")), api_key=args.api_key)
    )
    supervisor_endpoint = Endpoint(args.supervisor, args.supervisor_model)
    supervisor = TolerantClient(RoutedClient({SUPERVISOR: supervisor_endpoint}, api_key=args.api_key))
    options = CorrectOptions(args.workers, args.max_tokens, args.temperature, not args.no_progress)
    timeout = args.timeout or earlier.get("timeout") or 5.0
    try:
        stats = await correct(
            problems,
            args.collected,
            teacher,
            supervisor,
            args.out,
            supervisor_endpoint.label(SUPERVISOR),
            options,
            _judge(timeout),
            {"problems": source},
        )
    finally:
        await teacher.close()
        await supervisor.close()
    return _report(stats, "correct")


def _sft(args: argparse.Namespace) -> int:
    from mcl_runtime.train.sft import LORA_TARGETS, SFTConfig, train_adapter, train_agents

    if args.no_progress:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    config = SFTConfig(
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        target_modules=tuple(args.target_modules or LORA_TARGETS),
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_length=args.max_length,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        packing=args.packing,
        save_steps=args.save_steps,
        eval_fraction=args.eval_fraction,
        eval_steps=args.eval_steps,
        report_to=args.report_to,
        device=args.device,
        bf16=args.bf16,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    if args.data:
        logs = {args.out.name: train_adapter(args.base, args.data, args.out, config, args.eval_data or (), args.resume)}
        folders = {args.out.name: args.out}
    else:
        if args.eval_data or args.resume not in (True, False):
            raise ValueError("--eval-data and --resume DIR name one adapter's files: use them with --data")
        logs = train_agents(args.base, args.data_dir, args.out, config, args.resume)
        folders = {agent: args.out / agent for agent in logs}
    from accelerate import PartialState

    if PartialState().is_main_process:
        for name, log in logs.items():
            print(
                f"{name}: {log['examples']} examples, {log['total_steps']} steps on {log['processes']} process(es), "
                f"loss {log['first_loss']:.4f} -> {log['final_loss']:.4f}; adapter in {folders[name]}"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "collect":
            return asyncio.run(_collect(args))
        if args.command == "correct":
            return asyncio.run(_correct(args))
        return _sft(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
