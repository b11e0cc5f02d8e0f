"""Every benchmark script runs its ``--smoke`` mode (tiny configs, CPU) so that none of them rots.

The scripts run as subprocesses, a few at a time (one torch thread each), started together when the
first test of this module asks; each test then waits for its own script. Smoke output goes to a
temporary folder; ``make_report.py --smoke`` then renders those JSONs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
# Scripts this project has or expects; a missing one is skipped with a reason, any other
# benchmarks/bench_*.py found is run too.
EXPECTED = ["bench_engine_cpu", "bench_vs_32b", "bench_multi_lora", "bench_bandwidth", "bench_lora_kernels",
            "bench_attention", "bench_serve", "bench_block_manager", "bench_pipeline"]
SCRIPTS = list(dict.fromkeys(EXPECTED + sorted(p.stem for p in BENCH.glob("bench_*.py"))))
TIMEOUT_S = 150
PARALLEL = 3


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _command(script: str, out_dir: Path) -> list[str]:
    path = BENCH / f"{script}.py"
    cmd = [str(path), "--smoke"]
    if "--out-dir" in path.read_text():
        cmd += ["--out-dir", str(out_dir / script)]
    return cmd


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> tuple[Path, dict[str, Future]]:
    out_dir = tmp_path_factory.mktemp("bench_smoke")
    pool = ThreadPoolExecutor(PARALLEL)
    futures = {s: pool.submit(_run, _command(s, out_dir)) for s in SCRIPTS if (BENCH / f"{s}.py").is_file()}
    yield out_dir, futures
    pool.shutdown(wait=True, cancel_futures=True)


def _check(proc: subprocess.CompletedProcess, name: str) -> None:
    assert proc.returncode == 0, (f"{name} --smoke failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script: str, smoke_runs) -> None:
    _, futures = smoke_runs
    if script not in futures:
        pytest.skip(f"benchmarks/{script}.py does not exist yet (another engineer's part)")
    _check(futures[script].result(timeout=TIMEOUT_S * len(futures)), script)


def test_make_report_smoke(smoke_runs, tmp_path) -> None:
    out_dir, futures = smoke_runs
    ours = [s for s in ("bench_vs_32b", "bench_multi_lora", "bench_bandwidth", "bench_engine_cpu") if s in futures]
    for s in ours:
        futures[s].result(timeout=TIMEOUT_S * len(futures))
    results = tmp_path / "results"
    results.mkdir()
    for json_file in out_dir.glob("*/*.json"):
        (results / json_file.name).write_bytes(json_file.read_bytes())
    proc = _run([str(BENCH / "make_report.py"), "--smoke", "--results-dir", str(results)])
    _check(proc, "make_report")
    report = (results / "README.md").read_text()
    assert "SMOKE REPORT" in report
    for kind in ("vs_32b", "multi_lora", "bandwidth", "engine_cpu"):
        if any(kind in s.replace("bench_", "") for s in ours):
            assert f"{kind}_cpu.json" in report or f"{kind}.json" in report
