"""Load benchmark of the OpenAI-compatible server: requests/s, output tokens/s, time to first token
and inter-token latency (p50/p99) at concurrency 1, 8 and 32, requests spread over 4 adapters.

    python benchmarks/bench_serve.py [--smoke] [--out-dir DIR] [--no-gpu] [--url http://127.0.0.1:PORT]

Each setup starts ``python -m mcl_runtime.serve`` on 127.0.0.1 (a port the OS picks) and stops it
with SIGTERM afterwards:

1. ``cpu``: the demo model ``mcl-demo-tiny`` and its four adapters, on the CPU (every run);
2. ``cuda``: random bfloat16 weights with Qwen2.5-7B's shapes (28 layers, hidden 3584, MLP 18944,
   28 query / 4 KV heads, vocabulary 152064) and four random rank-16 adapters on all seven
   projections, when a GPU is available (built once under ``$MCL_CACHE``, ~15 GB). It uses the demo
   tokenizer, and the lm_head rows past that tokenizer's tokens are zero, so greedy decoding picks
   tokens that decode to text (streamed chunks need text) while every matmul keeps its 7B shape.

Load: at each concurrency ``c``, ``c`` workers send streamed completions back to back (greedy,
``ignore_eos``, so each request yields exactly ``--max-tokens`` tokens), adapter ``i % 4`` for
request ``i``, until ``--requests`` (default 4c, at least 16) are done or ``--max-seconds`` passed.
TTFT: request sent to first text chunk. ITL: gaps between text chunks (a chunk is one token, or
a few when the engine holds back a UTF-8 character split across tokens). TPOT: per request,
(last chunk - first chunk) / (tokens - 1). Server-side batching (sequences per engine step) is read
from ``/metrics`` before and after each level.

Writes ``benchmarks/results/serve_<device>_<model>.json`` and ``.png`` (``--smoke``: a few short
requests per level, written only with ``--out-dir``). ``--url`` measures a server already running on
this machine instead (one setup, named after the server's base model).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ADAPTERS = ("retrieval", "planning", "coding", "debugging")
LEVELS = (1, 8, 32)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
TASKS = (
    "reverse a linked list",
    "merge two sorted arrays",
    "count islands in a grid",
    "parse a date string",
    "find the longest palindrome",
    "evaluate an arithmetic expression",
    "compute a running median",
    "detect a cycle in a directed graph",
)
QWEN25_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}
GPU_MODEL_NAME = "qwen2.5-7b-shape-random"


@dataclass
class Sample:
    ok: bool
    start: float
    end: float
    tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2 or len(self.chunk_times) < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.tokens - 1)


def prompt(i: int) -> str:
    return (
        f"# Task {i}: {TASKS[i % len(TASKS)]}.\n# Write a Python function with type hints and a docstring,\n"
        f"# then three asserts that test it.\ndef solution_{i}("
    )


# ---- one request and one concurrency level ------------------------------------------------------
async def send(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> Sample:
    body = {
        "model": ADAPTERS[i % len(ADAPTERS)],
        "prompt": prompt(i),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sample = Sample(ok=False, start=time.perf_counter(), end=0.0)
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code == 200:
                await read_events(r, sample)
    except httpx.HTTPError:
        sample.ok = False
    sample.end = time.perf_counter()
    return sample


async def read_events(r: httpx.Response, sample: Sample) -> None:
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            sample.ok = sample.tokens > 0
            return
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            sample.tokens = chunk["usage"]["completion_tokens"]
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            sample.chunk_times.append(time.perf_counter())


async def run_level(
    url: str, concurrency: int, num_requests: int, max_seconds: float, max_tokens: int
) -> tuple[list[Sample], float]:
    """``concurrency`` workers sending requests back to back until ``num_requests`` or ``max_seconds``."""
    samples: list[Sample] = []
    counter = itertools.count()
    start = time.perf_counter()
    deadline = start + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline and (i := next(counter)) < num_requests:
            samples.append(await send(client, url, i, max_tokens))

    async with httpx.AsyncClient(timeout=httpx.Timeout(max_seconds + 60), limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(concurrency))), timeout=max_seconds + 120)
    return samples, time.perf_counter() - start


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None}
    p50, p99 = np.percentile(np.asarray(values) * 1000.0, [50, 99])
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}


def summarize(samples: list[Sample], elapsed: float) -> dict:
    ok = [s for s in samples if s.ok]
    gaps = [b - a for s in ok for a, b in itertools.pairwise(s.chunk_times)]
    tokens = sum(s.tokens for s in ok)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(ok) / elapsed, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / elapsed, 2),
        "ttft": percentiles([s.ttft for s in ok if s.ttft is not None]),
        "itl": percentiles(gaps),
        "tpot": percentiles([s.tpot for s in ok if s.tpot is not None]),
    }


# ---- the server ---------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


def batching(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    steps = after.get("mcl_engine_steps_total", 0) - before.get("mcl_engine_steps_total", 0)
    tokens = after.get("mcl_generation_tokens_total", 0) - before.get("mcl_generation_tokens_total", 0)
    return {
        "engine_steps": steps,
        "sequences_per_step_mean": round(tokens / steps, 3) if steps else None,
        "batch_size_max_so_far": after.get("mcl_batch_size_max"),
    }


@contextmanager
def server(args: list[str], startup_timeout: float) -> Iterator[str]:
    """``python -m mcl_runtime.serve`` on 127.0.0.1 with a free port; yields its URL; SIGTERM at the end."""
    cmd = [
        sys.executable,
        "-m",
        "mcl_runtime.serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--log-level",
        "warning",
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    urls: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def drain() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            log.append(line)
            if line.startswith("mcl_runtime.serve: serving"):
                urls.put(line.split(" at ")[1].split()[0].removesuffix("/v1"))

    threading.Thread(target=drain, daemon=True).start()
    try:
        try:
            yield urls.get(timeout=startup_timeout)
        except queue.Empty:
            raise RuntimeError("the server did not start:\n" + "".join(log[-40:])) from None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"--url must point at this machine (127.0.0.1), got {url}")
    return url.rstrip("/").removesuffix("/v1")


# ---- random-weight Qwen2.5-7B-shaped model --------------------------------------------------------
def _randn(shape: tuple[int, ...], std: float, gen, device: str):
    import torch

    return (torch.randn(shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()


def _layer_tensors(i: int, cfg: dict, gen, device: str) -> dict:
    import torch

    from mcl_runtime.model.arch import BY_NAME
    from mcl_runtime.model.config import parse_config

    model = parse_config(cfg)
    p = f"model.layers.{i}."
    out = {}
    for name, (d_in, d_out) in model.projection_shapes().items():
        key = f"{p}{BY_NAME[name].parent}.{name}"
        out[f"{key}.weight"] = _randn((d_out, d_in), 0.02, gen, device)
        if getattr(model, BY_NAME[name].bias):
            out[f"{key}.bias"] = _randn((d_out,), 0.02, gen, device)
    h = model.hidden_size
    out |= {
        f"{p}input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        f"{p}post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
    }
    return out


def _outer_tensors(cfg: dict, decodable: int, gen, device: str) -> dict:
    import torch

    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    head = _randn((vocab, h), 0.02, gen, device)
    head[decodable:] = 0
    return {
        "model.embed_tokens.weight": _randn((vocab, h), 0.02, gen, device),
        "lm_head.weight": head,
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
    }


def _write_adapter(folder: Path, template: Path, cfg: dict, rank: int, seed: int, device: str) -> None:
    import torch
    from safetensors.torch import save_file

    from mcl_runtime.model.arch import BY_NAME
    from mcl_runtime.model.config import parse_config

    gen = torch.Generator(device=device).manual_seed(seed)
    dims = parse_config(cfg).projection_shapes()
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for name, (d_in, d_out) in dims.items():
            key = f"base_model.model.model.layers.{i}.{BY_NAME[name].parent}.{name}"
            tensors[f"{key}.lora_A.weight"] = _randn((rank, d_in), d_in**-0.5, gen, device)
            tensors[f"{key}.lora_B.weight"] = _randn((d_out, rank), 0.01, gen, device)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = json.loads((template / "adapter_config.json").read_text())
    config.update(r=rank, lora_alpha=2 * rank, base_model_name_or_path=GPU_MODEL_NAME)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def write_random_model(root: Path, shapes: dict, rank: int = 16, device: str = "cpu") -> Path:
    """A model folder ``root/base`` with random weights of ``shapes`` (Qwen2 layout, demo tokenizer)
    and PEFT adapters ``root/adapters/<name>``; skipped when ``root/done`` exists."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from mcl_runtime.demo import demo_adapter_dirs, demo_model_dir

    if (root / "done").exists():
        return root
    demo = demo_model_dir() / "base"
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(demo / name, base / name)
    config = json.loads((demo / "config.json").read_text())
    decodable = config["vocab_size"]
    config.update(
        shapes, _name_or_path=GPU_MODEL_NAME, torch_dtype="bfloat16", max_window_layers=shapes["num_hidden_layers"]
    )
    (base / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator(device=device).manual_seed(0)
    save_file(_outer_tensors(config, decodable, gen, device), str(base / "model-outer.safetensors"))
    for i in range(config["num_hidden_layers"]):
        save_file(_layer_tensors(i, config, gen, device), str(base / f"model-layer{i:03d}.safetensors"))
    for seed, (name, template) in enumerate(demo_adapter_dirs().items(), start=1):
        _write_adapter(root / "adapters" / name, template, config, rank, seed, device)
    (root / "done").write_text("ok\n")
    return root


# ---- setups, reports ------------------------------------------------------------------------------
def machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    info = {
        "host": platform.node(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def setups(args: argparse.Namespace) -> list[dict]:
    if args.url:
        return [{"device": "remote", "model": None, "url": check_loopback(args.url), "server_args": []}]
    out = [{"device": "cpu", "model": "mcl-demo-tiny", "server_args": ["--device", "cpu"]}]
    import torch

    if torch.cuda.is_available() and not args.no_gpu and not args.smoke:
        cache = Path(os.environ.get("MCL_CACHE") or Path.home() / ".cache" / "mcl_runtime").expanduser()
        root = write_random_model(cache / GPU_MODEL_NAME, QWEN25_7B, device="cuda")
        loras = [f"--lora={name}={root / 'adapters' / name}" for name in ADAPTERS]
        out.append(
            {
                "device": "cuda",
                "model": GPU_MODEL_NAME,
                "server_args": ["--device", "cuda", "--dtype", "bfloat16", "--model", str(root / "base"), *loras],
            }
        )
    return out


def level_plan(args: argparse.Namespace) -> list[tuple[int, int]]:
    if args.smoke:
        return [(c, c) for c in LEVELS]
    return [(c, args.requests or max(16, 4 * c)) for c in LEVELS]


async def warm_up(url: str, max_tokens: int) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(send(client, url, i, max_tokens) for i in range(len(ADAPTERS))))


def measure(url: str, args: argparse.Namespace) -> list[dict]:
    asyncio.run(warm_up(url, 4))
    results = []
    for concurrency, num_requests in level_plan(args):
        before = scrape(url)
        samples, elapsed = asyncio.run(run_level(url, concurrency, num_requests, args.max_seconds, args.max_tokens))
        row = {"concurrency": concurrency, **summarize(samples, elapsed), **batching(before, scrape(url))}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def run_setup(setup: dict, args: argparse.Namespace) -> dict:
    host = machine("cuda" if setup["device"] == "cuda" else "cpu")
    if setup.get("url"):
        levels = measure(setup["url"], args)
        setup["model"] = httpx.get(setup["url"] + "/v1/models", timeout=30).json()["data"][0]["id"]
    else:
        with server(setup["server_args"], args.startup_timeout) as url:
            levels = measure(url, args)
    return {
        "benchmark": "serve",
        "device": setup["device"],
        "model": setup["model"],
        "machine": host,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "config": {
            "max_tokens": args.max_tokens,
            "max_seconds_per_level": args.max_seconds,
            "adapters": list(ADAPTERS),
            "server_args": setup["server_args"],
        },
        "levels": levels,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    xs = [row["concurrency"] for row in levels]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(xs, [row["output_tokens_per_s"] for row in levels], "o-", label="output tokens/s")
    rps = axes[0].twinx()
    rps.plot(xs, [row["requests_per_s"] for row in levels], "s--", color="tab:orange")
    rps.set_ylabel("requests/s (dashed)")
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title("throughput")
    for ax, key in ((axes[1], "ttft"), (axes[2], "itl")):
        for pct, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            ax.plot(xs, [row[key][pct] or np.nan for row in levels], style, label=f"{key.upper()} {pct[:3]}")
        ax.set_ylabel("ms")
        ax.set_title("time to first token" if key == "ttft" else "inter-token latency")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent requests (4 adapters)")
        ax.legend()
        ax.grid(alpha=0.3)
    m = report["machine"]
    fig.suptitle(
        f"mcl_runtime.serve, {report['model']} on {m.get('gpu') or m['cpu']} ({m['cpu_cores']} cores, "
        f"{report['device']}), {report['config']['max_tokens']} tokens per request",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"serve_{report['device']}_{report['model']}"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, Path(f"{stem}.png"))
    return stem


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="one short request per worker; CPU only")
    ap.add_argument("--out-dir", type=Path, help=f"where results go (default {RESULTS}; none with --smoke)")
    ap.add_argument("--url", help="measure a server already running on 127.0.0.1 instead of starting one")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU setup even when a GPU is available")
    ap.add_argument("--max-tokens", type=int, help="tokens per request (default 64; --smoke 4)")
    ap.add_argument("--requests", type=int, help="requests per level (default 4 x concurrency, at least 16)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="time bound of one level")
    ap.add_argument("--startup-timeout", type=float, default=900.0, help="seconds the server may take to load")
    args = ap.parse_args(argv)
    args.max_tokens = args.max_tokens or (4 if args.smoke else 64)
    if args.smoke:
        args.max_seconds = min(args.max_seconds, 30.0)
    if args.max_tokens < 1 or args.max_seconds <= 0 or (args.requests is not None and args.requests < 1):
        ap.error("--max-tokens, --requests and --max-seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.out_dir or (None if args.smoke else RESULTS)
    failed = False
    for setup in setups(args):
        report = run_setup(setup, args)
        failed |= any(row["errors"] or not row["output_tokens"] for row in report["levels"])
        if out_dir is not None:
            print(f"wrote {write(report, out_dir)}.{{json,png}}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
