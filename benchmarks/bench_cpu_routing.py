"""The crossovers behind the cpu backend's routing thresholds, each route timed side by side.

    python benchmarks/bench_cpu_routing.py [--smoke] [--out-dir DIR] [--shapes demo qwen7b] [--reps N]
                                           [--max-threads N] [--threads N] [--measures NAME ...] [--tag TAG]

Synthetic steps (random KV cache, shuffled blocks of 16, float32) in the attention and qkv shapes of
three models: ``demo`` (mcl-demo-tiny: 4 query heads, 2 KV heads of 32, hidden 128), ``qwen0.5b``
(Qwen2.5-0.5B: 14 query heads, 2 KV heads of 64, hidden 896; rank-16 adapters, as bench_vs_vllm.py)
and ``qwen7b`` (Qwen2.5-7B: 28 query heads, 4 KV heads of 128, hidden 3584), rank-32 adapters. Each figure is the
median per-call time of one layer's ``CPUBackend.attention`` or ``apply_lora`` (``prepare`` runs
once per step, outside the timing), the routes timed in alternating blocks of calls. For each
threshold of ``CPUBackend`` (``mcl_runtime/model/cpu_backend.py``), per shape:

* ``KERNEL_MAX_THREADS``: decodes, and a small prefill group, through the attention kernel vs the
  padded path at each torch thread count up to ``--max-threads`` (default: the machine's cores);
  ``measured``: the largest count up to which the kernel is faster in every case.
* ``PADDED_SMALL_PROMPTS`` / ``PADDED_SMALL``: prompts without cached context / chunks after
  cached context, four per group, of growing padded size (sequences x longest query x longest
  context), kernel vs padded; ``measured``: the largest size up to which the kernel is faster for
  that kind (also as the multiply-adds of ``q @ k.T``, ``measured_multiply_adds``, a unit that
  carries across shapes).
* ``SPLIT_GAIN``: on the padded path, decodes whose contexts are half short, half long, and prompts
  of two lengths, split by length vs one padded group; ``measured``: the largest ratio of padded
  work (split / one group, the cost ``CPUBackend._split`` computes) up to which the split is faster.
* ``ONEDNN_MIN_ROWS`` / ``ONEDNN_MAX_ROWS`` / ``ONEDNN_MIN_WEIGHT``: one layer's qkv projection
  (with its bias) through oneDNN vs ``F.linear`` (MKL) at growing row counts; ``measured``: the first
  count from which oneDNN is faster, the last up to which it stays faster, and the weight's elements
  (0 where oneDNN is faster at no row count).
  Each point also times the weight packed by ``prepare_weights`` (the route of eager calls on a
  packed weight whose plain copy was freed): ``packed_speedup`` against the faster plain route at
  that row count. ``MKL_MIN_ROWS``: the first row count from which ``F.linear`` on the plain weight
  beats the packed copy at every larger count measured.
* ``BF16_UPCAST_MIN_ROWS`` / ``BF16_UPCAST_MIN_WORK``: the qkv projection (with its bias) in
  bfloat16, as float32 GEMMs on pieces of the weight (``CPUBackend._linear_upcast``) vs torch's
  bfloat16 ``F.linear`` at growing row counts; ``measured``: the first count from which the float32
  GEMMs are faster at every larger count, and its multiply-adds (rows x weight elements; the
  calls' fixed cost decides it on small weights). ``native_bf16_gemm`` records whether torch's
  bfloat16 GEMM is oneDNN's on this CPU (the backend upcasts only where it is not).
* ``BF16_UPCAST_CHUNK``: the gate/up projection (``2 x intermediate`` rows of the weight) in
  bfloat16 as float32 GEMMs on pieces of the weight, per piece size, at a decode-sized and a
  prefill-sized row count; ``measured``: the size whose worst slowdown against the fastest size
  of each row count is least (``within_5_percent``: the sizes within 5% of the fastest at both).
* ``LORA_KERNEL_MAX_WORK``: LoRA of the qkv projection over four adapter segments of growing
  length, the C++ kernel vs the torch route the backend takes otherwise (the slot range, these
  four adapters being within ``LORA_RANGE_MAX_SLOTS``; gather + bmm tiles past it); ``measured``:
  the largest work (multiply-adds, as ``CPUBackend.apply_lora`` counts them) up to which the
  kernel is faster.
* ``LORA_RANGE_MAX_SLOTS``: LoRA of the qkv projection over the slot range vs gather + bmm tiles,
  for steps of 1 to 16 adapters in consecutive slots (a prefill of a ``lora`` segment each, and 32
  decodes spread over them); ``measured``: the most adapters up to which the range is faster in both.
* ``LORA_RANGE_MIN_WORK_BF16`` (only where oneDNN computes bfloat16 natively): each of the four
  projections' LoRA in bfloat16 over four adapter segments of growing length, the C++ kernel vs the
  slot range's bfloat16 GEMMs; ``measured``: the smallest work per slice from which the range was
  faster at every point of at least that work. With the kernel's float32 multiply-adds, and as
  ``LORA_RANGE_MIN_WORK_BF16_PAIRS`` with its AVX512-BF16 pair dot products where the CPU has them.
* ``LORA_TILE``: the gather + bmm LoRA path over a prefill of four adapter segments, per tile size;
  ``measured``: the fastest (``within_5_percent``: the sizes within 5% of it).

``crossover_found`` is False where one route won at every point measured (``measured`` is then the
last point; 0 where it lost at the first). ``in_code`` is the constant's value in this tree, printed
next to ``measured``. These measurements run ``--threads`` torch threads (default torch's); on a
machine shared with other processes, OpenMP regions wait for a core and penalise the route with
more torch ops, so ``load_average`` is recorded with the figures.
``--measures`` runs only the named measurements (the functions below, e.g. ``lora_range_min_work_bf16``).
Writes benchmarks/results/cpu_routing.json, or cpu_routing_<tag>.json with ``--tag`` (another
machine's figures; --smoke: only with --out-dir).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np
import torch
from common import base_parser, environment, interleaved, parse_with_smoke, save_result

from mcl_runtime.kernels.cpu import HAS_CPU_BF16_DOT
from mcl_runtime.model.backends import AttentionMeta, LoRAMeta, lora_segments
from mcl_runtime.model.cpu_backend import NATIVE_BF16_GEMM, CPUBackend
from mcl_runtime.model.layers import LinearWithLoRA

BLOCK_SIZE = 16
# Attention heads, and the qkv projection with its adapters' rank, of the models measured.
SHAPES = {
    "demo": dict(heads=4, kv_heads=2, head_dim=32, hidden=128, qkv=[128, 64, 64], intermediate=256, rank=32),
    "qwen0.5b": dict(heads=14, kv_heads=2, head_dim=64, hidden=896, qkv=[896, 128, 128], intermediate=4864, rank=16),
    "qwen7b": dict(heads=28, kv_heads=4, head_dim=128, hidden=3584, qkv=[3584, 512, 512], intermediate=18944, rank=32),
}
SMOKE_SHAPES = {"smoke": dict(heads=4, kv_heads=2, head_dim=16, hidden=64, qkv=[64, 32, 32], intermediate=128, rank=8)}
# Step sizes: decodes and their contexts, small prompts, the prefill lengths swept, the longest
# context / prompt of the split cases, the LoRA segments, the row counts of the linear layer.
SIZES = dict(
    decodes=32, decode_ctx=(256, 1024), prompts=[64, 48], prefill=[8, 16, 32, 64, 128, 256, 512], longest=(1024, 512)
)
SIZES["lora"] = [300, 200, 150, 350]
SIZES["linear_rows"] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
SIZES["bf16_rows"] = [1, 2, 4, 8, 16, 32, 64, 128]
SIZES["bf16_chunk_rows"] = [16, 256]
SIZES["bf16_chunks"] = [1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 23]
SIZES["lora_tokens"] = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SIZES["lora_bf16_tokens"] = [64, 128, 256, 512, 1024]
SIZES["lora_slots"] = [1, 2, 4, 8, 16]
SMOKE_SIZES = dict(
    decodes=8, decode_ctx=(32, 40), prompts=[8, 6], prefill=[4, 8], longest=(32, 16), lora=[30, 20, 15, 35]
)
SMOKE_SIZES["linear_rows"] = [1, 8]
SMOKE_SIZES["bf16_rows"] = [1, 8]
SMOKE_SIZES["bf16_chunk_rows"] = [8]
SMOKE_SIZES["bf16_chunks"] = [1 << 12, 1 << 14]
SMOKE_SIZES["lora_tokens"] = [1, 4]
SMOKE_SIZES["lora_bf16_tokens"] = [8, 16]
SMOKE_SIZES["lora_slots"] = [1, 2]


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--reps", type=int, default=40, help="calls of each route per point (in blocks of 5)")
    p.add_argument("--max-threads", type=int, default=os.cpu_count(), help="KERNEL_MAX_THREADS: threads up to")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads of the other measurements (default torch's)"
    )
    p.add_argument(
        "--measures", nargs="+", default=None, choices=[m.__name__ for m in MEASURES], help="only these (default all)"
    )
    p.add_argument("--tag", default=None, help="write cpu_routing_<tag>.json (another machine's figures)")
    return parse_with_smoke(p, dict(reps=5, max_threads=1))


class Step:
    """A synthetic step: sequences with ``q_lens`` new tokens and ``ctx_lens`` context (one kind of
    sequence: ``kind`` 0 decodes, 1 prompts, 2 chunks), their blocks shuffled over a random cache,
    random queries and new keys/values."""

    def __init__(self, q_lens: list[int], ctx_lens: list[int], kind: int, shape: dict, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        self.q_lens, self.ctx_lens = np.array(q_lens), np.array(ctx_lens, dtype=np.int32)
        blocks = -(-self.ctx_lens // BLOCK_SIZE)
        ids = rng.permutation(int(blocks.sum())).astype(np.int32)
        self.tables = np.zeros((len(q_lens), int(blocks.max())), np.int32)
        for b, start in enumerate(np.cumsum(blocks) - blocks):
            self.tables[b, : blocks[b]] = ids[start : start + blocks[b]]
        self.kind_counts = [len(q_lens) if k == kind else 0 for k in range(3)]
        T, Hq, Hkv, D = int(self.q_lens.sum()), shape["heads"], shape["kv_heads"], shape["head_dim"]
        self.q, self.k, self.v = (torch.randn(T, h, D, generator=gen) for h in (Hq, Hkv, Hkv))
        self.k_cache, self.v_cache = torch.randn(2, len(ids), BLOCK_SIZE, Hkv, D, generator=gen)
        self.scale = D**-0.5

    def meta(self) -> AttentionMeta:
        cu = np.zeros(len(self.q_lens) + 1, np.int32)
        cu[1:] = np.cumsum(self.q_lens)
        pos = np.concatenate([np.arange(c - q, c) for q, c in zip(self.q_lens, self.ctx_lens)])
        seq = np.repeat(np.arange(len(self.q_lens)), self.q_lens)
        slots = self.tables[seq, pos // BLOCK_SIZE].astype(np.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        return AttentionMeta(
            torch.from_numpy(slots),
            torch.from_numpy(self.tables),
            torch.from_numpy(self.ctx_lens),
            torch.from_numpy(cu),
            [0] + np.cumsum(self.kind_counts).tolist(),
            int(self.q_lens.max()),
            int(self.ctx_lens.max()),
            BLOCK_SIZE,
            self.ctx_lens,
            cu,
        )

    def attention(self, backend: CPUBackend) -> Callable[[], torch.Tensor]:
        """One layer's attention call on ``backend`` (prepared for the step now)."""
        attn = self.meta()
        backend.prepare(attn, None)
        return lambda: backend.attention(self.q, self.k_cache, self.v_cache, self.scale, attn, self.k, self.v)


