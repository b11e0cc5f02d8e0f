"""Pass-based trajectory distillation: run the MapCoder pipeline with a teacher and keep, per agent,
the answers of trajectories whose final code passes the hidden tests.

The output folder::

    collect.json         the settings (a resumed run must use the same problems, protocol, teacher)
    trajectories.jsonl   one record per finished trajectory (append-only: the resume point)
    retrieval.jsonl      kept examples, one file per agent, in problem order, then round, then call
    planning.jsonl       (the planning agent's plans and its verification ratings)
    coding.jsonl
    debugging.jsonl
    stats.json           kept / discarded per agent and why

Rounds: round r attempts every problem that no earlier round solved (``trajectory_id`` is
``<task_id>#<round>``; useful with a sampling teacher). A call is kept when its trajectory passed,
the backend answered it, the answer parsed and was not cut by the token limit; with
``drop_failed_code`` a coding or debugging answer whose code failed the sample tests is dropped
too. The agent files and stats are rebuilt from ``trajectories.jsonl`` at the end of every run, so
an interrupted run, resumed, writes the same files as an uninterrupted one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mcl_runtime.agents.datasets import Problem
from mcl_runtime.agents.evaluate import solve_and_judge
from mcl_runtime.agents.judge import Judge
from mcl_runtime.agents.llm import ChatClient
from mcl_runtime.agents.mapcoder import MapCoder, MapCoderConfig
from mcl_runtime.agents.prompts import AGENTS
from mcl_runtime.agents.records import read_records, write_json, write_jsonl
from mcl_runtime.train.runner import check_settings, run_all

SETTINGS, TRAJECTORIES, STATS = "collect.json", "trajectories.jsonl", "stats.json"


@dataclass(frozen=True)
class CollectOptions:
    # every fix tested: ``correct`` blames a fix by the sample run that follows it
    mapcoder: MapCoderConfig = field(default_factory=lambda: MapCoderConfig(test_last_fix=True))
    rounds: int = 1
    workers: int = 1
    drop_failed_code: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.workers < 1:
            raise ValueError(f"rounds and workers must be at least 1: {self}")


def agent_file(out_dir: Path, agent: str) -> Path:
    return out_dir / f"{agent}.jsonl"


def trajectory_id(task_id: str, round_: int) -> str:
    return f"{task_id}#{round_}"


async def collect(
    problems: list[Problem],
    client: ChatClient,
    out_dir: str | Path,
    teacher: dict[str, str],
    options: CollectOptions | None = None,
    judge: Judge | None = None,
    settings: dict | None = None,
) -> dict:
    """Collect trajectories into ``out_dir`` (resuming what is there) and return the stats.

    ``teacher`` names the teacher of each agent (provenance); ``settings`` are extra entries for
    ``collect.json`` (the CLI records the problem source and the teacher endpoints there)."""
    options = options or CollectOptions()
    out_dir = Path(out_dir)
    ids = [p.task_id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the problem set repeats task ids: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_settings(
        out_dir / SETTINGS,
        {**(settings or {}), "mapcoder": asdict(options.mapcoder), "teacher": dict(teacher), "rounds": options.rounds},
        ("problems", "mapcoder", "teacher"),
    )
    store = out_dir / TRAJECTORIES
    solver = MapCoder(client, judge or Judge(), options.mapcoder)
    errors: list[str] = []
    for round_ in range(options.rounds):
        todo = pending(problems, read_records(store), round_)

        async def work(problem: Problem, round_: int = round_) -> dict:
            return await _attempt(solver, problem, round_, teacher)

        errors += await run_all(
            todo, work, store, options.workers, options.progress, f"collect round {round_}", lambda p: p.task_id
        )
    stats = export(problems, read_records(store), out_dir, options)
    return {**stats, "errors": errors}


def pending(problems: list[Problem], records: list[dict], round_: int) -> list[Problem]:
    """The problems round ``round_`` still has to attempt."""
    done = {r["trajectory_id"] for r in records}
    solved_before = {r["task_id"] for r in records if r["passed"] and r["round"] < round_}
    return [p for p in problems if trajectory_id(p.task_id, round_) not in done and p.task_id not in solved_before]


async def _attempt(solver: MapCoder, problem: Problem, round_: int, teacher: dict[str, str]) -> dict:
    result = await solve_and_judge(solver, problem)
    return {
        "trajectory_id": trajectory_id(problem.task_id, round_),
        "task_id": problem.task_id,
        "dataset": problem.dataset,
        "round": round_,
        "passed": result.passed,
        "verdict": result.verdict,
        "teacher": dict(teacher),
        "trajectory": result.trajectory.to_dict(),
    }


# ---------------------------------------------------------------- examples and stats


def example(record: dict, index: int, source: str, answer: str | None = None, **provenance: str) -> dict:
    """The training example of call ``index`` of a trajectory record (its answer, or ``answer``)."""
    call = record["trajectory"]["calls"][index]
    text = call["text"] if answer is None else answer
    return {
        "messages": [*call["messages"], {"role": "assistant", "content": text}],
        "agent": call["agent"],
        "step": call["step"],
        "task_id": record["task_id"],
        "dataset": record.get("dataset"),
        "trajectory_id": record["trajectory_id"],
        "round": record["round"],
        "call_index": index,
        "teacher": record["teacher"].get(call["agent"]),
        "source": source,
        **provenance,
    }


def discard_reason(record: dict, index: int, drop_failed_code: bool = False) -> str | None:
    """Why call ``index`` of a trajectory is not a training example (None: keep it)."""
    call = record["trajectory"]["calls"][index]
    if not record["passed"]:
        return "failed trajectory"
    if call.get("error"):
        return "refused request"
    if not call["parsed"].get("ok"):
        return f"format failure: {call['parsed'].get('error') or 'unparsable'}"
    if call.get("finish_reason") == "length":
        return "truncated answer"
    if drop_failed_code and call["step"] in ("coding", "debugging") and _code_failed(record, index):
        return "code failed the sample tests"
    return None


def _code_failed(record: dict, index: int) -> bool:
    runs = [r for r in record["trajectory"]["sample_runs"] if r["after_call"] == index]
    return bool(runs) and not all(o["verdict"] == "passed" for o in runs[0]["outcomes"])


def sort_records(problems: list[Problem], records: list[dict]) -> list[dict]:
    order = {p.task_id: i for i, p in enumerate(problems)}
    return sorted(records, key=lambda r: (order.get(r["task_id"], len(order)), r["round"], r["trajectory_id"]))


def agent_stats() -> dict:
    return {a: {"kept": 0, "discarded": Counter()} for a in AGENTS}


def finish_stats(per_agent: dict) -> dict:
    return {a: {"kept": s["kept"], "discarded": dict(sorted(s["discarded"].items()))} for a, s in per_agent.items()}


def export(problems: list[Problem], records: list[dict], out_dir: Path, options: CollectOptions) -> dict:
    """Rebuild the agent files and ``stats.json`` from the trajectory records; return the stats."""
    records = sort_records(problems, records)
    kept: dict[str, list[dict]] = {a: [] for a in AGENTS}
    per_agent = agent_stats()
    for record in records:
        for index, call in enumerate(record["trajectory"]["calls"]):
            reason = discard_reason(record, index, options.drop_failed_code)
            if reason is None:
                kept[call["agent"]].append(example(record, index, "collect"))
                per_agent[call["agent"]]["kept"] += 1
            else:
                per_agent[call["agent"]]["discarded"][reason] += 1
    for agent, examples in kept.items():
        write_jsonl(agent_file(out_dir, agent), examples)
    stats = {
        "problems": len(problems),
        "rounds": options.rounds,
        "trajectories": len(records),
        "passed": sum(r["passed"] for r in records),
        "failed": sum(not r["passed"] for r in records),
        "problems_solved": len({r["task_id"] for r in records if r["passed"]}),
        "pending": sum(len(pending(problems, records, r)) for r in range(options.rounds)),
        "agents": finish_stats(per_agent),
    }
    write_json(out_dir / STATS, stats)
    return stats
