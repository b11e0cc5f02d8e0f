"""Qwen2.5-7B-Instruct + four rank-32 agent LoRAs against Qwen2.5-32B-Instruct, same engine.

    python benchmarks/bench_vs_32b.py [--smoke] [--out-dir DIR] [--batches 1 4 16]

Random weights in the exact published shapes (``Engine(load_format="dummy")``: config.json + tokenizer,
no checkpoint), bf16, the default backend of the device. 7B: four PEFT adapters of rank 32 on all seven
linear projections (written with random A/B), requests spread round-robin over the four agents. 32B:
no adapter. Workload (MapCoder-like): prompts of 1-2k tokens, 256 generated tokens each (EOS ignored;
one length, so the decode batch keeps its size), every request of a batch submitted at once; the same
prompts for both models. One engine per model and batch, its KV cache sized to hold that batch at full
length, so the peak is what that batch needs. Before the timed run the same batch runs once with 20
generated tokens (every prefill shape and the first decode steps compile untimed); Triton compiles
inside the timed run are counted in the JSON.
Reported per model and batch: weights, LoRA slots, KV cache used, peak allocated (CUDA), time to first
token, per-token decode time (TPOT), output tokens/s; and the 32B/7B ratio of each, next to the
ratio of weight bytes alone (4.30 for these two configs; goal >= 4.5x on memory and token time).
vLLM/SGLang: availability is recorded, they are not driven here.
--smoke: both configs shrunk 56x in width and 7x in depth, short requests, CPU; not results.
Writes benchmarks/results/vs_32b_<device>.json after every run (so a timeout keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import (
    AGENTS,
    QWEN25_7B_INSTRUCT,
    QWEN25_32B_INSTRUCT,
    base_parser,
    baseline_availability,
    cuda_peak,
    device_slug,
    engine_memory,
    environment,
    kv_block_bytes,
    make_workload,
    parse_with_smoke,
    release_memory,
    reset_cuda_peak,
    resolve_device,
    run_workload,
    save_result,
    shrink_config,
    warmup_workload,
    weight_params,
    write_model_folder,
    write_peft_adapter,
)

BLOCK_SIZE = 16
# Weight bytes alone, 32B over 7B, from the published configs (4.30).
WEIGHT_BYTES_RATIO = weight_params(QWEN25_32B_INSTRUCT) / weight_params(QWEN25_7B_INSTRUCT)
METRICS = (
    "weights_bytes",
    "lora_slots_bytes",
    "kv_used_bytes",
    "peak_allocated_bytes",
    "ttft_mean_s",
    "tpot_mean_s",
    "decode_step_median_s",
)


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompt-len", type=int, nargs=2, default=(1024, 2048), metavar=("MIN", "MAX"))
    p.add_argument("--gen-len", type=int, nargs=2, default=(256, 256), metavar=("MIN", "MAX"))
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=170.0, help="skip the runs that would start after this")
    return parse_with_smoke(p, dict(batches=[1, 3], prompt_len=(24, 48), gen_len=(6, 6)))


def model_specs(
    args: argparse.Namespace, workdir: Path, device: torch.device
) -> dict[str, tuple[Path, dict[str, Path]]]:
    """Model folder and adapter folders of the two contenders."""
    small, large = QWEN25_7B_INSTRUCT, QWEN25_32B_INSTRUCT
    if args.smoke:
        small, large = shrink_config(small), shrink_config(large)
    adapters = {
        name: write_peft_adapter(workdir / "adapters" / name, small, args.rank, 2 * args.rank, seed=i, device=device)
        for i, name in enumerate(AGENTS)
    }
    return {
        "qwen2.5-7b+4lora": (write_model_folder(workdir / "7b", small), adapters),
        "qwen2.5-32b": (write_model_folder(workdir / "32b", large), {}),
    }


def measure(
    name: str, model_dir: Path, adapters: dict[str, Path], batch: int, args: argparse.Namespace, device: torch.device
) -> dict:
    """One model at one batch size: memory and latency of the workload."""
    from mcl_runtime import Engine

    wl = make_workload(batch, tuple(args.prompt_len), tuple(args.gen_len), list(adapters) or [None], seed=batch)
    reset_cuda_peak(device)
    t0 = time.perf_counter()
    engine = Engine(
        model=model_dir,
        adapters=adapters,
        device=str(device),
        dtype=args.dtype,
        backend=args.backend,
        max_loras=max(1, len(adapters)),
        max_lora_rank=args.rank if adapters else 1,
        kv_cache_blocks=wl.kv_blocks(BLOCK_SIZE) + batch,
        block_size=BLOCK_SIZE,
        max_num_seqs=batch,
        load_format="dummy",
    )
    build_s = time.perf_counter() - t0
    run_workload(engine, warmup_workload(wl))
    reset_cuda_peak(device)
    res = run_workload(engine, wl)
    row = {
        "model": name,
        "batch": batch,
        "build_s": build_s,
        "backend": engine.backend.name,
        **engine_memory(engine, json.loads((model_dir / "config.json").read_text())),
        "kv_used_bytes": res.peak_kv_blocks * kv_block_bytes(engine),
        "peak_allocated_bytes": cuda_peak(device),
        **res.summary(),
    }
    del engine
    release_memory()
    return row


def ratios(rows: list[dict]) -> list[dict]:
    """32B / 7B+LoRA of each metric, per batch size (tokens/s: 7B over 32B)."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        pair = {r["model"]: r for r in rows if r["batch"] == batch}
        if len(pair) < 2:
            continue
        small, large = pair["qwen2.5-7b+4lora"], pair["qwen2.5-32b"]
        rec = {"batch": batch}
        for m in METRICS + ("resident_bytes",):
            a, b = small.get(m), large.get(m)
            rec[m] = b / a if a and b is not None else None
        rec["output_tok_s"] = small["output_tok_s"] / large["output_tok_s"]
        out.append(rec)
    return out


