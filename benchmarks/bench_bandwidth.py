"""Batch-1 decode as a fraction of the device's memory bandwidth.

    python benchmarks/bench_bandwidth.py [--smoke] [--out-dir DIR]

Qwen2.5-7B-Instruct shapes (``--shape``: also Qwen2.5-Coder-7B-Instruct,
Qwen3-8B), random bf16 weights (``load_format="dummy"``), one request at a time
(prompt ``--prompt-len`` tokens, ``--gen`` tokens, greedy), without an adapter and with one rank-32
adapter on all seven projections. Bytes a decode step must read: every weight once (the embedding
table only for its one row, unless tied to the lm_head), the adapter's A and B (its rank only), and
the KV cache at the mean context of the decode steps. Achieved bandwidth = those bytes / the median
decode step time (wall clock, Python included), next to the copy bandwidth of the same device
measured in the same run (``dst.copy_(src)``, read + write counted). Target: >= 85%. Each variant
first runs its exact workload once untimed (JIT compiles and allocator growth stay out of the
timing); the JSON is rewritten after each variant.
--smoke: tiny shapes on the CPU; not results.
Writes benchmarks/results/bandwidth_<device>.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from common import (
    GIB,
    add_shape_option,
    base_parser,
    copy_bandwidth,
    device_slug,
    environment,
    lora_bytes,
    make_workload,
    model_shape,
    parse_with_smoke,
    release_memory,
    resolve_device,
    run_workload,
    save_result,
    weight_params,
    write_model_folder,
    write_peft_adapter,
)

if TYPE_CHECKING:
    from mcl_runtime.engine.llm_engine import Engine

BLOCK_SIZE = 16


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__)
    add_shape_option(p)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--copy-bytes", type=int, default=2 * GIB)
    return parse_with_smoke(p, dict(prompt_len=32, gen=8, copy_bytes=64 << 20))


def bytes_per_step(engine: Engine, cfg: dict, adapter_rank: int, context: float) -> dict:
    """What one batch-1 decode step has to read from memory."""
    item = engine.kv_cache.element_size()
    params = weight_params(cfg)
    if not cfg.get("tie_word_embeddings"):
        params -= cfg["vocab_size"] * cfg["hidden_size"]  # the embedding: one row read per token
    weights = (params + cfg["hidden_size"]) * engine.dtype.itemsize
    kv_per_token = 2 * cfg["num_hidden_layers"] * engine.kv_cache.shape[-2] * engine.kv_cache.shape[-1] * item
    lora = lora_bytes(cfg, adapter_rank, item) if adapter_rank else 0
    kv = kv_per_token * context
    return {"weights": weights, "lora": lora, "kv": kv, "total": weights + lora + kv}


def measure(engine: Engine, cfg: dict, adapter: str | None, args: argparse.Namespace) -> dict:
    wl = make_workload(1, (args.prompt_len, args.prompt_len), (args.gen, args.gen), [adapter], seed=1)
    run_workload(engine, wl)  # warm-up on the exact shapes
    s = run_workload(engine, wl).summary()
    need = bytes_per_step(engine, cfg, args.rank if adapter else 0, args.prompt_len + args.gen / 2)
    step = s["decode_step_median_s"]
    return {
        "variant": "lora" if adapter else "base",
        "bytes_per_step": need,
        "decode_step_median_s": step,
        "achieved_bytes_per_s": need["total"] / step,
        "tpot_mean_s": s["tpot_mean_s"],
        "jit_compiles_in_run": s["jit_compiles_in_run"],
    }


def main() -> None:
    args = parse_args()
    device = resolve_device(args)
    from mcl_runtime import Engine

    copy_bw = copy_bandwidth(device, args.copy_bytes)
    print(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write)", flush=True)
    cfg = model_shape(args)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mcl_bw_") as tmp:
        model_dir = write_model_folder(Path(tmp) / "model", cfg)
        adapter = write_peft_adapter(Path(tmp) / "lora", cfg, args.rank, 2 * args.rank, device=device)
        blocks = -(-(args.prompt_len + args.gen) // BLOCK_SIZE) + 2
        engine = Engine(
            model=model_dir,
            adapters={"agent": adapter},
            device=str(device),
            dtype=args.dtype,
            backend=args.backend,
            max_loras=1,
            max_lora_rank=args.rank,
            kv_cache_blocks=blocks,
            block_size=BLOCK_SIZE,
            max_num_seqs=1,
            load_format="dummy",
        )
        backend = engine.backend.name
        for a in (None, "agent"):
            r = measure(engine, cfg, a, args)
            r["fraction_of_copy_bandwidth"] = r["achieved_bytes_per_s"] / copy_bw
            rows.append(r)
            print(
                f"{r['variant']:5s}: {r['bytes_per_step']['total'] / 1e9:.3f} GB per step in "
                f"{1e3 * r['decode_step_median_s']:.2f} ms = {r['achieved_bytes_per_s'] / 1e9:.1f} GB/s, "
                f"{100 * r['fraction_of_copy_bandwidth']:.0f}% of copy bandwidth {copy_bw / 1e9:.1f} GB/s",
                flush=True,
            )
            save(args, device, backend, copy_bw, rows, complete=len(rows) == 2)
        del engine
        release_memory()


def save(
    args: argparse.Namespace, device: torch.device, backend: str, copy_bw: float, rows: list[dict], complete: bool
) -> None:
    save_result(
        f"bandwidth_{device_slug(device)}",
        {
            "benchmark": "bandwidth",
            "env": environment(device),
            "complete": complete,
            "config": {
                "model": f"{args.shape} config" + (" (shrunk for smoke)" if args.smoke else ""),
                "weights": "random (load_format=dummy)",
                "dtype": args.dtype,
                "backend": backend,
                "prompt_len": args.prompt_len,
                "gen_tokens": args.gen,
                "rank": args.rank,
                "copy_bytes": args.copy_bytes,
                "copy_bandwidth_counts": "read + write",
            },
            "copy_bandwidth_bytes_per_s": copy_bw,
            "runs": rows,
            "target_fraction": 0.85,
        },
        args.out_dir,
        args.smoke,
        announce=complete,
    )


if __name__ == "__main__":
    main()
