"""SGMV LoRA kernels (shrink + expand, ``mcl_runtime.kernels.lora_apply``) against torch baselines.

    python benchmarks/bench_lora_kernels.py [--smoke] [--out-dir DIR] [--tokens 1,16,...] [--adapters 1,4,16]

Shapes are Qwen2.5-7B's LoRA-targeted projections (hidden 3584; qkv = 3584 + 512 + 512, o, gate_up =
2 x 18944, down 18944 -> 3584), bf16, adapter rank 32 in buffers padded to max rank 64 (as the engine
lays them out), 1 / 4 / 16 adapters, 1-4096 tokens whose adapters follow a popularity law
(uniform / zipf / identical) and are sorted by adapter (the engine's order); inputs are drawn on the
device. Compared with
  (a) a torch loop over the adapters' segments (two matmuls per slice),
  (b) gather + bmm (punica's baseline: each token gathers its adapter's weights),
  (c) vLLM's / SGLang's Triton LoRA ops, recorded as "not installed" when they are not importable.
Baselines get rank-trimmed weights (no padding). Prints latency, achieved GB/s (minimal traffic:
x, the used adapters' A and B, the fp32 intermediate, y read + written) and TFLOP/s, speed-ups, and
the LoRA overhead over the base linear layers of one decoder layer at batch 32 with 4 adapters.

Order: the overhead at batch 32 first, then every projection over uniform adapters, then the other
popularity laws on qkv; the JSON is rewritten after every case, so ``--max-seconds`` (or a kill) keeps
what was measured. Each timing follows one untimed call on the same inputs (no JIT compile inside).

Writes benchmarks/results/lora_kernels_<device>.{json,png} on CUDA. ``--smoke`` runs tiny shapes
(the Triton interpreter on CPU) in a few seconds to check that the script still works; its output
goes to a temporary folder and is not a result.
"""

from __future__ import annotations

import random
import sys
import time
import zlib
from pathlib import Path

import torch
from common import (
    KernelResult,
    interpret_triton_for_cpu_smoke,
    kernel_figure,
    kernel_ms,
    kernel_parser,
    kernel_setup,
    kernel_timing,
    save_figure,
)

interpret_triton_for_cpu_smoke()

from mcl_runtime.kernels import HAS_TRITON, lora_apply  # noqa: E402

PROJECTIONS = {
    "qkv": (3584, (3584, 512, 512)),
    "o": (3584, (3584,)),
    "gate_up": (3584, (18944, 18944)),
    "down": (18944, (3584,)),
}
SMOKE_PROJECTIONS = {"qkv": (64, (32, 16, 16)), "down": (96, (48,))}
POPULARITY = ("uniform", "zipf", "identical")
MAX_GATHER_BYTES = 4 << 30


def token_slots(popularity: str, num_tokens: int, num_adapters: int, rng: random.Random) -> list[int]:
    if popularity == "identical":
        return [0] * num_tokens
    if popularity == "uniform":
        return sorted(rng.randrange(num_adapters) for _ in range(num_tokens))
    if popularity == "zipf":
        weights = [1.0 / (k + 1) ** 1.5 for k in range(num_adapters)]
        return sorted(rng.choices(range(num_adapters), weights=weights, k=num_tokens))
    raise ValueError(popularity)