def cpu(**options) -> CPUBackend:
    """``CPUBackend(attention_kernel, layer_kernels)`` with the other options as its thresholds."""
    backend = CPUBackend(
        options.pop("attention_kernel", None), options.pop("layer_kernels", True), options.pop("onednn_linear", True)
    )
    for name, value in options.items():
        setattr(backend, name, value)
    return backend


def race(step: Step, routes: dict[str, CPUBackend], reps: int) -> dict[str, float]:
    return interleaved({name: step.attention(backend) for name, backend in routes.items()}, reps, block=5)


def crossover(points: list[dict], first_wins: Callable[[dict], bool], key: str) -> tuple[float, bool]:
    """The last point's ``key`` up to which ``first_wins`` holds at every point (ordered by it; 0
    when it fails at the first), and whether it stops holding within the points."""
    last = 0
    for p in points:
        if not first_wins(p):
            return last, True
        last = p[key]
    return last, False


def report(name: str, measured: float, found: bool, points: list[dict], rule: str) -> dict:
    in_code = getattr(CPUBackend, name)
    print(f"{name}: measured {measured:g}{'' if found else ' (no crossover measured)'}, in code {in_code:g}")
    return {name: dict(in_code=in_code, measured=measured, crossover_found=found, rule=rule, points=points)}


