"""Where each engine's CPU time goes on the ``bench_vs_vllm.py`` workload (the input of the optimisation work).

    python benchmarks/profile_cpu.py [--shape qwen2.5-0.5b-instruct] [--dtype float32 bfloat16] [--scenario base]
        [--requests 16] [--max-tokens 16] [--threads 2] [--engines ours vllm] [--keep DIR]

Per dtype and engine, one process (``engine_worker.py`` with a ``profile_dir``) runs the four-adapter
mixed workload (``--scenario base``: the base model, the engine started without LoRA) twice under a
profiler: ``prefill`` (one new token per request: the prompt steps) and ``full`` (``--max-tokens``; the
same prompt lengths, other ids). Ours: the step profiler (``step_profile.py``: ms per decode step and per
prefill step in scheduling, metadata, attention, base GEMMs, LoRA, the rest of the forward, sampling and
engine bookkeeping) and torch.profiler (self time per op and input shapes); vLLM: its own torch
profiler. The op tables are sorted into categories (``categorize``); decode = full - prefill. Profilers
slow both engines down: read shares, not absolute times. Writes
``benchmarks/results/profile_cpu_<shape>[_base].json``; ``--keep DIR`` keeps the raw tables.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from bench_vs_vllm import SHAPES, build_folders, engine_envs, model_config, run_engine, scenario_adapters, workload
from common import RESULTS_DIR, environment
from vllm_env import ensure_vllm

from mcl_runtime.engine.kv_cache import parse_bytes

# Op-name patterns, first match wins (the LM head is decided by its shapes first).
CATEGORIES = [
    ("attention", r"attention|attn|sdpa|flash|paged|reshape_and_cache"),
    ("lora", r"lora|sgmv|bgmv|punica"),
    ("gemm", r"aten::(mm|addmm|bmm|linear|matmul)|onednn|mkldnn|gemm|_mm\b"),
    ("sampler", r"argmax|topk|sort|softmax|multinomial|sampl|gather|max\b|exponential"),
    ("norm_rope_act", r"norm|rotary|rope|silu|gelu|act_and_mul|rsqrt|pow|mean|embedding"),
    ("elementwise", r"aten::(add|mul|sub|div|neg|where|fill_|zero_|copy_|to|_to_copy|clone|cat|index|slice|view)"),
]


def categorize(rows: list[dict], vocab: int, rank: int) -> dict[str, float]:
    """Self milliseconds per category of op rows ``{op, shapes, self_us}``. Besides the names: the LM head
    is the matmul whose shapes name the vocabulary; a gather or batched matmul with a dimension of the
    adapters' rank last or next to last (vLLM's CPU LoRA: per-token weight gathers and ``bmm``) is LoRA."""
    out: dict[str, float] = defaultdict(float)
    lora_shape = re.compile(rf"(, {rank}\]|\[\d+, 1, (\d+, )?{rank}(, \d+)?\])")
    for row in rows:
        op, shapes = row["op"], row["shapes"]
        if str(vocab) in shapes and re.search(CATEGORIES[2][1], op):
            name = "lm_head"
        elif op in ("aten::index", "aten::bmm") and lora_shape.search(shapes):
            name = "lora"
        else:
            name = next((c for c, pattern in CATEGORIES if re.search(pattern, op, re.IGNORECASE)), "other_ops")
        out[name] += row["self_us"] / 1e3
    return dict(out)


_UNITS = {"s": 1e6, "ms": 1e3, "us": 1.0, "ns": 1e-3}


def parse_table(text: str) -> list[dict]:
    """Rows of a ``key_averages().table()`` printed with input shapes (vLLM writes one per worker)."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("Name"))
    cols = re.split(r"\s{2,}", lines[header].strip())
    rows = []
    for line in lines[header + 2 :]:
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) < len(cols) - 1 or line.startswith("-"):
            continue
        rec = dict(zip(cols, parts))
        m = re.fullmatch(r"([0-9.]+)(s|ms|us|ns)", rec.get("Self CPU", ""))
        if m:
            rows.append(
                {
                    "op": rec["Name"],
                    "shapes": rec.get("Input Shapes", ""),
                    "self_us": float(m.group(1)) * _UNITS[m.group(2)],
                    "calls": int(rec.get("# of Calls", "0") or 0),
                }
            )
    return rows


_STEP = re.compile(r"execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)")


def trace_steps(path: Path, vocab: int, rank: int) -> dict:
    """vLLM's steps from its trace (each step is a ``execute_context_N(tokens)_generation_M(tokens)``
    range): per decode-only step and per step with prompt tokens, the mean wall ms and the mean self ms
    per category of the ops inside (self = an op's time less its children's)."""
    events = json.loads(gzip.open(path).read())["traceEvents"]
    events = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: (e["ts"], -e["dur"]))
    steps = [(e, _STEP.fullmatch(e["name"])) for e in events if _STEP.fullmatch(e["name"])]
    tids = {e["tid"] for e, _ in steps}
    ops = [e for e in events if e.get("cat") == "cpu_op" and e["tid"] in tids]
    # self time of each op: its duration less that of the ops directly inside it (the steps' thread)
    self_us, stack = {}, []
    for e in ops:
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
            stack.pop()
        if stack:
            self_us[id(stack[-1])] -= e["dur"]
        self_us[id(e)] = e["dur"]
        stack.append(e)
    out = {}
    for kind in ("decode", "prefill"):
        chosen = [
            e
            for e, m in steps
            if (int(m.group(2)) == 0) == (kind == "decode") and int(m.group(2)) + int(m.group(4)) > 0
        ]
        if not chosen:
            continue
        rows = [
            {"op": o["name"], "shapes": str(o["args"].get("Input Dims", "")), "self_us": self_us[id(o)]}
            for o in ops
            if any(s["ts"] <= o["ts"] < s["ts"] + s["dur"] for s in chosen)
        ]
        cats = categorize(rows, vocab, rank)
        wall = sum(s["dur"] for s in chosen) / 1e3
        cats["unattributed (host)"] = wall - sum(cats.values())
        out[kind] = {
            "steps": len(chosen),
            "step_ms": wall / len(chosen),
            "tokens_per_step": sum(int(m.group(2)) + int(m.group(4)) for e, m in steps if e in chosen) / len(chosen),
            "ms_per_step": {k: v / len(chosen) for k, v in cats.items()},
        }
    return out


