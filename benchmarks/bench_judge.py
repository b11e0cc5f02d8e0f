"""Judging time: every canonical HumanEval solution judged on its hidden tests, ``--workers`` at a
time, by the judge of this checkout ("after") and by the judge of git ``--ref`` ("before",
default ``main``), alternated ``--repeats`` times in one run on the same machine.

    python benchmarks/bench_judge.py [--smoke] [--ref main] [--workers 2] [--repeats 3]
        [--datasets humaneval,humaneval-et] [--out-dir DIR]

Each side runs in its own interpreter with its own copy of ``mcl_runtime`` on ``sys.path`` (the
"before" copy is ``git archive REF mcl_runtime``), so the two never share a sandbox or a module.
A dataset the "before" checkout does not ship is timed for "after" only. The ratio is
before / after of the median wall time (above 1: the new judge is faster), and the same for
the CPU time of the judging process and its sandbox processes, which a busy machine disturbs
less. Only HumanEval is repeated. The pass counts are
in the result, with the problems whose canonical solution fails checked against a reference:
the same program and test run bare in a fresh interpreter (``python -c``, the official
harnesses' way: exec, then ``check(entry_point)``), so a failure that is the dataset's own
(HumanEval-ET has a few broken asserts) shows up as agreement, not as a judge bug.

Writes ``benchmarks/results/judge_cpu.json`` (``--smoke``: 8 problems, one repeat, only with ``--out-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"


def judge_all(dataset: str, workers: int, limit: int | None) -> dict:
    """Worker side: judge the canonical solutions of ``dataset`` with the importable ``mcl_runtime``."""
    from importlib import resources

    from mcl_runtime.agents.datasets import BUILTIN, problem_from_record
    from mcl_runtime.agents.judge import Judge
    from mcl_runtime.agents.sandbox import Limits, Sandbox

    if dataset not in BUILTIN:
        return {"skipped": f"this checkout has no built-in dataset {dataset!r}"}
    text = resources.files("mcl_runtime.agents").joinpath("data", BUILTIN[dataset]).read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()][:limit]
    jobs = [
        (p.program(r["canonical_solution"]), list(p.hidden_tests)) for r in records for p in [problem_from_record(r)]
    ]
    judge = Judge(Sandbox(Limits(timeout_s=20), max_concurrent=workers))
    start, cpu_start = time.monotonic(), _cpu_seconds()
    with ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(lambda job: judge.run_tests(*job), jobs))
    seconds, cpu = time.monotonic() - start, _cpu_seconds() - cpu_start
    failed = [r.get("task_id") for r, outs in zip(records, outcomes) if not all(o.passed for o in outs)]
    reference = {
        r.get("task_id"): reference_passes(program, tests[0])
        for r, (program, tests) in zip(records, jobs)
        if r.get("task_id") in failed
    }
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "problems": len(jobs),
        "passed": len(jobs) - len(failed),
        "failed": failed,
        "failed_in_the_reference_too": sorted(k for k, ok in reference.items() if not ok),
        "failed_only_here": sorted(k for k, ok in reference.items() if ok),
        "test_runs": sum(len(outs) for outs in outcomes),
        "isolation": judge.sandbox.isolation.describe(),
    }


def _cpu_seconds() -> float:
    """CPU time of this process and of every sandbox process it has reaped (all of a run's)."""
    import resource

    return sum(
        u.ru_utime + u.ru_stime
        for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def reference_passes(program: str, test, timeout_s: float = 20) -> bool:
    """The canonical program and its test run bare, as the official harnesses run them."""
    source = program + "\n" + test.source + (f"\ncheck({test.entry_point})\n" if test.entry_point else "")
    try:
        return subprocess.run([sys.executable, "-c", source], capture_output=True, timeout=timeout_s).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def export_ref(ref: str, dest: Path) -> Path | None:
    """``mcl_runtime`` as of git ``ref`` under ``dest``; None when there is no such ref here (a CI
    checkout without the branch), and then only "after" is timed."""
    archive = subprocess.run(["git", "archive", ref, "mcl_runtime"], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        print(f"no git ref {ref!r} here: timing this checkout only", file=sys.stderr)
        return None
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def run_side(pythonpath: Path, dataset: str, workers: int, limit: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", dataset, "--workers", str(workers)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    proc = subprocess.run(cmd, cwd=pythonpath, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    timed = [r for r in runs if "seconds" in r]
    if not timed:
        return runs[0]
    return {
        **{k: v for k, v in timed[-1].items() if k not in ("seconds", "cpu_seconds")},
        "seconds_median": statistics.median(r["seconds"] for r in timed),
        "seconds_all": [r["seconds"] for r in timed],
        "cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in timed if "cpu_seconds" in r)
        if any("cpu_seconds" in r for r in timed)
        else None,
    }


def compare(args: argparse.Namespace) -> dict:
    limit = 8 if args.smoke else args.limit
    repeats = 1 if args.smoke else args.repeats
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_judge_") as tmp:
        before_root = export_ref(args.ref, Path(tmp))
        for dataset in args.datasets.split(","):
            runs = {"before": [], "after": []}
            for _ in range(repeats if dataset == "humaneval" else 1):
                for side, root in (("before", before_root), ("after", ROOT)):
                    if root is None:
                        runs[side].append({"skipped": f"no git ref {args.ref!r} in this checkout"})
                        continue
                    runs[side].append(run_side(root, dataset, args.workers, limit))
                    print(dataset, side, runs[side][-1], file=sys.stderr)
            entry = {side: summarize(r) for side, r in runs.items()}
            if "seconds_median" in entry["before"]:
                entry["before_over_after"] = entry["before"]["seconds_median"] / entry["after"]["seconds_median"]
                if entry["before"]["cpu_seconds_median"]:
                    entry["before_over_after_cpu"] = (
                        entry["before"]["cpu_seconds_median"] / entry["after"]["cpu_seconds_median"]
                    )
            results[dataset] = entry
    return results


def machine() -> dict:
    import platform

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "commit": commit.stdout.strip(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="8 problems, one repeat; numbers are not results")
    p.add_argument("--ref", default="main", help="git ref whose judge is 'before'")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--datasets", default="humaneval,humaneval-et")
    p.add_argument("--out-dir", type=Path, default=None, help=f"where the JSON goes (default {RESULTS_DIR})")
    p.add_argument("--worker", metavar="DATASET", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(judge_all(args.worker, args.workers, args.limit)))
        return
    payload = {
        "smoke": args.smoke,
        "machine": machine(),
        "ref_before": args.ref,
        "workers": args.workers,
        "repeats": 1 if args.smoke else args.repeats,
        "results": compare(args),
    }
    print(json.dumps(payload, indent=2))
    if args.smoke and args.out_dir is None:
        return
    out_dir = args.out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "judge_cpu.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