def kernel_max_threads(shape: dict, sizes: dict, args: argparse.Namespace) -> dict:
    n = sizes["decodes"]
    cases = {
        "decodes": Step([1] * n, np.linspace(*sizes["decode_ctx"], n).astype(int).tolist(), 0, shape),
        "prompts": Step(sizes["prompts"], sizes["prompts"], 1, shape),
    }
    routes = {"kernel": cpu(attention_kernel=True, PADDED_SMALL=float("inf")), "padded": cpu(attention_kernel=False)}
    threads, points = torch.get_num_threads(), []
    try:
        for n in range(1, args.max_threads + 1):
            torch.set_num_threads(n)
            point = {"threads": n}
            for case, step in cases.items():
                us = race(step, routes, args.reps)
                point[case] = {**{f"{r}_us": t for r, t in us.items()}, "kernel_speedup": us["padded"] / us["kernel"]}
                print(f"  {n} threads, {case}: kernel {point[case]['kernel_speedup']:.2f}x the padded path")
            points.append(point)
    finally:
        torch.set_num_threads(threads)
    measured, found = crossover(points, lambda p: all(p[c]["kernel_speedup"] >= 1 for c in cases), "threads")
    return report("KERNEL_MAX_THREADS", measured, found, points, "kernel faster in every case")