def engine_profile(engine: str, folder: Path, wall: dict[str, float], vocab: int, rank: int) -> dict:
    rows = {}
    for name in ("prefill", "full"):
        if engine == "ours":
            rows[name] = json.loads((folder / f"ours_{name}.json").read_text())
        else:
            rows[name] = parse_table((folder / f"vllm_{name}.txt").read_text())
    cats = {name: categorize(r, vocab, rank) for name, r in rows.items()}
    names = set(cats["full"]) | set(cats["prefill"])
    decode = {c: cats["full"].get(c, 0.0) - cats["prefill"].get(c, 0.0) for c in names}
    out = {
        "wall_ms": {k: 1e3 * v for k, v in wall.items()},
        "ops_ms": {"prefill": cats["prefill"], "decode (full - prefill)": decode, "full": cats["full"]},
        "top_ops_full": [
            {k: r[k] for k in ("op", "shapes", "self_us", "calls")}
            for r in sorted(rows["full"], key=lambda r: -r["self_us"])[:15]
        ],
    }
    if engine == "ours":
        out["steps"] = {n: json.loads((folder / f"ours_{n}_steps.json").read_text()) for n in ("prefill", "full")}
    elif (folder / "vllm_full.trace.json.gz").exists():
        out["steps"] = {n: trace_steps(folder / f"vllm_{n}.trace.json.gz", vocab, rank) for n in ("prefill", "full")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=SHAPES[0], choices=SHAPES)
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(64, 256))
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--engines", nargs="+", default=["ours", "vllm"], choices=["ours", "vllm"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--scenario", default="mixed", choices=["mixed", "base"], help="four adapters, or the base model (no LoRA)"
    )
    p.add_argument("--venv", type=Path, default=None)
    p.add_argument("--keep", type=Path, default=None, help="keep the raw op tables here")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args()
    args.smoke, args.no_vllm = False, "vllm" not in args.engines
    cfg = model_config(args.shape, False)
    model, adapters = build_folders(cfg, args.rank)
    vocab = cfg["vocab_size"]
    pythons = {"ours": sys.executable}
    if "vllm" in args.engines:
        env = ensure_vllm(args.venv)
        if not env.ok:
            raise SystemExit(f"vLLM does not import: {env.error}")
        pythons["vllm"] = env.python
    envs = engine_envs(args)
    per_request = scenario_adapters(args.scenario)
    # The same prompt lengths in both (decode = full - prefill), other ids (no prefix-cache hit in "full").
    prefill = workload(args.requests, args.prompt_len, 1, per_request, 1, cfg["bos_token_id"])
    full = {
        "prompts": [[(t + 1) % cfg["bos_token_id"] for t in p] for p in prefill["prompts"]],
        "max_tokens": [args.max_tokens] * args.requests,
        "adapters": prefill["adapters"],
    }
    wls = {"prefill": prefill, "full": full}
    payload = {"machine": environment("cpu"), "args": {k: str(v) for k, v in vars(args).items()}, "cases": {}}
    keep = args.keep or Path(tempfile.mkdtemp(prefix="profile_cpu_"))
    for dtype in args.dtype:
        for engine in args.engines:
            folder = keep / f"{engine}_{dtype}"
            folder.mkdir(parents=True, exist_ok=True)
            spec = {
                "tag": f"profile_{dtype}",
                "device": "cpu",
                "model": str(model),
                "adapters": adapters if args.scenario == "mixed" else {},
                "lora_rank": args.rank,
                "dtype": dtype,
                "threads": args.threads,
                "kv_cache_memory": parse_bytes(args.kv_cache_memory),
                "ours_options": {},
                "vllm_options": {},
                "warmup": workload(4, args.prompt_len, 4, per_request, 3, cfg["bos_token_id"]),
                "scenarios": wls,
                "profile_dir": str(folder),
            }
            print(f"profiling {engine} {dtype}", flush=True)
            res = run_engine(engine, spec, pythons[engine], envs[engine], folder, 3600)
            if "error" in res:
                payload["cases"][f"{engine}_{dtype}"] = res
                continue
            wall = {k: v["wall_s"] for k, v in res["scenarios"].items()}
            payload["cases"][f"{engine}_{dtype}"] = engine_profile(engine, folder, wall, vocab, args.rank)
            out = args.out_dir / f"profile_cpu_{args.shape}{'' if args.scenario == 'mixed' else '_base'}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}; raw tables in {keep}")


if __name__ == "__main__":
    main()
