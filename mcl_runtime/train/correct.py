"""Supervisor-guided correction of failed trajectories (those a ``collect`` folder recorded).

Per failed trajectory:
1. blame one step (``locate``): the first answer that did not parse (a retrieval answer without
   its sections, an empty plan, a rating without a number, an answer without code); else the last
   debugging round, which did not fix the code; else the plan the final code was written from;
2. send that step's input, its answer and the test feedback (the code that followed, its sample
   test report, the hidden-test verdict) to the supervisor for the answer the agent should have
   given; an answer that does not parse with the agent's own parser is discarded;
3. re-run the trajectory from that step (``ReplayClient``: the recorded answers up to it, the
   supervisor's in its place, the teacher after it) and judge the final code on the hidden tests;
4. keep the corrected example only when the re-run passes.

The output folder::

    correct.json         the settings (collect folder, supervisor, protocol)
    corrections.jsonl    one record per failed trajectory handled (append-only: the resume point),
                         with the supervisor's answer and the re-run trajectory
    <agent>.jsonl        the kept corrected examples, in problem order
    stats.json           outcomes, and kept / discarded per agent and why
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mcl_runtime.agents.datasets import Problem
from mcl_runtime.agents.evaluate import solve_and_judge
from mcl_runtime.agents.judge import Judge, TestOutcome, Verdict
from mcl_runtime.agents.llm import ChatClient, ChatError
from mcl_runtime.agents.mapcoder import MapCoder, MapCoderConfig
from mcl_runtime.agents.parsers import (
    Parsed,
    parse_code,
    parse_debugging,
    parse_plan,
    parse_retrieval,
    parse_verification,
)
from mcl_runtime.agents.prompts import AGENTS, MAX_CODE, clip, test_report
from mcl_runtime.agents.records import read_records, write_json, write_jsonl
from mcl_runtime.train.clients import ReplayClient, ReplayDiverged
from mcl_runtime.train.collect import (
    SETTINGS as COLLECT_SETTINGS,
)
from mcl_runtime.train.collect import (
    TRAJECTORIES,
    agent_file,
    agent_stats,
    example,
    finish_stats,
    sort_records,
)
from mcl_runtime.train.runner import check_settings, run_all

SETTINGS, CORRECTIONS, STATS = "correct.json", "corrections.jsonl", "stats.json"
SUPERVISOR = "supervisor"  # the agent name the supervisor's calls go under
MAX_ANSWER = 8000
SUPERVISOR_SYSTEM = (
    "You supervise a team of agents that write Python programs. One agent gave a wrong or "
    "unusable answer. You write the answer it should have given, in the exact format its "
    "instructions ask for."
)


@dataclass(frozen=True)
class Blame:
    index: int  # the call to correct
    feedback: str  # what went wrong, for the supervisor


@dataclass(frozen=True)
class CorrectOptions:
    workers: int = 1
    max_tokens: int | None = None  # supervisor answer; default: the protocol's per-call limit
    temperature: float = 0.0
    progress: bool = False


def step_parser(step: str, k: int) -> Callable[[str], Parsed]:
    parsers = {
        "retrieval": lambda text: parse_retrieval(text, k),
        "planning": parse_plan,
        "verification": parse_verification,
        "coding": parse_code,
        "debugging": parse_debugging,
    }
    if step not in parsers:
        raise ValueError(f"unknown agent step {step!r}")
    return parsers[step]


# ---------------------------------------------------------------- blame


def locate(record: dict, problem: Problem) -> Blame | None:
    """The step of a failed trajectory to correct, or None when there is none (see the module docstring)."""
    traj = record["trajectory"]
    calls = traj["calls"]
    for i, call in enumerate(calls):
        if not call.get("error") and not call["parsed"].get("ok"):
            return Blame(
                i,
                f"The answer cannot be used: {call['parsed'].get('error') or 'it does not parse'}. "
                "It must follow the answer format of the instructions exactly.",
            )
    coding = [i for i, c in enumerate(calls) if c["step"] == "coding"]
    if not coding:
        return None
    debugging = [i for i in range(coding[-1] + 1, len(calls)) if calls[i]["step"] == "debugging"]
    if debugging:
        target, what = debugging[-1], "The code of this answer"
    else:
        target, what = _planning_call(calls, traj["plans"], len(coding) - 1), "The code written from this plan"
    run = _run_after(traj, debugging[-1] if debugging else coding[-1])
    if target is None or calls[target].get("error") or run is None:
        return None
    return Blame(target, _code_feedback(what, run, problem, record["verdict"]))


def _planning_call(calls: list[dict], plans: list[dict], attempt: int) -> int | None:
    if attempt >= len(plans):
        return None
    plan = plans[attempt]["plan"]
    return next((i for i, c in enumerate(calls) if c["step"] == "planning" and c["parsed"].get("plan") == plan), None)


def _run_after(traj: dict, index: int) -> dict | None:
    return next((r for r in traj["sample_runs"] if r["after_call"] == index), None)


def _outcome(d: dict) -> TestOutcome:
    return TestOutcome(Verdict(d["verdict"]), d["input"], d["expected"], d["actual"], d["error"], d["seconds"])


def _code_feedback(what: str, run: dict, problem: Problem, verdict: str) -> str:
    outcomes = [_outcome(o) for o in run["outcomes"]]
    if all(o.passed for o in outcomes):
        result = f"It passes the sample tests but fails the hidden tests ({verdict})."
    else:
        result = f"It fails the sample tests, and the final code fails the hidden tests ({verdict})."
    return (
        f"{what}:\n```python\n{clip(run['code'], MAX_CODE)}\n```\n\n{result}\n\n"
        f"# Sample test report\n{test_report(outcomes, problem.style)}"
    )


def supervisor_messages(call: dict, feedback: str) -> list[dict]:
    """The supervisor's request: the agent's input, its answer and what went wrong."""
    instructions = "\n\n".join(f"## {m['role']}\n{m['content']}" for m in call["messages"])
    user = f"""# The {call["agent"]} agent's instructions ({call["step"]} step)
{instructions}