def padded_small(shape: dict, sizes: dict, args: argparse.Namespace) -> dict:
    routes = {"kernel": cpu(attention_kernel=True, PADDED_SMALL=float("inf")), "padded": cpu(attention_kernel=False)}
    points = []
    for q in sizes["prefill"]:
        point = {}
        for kind, ctx in (("prompts", q), ("chunks", 4 * q)):
            step = Step([q] * 4, [ctx] * 4, 1 if kind == "prompts" else 2, shape)
            us = race(step, routes, args.reps)
            point[kind] = {
                "pairs": 4 * q * ctx,
                "multiply_adds": 4 * q * ctx * shape["heads"] * shape["head_dim"],  # of q @ k.T, as many of p @ v
                **{f"{r}_us": t for r, t in us.items()},
                "kernel_speedup": us["padded"] / us["kernel"],
            }
            print(f"  {kind} of {q} after {ctx - q}: {4 * q * ctx} pairs, kernel {point[kind]['kernel_speedup']:.2f}x")
        points.append(point)
    # Per kind, ordered by size: the largest size below the first at which the padded path wins.
    result = {}
    for kind, name in (("prompts", "PADDED_SMALL_PROMPTS"), ("chunks", "PADDED_SMALL")):
        flat = [p[kind] for p in points]
        measured, found = crossover(flat, lambda p: p["kernel_speedup"] >= 1, "pairs")
        multiply_adds = crossover(flat, lambda p: p["kernel_speedup"] >= 1, "multiply_adds")[0]
        result |= report(
            name, measured, found, points, f"kernel faster for every group of {kind} of at most this many pairs"
        )
        result[name]["measured_multiply_adds"] = multiply_adds
    return result