def main() -> None:
    args = parse_args()
    device = resolve_device(args)
    env = environment(device)
    rows: list[dict] = []
    skipped: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mcl_vs32b_") as tmp:
        specs = model_specs(args, Path(tmp), device)
        for batch in args.batches:
            for name, (model_dir, adapters) in specs.items():
                if time.perf_counter() - start > args.max_seconds:
                    skipped.append(f"{name} batch {batch}: over --max-seconds {args.max_seconds}")
                    continue
                row = measure(name, model_dir, adapters, batch, args, device)
                row["resident_bytes"] = row["weights_bytes"] + row["lora_slots_bytes"] + row["kv_used_bytes"]
                rows.append(row)
                print(
                    f"{name:18s} batch {batch:3d}: TTFT {row['ttft_mean_s']:.3f} s, TPOT "
                    f"{row['tpot_mean_s'] or 0:.4f} s, {row['output_tok_s']:.1f} tok/s, weights "
                    f"{row['weights_bytes'] / 2**30:.2f} GiB, KV {row['kv_used_bytes'] / 2**30:.3f} GiB, "
                    f"Triton compiles in the timed run: {row['jit_compiles_in_run']}",
                    flush=True,
                )
                save(args, env, device, rows, skipped, complete=False)
    save(args, env, device, rows, skipped, complete=True)
    for r in ratios(rows):
        print(
            f"batch {r['batch']}: 32B/7B weight bytes alone {WEIGHT_BYTES_RATIO:.2f}x; measured: memory (peak) "
            f"{r['peak_allocated_bytes'] or r['resident_bytes']:.2f}x, TPOT {r['tpot_mean_s'] or 0:.2f}x, "
            f"tokens/s {r['output_tok_s']:.2f}x"
        )


def save(
    args: argparse.Namespace, env: dict, device: torch.device, rows: list[dict], skipped: list[str], complete: bool
) -> None:
    save_result(
        f"vs_32b_{device_slug(device)}",
        {
            "benchmark": "vs_32b",
            "env": env,
            "complete": complete,
            "skipped": skipped,
            "config": {
                "models": {
                    "qwen2.5-7b+4lora": "Qwen2.5-7B-Instruct config, 4 LoRAs rank "
                    f"{args.rank} alpha {2 * args.rank} on q,k,v,o,gate,up,down",
                    "qwen2.5-32b": "Qwen2.5-32B-Instruct config, no adapter",
                },
                "weights": "random (load_format=dummy)",
                "dtype": args.dtype,
                "device": str(device),
                "batches": args.batches,
                "prompt_len": list(args.prompt_len),
                "gen_len": list(args.gen_len),
                "block_size": BLOCK_SIZE,
                "sampling": "greedy, ignore_eos",
                "shrunk_for_smoke": args.smoke,
            },
            "baselines": baseline_availability(),
            "runs": rows,
            "ratios_32b_over_7b": ratios(rows),
            "weight_bytes_ratio_32b_over_7b": WEIGHT_BYTES_RATIO,
            "goal": "32B/7B >= 4.5x on memory and on token time",
        },
        args.out_dir,
        args.smoke,
    )


if __name__ == "__main__":
    main()
