"""The benchmark problem sets, normalised into one ``Problem`` shape.

Four schemas are recognised per record (see ``data/README.md`` for sources and licences):
HumanEval (task_id, prompt, entry_point, test, sample_io: assert lines; HumanEval-ET adds
test_case_list, extra asserts that join ``test`` as hidden tests, and has no sample_io, so its
samples are HumanEval's for the same task id, as in MapCoder), MBPP (name, prompt,
entry_point, test, sample_io), APPS (id, description, starter_code, sample_io and test_list:
stdin/stdout pairs whose output is a one-element list) and xCodeEval (src_uid, description,
input_spec, output_spec, notes, sample_inputs, sample_outputs, time_limit; no hidden tests ship,
so its samples are also its hidden tests).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mcl_runtime.agents.judge import FunctionTest, IOTest, Test

BUILTIN = {
    "humaneval": "humaneval_wst.jsonl",
    "humaneval-et": "humaneval_et.jsonl",
    "mbpp": "mbpp_py.jsonl",
    "apps": "apps_selected150.jsonl",
    "xcodeeval": "xcodeeval_prog_syn_val.jsonl",
}
FUNCTION_PREAMBLE = "from typing import *\n"


@dataclass(frozen=True)
class Problem:
    task_id: str  # the dataset's own id
    dataset: str  # humaneval | humaneval-et | mbpp | apps | xcodeeval
    style: str  # "function" or "stdio"
    statement: str  # the problem as the agents see it
    sample_tests: tuple[Test, ...]  # visible to the agents; drive debugging
    hidden_tests: tuple[Test, ...]  # judge the final program
    prefix: str = ""  # put before the generated code to form the program
    starter_code: str = ""
    time_limit_s: float | None = None
    hidden_are_samples: bool = False  # True when only sample tests exist (xCodeEval here)

    def program(self, code: str) -> str:
        """The program that is run: ``prefix`` + ``code``, with __future__ imports kept first."""
        lines = code.splitlines(keepends=True)
        future = [ln for ln in lines if ln.startswith("from __future__ import")]
        rest = [ln for ln in lines if not ln.startswith("from __future__ import")]
        return "".join(future) + self.prefix + "".join(rest)


def load_problems(name_or_path: str, limit: int | None = None) -> list[Problem]:
    """A built-in set by name (humaneval, humaneval-et, mbpp, apps, xcodeeval) or any JSONL of those
    schemas."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    lines = _read_lines(name_or_path)
    problems = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if limit is not None and len(problems) >= limit:
            break
        try:
            problems.append(problem_from_record(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{name_or_path}: line {number}: {exc}") from exc
    return problems


def _read_lines(name_or_path: str) -> list[str]:
    if name_or_path in BUILTIN:
        ref = resources.files("mcl_runtime.agents").joinpath("data", BUILTIN[name_or_path])
        return ref.read_text(encoding="utf-8").splitlines()
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no dataset named {name_or_path!r} (built-in: {', '.join(BUILTIN)}) and no such file")
    return path.read_text(encoding="utf-8").splitlines()


def problem_from_record(rec: dict) -> Problem:
    if not isinstance(rec, dict):
        raise ValueError(f"a problem record must be a JSON object, got {type(rec).__name__}")
    if "src_uid" in rec:
        return _xcodeeval(rec)
    if "test_list" in rec:
        return _apps(rec)
    if "entry_point" in rec and "test" in rec:
        return _function_problem(rec)
    raise ValueError(f"unrecognised problem schema with keys {sorted(rec)}")


def _function_problem(rec: dict) -> Problem:
    extended = "test_case_list" in rec
    dataset = "humaneval-et" if extended else "humaneval" if "task_id" in rec else "mbpp"
    task_id = str(rec["task_id"] if "task_id" in rec else rec["name"])
    test = rec["test"]
    if extended:
        test = test.rstrip("\n") + "\n\n" + "\n".join(rec["test_case_list"]) + "\n"
    calls_check = re.search(r"^(check|test_check)\(", test, re.MULTILINE) is not None
    hidden = FunctionTest(test, None if calls_check else rec["entry_point"])
    sample_io = rec["sample_io"] if "sample_io" in rec else _humaneval_samples().get(task_id, []) if extended else []
    samples = tuple(FunctionTest(s) for s in sample_io or [] if isinstance(s, str))
    return Problem(
        task_id, dataset, "function", rec["prompt"], samples, (hidden,), prefix=FUNCTION_PREAMBLE + rec["prompt"] + "\n"
    )


@functools.cache
def _humaneval_samples() -> dict[str, list[str]]:
    """HumanEval's visible examples by task id (HumanEval-ET ships none)."""
    records = (json.loads(line) for line in _read_lines("humaneval") if line.strip())
    return {r["task_id"]: r.get("sample_io") or [] for r in records}


def distinct(problems: list[Problem]) -> tuple[list[Problem], list[str]]:
    """The problems with repeated (dataset, task id) rows dropped, and the ids of the rows dropped
    (APPS's selected 150 holds 22 repeated rows of 21 ids, identical records)."""
    seen, kept, dropped = set(), [], []
    for p in problems:
        key = (p.dataset, p.task_id)
        if key in seen:
            dropped.append(p.task_id)
        else:
            seen.add(key)
            kept.append(p)
    return kept, dropped


TOLERANCE = re.compile(
    r"(?:absolute|relative)\s+(?:or|and|and/or)\s+(?:absolute|relative)\s+error"
    r"[^.]{0,80}?(?:10\s*\^?\s*\{?\s*[-\u2212]\s*(\d+)|1e-(\d+))",
    re.IGNORECASE,
)


def stated_tolerance(statement: str) -> float | None:
    """The error a statement allows ("absolute or relative error ... 10^{-6}" -> 1e-6), if any."""
    match = TOLERANCE.search(statement)
    return None if match is None else 10.0 ** -int(match.group(1) or match.group(2))


def expected_text(output) -> str:
    """APPS/xCodeEval expected output: a string, or a one-element list holding the value printed."""
    if isinstance(output, list):
        output = output[0] if len(output) == 1 else "\n".join(map(str, output))
    return output if isinstance(output, str) else str(output)


def _io_tests(pairs, tolerance: float | None) -> tuple[IOTest, ...]:
    return tuple(IOTest(str(p["input"]), expected_text(p["output"]), tolerance) for p in pairs or [])


def _apps(rec: dict) -> Problem:
    starter = (rec.get("starter_code") or "").strip()
    tolerance = stated_tolerance(rec["description"])
    return Problem(
        str(rec["id"] if "id" in rec else rec["name"]),
        "apps",
        "stdio",
        rec["description"],
        _io_tests(rec.get("sample_io"), tolerance),
        _io_tests(rec["test_list"], tolerance),
        starter_code=starter,
    )


def _xcodeeval(rec: dict) -> Problem:
    parts = [rec["description"], "Input\n" + rec.get("input_spec", ""), "Output\n" + rec.get("output_spec", "")]
    if rec.get("notes"):
        parts.append(rec["notes"])
    limits = [f"{k.replace('_', ' ').capitalize()}: {rec[k]}" for k in ("time_limit", "memory_limit") if rec.get(k)]
    statement = "\n\n".join(parts + (["\n".join(limits)] if limits else []))
    tolerance = stated_tolerance(statement)
    samples = tuple(IOTest(i, o, tolerance) for i, o in zip(rec["sample_inputs"], rec["sample_outputs"]))
    return Problem(
        rec["src_uid"],
        "xcodeeval",
        "stdio",
        statement,
        samples,
        samples,
        time_limit_s=_seconds(rec.get("time_limit")),
        hidden_are_samples=True,
    )


def _seconds(text: str | None) -> float | None:
    match = re.match(r"\s*([\d.]+)\s*second", text or "")
    return float(match.group(1)) if match else None
