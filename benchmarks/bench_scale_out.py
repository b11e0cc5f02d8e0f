"""Scale-out on Ray Serve: the MapCoder-Lite pipeline against the server run as 1 and as 2 engine replicas
(``python -m mcl_runtime.serve --replicas N``'s application, one CPU each), side by side in one run; and
what session routing is worth: the prefix-cache hit rate when each problem's calls carry its id as
``X-Session-ID`` (what the pipeline sends) vs a fresh key per call (random routing over the replicas).

    python benchmarks/bench_scale_out.py [--smoke] [--problems N] [--workers W] [--t T] [--max-tokens N]
        [--out-dir DIR]

The workload is the real pipeline (``MapCoder`` through the OpenAI client, generated code judged in the
sandbox) on the embedded demo model over the first HumanEval problems. The demo model's answers are
nonsense, so every problem takes the same path: retrieval, one plan and its rating, code, then ``t``
debugging rounds, whose prompts share the problem, the plan and the code: that shared prefix is what
session routing keeps in one replica's cache. Each setting gets a fresh deployment (cold caches), a
warm-up on other problems, then the timed run. Problems/hour counts the whole problem (model calls
and sandbox runs), as the pipeline's summary does. The client and its sandbox run on the same machine
as the replicas: with fewer than 4 cores they compete for them (the JSON records the core count).

Writes ``benchmarks/results/scale_out_cpu.json`` (``--smoke``: only with ``--out-dir``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from common import environment, save_result
from prometheus_client.parser import text_string_to_metric_families

from mcl_runtime.agents.datasets import load_problems
from mcl_runtime.agents.evaluate import evaluate
from mcl_runtime.agents.judge import Judge
from mcl_runtime.agents.llm import ChatReply, OpenAIChatClient
from mcl_runtime.agents.mapcoder import MapCoder, MapCoderConfig
from mcl_runtime.agents.sandbox import Limits, Sandbox

APP = "bench_scale_out"
SETTINGS = [("1 replica", 1, "session"), ("2 replicas", 2, "session"), ("2 replicas, random routing", 2, "random")]


class RandomSessions:
    """The pipeline's client with a fresh session key per call: calls spread at random over the replicas."""

    def __init__(self, client: OpenAIChatClient) -> None:
        self.client = client

    async def chat(self, agent, messages, max_tokens, temperature, structured=None, session=None) -> ChatReply:
        return await self.client.chat(agent, messages, max_tokens, temperature, structured, uuid.uuid4().hex)

    async def close(self) -> None:
        await self.client.close()


def cache_counters(url: str) -> dict[str, float]:
    """Prompt tokens and prefix-cache hit tokens, summed over the replicas."""
    totals = {"prompt_tokens": 0.0, "hit_tokens": 0.0}
    names = {"mcl_prompt_tokens_total": "prompt_tokens", "mcl_engine_prefix_cache_hit_tokens": "hit_tokens"}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=60).text):
        for sample in family.samples:
            if sample.name in names:
                totals[names[sample.name]] += sample.value
    return totals


