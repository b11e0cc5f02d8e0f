"""Run the pipeline over a problem set with N problems in flight, judge the final code on the
hidden tests, and write one JSON line per problem plus ``<out>.summary.json``.

The results file is append-only and the resume point: a run over an existing file skips the problems
it holds a result for and does again those whose line records an error (the backend failed the
problem, e.g. a server that stayed unreachable), so in the end every problem has exactly one line.
The summary covers every line of the problem set; a resumed run must keep the settings that decide
the results (``RESUME_KEYS``), which the summary file records from the start."""

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
from mcl_runtime.agents.records import append_record, read_records, write_json, write_jsonl

DUPLICATES_NOTE = (
    "{dropped} of the {rows} rows repeat an earlier problem id ({ids}); each problem is "
    "solved and counted once, so pass@1 is over {distinct} distinct problems."
)
RESUME_KEYS = ("dataset", "k", "t", "loop", "max_tokens", "temperature", "structured_output", "call_budget")
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


def summarize(rows: list[dict], wall_seconds: float, solved: int, config: dict) -> dict:
    """The summary of ``rows`` (result lines), ``solved`` of them in this run's ``wall_seconds``."""
    n = len(rows)
    passed = sum(r["passed"] for r in rows)
    summary = {
        **config,
        "problems": n,
        "passed": passed,
        "pass@1": passed / n if n else 0.0,
        "format_failures": {a: sum(r["format_failures"][a] for r in rows) for a in AGENTS},
        "calls": {a: sum(r["calls"][a] for r in rows) for a in AGENTS},
        "tokens": {
            a: {kind: sum(r["tokens"][a][kind] for r in rows) for kind in ("prompt", "completion")} for a in AGENTS
        },
        "verdicts": dict(Counter(r["verdict"] for r in rows)),
        "errors": sum(r.get("error") is not None for r in rows),
        "resumed": n - solved,
        "wall_seconds": wall_seconds,
        "problems_per_hour": 3600.0 * solved / wall_seconds if wall_seconds > 0 else 0.0,
    }
    summary["calls_total"] = sum(summary["calls"].values())
    if any(r.get("judged_on_samples_only") for r in rows):
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


class ResumeMismatch(ValueError):
    """The results file was made with other settings than the run asked to resume it."""


def _resume(out: Path, config: dict) -> dict[str, dict]:
    """The result lines ``out`` already holds without an error, by task id (the file is rewritten
    without the others); refuses a file made with other ``RESUME_KEYS``."""
    rows = read_records(out)
    if not rows:
        return {}
    earlier = json.loads(summary_path(out).read_text()) if summary_path(out).exists() else {}
    changed = [k for k in RESUME_KEYS if k in earlier and k in config and earlier[k] != config[k]]
    if changed:
        raise ResumeMismatch(
            f"{out} holds results made with other settings ("
            + ", ".join(f"{k}: {earlier[k]!r} then, {config[k]!r} now" for k in changed)
            + "); write to another file to start a new run"
        )
    kept = {r["task_id"]: r for r in rows if r.get("error") is None}
    if len(kept) < len(rows):
        write_jsonl(out, kept.values())
    return kept


async def evaluate(
    problems: list[Problem],
    solver: MapCoder,
    out: Path,
    workers: int = 1,
    config: dict | None = None,
    progress: bool = True,
    trajectories: IO[str] | None = None,
) -> dict:
    """Solve and judge ``problems`` (a repeated problem id once), ``workers`` at a time, resuming what
    ``out`` holds (see the module docstring); each result is appended to ``out`` as it finishes."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    rows = len(problems)
    problems, dropped = distinct(problems)
    config = {**(config or {}), **_duplicates(rows, problems, dropped)}
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _resume(out, config)
    todo = [p for p in problems if p.task_id not in done]
    write_json(summary_path(out), {**config, "complete": False})
    slots = asyncio.Semaphore(workers)
    start = time.monotonic()
    passed = sum(done[p.task_id]["passed"] for p in problems if p.task_id in done)
    with tqdm(total=len(problems), initial=len(problems) - len(todo), disable=not progress, desc="problems") as bar:
        for next_done in asyncio.as_completed([_guarded(solver, p, slots) for p in todo]):
            result = await next_done
            done[result.task_id] = result.to_json()
            append_record(out, done[result.task_id])
            if trajectories is not None and result.trajectory is not None:
                trajectories.write(
                    json.dumps({"task_id": result.task_id, "passed": result.passed, **result.trajectory.to_dict()})
                    + "\n"
                )
                trajectories.flush()
            passed += result.passed
            bar.update(1)
            bar.set_postfix(passed=f"{passed}/{bar.n}")
    summary = summarize([done[p.task_id] for p in problems], time.monotonic() - start, len(todo), config)
    summary["complete"] = True
    write_json(summary_path(out), summary)
    return summary
