"""C++ vs Python block manager on the CPU.

    python benchmarks/bench_block_manager.py [--smoke] [--out PATH]

1. trace: the same random serving trace (10k operations: add_sequence + prompt append with shared
   prefixes, decode appends, fork, free, build_metadata, pop_block_copies) replayed on each.
2. metadata: build_metadata for a decode step of 256 sequences of 1-2k tokens (one new token each).

Targets: C++ >= 10x faster on the trace, metadata for 256 sequences <= 100 us.
Writes benchmarks/results/block_manager_cpu.json (--smoke: a tiny run that writes only with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from mcl_runtime.engine.block_manager import HAVE_EXT, PyBlockManager

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "block_manager_cpu.json"
VOCAB = 32000


def make_trace(num_ops: int, block_size: int, num_blocks: int, seed: int) -> list[tuple]:
    """Random operations, generated against the reference so that every one of them is valid."""
    rng = random.Random(seed)
    bm = PyBlockManager(num_blocks, block_size)
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randrange(64, 512))] for _ in range(8)]
    live: list[int] = []
    next_id = 0
    ops: list[tuple] = []
    while len(ops) < num_ops:
        r = rng.random()
        if not live or (r < 0.08 and len(live) < 64):
            prefix = rng.choice(prefixes)
            suffix = [rng.randrange(VOCAB) for _ in range(rng.randrange(16, 128))]
            prompt = prefix[: rng.randrange(len(prefix) + 1)] + suffix
            op = ("add", next_id, prompt, rng.randrange(4))
            live.append(next_id)
            next_id += 1
        elif r < 0.1 and len(live) < 64:
            op = ("fork", rng.choice(live), next_id)
            live.append(next_id)
            next_id += 1
        elif r < 0.2:
            op = ("free", live.pop(rng.randrange(len(live))))
        elif r < 0.85:
            op = ("append", rng.choice(live), [rng.randrange(VOCAB)])
        elif r < 0.95:
            batch = rng.sample(live, rng.randrange(1, len(live) + 1))
            op = ("build_metadata", batch, [min(1, bm.get_num_tokens(s)) for s in batch])
        else:
            op = ("pop_block_copies",)
        replay(bm, [op])
        ops.append(op)
    return ops


def replay(bm, ops: list[tuple]) -> list:
    out = []
    for op in ops:
        kind = op[0]
        if kind == "add":
            cached = bm.add_sequence(op[1], op[2], op[3])
            out.append(bm.append_tokens(op[1], op[2][cached:]))
        elif kind == "append":
            out.append(bm.append_tokens(op[1], op[2]))
        elif kind == "fork":
            out.append(bm.fork(op[1], op[2]))
        elif kind == "free":
            out.append(bm.free(op[1]))
        elif kind == "build_metadata":
            out.append(bm.build_metadata(op[1], op[2]))
        else:
            out.append(bm.pop_block_copies())
    return out


def time_trace(cls, ops: list[tuple], block_size: int, num_blocks: int, repeats: int) -> tuple[float, list]:
    """Best wall time of ``repeats`` replays on fresh managers, and the outputs of the last one."""
    best = float("inf")
    for _ in range(repeats):
        bm = cls(num_blocks, block_size)
        t0 = time.perf_counter()
        out = replay(bm, ops)
        best = min(best, time.perf_counter() - t0)
    return best, out


def same_outputs(a: list, b: list) -> bool:
    def norm(x):
        return [arr.tolist() for arr in x] if isinstance(x, tuple) and len(x) == 5 else x

    return all(norm(x) == norm(y) for x, y in zip(a, b)) and len(a) == len(b)


def decode_batch(cls, num_seqs: int, min_len: int, max_len: int, block_size: int, seed: int):
    """A manager holding ``num_seqs`` sequences of min_len..max_len tokens, each with one new token."""
    rng = random.Random(seed)
    lengths = [rng.randrange(min_len, max_len + 1) for _ in range(num_seqs)]
    bm = cls(sum(-(-(n + 1) // block_size) for n in lengths), block_size)
    for s, n in enumerate(lengths):
        prompt = [rng.randrange(VOCAB) for _ in range(n)]
        cached = bm.add_sequence(s, prompt, s % 4)
        if not bm.append_tokens(s, prompt[cached:]) or not bm.append_tokens(s, [rng.randrange(VOCAB)]):
            raise RuntimeError("decode batch does not fit in its pool")
    return bm, list(range(num_seqs)), [1] * num_seqs


def time_metadata(bm, seq_ids: list[int], num_new: list[int], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        bm.build_metadata(seq_ids, num_new)
        times.append(time.perf_counter() - t0)
    return times


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    import numpy

    return {
        "cpu": cpu or platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "numpy": numpy.__version__,
    }


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT}; none with --smoke)")
    args = ap.parse_args()
    out_path = args.out if args.out or args.smoke else DEFAULT_OUT
    if args.smoke:
        cfg = dict(
            num_ops=1000,
            block_size=16,
            num_blocks=512,
            num_seqs=32,
            min_len=128,
            max_len=256,
            py_repeats=1,
            cpp_repeats=2,
            meta_repeats=20,
        )
    else:
        cfg = dict(
            num_ops=10_000,
            block_size=16,
            num_blocks=2048,
            num_seqs=256,
            min_len=1024,
            max_len=2048,
            py_repeats=2,
            cpp_repeats=5,
            meta_repeats=300,
        )
    impls = {"python": PyBlockManager}
    if HAVE_EXT:
        from mcl_runtime import _C

        impls["cpp"] = _C.BlockManager
    else:
        print("C++ extension not built (or MCL_NO_EXT=1): timing the Python reference only")

    info = machine()
    print(
        f"device: cpu ({info['cpu']}, {info['cpu_count']} cores), python {info['python']}, torch {info['torch']}, numpy {info['numpy']}"  # noqa: E501
    )
    ops = make_trace(cfg["num_ops"], cfg["block_size"], cfg["num_blocks"], seed=0)
    results: dict = {"trace": {}, "metadata": {}}
    outputs = {}
    for name, cls in impls.items():
        repeats = cfg["py_repeats"] if name == "python" else cfg["cpp_repeats"]
        seconds, outputs[name] = time_trace(cls, ops, cfg["block_size"], cfg["num_blocks"], repeats)
        results["trace"][name] = {"seconds": seconds, "us_per_op": seconds / len(ops) * 1e6}
        print(f"trace    {name:>6}: {seconds * 1e3:9.1f} ms for {len(ops)} ops ({seconds / len(ops) * 1e6:.2f} us/op)")
    if "cpp" in outputs and not same_outputs(outputs["python"], outputs["cpp"]):
        raise SystemExit("the C++ and Python managers gave different outputs on the trace")

    for name, cls in impls.items():
        bm, seq_ids, num_new = decode_batch(
            cls, cfg["num_seqs"], cfg["min_len"], cfg["max_len"], cfg["block_size"], seed=1
        )
        repeats = cfg["meta_repeats"] if name == "cpp" else max(5, cfg["meta_repeats"] // 20)
        times = time_metadata(bm, seq_ids, num_new, repeats)
        results["metadata"][name] = {
            "median_us": statistics.median(times) * 1e6,
            "min_us": min(times) * 1e6,
            "repeats": repeats,
        }
        print(
            f"metadata {name:>6}: {statistics.median(times) * 1e6:9.1f} us median, {min(times) * 1e6:.1f} us min "
            f"({cfg['num_seqs']} sequences, {cfg['min_len']}-{cfg['max_len']} tokens, 1 new each)"
        )

    summary = {}
    if "cpp" in impls:
        summary = {
            "trace_speedup": results["trace"]["python"]["seconds"] / results["trace"]["cpp"]["seconds"],
            "metadata_speedup": results["metadata"]["python"]["median_us"] / results["metadata"]["cpp"]["median_us"],
            "metadata_us_cpp": results["metadata"]["cpp"]["median_us"],
        }
        summary["meets_speedup_target_10x"] = summary["trace_speedup"] >= 10
        summary["meets_metadata_target_100us"] = summary["metadata_us_cpp"] <= 100
        print(
            f"C++/Python speed-up: trace {summary['trace_speedup']:.1f}x, "
            f"metadata {summary['metadata_speedup']:.1f}x; C++ metadata {summary['metadata_us_cpp']:.1f} us "
            "per build (targets: >= 10x, <= 100 us)"
        )

    if out_path:
        report = {
            "benchmark": "block_manager",
            "device": f"cpu: {info['cpu']}",
            "machine": info,
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "smoke": args.smoke,
            "config": cfg,
            "results": results,
            "summary": summary,
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
