"""Paged attention kernels (``mcl_runtime.kernels``) against torch SDPA and flash-attn.

    python benchmarks/bench_attention.py [--smoke] [--out-dir DIR] [--batches 1,32] [--contexts 512,8192]

Decode: Qwen2.5-7B attention (28 query heads, 4 KV heads, head dim 128), bf16, KV blocks of 16 tokens
handed out in shuffled order, every sequence of the batch at the same context length; inputs are
drawn on the device.
``paged_decode_attention`` is compared with torch SDPA on contiguous K/V ([B, Hkv, ctx, D],
``enable_gqa``) and with flash-attn's ``flash_attn_with_kvcache`` on contiguous K/V when flash-attn
is importable. Achieved bandwidth (K and V read once, plus q and o) is reported against the device
copy bandwidth measured in the same run (``dst.copy_(src)`` of 1 GiB: 2 GiB moved).
Prefill: one sequence attending causally over itself, ``paged_prefill_attention`` vs SDPA
``is_causal`` on contiguous K/V, in TFLOP/s (causal half counted).

The JSON is rewritten after every case (``--max-seconds`` or a kill keeps what was measured); each
timing follows one untimed call on the same inputs.

Writes benchmarks/results/attention_<device>.{json,png} on CUDA. ``--smoke`` runs tiny shapes (the
Triton interpreter on CPU) in a few seconds to check that the script still works; its output goes
to a temporary folder and is not a result.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    KernelResult,
    copy_bandwidth,
    interpret_triton_for_cpu_smoke,
    kernel_figure,
    kernel_ms,
    kernel_parser,
    kernel_setup,
    kernel_timing,
    save_figure,
)

interpret_triton_for_cpu_smoke()

from mcl_runtime.kernels import HAS_TRITON, paged_decode_attention, paged_prefill_attention  # noqa: E402

MAX_KV_BYTES = 16 << 30


def flash_attn_fn():
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:  # not installed or built for another torch/CUDA
        return None
    return flash_attn_with_kvcache


class PagedKV:
    """B sequences of ctx tokens: contiguous K/V [B, ctx, Hkv, D] and the same data in a paged cache."""

    def __init__(
        self,
        batch: int,
        ctx: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        seed: int,
    ) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        per_seq = -(-ctx // block_size)
        num_blocks = batch * per_seq + 1
        order = list(range(1, num_blocks))
        random.Random(seed).shuffle(order)
        self.block_tables = torch.tensor(order, dtype=torch.int32).view(batch, per_seq).to(device)
        self.k = torch.randn(batch, ctx, num_kv_heads, head_dim, generator=gen, device=device).to(dtype)
        self.v = torch.randn(batch, ctx, num_kv_heads, head_dim, generator=gen, device=device).to(dtype)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        pad = per_seq * block_size - ctx
        idx = self.block_tables.long().flatten()
        self.k_cache[idx] = F.pad(self.k, (0, 0, 0, 0, 0, pad)).reshape(-1, block_size, num_kv_heads, head_dim)
        self.v_cache[idx] = F.pad(self.v, (0, 0, 0, 0, 0, pad)).reshape(-1, block_size, num_kv_heads, head_dim)
        self.context_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)


def decode_sweep(
    cfg: dict, device: torch.device, copy_gbps: float, records: list[dict], go_on: Callable[[str], bool]
) -> None:
    hq, hkv, d, bs = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["block_size"]
    dtype = cfg["dtype"]
    scale = d**-0.5
    flash = flash_attn_fn() if device.type == "cuda" else None
    print(
        f"{'B':>4} {'ctx':>6} | {'paged ms':>9} {'GB/s':>7} {'%copy':>6} | {'sdpa ms':>9} {'GB/s':>7} {'x':>5} | flash-attn"  # noqa: E501
    )
    for batch in cfg["batches"]:
        for ctx in cfg["contexts"]:
            if not go_on(f"decode B={batch} ctx={ctx}"):
                continue
            es = torch.finfo(dtype).bits // 8
            kv_bytes = 2 * batch * ctx * hkv * d * es
            if kv_bytes > MAX_KV_BYTES:
                records.append({"batch": batch, "context": ctx, "skipped": f"K/V {kv_bytes / 2**30:.1f} GiB"})
                continue
            kv = PagedKV(batch, ctx, hkv, d, bs, dtype, device, seed=batch * 7919 + ctx)
            q = torch.randn(batch, hq, d, device=device).to(dtype)
            nbytes = kv_bytes + 2 * q.numel() * es
            paged = lambda: paged_decode_attention(
                q,
                kv.k_cache,
                kv.v_cache,
                kv.block_tables,  # noqa: E731
                kv.context_lens,
                scale,
                ctx,
            )
            q4, k4, v4 = q[:, :, None], kv.k.transpose(1, 2), kv.v.transpose(1, 2)
            sdpa = lambda: F.scaled_dot_product_attention(q4, k4, v4, scale=scale, enable_gqa=True)  # noqa: E731
            diff = (paged().float() - sdpa()[:, :, 0].float()).abs().max().item()
            rec = {"batch": batch, "context": ctx, "bytes": nbytes, "max_abs_diff_vs_sdpa": diff}
            ms = kernel_ms(paged, device)
            rec["paged"] = {"ms": ms, "gbps": nbytes / ms / 1e6, "fraction_of_copy": nbytes / ms / 1e6 / copy_gbps}
            sdpa_ms = kernel_ms(sdpa, device)
            rec["sdpa_contiguous"] = {"ms": sdpa_ms, "gbps": nbytes / sdpa_ms / 1e6, "speedup_paged": sdpa_ms / ms}
            if flash is not None:
                qf = q[:, None]
                fl_ms = kernel_ms(
                    lambda: flash(qf, kv.k, kv.v, cache_seqlens=kv.context_lens, softmax_scale=scale), device
                )
                rec["flash_attn_contiguous"] = {"ms": fl_ms, "gbps": nbytes / fl_ms / 1e6, "speedup_paged": fl_ms / ms}
            else:
                rec["flash_attn_contiguous"] = "not installed"
            records.append(rec)
            fl = rec["flash_attn_contiguous"]
            print(
                f"{batch:>4} {ctx:>6} | {ms:9.4f} {rec['paged']['gbps']:7.1f} {100 * rec['paged']['fraction_of_copy']:5.1f}% | "  # noqa: E501
                f"{sdpa_ms:9.4f} {rec['sdpa_contiguous']['gbps']:7.1f} {sdpa_ms / ms:4.1f}x | "
                + (f"{fl['ms']:.4f} ms ({fl['speedup_paged']:.1f}x)" if isinstance(fl, dict) else fl),
                flush=True,
            )
            if diff > 0.05:
                raise SystemExit(f"paged decode and SDPA disagree: max abs diff {diff:.3g}")
            kv = q = None  # free the cache before the next shape


def prefill_sweep(cfg: dict, device: torch.device, records: list[dict], go_on: Callable[[str], bool]) -> None:
    hq, hkv, d, bs = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["block_size"]
    dtype = cfg["dtype"]
    scale = d**-0.5
    print(f"{'q_len':>6} | {'paged ms':>9} {'TFLOP/s':>8} | {'sdpa ms':>9} {'TFLOP/s':>8} {'x':>5}")
    for n in cfg["prefill_lens"]:
        if not go_on(f"prefill q_len={n}"):
            continue
        kv = PagedKV(1, n, hkv, d, bs, dtype, device, seed=n)
        q = torch.randn(n, hq, d, device=device).to(dtype)
        cu = torch.tensor([0, n], dtype=torch.int32, device=device)
        flops = 2 * 2 * hq * d * n * (n + 1) / 2
        paged = lambda: paged_prefill_attention(
            q,
            kv.k_cache,
            kv.v_cache,
            kv.block_tables,
            cu,  # noqa: E731
            kv.context_lens,
            scale,
            n,
        )
        q4, k4, v4 = q.transpose(0, 1)[None], kv.k.transpose(1, 2), kv.v.transpose(1, 2)
        sdpa = lambda: F.scaled_dot_product_attention(
            q4,
            k4,
            v4,
            scale=scale,
            is_causal=True,  # noqa: E731
            enable_gqa=True,
        )
        diff = (paged().float() - sdpa()[0].transpose(0, 1).float()).abs().max().item()
        ms, sdpa_ms = kernel_ms(paged, device), kernel_ms(sdpa, device)
        records.append(
            {
                "q_len": n,
                "flops": flops,
                "max_abs_diff_vs_sdpa": diff,
                "paged": {"ms": ms, "tflops": flops / ms / 1e9},
                "sdpa_contiguous": {"ms": sdpa_ms, "tflops": flops / sdpa_ms / 1e9, "speedup_paged": sdpa_ms / ms},
            }
        )
        print(
            f"{n:>6} | {ms:9.4f} {flops / ms / 1e9:8.2f} | {sdpa_ms:9.4f} {flops / sdpa_ms / 1e9:8.2f} "
            f"{sdpa_ms / ms:4.1f}x",
            flush=True,
        )
        if diff > 0.05:
            raise SystemExit(f"paged prefill and SDPA disagree: max abs diff {diff:.3g}")
        kv = q = None  # free the cache before the next shape


def plot(decode: list[dict], prefill: list[dict], copy_gbps: float, title: str, path: Path) -> None:
    fig, axes = kernel_figure(2, (13, 4.8))
    done = [r for r in decode if "paged" in r]
    for i, batch in enumerate(sorted({r["batch"] for r in done})):
        rows = [r for r in done if r["batch"] == batch]
        color = f"C{i % 10}"
        axes[0].plot(
            [r["context"] for r in rows],
            [r["paged"]["gbps"] for r in rows],
            "o-",
            color=color,
            label=f"paged B={batch}",
        )
        axes[0].plot(
            [r["context"] for r in rows],
            [r["sdpa_contiguous"]["gbps"] for r in rows],
            "s--",
            color=color,
            alpha=0.6,
            label=f"SDPA B={batch}",
        )
    axes[0].axhline(copy_gbps, color="k", lw=1, ls=":", label="device copy")
    axes[0].set(xscale="log", xlabel="context tokens", ylabel="GB/s (K+V read once)", title="decode attention")
    axes[0].legend(fontsize=7, ncol=2)
    if prefill:
        axes[1].plot(
            [r["q_len"] for r in prefill], [r["paged"]["tflops"] for r in prefill], "o-", label="paged prefill"
        )
        axes[1].plot(
            [r["q_len"] for r in prefill],
            [r["sdpa_contiguous"]["tflops"] for r in prefill],
            "s--",
            label="SDPA causal (contiguous)",
        )
    axes[1].set(xscale="log", xlabel="tokens (one sequence)", ylabel="TFLOP/s", title="prefill attention")
    axes[1].legend()
    save_figure(fig, title, path)


def main() -> None:
    ap = kernel_parser(__doc__)
    ap.add_argument("--batches", default=None, help="comma-separated decode batch sizes")
    ap.add_argument("--contexts", default=None, help="comma-separated decode context lengths")
    args = ap.parse_args()
    if args.smoke:
        cfg = dict(
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            block_size=16,
            dtype=torch.bfloat16,
            batches=[1, 3],
            contexts=[40],
            prefill_lens=[24],
            copy_bytes=1 << 24,
        )
    else:
        cfg = dict(
            num_heads=28,
            num_kv_heads=4,
            head_dim=128,
            block_size=16,
            dtype=torch.bfloat16,
            batches=[1, 8, 32, 64, 128],
            contexts=[512, 2048, 8192, 32768],
            prefill_lens=[512, 2048, 8192],
            copy_bytes=1 << 30,
        )
    if args.batches:
        cfg["batches"] = [int(b) for b in args.batches.split(",")]
    if args.contexts:
        cfg["contexts"] = [int(c) for c in args.contexts.split(",")]
    device, info = kernel_setup(args.smoke, HAS_TRITON)
    start = time.perf_counter()
    copy_gbps = copy_bandwidth(device, cfg["copy_bytes"]) / 1e9
    print(f"device copy bandwidth: {copy_gbps:.1f} GB/s")
    flash_status = "installed" if flash_attn_fn() is not None else "not installed"
    decode: list[dict] = []
    prefill: list[dict] = []
    skipped: list[str] = []
    report = {
        "benchmark": "attention",
        **info,
        "flash_attn": flash_status,
        "config": {**cfg, "dtype": str(cfg["dtype"]), "timing": kernel_timing(device)},
        "copy_bandwidth_gbps": copy_gbps,
        "decode": decode,
        "prefill": prefill,
        "skipped": skipped,
    }
    result = KernelResult("attention", args.out_dir, args.smoke, device)

    def go_on(case: str) -> bool:
        """Save what is measured so far; False (and the case listed as skipped) past --max-seconds."""
        result.save(report)
        if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
            skipped.append(case)
            return False
        return True

    decode_sweep(cfg, device, copy_gbps, decode, go_on)
    prefill_sweep(cfg, device, prefill, go_on)
    title = (
        f"paged attention, Qwen2.5-7B heads (28/4 x 128), bf16, block 16: {info['device']}"
        if not args.smoke
        else f"SMOKE RUN, tiny shapes, not a result ({info['device']})"
    )
    result.finish(report, lambda png: plot(decode, prefill, copy_gbps, title, png), complete=not skipped)


if __name__ == "__main__":
    main()