def run_setting(args: argparse.Namespace, replicas: int, routing: str, url: str, address: str) -> dict:
    from ray import serve

    from mcl_runtime.serve.__main__ import parse_args
    from mcl_runtime.serve.ray_app import build_application

    serve_args = parse_args(["--replicas", str(replicas), "--cpus-per-replica", "1", "--ray-address", address])
    start = time.perf_counter()
    serve.run(build_application(serve_args), name=APP, route_prefix="/")
    deploy_s = time.perf_counter() - start
    problems = load_problems("humaneval", limit=args.problems + args.workers)
    warmup, timed = problems[args.problems :], problems[: args.problems]
    config = MapCoderConfig(k=1, t=args.t, max_tokens=args.max_tokens, temperature=0.0)
    judge = Judge(Sandbox(Limits(timeout_s=5.0)))

    async def run(batch, out: Path) -> dict:
        client = OpenAIChatClient(url + "/v1", timeout_s=600)
        chat = RandomSessions(client) if routing == "random" else client
        try:
            return await evaluate(batch, MapCoder(chat, judge, config), out, args.workers, progress=False)
        finally:
            await chat.close()

    with tempfile.TemporaryDirectory(prefix="mcl_scale_out_") as tmp:
        asyncio.run(run(warmup, Path(tmp) / "warmup.jsonl"))
        before = cache_counters(url)
        summary = asyncio.run(run(timed, Path(tmp) / "timed.jsonl"))
        after = cache_counters(url)
    serve.delete(APP)
    prompt = after["prompt_tokens"] - before["prompt_tokens"]
    hits = after["hit_tokens"] - before["hit_tokens"]
    return {
        "replicas": replicas,
        "routing": routing,
        "problems": summary["problems"],
        "errors": summary["errors"],
        "calls": summary["calls_total"],
        "wall_seconds": summary["wall_seconds"],
        "problems_per_hour": summary["problems_per_hour"],
        "prompt_tokens": prompt,
        "prefix_cache_hit_tokens": hits,
        "prefix_cache_hit_rate": hits / prompt if prompt else 0.0,
        "deploy_seconds": deploy_s,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few short problems (CI); numbers are not results")
    p.add_argument("--problems", type=int, default=24, help="timed problems per setting")
    p.add_argument("--workers", type=int, default=8, help="problems in flight (and warm-up problems)")
    p.add_argument("--t", type=int, default=3, help="debugging rounds per problem")
    p.add_argument("--max-tokens", type=int, default=96, help="per model call")
    p.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    p.add_argument("--note", default="", help="how the machine was during the run (recorded in the JSON)")
    args = p.parse_args()
    if args.smoke:
        args.problems, args.workers, args.t, args.max_tokens = 2, 2, 1, 16
    if min(args.problems, args.workers, args.max_tokens) < 1 or args.t < 0:
        raise SystemExit("--problems, --workers and --max-tokens must be positive, --t not negative")
    return args


def main() -> None:
    import ray
    from ray import serve

    from mcl_runtime.demo import demo_model_dir
    from mcl_runtime.serve.ray_app import init_ray

    args = parse_args()
    demo_model_dir()
    cores = os.cpu_count() or 1
    init_ray(num_cpus=max(2, cores), include_dashboard=False, logging_level=logging.WARNING)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        url, address = f"http://127.0.0.1:{port}", ray.get_runtime_context().gcs_address
        rows = [run_setting(args, replicas, routing, url, address) for _, replicas, routing in SETTINGS]
    finally:
        serve.shutdown()
        ray.shutdown()
    one, two, random_two = rows
    report = {
        "benchmark": "scale_out",
        "workload": {
            "dataset": "humaneval",
            "problems": args.problems,
            "workers": args.workers,
            "k": 1,
            "t": args.t,
            "max_tokens": args.max_tokens,
            "model": "mcl-demo-tiny (float32, CPU)",
        },
        "settings": [{"setting": name, **row} for (name, _, _), row in zip(SETTINGS, rows)],
        "ratios": {
            "problems_per_hour_2_vs_1_replicas": two["problems_per_hour"] / one["problems_per_hour"],
            "prefix_cache_hit_rate_session_routing": two["prefix_cache_hit_rate"],
            "prefix_cache_hit_rate_random_routing": random_two["prefix_cache_hit_rate"],
        },
        "conditions": {
            "cores": cores,
            "placement": "one CPU per replica; the client and its sandbox run on the same machine"
            + ("" if cores >= 4 else f" (only {cores} cores here: the replicas compete with the client)"),
            "note": args.note,
        },
        "environment": environment("cpu"),
    }
    print(
        f"problems/h: 1 replica {one['problems_per_hour']:.1f}, 2 replicas {two['problems_per_hour']:.1f} "
        f"({report['ratios']['problems_per_hour_2_vs_1_replicas']:.2f}x); prefix-cache hit rate: session routing "
        f"{two['prefix_cache_hit_rate']:.1%}, random routing {random_two['prefix_cache_hit_rate']:.1%}"
    )
    path = save_result("scale_out_cpu", report, args.out_dir, args.smoke)
    if path is not None:
        plot(report, path.with_suffix(".png"))


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    panels = [("problems_per_hour", "problems / hour", 1), ("prefix_cache_hit_rate", "prefix-cache hit rate (%)", 100)]
    for ax, (key, label, scale) in zip(axes, panels):
        ax.bar([r["setting"] for r in rows], [scale * r[key] for r in rows], color=["#888", "#2a7", "#c84"])
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelsize=8)
    env = report["environment"]
    cores = report["conditions"]["cores"]
    fig.suptitle(f"Ray Serve replicas of mcl-demo-tiny, one CPU each ({env['cpu']}, {cores} cores)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
