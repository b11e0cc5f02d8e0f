"""The C++ CPU kernels against the torch ops the engine runs without them, side by side.

    python benchmarks/bench_cpu_kernels.py [--smoke] [--out-dir DIR] [--shapes micro qwen7b] [--reps 200]

For each shape, an engine (cpu backend, float32, 4 LoRA adapters + base, dummy weights) admits that
many requests (adapters in turn), prefills them and decodes a few steps; the next decode step's
metadata (``ForwardContext``, as ``backend.prepare`` left it) is taken from its forward call. Then,
per call of one layer, on random inputs of that step's shapes:

* ``attention``: ``CPUBackend.attention`` through the C++ paged-attention kernel (the default at
  <= ``CPUBackend.KERNEL_MAX_THREADS`` torch threads) vs ``CPUBackend(attention_kernel=False)``'s
  padded path (its own ``prepare`` on the same metadata), over the engine's KV cache;
* ``lora_<proj>``: ``apply_lora`` through ``lora_apply_cpu`` vs ``layer_kernels=False``'s gather + bmm;
* ``rms_norm_residual``: ``rms_norm_cpu`` with the residual vs ``F.rms_norm(x + residual)``;
* ``rope``: ``rope_cpu`` (in place on the q/k heads of a fused qkv) vs ``rope_torch``;
* ``silu_and_mul`` / ``silu_and_mul_bf16``: ``silu_and_mul_cpu`` on a fused gate_up output (float32,
  bfloat16) vs ``silu_and_mul_torch`` (torch's SiLU, then the product);
* ``argmax`` / ``argmax_bf16``: ``argmax_cpu`` on the step's rows of Qwen2.5's 151,936 logits
  (float32, bfloat16) vs the sampler's path without it (a float32 copy, NumPy's argmax).

Both paths are timed in alternating blocks of calls (so both see the same machine); the figure is
the median per-call time over blocks, and ``speedup`` = torch / kernel. ``max_abs_diff`` compares
one output of each path. Shapes: ``micro`` is bench_host_overhead's model at its 256 sequences
(hidden 64, 4/2 heads of 16); ``qwen7b`` is one Qwen2.5-7B-Instruct layer (hidden 3584, 28/4 heads of
128, rank-32 adapters) at 32 decodes. Per-step costs (``prepare``) are not included.
The attention and LoRA kernels run on torch's threads where the work is worth it (as the engine
calls them, SiLU-and-multiply and argmax too), RMSNorm and rope on one; torch's ops on all of
torch's threads (``--threads N`` sets them). Writes benchmarks/results/cpu_kernels.json, or
cpu_kernels_threads<N>.json with ``--threads``, with ``_<tag>`` for ``--tag`` (another machine's
file; --smoke: only with --out-dir).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    QWEN25_7B_INSTRUCT,
    SMOKE_VOCAB,
    base_parser,
    environment,
    interleaved,
    parse_with_smoke,
    save_result,
    write_model_folder,
    write_peft_adapter,
)

NUM_ADAPTERS = 4
QWEN25_VOCAB = 151_936  # the argmax cases' row width, whatever the shape's (test-sized) vocabulary
SHAPES = {
    "micro": dict(
        cfg={
            **QWEN25_7B_INSTRUCT,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "max_window_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 512,
            "bos_token_id": 509,
            "eos_token_id": 511,
        },
        seqs=256,
        prompt_len=48,
        rank=8,
    ),
    "qwen7b": dict(
        cfg={
            **QWEN25_7B_INSTRUCT,
            "num_hidden_layers": 1,
            "max_window_layers": 1,
            "vocab_size": SMOKE_VOCAB,
            "bos_token_id": 509,
            "eos_token_id": 511,
        },
        seqs=32,
        prompt_len=48,
        rank=32,
    ),
}
SMOKE_SHAPES = {"micro": dict(SHAPES["micro"], seqs=8, prompt_len=8)}


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--reps", type=int, default=200, help="calls of each path per case (in blocks of 10)")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps before the one measured")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default torch's; the kernels run on one): writes cpu_kernels_threads<N>.json",
    )
    p.add_argument("--tag", default=None, help="suffix of the result file's name (e.g. another machine's)")
    return parse_with_smoke(p, dict(reps=20, decode_steps=1))


def step_context(shape: dict, decode_steps: int, tmp: Path):
    """An engine and the ``ForwardContext`` of one of its decode steps (after ``backend.prepare``)."""
    from mcl_runtime import Engine, SamplingParams

    cfg = shape["cfg"]
    base = write_model_folder(tmp / "base", cfg)
    adapters = {
        f"a{i}": write_peft_adapter(tmp / f"a{i}", cfg, rank=shape["rank"], seed=i, dtype=torch.float32)
        for i in range(NUM_ADAPTERS)
    }
    n, plen = shape["seqs"], shape["prompt_len"]
    engine = Engine(
        model=base,
        adapters=adapters,
        device="cpu",
        dtype="float32",
        backend="cpu",
        max_loras=NUM_ADAPTERS,
        max_lora_rank=shape["rank"],
        max_num_seqs=n,
        load_format="dummy",
        kv_cache_blocks=n * ((plen + decode_steps + 16) // 16 + 2),
    )
    names = [f"a{i}" for i in range(NUM_ADAPTERS)] + [None]
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=decode_steps + 8, ignore_eos=True)
    for i in range(n):
        engine.add_request(None, torch.randint(0, 500, (plen,), generator=gen).tolist(), params, names[i % len(names)])
    while engine.scheduler.waiting or (engine.table.num_computed[engine.scheduler.running] == 0).any():
        engine.step()
    for _ in range(decode_steps):
        engine.step()
    captured = {}
    hook = engine.model.register_forward_pre_hook(lambda m, args: captured.update(ctx=args[2]))
    engine.step()
    hook.remove()
    return engine, captured["ctx"]


def cases(engine, ctx) -> dict[str, tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]]:
    """Case name -> (kernel path, torch path), each returning its output."""
    from mcl_runtime.kernels import argmax_cpu, rms_norm_cpu, rope_cpu, silu_and_mul_cpu
    from mcl_runtime.model.cpu_backend import CPUBackend
    from mcl_runtime.model.reference_backend import rope_torch, silu_and_mul_torch

    cfg, layer = engine.model.config, engine.model.layers[0]
    kernel = engine.backend
    padded = CPUBackend(attention_kernel=False, layer_kernels=False)
    attn, lora = dataclasses.replace(ctx.attn, plan=None), dataclasses.replace(ctx.lora, plan=None)
    padded.prepare(attn, lora)
    T, Hq, Hkv, D = len(ctx.attn.slot_mapping), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = ctx.kv_caches[0]
    q, k, v = (torch.randn(T, h, D, generator=gen) for h in (Hq, Hkv, Hkv))
    scale = layer.self_attn.scale
    out = {
        "attention": (
            lambda: kernel.attention(q, k_cache, v_cache, scale, ctx.attn, k, v),
            lambda: padded.attention(q, k_cache, v_cache, scale, attn, k, v),
        )
    }
    for name, mod in engine.model.lora_modules(0).items():
        x = torch.randn(T, mod.in_features, generator=gen)
        y_kernel, y_torch = torch.zeros(T, sum(mod.out_sizes)), torch.zeros(T, sum(mod.out_sizes))
        out[f"lora_{name}"] = (
            lambda x=x, y=y_kernel, m=mod: (y.zero_(), kernel.apply_lora(x, y, m, ctx.lora), y)[2],
            lambda x=x, y=y_torch, m=mod: (y.zero_(), padded.apply_lora(x, y, m, lora), y)[2],
        )
    norm = layer.post_attention_layernorm
    x, res = torch.randn(T, cfg.hidden_size, generator=gen), torch.randn(T, cfg.hidden_size, generator=gen)
    res_kernel = res.clone()
    out["rms_norm_residual"] = (
        lambda: rms_norm_cpu(x, norm.weight, norm.eps, res_kernel.copy_(res)),
        lambda: F.rms_norm(x + res, norm.weight.shape, norm.weight, norm.eps),
    )
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=gen)
    qk = qkv[:, : (Hq + Hkv) * D].view(T, Hq + Hkv, D)
    qk_kernel = qk.clone()
    cos, sin = ctx.cos, ctx.sin
    out["rope"] = (lambda: rope_cpu(qk_kernel.copy_(qk), cos, sin), lambda: rope_torch(qk, cos, sin))
    threads = torch.get_num_threads()
    gate_up = 4 * torch.randn(T, 2 * cfg.intermediate_size, generator=gen)
    logits = torch.randn(T, QWEN25_VOCAB, generator=gen)
    for suffix, dtype in (("", torch.float32), ("_bf16", torch.bfloat16)):
        g, z = gate_up.to(dtype), logits.to(dtype)
        out[f"silu_and_mul{suffix}"] = (lambda g=g: silu_and_mul_cpu(g, threads), lambda g=g: silu_and_mul_torch(g))
        out[f"argmax{suffix}"] = (
            lambda z=z: argmax_cpu(z, threads),
            lambda z=z: torch.from_numpy(np.argmax(z.float().numpy(), axis=-1)),
        )
    return out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SMOKE_SHAPES if args.smoke else {name: SHAPES[name] for name in args.shapes}
    results: dict[str, dict] = {}
    with torch.inference_mode():
        for shape_name, shape in shapes.items():
            with tempfile.TemporaryDirectory(prefix="bench_cpu_kernels_") as tmp:
                engine, ctx = step_context(shape, args.decode_steps, Path(tmp))
                ctx_lens = ctx.attn.context_lens_host
                results[shape_name] = {
                    "seqs": shape["seqs"],
                    "hidden": engine.model.config.hidden_size,
                    "context_lens": [int(ctx_lens.min()), int(ctx_lens.max())],
                    "lora_rank": shape["rank"],
                    "cases": {},
                }
                print(f"\n{shape_name}: {shape['seqs']} decodes, contexts {ctx_lens.min()}-{ctx_lens.max()}")
                for name, (kernel_fn, torch_fn) in cases(engine, ctx).items():
                    diff = (kernel_fn().float() - torch_fn().float()).abs().max().item()
                    us = interleaved({"kernel": kernel_fn, "torch": torch_fn}, args.reps)
                    results[shape_name]["cases"][name] = {
                        "kernel_us": us["kernel"],
                        "torch_us": us["torch"],
                        "speedup": us["torch"] / us["kernel"],
                        "max_abs_diff": diff,
                    }
                    print(
                        f"  {name:>18}: kernel {us['kernel']:8.1f} us   torch {us['torch']:8.1f} us   "
                        f"{us['torch'] / us['kernel']:5.2f}x   (max |diff| {diff:.1e})"
                    )
                del engine, ctx
    payload = {
        "benchmark": "cpu_kernels",
        "env": environment("cpu"),
        "torch_threads": torch.get_num_threads(),
        "config": {
            "dtype": "float32",
            "adapters": NUM_ADAPTERS,
            "decode_steps_before": args.decode_steps,
            "reps": args.reps,
            "timing": "alternating blocks of 10 calls, median per call",
        },
        "results": results,
    }
    name = f"cpu_kernels_threads{args.threads}" if args.threads else "cpu_kernels"
    name += f"_{args.tag}" if args.tag else ""
    save_result(name, payload, args.out_dir, args.smoke)


if __name__ == "__main__":
    main()