class Projection:
    """One projection's LoRA buffers (engine layout) plus rank-trimmed copies for the baselines."""

    def __init__(
        self,
        hidden: int,
        slices: tuple[int, ...],
        num_slots: int,
        rank: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        gen = torch.Generator(device=device).manual_seed(hidden + sum(slices))
        n = len(slices)
        self.hidden, self.slices, self.rank, self.max_rank = hidden, slices, rank, max_rank
        self.offsets = tuple([0] + torch.tensor(slices).cumsum(0).tolist())
        n_out = self.offsets[-1]
        a = torch.randn(num_slots, n, rank, hidden, generator=gen, device=device) / hidden**0.5
        b = torch.randn(num_slots, n_out, rank, generator=gen, device=device) / rank**0.5
        self.a_trim = a.reshape(num_slots, n * rank, hidden).to(dtype).contiguous()
        self.b_trim = b.to(dtype).contiguous()
        self.lora_a = torch.zeros(num_slots, n, max_rank, hidden, dtype=dtype, device=device)
        self.lora_a[:, :, :rank] = a.to(dtype)
        self.lora_a = self.lora_a.view(num_slots, n * max_rank, hidden)
        self.lora_b = torch.zeros(num_slots, n_out, max_rank, dtype=dtype, device=device)
        self.lora_b[:, :, :rank] = self.b_trim
        self.ranks = torch.full((num_slots, n), rank, dtype=torch.int32, device=device)
        self.scaling_host = [2.0] * num_slots
        self.scaling = torch.tensor(self.scaling_host, dtype=torch.float32, device=device)


class Case:
    def __init__(self, proj: Projection, slots: list[int], dtype: torch.dtype, device: torch.device) -> None:
        self.proj = proj
        T = len(slots)
        starts, seg_slots = [0], []
        for i, s in enumerate(slots):
            if seg_slots and seg_slots[-1] == s:
                starts[-1] = i + 1
            else:
                seg_slots.append(s)
                starts.append(i + 1)
        self.segments = [(starts[i], starts[i + 1], w) for i, w in enumerate(seg_slots)]
        self.max_seg_len = max(b - a for a, b, _ in self.segments)
        self.num_used = len(set(seg_slots))
        self.seg_starts = torch.tensor(starts, dtype=torch.int32, device=device)
        self.seg_slots = torch.tensor(seg_slots, dtype=torch.int32, device=device)
        self.token_slots = torch.tensor(slots, dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(T)
        self.x = torch.randn(T, proj.hidden, generator=gen, device=device).to(dtype)
        self.y = torch.zeros(T, proj.offsets[-1], dtype=dtype, device=device)
        self.u = torch.empty(T, len(proj.slices) * proj.max_rank, dtype=torch.float32, device=device)

    def sgmv(self) -> None:
        p = self.proj
        lora_apply(
            self.x,
            self.y,
            p.lora_a,
            p.lora_b,
            self.seg_starts,
            self.seg_slots,
            p.ranks,
            p.scaling,
            p.offsets,
            self.max_seg_len,
            buffer=self.u,
        )

    def torch_loop(self) -> None:
        p, r = self.proj, self.proj.rank
        for lo, hi, w in self.segments:
            u = self.x[lo:hi] @ p.a_trim[w].T
            for j in range(len(p.slices)):
                sl = slice(p.offsets[j], p.offsets[j + 1])
                self.y[lo:hi, sl] += p.scaling_host[w] * (u[:, j * r : (j + 1) * r] @ p.b_trim[w, sl].T)

    def gather_bmm(self) -> None:
        p, r = self.proj, self.proj.rank
        u = torch.bmm(p.a_trim[self.token_slots], self.x[:, :, None])
        b = p.b_trim[self.token_slots]
        scale = p.scaling[self.token_slots].to(self.y.dtype)[:, None]
        for j in range(len(p.slices)):
            sl = slice(p.offsets[j], p.offsets[j + 1])
            self.y[:, sl] += scale * torch.bmm(b[:, sl], u[:, j * r : (j + 1) * r])[:, :, 0]

    def gather_bytes(self) -> int:
        p = self.proj
        return self.x.shape[0] * (p.a_trim[0].numel() + p.b_trim[0].numel()) * self.x.element_size()

    def traffic_and_flops(self) -> tuple[int, int]:
        p, r, es = self.proj, self.proj.rank, self.x.element_size()
        T, n, N = self.x.shape[0], len(p.slices), p.offsets[-1]
        nbytes = (
            T * p.hidden * es + self.num_used * (n * r * p.hidden + N * r) * es + 2 * T * n * r * 4 + 2 * T * N * es
        )
        flops = 2 * T * r * (n * p.hidden + N)
        return nbytes, flops


def other_libraries() -> dict:
    found = {}
    for name, module in (("vllm", "vllm.lora.ops.triton_ops"), ("sglang", "sglang.srt.lora.triton_ops")):
        try:
            mod = __import__(module, fromlist=["_"])
        except Exception:  # not installed, or installed without a usable GPU build
            found[name] = "not installed"
        else:
            version = getattr(sys.modules.get(name), "__version__", "?")
            found[name] = (
                f"installed ({version}, {module}: {sorted(n for n in dir(mod) if not n.startswith('_'))}); "
                "not benchmarked: its metadata API differs between releases"
            )
    return found


def check_same(case: Case, dtype: torch.dtype) -> float:
    """Max abs difference of the SGMV and torch-loop results from y = 0."""
    case.y.zero_()
    case.sgmv()
    got = case.y.float().clone()
    case.y.zero_()
    case.torch_loop()
    err = (got - case.y.float()).abs().max().item()
    tol = 1e-3 if dtype == torch.float32 else 0.05 * max(1.0, case.y.float().abs().max().item())
    if err > tol:
        raise SystemExit(f"SGMV and torch loop disagree: max abs diff {err:.3g} > {tol:.3g}")
    return err


def overhead_at_batch(
    projections: dict[str, Projection], batch: int, num_adapters: int, dtype: torch.dtype, device: torch.device
) -> dict:
    """LoRA (SGMV) time vs the base linear x @ W.T for each projection of one decoder layer."""
    rng = random.Random(batch)
    out = {"batch": batch, "adapters": num_adapters, "projections": {}}
    base_total = lora_total = 0.0
    for name, proj in projections.items():
        case = Case(proj, token_slots("uniform", batch, num_adapters, rng), dtype, device)
        w = torch.randn(proj.offsets[-1], proj.hidden, device=device, dtype=dtype) / proj.hidden**0.5
        base_ms = kernel_ms(lambda: case.x @ w.T, device)
        lora_ms = kernel_ms(case.sgmv, device)
        out["projections"][name] = {"base_ms": base_ms, "lora_ms": lora_ms, "overhead": lora_ms / base_ms}
        base_total += base_ms
        lora_total += lora_ms
        w = None  # free before the next shape
    out.update(base_ms=base_total, lora_ms=lora_total, overhead=lora_total / base_total)
    return out


def plot(records: list[dict], overhead: dict, title: str, path: Path) -> None:
    fig, axes = kernel_figure(3, (17, 4.8))
    sel = [r for r in records if r["projection"] == "qkv" and r["popularity"] == "uniform"]
    adapters = sorted({r["adapters"] for r in sel})
    pick = 4 if 4 in adapters else adapters[-1]
    for method, style in (("sgmv", "o-"), ("torch_loop", "s--"), ("gather_bmm", "^:")):
        pts = [
            (r["tokens"], r[method]["ms"])
            for r in sel
            if r["adapters"] == pick and isinstance(r.get(method), dict) and "ms" in r[method]
        ]
        if pts:
            axes[0].plot(*zip(*pts), style, label=method)
    axes[0].set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms", title=f"qkv LoRA, {pick} adapters, uniform")
    axes[0].legend()
    for name in sorted({r["projection"] for r in records}):
        pts = [
            (r["tokens"], r["sgmv"]["gbps"])
            for r in records
            if r["projection"] == name and r["popularity"] == "uniform" and r["adapters"] == pick
        ]
        if pts:
            axes[1].plot(*zip(*pts), "o-", label=name)
    axes[1].set(
        xscale="log",
        xlabel="tokens",
        ylabel="GB/s (minimal traffic)",
        title=f"SGMV bandwidth, {pick} adapters, uniform",
    )
    axes[1].legend()
    names = list(overhead["projections"])
    axes[2].bar(names, [100 * overhead["projections"][n]["overhead"] for n in names])
    axes[2].set(
        ylabel="LoRA time / base linear time (%)",
        title=f"overhead at batch {overhead['batch']}, {overhead['adapters']} adapters "
        f"(layer: {100 * overhead['overhead']:.0f}%)",
    )
    save_figure(fig, title, path)


def sweep(shapes: dict, adapters: list[int]) -> list[tuple[str, str, int]]:
    """(projection, popularity, adapters) in the order they run: every projection over uniform
    adapters, then the other popularity laws on qkv."""
    plan = [(name, "uniform", n) for name in shapes for n in adapters]
    return plan + [("qkv", pop, n) for pop in POPULARITY if pop != "uniform" for n in adapters if "qkv" in shapes]


def measure_case(
    proj: Projection,
    name: str,
    popularity: str,
    num_adapters: int,
    T: int,
    dtype: torch.dtype,
    device: torch.device,
    libs: dict,
) -> dict:
    rng = random.Random(zlib.crc32(f"{name}/{popularity}/{num_adapters}/{T}".encode()))
    case = Case(proj, token_slots(popularity, T, num_adapters, rng), dtype, device)
    rec = {
        "projection": name,
        "popularity": popularity,
        "adapters": num_adapters,
        "tokens": T,
        "adapters_used": case.num_used,
        "segments": len(case.segments),
        "max_abs_diff_vs_loop": check_same(case, dtype),
    }
    nbytes, flops = case.traffic_and_flops()
    ms = kernel_ms(case.sgmv, device)
    rec["sgmv"] = {"ms": ms, "gbps": nbytes / ms / 1e6, "tflops": flops / ms / 1e9, "bytes": nbytes, "flops": flops}
    rec["torch_loop"] = {"ms": kernel_ms(case.torch_loop, device)}
    if case.gather_bytes() <= MAX_GATHER_BYTES:
        rec["gather_bmm"] = {"ms": kernel_ms(case.gather_bmm, device)}
    else:
        rec["gather_bmm"] = f"skipped: gathers {case.gather_bytes() / 2**30:.1f} GiB"
    for base in ("torch_loop", "gather_bmm"):
        if isinstance(rec[base], dict):
            rec[base]["speedup_sgmv"] = rec[base]["ms"] / ms
    rec.update(libs)
    g = rec["gather_bmm"]
    print(
        f"{name:>8} {popularity:>9} {num_adapters:>3} {T:>5} | {ms:9.4f} "
        f"{rec['sgmv']['gbps']:7.1f} {rec['sgmv']['tflops']:8.3f} | "
        f"{rec['torch_loop']['ms']:9.4f} {rec['torch_loop']['speedup_sgmv']:5.1f}x | "
        + (f"{g['ms']:9.4f} {g['speedup_sgmv']:5.1f}x" if isinstance(g, dict) else g),
        flush=True,
    )
    return rec


def main() -> None:
    ap = kernel_parser(__doc__)
    ap.add_argument("--tokens", default=None, help="comma-separated token counts")
    ap.add_argument("--adapters", default=None, help="comma-separated adapter counts")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--max-rank", type=int, default=64)
    args = ap.parse_args()
    start = time.perf_counter()
    dtype = torch.bfloat16
    if args.smoke:
        shapes, tokens, adapters, rank, max_rank = SMOKE_PROJECTIONS, [8], [4], 8, 16
        overhead_batch = 4
    else:
        shapes, tokens, adapters = PROJECTIONS, [1, 16, 64, 256, 1024, 4096], [1, 4, 16]
        rank, max_rank, overhead_batch = args.rank, args.max_rank, 32
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    if args.adapters:
        adapters = [int(a) for a in args.adapters.split(",")]
    num_slots = max(16, max(adapters))
    device, info = kernel_setup(args.smoke, HAS_TRITON)
    libs = other_libraries()
    print("other LoRA kernels: " + ", ".join(f"{k}: {v}" for k, v in libs.items()))

    projections = {name: Projection(h, s, num_slots, rank, max_rank, dtype, device) for name, (h, s) in shapes.items()}
    result = KernelResult("lora_kernels", args.out_dir, args.smoke, device)
    records: list[dict] = []
    skipped: list[str] = []
    report = {
        "benchmark": "lora_kernels",
        **info,
        "config": {
            "dtype": str(dtype),
            "rank": rank,
            "max_rank": max_rank,
            "num_slots": num_slots,
            "projections": {k: {"hidden": v[0], "slices": list(v[1])} for k, v in shapes.items()},
            "tokens": tokens,
            "adapters": adapters,
            "timing": kernel_timing(device),
            "baselines": "rank-trimmed weights; gather_bmm skipped above "
            f"{MAX_GATHER_BYTES >> 30} GiB of gathered weights",
        },
        "other_libraries": libs,
        "results": records,
        "skipped": skipped,
        "overhead": None,
    }
    overhead = overhead_at_batch(projections, overhead_batch, min(4, max(adapters)), dtype, device)
    report["overhead"] = overhead
    result.save(report)
    print(
        f"LoRA overhead at batch {overhead['batch']}, {overhead['adapters']} adapters: "
        + ", ".join(f"{k} {100 * v['overhead']:.0f}%" for k, v in overhead["projections"].items())
        + f"; whole layer {100 * overhead['overhead']:.0f}% "
        f"({overhead['lora_ms']:.3f} ms LoRA vs {overhead['base_ms']:.3f} ms base)",
        flush=True,
    )
    print(
        f"{'proj':>8} {'pop':>9} {'ad':>3} {'T':>5} | {'sgmv ms':>9} {'GB/s':>7} {'TFLOP/s':>8} | "
        f"{'loop ms':>9} {'x':>6} | {'gather ms':>9} {'x':>6}"
    )
    for name, popularity, num_adapters in sweep(shapes, adapters):
        for T in tokens:
            if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
                skipped.append(f"{name}/{popularity}/{num_adapters}/{T}")
                continue
            records.append(measure_case(projections[name], name, popularity, num_adapters, T, dtype, device, libs))
            result.save(report)
    if skipped:
        print(f"skipped {len(skipped)} cases over --max-seconds {args.max_seconds}")
    title = f"SGMV LoRA kernels, Qwen2.5-7B shapes, rank {rank}, {dtype}: {info['device']}"
    if args.smoke:
        title = f"SMOKE RUN, tiny shapes, not a result ({info['device']})"
    result.finish(report, lambda png: plot(records, overhead, title, png), complete=not skipped)


if __name__ == "__main__":
    main()
