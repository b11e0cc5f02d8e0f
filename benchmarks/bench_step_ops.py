"""Ops and kernel launches per decode step and per layer, eager vs ``compile=True`` (CPU counts).

Qwen2.5-7B-Instruct layer shapes (``load_format="dummy"``: config only, random weights, vocabulary
cut to 1024 since the vocabulary only sizes the embedding and the LM head), 1 and 2 layers: the
difference is the per-layer count, extrapolated to 28 layers. A batch of 4 decodes with two
adapters and one base row (torch backend, fp32). Counted by the CPU profiler around one decode
step's forward, eager: every aten op that calls no other aten op and is not a view, metadata or
allocation op (one kernel launch each, from the CPU profiler); ``compile=True``: the kernel calls
in the Inductor graph's ``call()`` (generated C++ kernels, extern GEMMs, aten fallbacks, copies).
Counts, not times: valid on any machine.

    python benchmarks/bench_step_ops.py [--smoke]
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections import Counter
from pathlib import Path

import torch
from common import (
    QWEN25_7B_INSTRUCT,
    SMOKE_VOCAB,
    environment,
    save_result,
    shrink_config,
    write_model_folder,
    write_peft_adapter,
)
from torch._inductor.utils import run_and_get_code

FULL_LAYERS = 28


# Leaf ops that launch no kernel: views, metadata and allocation.
NO_KERNEL = {
    "aten::view",
    "aten::as_strided",
    "aten::t",
    "aten::transpose",
    "aten::permute",
    "aten::expand",
    "aten::slice",
    "aten::select",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::_reshape_alias",
    "aten::alias",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::detach",
    "aten::empty",
    "aten::empty_strided",
    "aten::lift_fresh",
    "aten::_unsafe_view",
    "aten::split",
    "aten::chunk",
    "aten::unbind",
    "aten::narrow",
    "aten::reshape",
    "aten::to",
    "aten::result_type",
}  # a leaf `to` converts nothing (a conversion calls _to_copy)
CALL_PATTERN = re.compile(r"(cpp_fused_\w+|extern_kernels\.\w+|torch\.ops\.[\w.]+|aten\.\w+|\.copy_)\(")


def count_eager(fn) -> Counter:
    """Leaf aten ops (calling no other aten op) of ``fn()`` that launch a kernel, from the CPU profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(
        e.name
        for e in prof.events()
        if e.name.startswith("aten::")
        and e.name not in NO_KERNEL
        and not any(c.name.startswith("aten::") for c in e.cpu_children)
    )


def count_compiled(source: str) -> Counter:
    """Kernel calls of an Inductor graph's ``call()``: generated C++ kernels, extern kernels (GEMMs),
    aten fallbacks and copies back into mutated inputs."""
    body = source[source.index("def call(") :]
    ops: Counter[str] = Counter()
    for line in body.splitlines()[1:]:
        if line and not line.startswith(" "):
            break
        if not line.strip().startswith("#"):
            for name in CALL_PATTERN.findall(line):
                ops["cpp_fused" if name.startswith("cpp_fused_") else name] += 1
    return ops


def count_decode_step(folder: Path, adapters: dict[str, Path], compile: bool) -> Counter:
    """Kernel launches of one decode step's forward in a short generate (4 sequences, 4 tokens)."""
    from mcl_runtime import Engine, SamplingParams

    torch._dynamo.reset()
    engine = Engine(
        str(folder),
        adapters={k: str(v) for k, v in adapters.items()},
        device="cpu",
        dtype="float32",
        load_format="dummy",
        max_loras=2,
        max_lora_rank=16,
        max_num_seqs=4,
        max_model_len=256,
        kv_cache_blocks=64,
        compile=compile,
    )
    prompts = [[(7 * i + j) % 500 for j in range(12 + i)] for i in range(4)]
    run = lambda: engine.generate(
        prompts,
        SamplingParams(max_tokens=4, ignore_eos=True),  # noqa: E731
        adapter=["a", "b", None, "a"],
    )
    if compile:  # every decode step replays the one graph compiled for bucket 4
        _, sources = run_and_get_code(run)
        return count_compiled(sources[-1])
    counted: list[Counter] = []
    model_forward = engine.runner.model.forward

    def counting_forward(*args):
        out = []
        counted.append(count_eager(lambda: out.append(model_forward(*args))))
        return out[0]

    engine.runner.model.forward = counting_forward
    run()
    return counted[-1]  # the last decode step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny widths, eager only (a check of the script within the smoke suite's time cap)",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    base_cfg = shrink_config(QWEN25_7B_INSTRUCT) if args.smoke else {**QWEN25_7B_INSTRUCT, "vocab_size": SMOKE_VOCAB}
    modes = ("eager",) if args.smoke else ("eager", "compile")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layers in (1, 2):
            cfg = {**base_cfg, "num_hidden_layers": layers}
            folder = write_model_folder(Path(tmp) / f"L{layers}", cfg)
            adapters = {
                name: write_peft_adapter(
                    Path(tmp) / f"L{layers}-{name}", cfg, rank=16, alpha=32, seed=i, dtype=torch.float32
                )
                for i, name in enumerate(("a", "b"))
            }
            for mode in modes:
                rows[(mode, layers)] = count_decode_step(folder, adapters, mode == "compile")
                print(mode, layers, sum(rows[(mode, layers)].values()), flush=True)
    result = {
        "benchmark": "bench_step_ops",
        "environment": environment("cpu"),
        "shapes": "Qwen2.5-7B-Instruct layers" + (" (shrunk: smoke)" if args.smoke else ""),
        "batch": "4 decodes: adapters a, b, a (rank 16, all projections) + 1 base row; fp32; torch backend",
        "note": "counts, not times; per_layer = count(2 layers) - count(1 layer)",
    }
    for mode in modes:
        one, two = sum(rows[(mode, 1)].values()), sum(rows[(mode, 2)].values())
        result[mode] = {
            "launches_per_layer": two - one,
            "launches_per_step_28_layers": one + (FULL_LAYERS - 1) * (two - one),
            "launches_1_layer": one,
            "launches_2_layers": two,
            "by_op_2_layers": dict(rows[(mode, 2)].most_common()),
        }
    if "compile" in modes:
        result["ratio_launches_per_layer_eager_over_compile"] = round(
            result["eager"]["launches_per_layer"] / max(1, result["compile"]["launches_per_layer"]), 2
        )
    save_result("step_ops", result, args.out, smoke=args.smoke)


if __name__ == "__main__":
    main()
