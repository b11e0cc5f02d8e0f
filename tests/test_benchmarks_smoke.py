"""Every benchmark script runs its ``--smoke`` mode (tiny configs, CPU) so that none of them rots.

The scripts of the GPU run (``benchmarks/run_gpu.sh``: kernel microbenchmarks and the engine
benchmarks) run through ``run_gpu.sh --cpu-preflight``, the same steps, caps, packing and file
limit as on the GPU, smoke-sized; it leaves out only its ``pytest_cuda`` step (CI collects the tests
itself). The other scripts run one by one. All run as subprocesses, a few at a time (one torch
thread each), started together when the first test of this module asks; each test then waits for
its own. Smoke output goes to a temporary folder; ``make_report.py --smoke`` then renders those JSONs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
# Scripts this project has or expects; a missing one is skipped with a reason, any other
# benchmarks/bench_*.py found is run too.
EXPECTED = [
    "bench_engine_cpu",
    "bench_vs_32b",
    "bench_multi_lora",
    "bench_bandwidth",
    "bench_lora_kernels",
    "bench_attention",
    "bench_serve",
    "bench_block_manager",
    "bench_pipeline",
    "bench_vs_vllm",
    "bench_pipeline_vs_vllm",
]
GPU_RUN = ["bench_lora_kernels", "bench_attention", "bench_vs_32b", "bench_bandwidth", "bench_multi_lora"]
SCRIPTS = [s for s in dict.fromkeys(EXPECTED + sorted(p.stem for p in BENCH.glob("bench_*.py"))) if s not in GPU_RUN]
TIMEOUT_S = 150
SLOW = {"bench_scale_out": 420}  # starts Ray and deploys three applications
PREFLIGHT_TIMEOUT_S = 900
PARALLEL = 3
PREFLIGHT = "run_gpu_preflight"


def _run(args: list[str], timeout: float = TIMEOUT_S, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", **env}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _preflight(out_dir: Path) -> subprocess.CompletedProcess:
    return _run(
        ["bash", str(BENCH / "run_gpu.sh"), "--cpu-preflight"],
        PREFLIGHT_TIMEOUT_S,
        OUT=str(out_dir),
        PYTHON=sys.executable,
        SKIP_STEPS="pytest_cuda",
    )


def _command(script: str, out_dir: Path) -> list[str]:
    path = BENCH / f"{script}.py"
    cmd = [sys.executable, str(path), "--smoke"]
    if "--out-dir" in path.read_text():
        cmd += ["--out-dir", str(out_dir / script)]
    return cmd


# Scripts that need an optional extra, with the marker their test carries (deselectable, skipped without it).
MARKS = {"bench_serve": pytest.mark.server_stack, "bench_scale_out": pytest.mark.ray}


def _selected(session: pytest.Session) -> set[str]:
    """The scripts whose smoke test runs in this session (after ``-m``/``-k`` deselection and skips)."""
    selected = set()
    for item in session.items:
        if getattr(item, "originalname", None) != "test_benchmark_smoke":
            continue
        mark = MARKS.get(item.callspec.params["script"])
        if mark is not None and mark.name == "ray" and importlib.util.find_spec("ray") is None:
            continue
        selected.add(item.callspec.params["script"])
    return selected


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory) -> tuple[Path, dict[str, Future]]:
    out_dir = tmp_path_factory.mktemp("bench_smoke")
    pool = ThreadPoolExecutor(PARALLEL)
    futures = {PREFLIGHT: pool.submit(_preflight, out_dir / PREFLIGHT)}
    selected = _selected(request.session)
    futures.update(
        {
            s: pool.submit(_run, _command(s, out_dir), SLOW.get(s, TIMEOUT_S))
            for s in SCRIPTS
            if s in selected and (BENCH / f"{s}.py").is_file()
        }
    )
    yield out_dir, futures
    pool.shutdown(wait=True, cancel_futures=True)


def _check(proc: subprocess.CompletedProcess, name: str) -> None:
    assert proc.returncode == 0, (
        f"{name} --smoke failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def test_run_gpu_cpu_preflight(smoke_runs) -> None:
    """The GPU run's steps pass smoke-sized, and what it leaves in $OUT would all come back."""
    out_dir, futures = smoke_runs
    _check(futures[PREFLIGHT].result(timeout=PREFLIGHT_TIMEOUT_S), "run_gpu.sh --cpu-preflight")
    files = sorted(p.name for p in (out_dir / PREFLIGHT).rglob("*") if p.is_file())
    assert len(files) <= 8, files
    for kind in (
        "lora_kernels_smoke",
        "attention_smoke",
        "vs_32b_cpu",
        "bandwidth_cpu",
        "multi_lora_cpu",
        "host_overhead_cpu",
    ):
        assert f"{kind}.json" in files, files
    with tarfile.open(out_dir / PREFLIGHT / "run_gpu_phase1-phase2-phase3.tar.gz") as tar:
        names = tar.getnames()
    assert "./summary.txt" in names and "./report/README.preview.md" in names, names


@pytest.mark.parametrize("script", [pytest.param(s, marks=MARKS[s]) if s in MARKS else s for s in SCRIPTS])
def test_benchmark_smoke(script: str, smoke_runs) -> None:
    _, futures = smoke_runs
    if script not in futures:
        pytest.skip(f"benchmarks/{script}.py does not exist yet (another engineer's part)")
    _check(futures[script].result(timeout=TIMEOUT_S * len(futures) + max(SLOW.values())), script)


def test_make_report_smoke(smoke_runs, tmp_path) -> None:
    out_dir, futures = smoke_runs
    ours = [s for s in (PREFLIGHT, "bench_engine_cpu") if s in futures]
    for s in ours:
        futures[s].result(timeout=PREFLIGHT_TIMEOUT_S)
    results = tmp_path / "results"
    results.mkdir()
    for json_file in out_dir.glob("*/*.json"):
        (results / json_file.name).write_bytes(json_file.read_bytes())
    proc = _run([sys.executable, str(BENCH / "make_report.py"), "--smoke", "--results-dir", str(results)])
    _check(proc, "make_report")
    report = (results / "README.md").read_text()
    assert "SMOKE REPORT" in report
    # The preflight's results, and the engine benchmark's where its smoke test was selected too.
    kinds = ["vs_32b", "multi_lora", "bandwidth"] + (["engine_cpu"] if "bench_engine_cpu" in futures else [])
    for kind in kinds:
        assert f"{kind}_cpu.json" in report or f"{kind}.json" in report
