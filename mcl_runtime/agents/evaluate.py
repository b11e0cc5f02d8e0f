"""Run the pipeline over a problem set with N problems in flight, judge the final code on the
hidden tests, and write one JSON line per problem plus ``<out>.summary.json``."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tqdm import tqdm

from mcl_runtime.agents.datasets import Problem, distinct
from mcl_runtime.agents.judge import TestOutcome, Verdict
from mcl_runtime.agents.mapcoder import MapCoder, Trajectory
from mcl_runtime.agents.prompts import AGENTS

DUPLICATES_NOTE = (
    "{dropped} of the {rows} rows repeat an earlier problem id ({ids}); each problem is "
    "solved and counted once, so pass@1 is over {distinct} distinct problems."
)
SAMPLES_ONLY_NOTE = (
    "xCodeEval ships only its sample tests here, so its problems are judged on those "
    "sample tests, not on the full hidden test suite: its pass@1 is an upper bound."
)


@dataclass
class ProblemResult:
    task_id: str
    dataset: str
    passed: bool
    code: str
    verdict: str  # "passed" or the first failing hidden test's verdict
    verdicts: list[str]  # per hidden test run (judging stops at the first failure)
    samples_passed: bool
    calls: dict
    tokens: dict
    format_failures: dict
    seconds: float
    judged_on_samples_only: bool = False
    error: str | None = None
    trajectory: Trajectory | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "trajectory"}


def verdict_of(outcomes: list[TestOutcome]) -> str:
    if not outcomes:
        return "no tests"
    failed = [o for o in outcomes if not o.passed]
    return failed[0].verdict.value if failed else Verdict.PASSED.value


async def solve_and_judge(solver: MapCoder, problem: Problem) -> ProblemResult:
    start = time.monotonic()
    traj = await solver.solve(problem)
    hidden = await solver.judge.arun_tests(
        problem.program(traj.final_code),
        list(problem.hidden_tests),
        stop_on_failure=True,
        limits=solver.limits_for(problem),
    )
    verdict = verdict_of(hidden)
    return ProblemResult(
        problem.task_id,
        problem.dataset,
        verdict == Verdict.PASSED.value,
        traj.final_code,
        verdict,
        [o.verdict.value for o in hidden],
        traj.samples_passed,
        traj.per_agent("calls"),
        traj.per_agent("tokens"),
        traj.per_agent("format_failures"),
        time.monotonic() - start,
        problem.hidden_are_samples,
        trajectory=traj,
    )


def _failed_result(problem: Problem, exc: BaseException, seconds: float) -> ProblemResult:
    zero = {a: 0 for a in AGENTS}
    return ProblemResult(
        problem.task_id,
        problem.dataset,
        False,
        "",
        "error",
        [],
        False,
        dict(zero),
        {a: {"prompt": 0, "completion": 0} for a in AGENTS},
        dict(zero),
        seconds,
        problem.hidden_are_samples,
        error=f"{type(exc).__name__}: {exc}",
    )


async def _guarded(solver: MapCoder, problem: Problem, slots: asyncio.Semaphore) -> ProblemResult:
    async with slots:
        start = time.monotonic()
        try:
            return await solve_and_judge(solver, problem)
        except Exception as exc:  # one problem's failure is recorded; the run goes on
            return _failed_result(problem, exc, time.monotonic() - start)


def summarize(results: list[ProblemResult], wall_seconds: float, config: dict) -> dict:
    n = len(results)
    passed = sum(r.passed for r in results)
    summary = {
        **config,
        "problems": n,
        "passed": passed,
        "pass@1": passed / n if n else 0.0,
        "format_failures": {a: sum(r.format_failures[a] for r in results) for a in AGENTS},
        "calls": {a: sum(r.calls[a] for r in results) for a in AGENTS},
        "tokens": {
            a: {kind: sum(r.tokens[a][kind] for r in results) for kind in ("prompt", "completion")} for a in AGENTS
        },
        "verdicts": dict(Counter(r.verdict for r in results)),
        "errors": sum(r.error is not None for r in results),
        "wall_seconds": wall_seconds,
        "problems_per_hour": 3600.0 * n / wall_seconds if wall_seconds > 0 else 0.0,
    }
    summary["calls_total"] = sum(summary["calls"].values())
    if any(r.judged_on_samples_only for r in results):
        summary["note"] = SAMPLES_ONLY_NOTE
    return summary


def summary_path(out: Path) -> Path:
    return Path(str(out) + ".summary.json")


def _duplicates(rows: int, kept: list[Problem], dropped: list[str]) -> dict:
    info = {"dataset_rows": rows, "distinct_problems": len(kept)}
    if dropped:
        ids = ", ".join(sorted(set(dropped))[:8]) + (", ..." if len(set(dropped)) > 8 else "")
        info["duplicates_note"] = DUPLICATES_NOTE.format(dropped=len(dropped), rows=rows, ids=ids, distinct=len(kept))
    return info


async def evaluate(
    problems: list[Problem],
    solver: MapCoder,
    out: Path,
    workers: int = 1,
    config: dict | None = None,
    progress: bool = True,
    trajectories: IO[str] | None = None,
) -> dict:
    """Solve and judge ``problems`` (a repeated problem id once), ``workers`` at a time; write
    results as they finish."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    rows = len(problems)
    problems, dropped = distinct(problems)
    slots = asyncio.Semaphore(workers)
    start = time.monotonic()
    results: list[ProblemResult] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f, tqdm(total=len(problems), disable=not progress, desc="problems") as bar:
        for next_done in asyncio.as_completed([_guarded(solver, p, slots) for p in problems]):
            result = await next_done
            results.append(result)
            f.write(json.dumps(result.to_json()) + "\n")
            f.flush()
            if trajectories is not None and result.trajectory is not None:
                trajectories.write(
                    json.dumps({"task_id": result.task_id, "passed": result.passed, **result.trajectory.to_dict()})
                    + "\n"
                )
            bar.update(1)
            bar.set_postfix(passed=f"{sum(r.passed for r in results)}/{len(results)}")
    summary = summarize(results, time.monotonic() - start, {**(config or {}), **_duplicates(rows, problems, dropped)})
    summary_path(out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