# The agent's answer
{clip(call["text"], MAX_ANSWER) or "(empty)"}

# What went wrong
{feedback}

Write the answer the {call["agent"]} agent should have given to its instructions: correct, and in exactly the format they ask for. Reply with that answer only, with no remarks about the correction."""
    return [{"role": "system", "content": SUPERVISOR_SYSTEM}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- the run


class _Corrector:
    def __init__(
        self,
        teacher: ChatClient,
        supervisor: ChatClient,
        supervisor_label: str,
        judge: Judge,
        config: MapCoderConfig,
        options: CorrectOptions,
    ) -> None:
        self.teacher, self.supervisor, self.label = teacher, supervisor, supervisor_label
        self.judge, self.config, self.options = judge, config, options

    async def __call__(self, item: tuple[dict, Problem]) -> dict:
        record, problem = item
        head = {
            "trajectory_id": record["trajectory_id"],
            "task_id": record["task_id"],
            "round": record["round"],
            "supervisor": self.label,
        }
        blame = locate(record, problem)
        if blame is None:
            return {**head, "outcome": "no step to correct"}
        call = record["trajectory"]["calls"][blame.index]
        head.update(call_index=blame.index, agent=call["agent"], step=call["step"], feedback=blame.feedback)
        try:
            reply = await self.supervisor.chat(
                SUPERVISOR,
                supervisor_messages(call, blame.feedback),
                self.options.max_tokens or self.config.max_tokens,
                self.options.temperature,
            )
        except ChatError as exc:
            return {**head, "outcome": "supervisor refused", "error": str(exc)}
        head["supervisor_text"] = reply.text
        if not step_parser(call["step"], self.config.k)(reply.text).ok:
            return {**head, "outcome": "supervisor answer did not parse"}
        if reply.finish_reason == "length":
            return {**head, "outcome": "supervisor answer truncated"}
        return {**head, **await self._rerun(record, problem, blame.index, reply.text)}

    async def _rerun(self, record: dict, problem: Problem, index: int, answer: str) -> dict:
        replay = ReplayClient(self.teacher, record["trajectory"]["calls"], index, answer)
        try:
            result = await solve_and_judge(MapCoder(replay, self.judge, self.config), problem)
        except ReplayDiverged as exc:
            return {"outcome": "re-run diverged", "error": str(exc)}
        return {
            "outcome": "kept" if result.passed else "re-run failed",
            "rerun": {"passed": result.passed, "verdict": result.verdict, "trajectory": result.trajectory.to_dict()},
        }


def collected_settings(collected_dir: Path) -> dict:
    path = collected_dir / COLLECT_SETTINGS
    if not path.is_file():
        raise FileNotFoundError(f"{collected_dir} is not a collect output folder (no {COLLECT_SETTINGS})")
    return json.loads(path.read_text(encoding="utf-8"))


async def correct(
    problems: list[Problem],
    collected_dir: str | Path,
    teacher: ChatClient,
    supervisor: ChatClient,
    out_dir: str | Path,
    supervisor_label: str,
    options: CorrectOptions | None = None,
    judge: Judge | None = None,
    settings: dict | None = None,
) -> dict:
    """Correct the failed trajectories of ``collected_dir`` into ``out_dir`` (resuming what is
    there); ``teacher`` answers the re-runs after the corrected step. Returns the stats."""
    options = options or CorrectOptions()
    collected_dir, out_dir = Path(collected_dir), Path(out_dir)
    protocol = collected_settings(collected_dir)["mapcoder"]
    out_dir.mkdir(parents=True, exist_ok=True)
    check_settings(
        out_dir / SETTINGS,
        {
            **(settings or {}),
            "collected": str(collected_dir.resolve()),
            "supervisor": supervisor_label,
            "mapcoder": protocol,
        },
        ("collected", "supervisor", "mapcoder"),
    )
    store = out_dir / CORRECTIONS
    todo = _pending(problems, read_records(collected_dir / TRAJECTORIES), read_records(store))
    work = _Corrector(teacher, supervisor, supervisor_label, judge or Judge(), MapCoderConfig(**protocol), options)
    errors = await run_all(
        todo, work, store, options.workers, options.progress, "correct", lambda item: item[0]["trajectory_id"]
    )
    stats = export(problems, read_records(collected_dir / TRAJECTORIES), read_records(store), out_dir)
    return {**stats, "errors": errors}


def _pending(problems: list[Problem], records: list[dict], corrections: list[dict]) -> list[tuple[dict, Problem]]:
    by_id = {p.task_id: p for p in problems}
    done = {c["trajectory_id"] for c in corrections}
    failed = [r for r in sort_records(problems, records) if not r["passed"] and r["trajectory_id"] not in done]
    missing = sorted({r["task_id"] for r in failed} - set(by_id))
    if missing:
        raise ValueError(f"failed trajectories of problems not in the problem set: {missing[:5]}")
    return [(r, by_id[r["task_id"]]) for r in failed]


def export(problems: list[Problem], records: list[dict], corrections: list[dict], out_dir: Path) -> dict:
    """Rebuild the agent files and ``stats.json`` from the correction records; return the stats."""
    by_id = {r["trajectory_id"]: r for r in records}
    order = {r["trajectory_id"]: i for i, r in enumerate(sort_records(problems, records))}
    corrections = sorted(corrections, key=lambda c: order.get(c["trajectory_id"], len(order)))
    kept: dict[str, list[dict]] = {a: [] for a in AGENTS}
    per_agent = agent_stats()
    for c in corrections:
        if "agent" not in c:
            continue
        if c["outcome"] == "kept":
            kept[c["agent"]].append(
                example(
                    by_id[c["trajectory_id"]],
                    c["call_index"],
                    "correct",
                    c["supervisor_text"],
                    supervisor=c["supervisor"],
                )
            )
            per_agent[c["agent"]]["kept"] += 1
        else:
            per_agent[c["agent"]]["discarded"][c["outcome"]] += 1
    for agent, examples in kept.items():
        write_jsonl(agent_file(out_dir, agent), examples)
    failed = [r for r in records if not r["passed"]]
    stats = {
        "failed_trajectories": len(failed),
        "handled": len(corrections),
        "pending": len({r["trajectory_id"] for r in failed} - {c["trajectory_id"] for c in corrections}),
        "outcomes": dict(sorted(Counter(c["outcome"] for c in corrections).items())),
        "agents": finish_stats(per_agent),
    }
    write_json(out_dir / STATS, stats)
    return stats