def split_gain(shape: dict, sizes: dict, args: argparse.Namespace) -> dict:
    routes = {"split": cpu(attention_kernel=False, SPLIT_GAIN=1.0), "one": cpu(attention_kernel=False, SPLIT_GAIN=0.0)}
    long_ctx, long_prompt = sizes["longest"]
    points = []
    for frac in (0.1, 0.25, 0.5, 0.75, 0.9):
        for kind, n, longest, power in (("decodes", 32, long_ctx, 1), ("prompts", 8, long_prompt, 2)):
            lengths = [max(2, int(frac * longest))] * (n // 2) + [longest] * (n // 2)
            parts = routes["split"]._split(np.array(lengths), power)
            cost = sum(len(p) * max(lengths[i] for i in p) ** power for p in parts) / (n * longest**power)
            step = Step([1] * n if kind == "decodes" else lengths, lengths, 0 if kind == "decodes" else 1, shape)
            us = race(step, routes, args.reps)
            points.append(
                {
                    "kind": kind,
                    "work_ratio": cost,
                    **{f"{r}_us": t for r, t in us.items()},
                    "split_speedup": us["one"] / us["split"],
                }
            )
            print(f"  {kind}, padded work ratio {cost:.2f}: split {points[-1]['split_speedup']:.2f}x one group")
    points.sort(key=lambda p: p["work_ratio"])
    measured, found = crossover(points, lambda p: p["split_speedup"] >= 1, "work_ratio")
    return report("SPLIT_GAIN", measured, found, points, "split faster at every work ratio up to this")


def onednn_rows(shape: dict, sizes: dict, args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(sum(shape["qkv"]), shape["hidden"], generator=gen)
    b = torch.randn(len(w), generator=gen)
    every_size = dict(ONEDNN_MIN_ROWS=1, ONEDNN_MAX_ROWS=1 << 30, ONEDNN_MIN_WEIGHT=0)
    routes = {
        "onednn": cpu(**every_size, pack_weights=False),
        "packed": cpu(**every_size),
        "mkl": cpu(onednn_linear=False),
    }
    routes["packed"].prepare_weights([w], keep_plain=False)  # every call on the packed copy
    points = []
    for rows in sizes["linear_rows"]:
        x = torch.randn(rows, shape["hidden"], generator=gen)
        us = interleaved({name: (lambda r=r: r.linear(x, w, b)) for name, r in routes.items()}, args.reps, block=5)
        speedup, packed = us["mkl"] / us["onednn"], min(us["mkl"], us["onednn"]) / us["packed"]
        points.append(
            {
                "rows": rows,
                "onednn_us": us["onednn"],
                "packed_us": us["packed"],
                "mkl_us": us["mkl"],
                "speedup": speedup,
                "packed_speedup": packed,
            }
        )
        print(
            f"  {rows} rows: oneDNN {us['onednn']:.0f} us, packed {us['packed']:.0f} us, F.linear {us['mkl']:.0f} us"
            f" (oneDNN {speedup:.2f}x F.linear, packed {packed:.2f}x the faster)"
        )
    mkl_wins = [p["mkl_us"] < p["packed_us"] for p in points]
    mkl_from = next((p["rows"] for i, p in enumerate(points) if all(mkl_wins[i:])), 0)
    mkl_rule = "F.linear on the plain weight faster than the packed copy from this row count on (0: nowhere)"
    # found: each route won somewhere (not MKL at none, nor at every count from the first)
    mkl = report("MKL_MIN_ROWS", mkl_from, mkl_from not in (0, points[0]["rows"]), points, mkl_rule)
    first = next((i for i, p in enumerate(points) if p["speedup"] >= 1), None)
    rule = "oneDNN faster from the first to the last of these row counts, for a weight this large (0: at none)"
    if first is None:
        names = ("ONEDNN_MIN_ROWS", "ONEDNN_MAX_ROWS", "ONEDNN_MIN_WEIGHT")
        return {**mkl, **{name: report(name, 0, False, points, rule)[name] for name in names}}
    measured_max, found = crossover(points[first:], lambda p: p["speedup"] >= 1, "rows")
    return {
        **mkl,
        **report("ONEDNN_MIN_ROWS", points[first]["rows"], True, points, rule),
        **report("ONEDNN_MAX_ROWS", measured_max, found, points, rule),
        **report("ONEDNN_MIN_WEIGHT", w.numel(), True, points, rule),
    }


def bf16_upcast_rows(shape: dict, sizes: dict, args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(sum(shape["qkv"]), shape["hidden"], generator=gen).bfloat16()
    b = torch.randn(len(w), generator=gen).bfloat16()
    routes = {
        "upcast": cpu(bf16_upcast=True, BF16_UPCAST_MIN_ROWS=1, BF16_UPCAST_MIN_WORK=0),
        "bf16": cpu(bf16_upcast=False),
    }
    points = []
    for rows in sizes["bf16_rows"]:
        x = torch.randn(rows, shape["hidden"], generator=gen).bfloat16()
        us = interleaved({name: (lambda r=r: r.linear(x, w, b)) for name, r in routes.items()}, args.reps, block=5)
        points.append(
            {
                "rows": rows,
                "upcast_us": us["upcast"],
                "bf16_us": us["bf16"],
                "speedup": us["bf16"] / us["upcast"],
                "native_bf16_gemm": NATIVE_BF16_GEMM,
            }
        )
        print(f"  {rows} rows: float32 pieces {us['upcast']:.0f} us, bf16 F.linear {us['bf16']:.0f} us")
    wins = [p["speedup"] >= 1 for p in points]
    first = next((i for i in range(len(points)) if all(wins[i:])), None)
    measured = 0 if first is None else points[first]["rows"]
    found = first not in (None, 0)
    rule = "float32 GEMMs on pieces faster than torch's bfloat16 GEMM from this row count on (0: nowhere)"
    work_rule = "the same, as multiply-adds: that row count x the weight's elements (0: nowhere)"
    return {
        **report("BF16_UPCAST_MIN_ROWS", measured, found, points, rule),
        **report("BF16_UPCAST_MIN_WORK", measured * w.numel(), found, points, work_rule),
    }


def projections(shape: dict) -> dict[str, tuple[int, list[int]]]:
    """The four fused projections of ``shape``: (input features, each slice's output features)."""
    hidden, inter = shape["hidden"], shape["intermediate"]
    return {
        "qkv": (hidden, shape["qkv"]),
        "o": (hidden, [hidden]),
        "gate_up": (hidden, [inter, inter]),
        "down": (inter, [hidden]),
    }


class LoRACase:
    """Projection ``proj`` of ``shape`` (default qkv) with rank-``shape["rank"]`` adapters, in
    ``dtype``, and a step whose adapter segments have ``q_lens`` tokens."""

    def __init__(
        self,
        shape: dict,
        q_lens: list[int],
        slots: list[int] | None = None,
        proj: str = "qkv",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """``slots``: each segment's adapter (default: segment i takes adapter i)."""
        gen = torch.Generator().manual_seed(0)
        (fan_in, outs), rank = projections(shape)[proj], shape["rank"]
        slots = list(range(len(q_lens))) if slots is None else slots
        num_slots = max(slots) + 1
        self.mod = LinearWithLoRA(fan_in, outs, True, num_slots, rank, dtype, torch.device("cpu"))
        for slot in range(num_slots):
            slices = [(torch.randn(rank, fan_in, generator=gen), torch.randn(n, rank, generator=gen)) for n in outs]
            self.mod.set_slot(slot, slices, 0.5)
        self.seg_starts, self.seg_slots, self.max_seg = lora_segments(np.array(slots), np.array(q_lens))
        self.x = torch.randn(sum(q_lens), fan_in, generator=gen).to(dtype)
        self.y = torch.zeros(len(self.x), sum(outs), dtype=dtype)
        self.shape = shape
        self.work = sum(q_lens) * len(outs) * rank * (fan_in + sum(outs) // len(outs))  # as CPUBackend counts it
        self.slice_work = self.work // len(outs)

    def call(self, backend: CPUBackend) -> Callable[[], None]:
        """One ``apply_lora`` of the step on ``backend`` (prepared for it now)."""
        starts, slots = self.seg_starts, self.seg_slots
        lora = LoRAMeta(
            torch.from_numpy(starts), torch.from_numpy(slots), self.max_seg, self.shape["rank"], starts, slots
        )
        backend.prepare(Step([1], [1], 0, self.shape).meta(), lora)
        return lambda: backend.apply_lora(self.x, self.y, self.mod, lora)


def lora_kernel_max_work(shape: dict, sizes: dict, args: argparse.Namespace) -> dict:
    kernel, torch_route = cpu(LORA_KERNEL_MAX_WORK=float("inf")), cpu(layer_kernels=False)
    points = []
    for n in sizes["lora_tokens"]:
        case = LoRACase(shape, [n] * 4)
        us = interleaved({"kernel": case.call(kernel), "torch": case.call(torch_route)}, args.reps, block=5)
        points.append({"tokens": 4 * n, "work": case.work, "kernel_us": us["kernel"], "torch_us": us["torch"]})
        print(f"  {4 * n} tokens ({case.work} multiply-adds): kernel {us['kernel']:.0f} us, torch {us['torch']:.0f} us")
    measured, found = crossover(points, lambda p: p["kernel_us"] <= p["torch_us"], "work")
    return report("LORA_KERNEL_MAX_WORK", measured, found, points, "the kernel faster at every work up to this")


def lora_range_max_slots(shape: dict, sizes: dict, args: argparse.Namespace) -> dict:
    ranged = cpu(layer_kernels=False, LORA_RANGE_MAX_SLOTS=1 << 30)
    tiles = cpu(layer_kernels=False, LORA_RANGE_MAX_SLOTS=0)
    segment, decodes = sizes["lora"][0], sizes["decodes"]
    points = []
    for n in sizes["lora_slots"]:
        point: dict = {"adapters": n}
        prefill, decode = LoRACase(shape, [segment] * n), LoRACase(shape, [1] * decodes, np.arange(decodes) % n)
        steps = {"prefill": prefill, "decode": decode}
        for kind, case in steps.items():
            us = interleaved({"range": case.call(ranged), "tiles": case.call(tiles)}, args.reps, block=5)
            point |= {f"{kind}_range_us": us["range"], f"{kind}_tiles_us": us["tiles"]}
            print(f"  {n} adapters, {kind}: slot range {us['range']:.0f} us, tiles {us['tiles']:.0f} us")
        points.append(point)
    faster = lambda p: all(p[f"{k}_range_us"] <= p[f"{k}_tiles_us"] for k in ("prefill", "decode"))  # noqa: E731
    measured, found = crossover(points, faster, "adapters")
    return report("LORA_RANGE_MAX_SLOTS", measured, found, points, "the slot range faster at every count up to this")


def lora_range_min_work_bf16(shape: dict, sizes: dict, args: argparse.Namespace) -> dict:
    """``LORA_RANGE_MIN_WORK_BF16`` with the kernel's float32 multiply-adds and, where the CPU has
    AVX512-BF16, ``LORA_RANGE_MIN_WORK_BF16_PAIRS`` with its pair dot products."""
    if not NATIVE_BF16_GEMM:
        print("  LORA_RANGE_MIN_WORK_BF16: not measured (oneDNN has no bfloat16 kernel for this CPU)")
        return {}
    ranged = cpu(LORA_KERNEL_MAX_WORK=0, LORA_RANGE_MAX_SLOTS=1 << 30)
    arithmetics = {"LORA_RANGE_MIN_WORK_BF16": False}
    if HAS_CPU_BF16_DOT:
        arithmetics["LORA_RANGE_MIN_WORK_BF16_PAIRS"] = True
    out = {}
    for name, pairs in arithmetics.items():
        kernel = cpu(LORA_KERNEL_MAX_WORK=float("inf"), **{name: float("inf")}, lora_bf16_dot=pairs)
        points = []
        for proj in projections(shape):
            for tokens in sizes["lora_bf16_tokens"]:
                case = LoRACase(shape, [tokens // 4] * 4, proj=proj, dtype=torch.bfloat16)
                us = interleaved({"kernel": case.call(kernel), "range": case.call(ranged)}, args.reps, block=5)
                timings = {f"{r}_us": t for r, t in us.items()}
                points.append({"proj": proj, "tokens": tokens, "slice_work": case.slice_work, **timings})
                print(f"  {name}: {proj}, {tokens} tokens: slot range {us['kernel'] / us['range']:.2f}x the kernel")
        # The smallest slice work from which the range is faster at every point of at least that work.
        losing = [p["slice_work"] for p in points if p["range_us"] > p["kernel_us"]]
        winning = [p["slice_work"] for p in points if p["slice_work"] > max(losing, default=-1)]
        measured, found = (min(winning), bool(losing)) if winning else (max(losing), False)
        rule = "the least slice work from which the slot range beat the kernel at every larger point (all projections)"
        out.update(report(name, measured, found, points, rule))
    return out


def bf16_upcast_chunk(shape: dict, sizes: dict, args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2 * shape["intermediate"], shape["hidden"], generator=gen).bfloat16()
    chunks = sizes["bf16_chunks"]
    routes = {
        c: cpu(bf16_upcast=True, BF16_UPCAST_MIN_ROWS=1, BF16_UPCAST_MIN_WORK=0, BF16_UPCAST_CHUNK=c) for c in chunks
    }
    points = [{"chunk": c} for c in chunks]
    for rows in sizes["bf16_chunk_rows"]:
        x = torch.randn(rows, shape["hidden"], generator=gen).bfloat16()
        us = interleaved({str(c): (lambda r=r: r.linear(x, w, None)) for c, r in routes.items()}, args.reps, block=5)
        for p in points:
            p[f"{rows}_rows_us"] = us[str(p["chunk"])]
    for p in points:  # the slowdown against each row count's fastest chunk, the worst of them
        p["worst_ratio"] = max(
            p[f"{r}_rows_us"] / min(q[f"{r}_rows_us"] for q in points) for r in sizes["bf16_chunk_rows"]
        )
        print(f"  chunk {p['chunk']}: {p['worst_ratio']:.2f}x the fastest at its slowest row count")
    best = min(points, key=lambda p: p["worst_ratio"])
    rule = "the piece size (weight elements) whose worst ratio to the fastest, over the row counts, is lowest"
    result = report("BF16_UPCAST_CHUNK", best["chunk"], True, points, rule)
    result["BF16_UPCAST_CHUNK"]["within_5_percent"] = [p["chunk"] for p in points if p["worst_ratio"] <= 1.05]
    return result


def lora_tile(shape: dict, sizes: dict, args: argparse.Namespace) -> dict:
    case = LoRACase(shape, sizes["lora"])
    tiles = [32, 64, 128, 256, 512]
    routes = {str(t): cpu(layer_kernels=False, LORA_TILE=t, LORA_RANGE_MAX_SLOTS=0) for t in tiles}
    us = interleaved({name: case.call(backend) for name, backend in routes.items()}, args.reps, block=5)
    points = [{"tile": t, "us": us[str(t)]} for t in tiles]
    best = min(points, key=lambda p: p["us"])
    for p in points:
        print(f"  tile {p['tile']}: {p['us']:.0f} us ({p['us'] / best['us']:.2f}x the fastest)")
    near = [p["tile"] for p in points if p["us"] <= 1.05 * best["us"]]
    result = report("LORA_TILE", best["tile"], True, points, "the fastest tile size")
    result["LORA_TILE"]["within_5_percent"] = near
    return result


MEASURES = (
    kernel_max_threads,
    padded_small,
    split_gain,
    onednn_rows,
    bf16_upcast_rows,
    bf16_upcast_chunk,
    lora_kernel_max_work,
    lora_range_max_slots,
    lora_range_min_work_bf16,
    lora_tile,
)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SMOKE_SHAPES if args.smoke else {name: SHAPES[name] for name in args.shapes}
    sizes = SMOKE_SIZES if args.smoke else SIZES
    measures = [m for m in MEASURES if args.measures is None or m.__name__ in args.measures]
    results, load_before = {}, os.getloadavg()
    with torch.inference_mode():
        for shape_name, shape in shapes.items():
            print(f"\n{shape_name}: {shape}")
            for measure in measures:
                for name, entry in measure(shape, sizes, args).items():
                    results.setdefault(name, {})[shape_name] = entry
    save_result(
        f"cpu_routing_{args.tag}" if args.tag else "cpu_routing",
        {
            "benchmark": "cpu_routing",
            "env": environment("cpu"),
            "torch_threads": torch.get_num_threads(),
            "config": {
                "dtype": "float32 (BF16_UPCAST_*, LORA_RANGE_MIN_WORK_BF16*: bfloat16)",
                "native_bf16_gemm": NATIVE_BF16_GEMM,
                "shapes": shapes,
                "sizes": sizes,
                "block_size": BLOCK_SIZE,
                "reps": args.reps,
                "timing": "alternating blocks of 5 calls, median per call; prepare() excluded",
            },
            # Other processes' load (1-minute average, before and after): the figures are only as
            # good as the machine was quiet.
            "load_average": [load_before[0], os.getloadavg()[0]],
            "thresholds": results,
        },
        args.out_dir,
        args.smoke,
    )


if __name__ == "__main__":
    main()
