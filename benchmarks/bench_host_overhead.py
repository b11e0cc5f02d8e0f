"""Host overhead of one decode step (everything but the model's arithmetic).

    python benchmarks/bench_host_overhead.py [--device cpu|cuda] [--seqs 1 32 256] [--compare REF] [--repeat K]
                                             [--smoke] [--out-dir DIR]

A micro model (Qwen2, 1 layer, hidden 64, dummy weights, the demo tokenizer) with 4 LoRA adapters
plus the base model, so the forward pass is nearly free and the step time is the engine's own.
For each number of running sequences: that many requests (adapters in turn, greedy, EOS ignored)
are admitted and prefilled, then ``--steps`` decode steps are timed one by one (median). Three
consumers: ``generate`` reads nothing until a request ends (what ``Engine.generate`` does, and
like it asks ``step(finished_only=True)`` where the engine has that argument), ``step`` calls a
plain ``step()`` (outputs of every request that progressed) and reads only the ended ones,
``stream`` reads every output's text after every step (what a streaming server does; its requests
are added with ``stream=True`` where the engine has that argument, and ask for delta outputs where
the engine has ``SamplingParams.output_kind``, as the server does).

A second, profiled pass splits the step: scheduling (``scheduler.schedule``), runner metadata
(``runner.run`` up to the model's forward), forward, LM head (``model.compute_logits``), sampling
(the rest of ``runner.run`` after the forward), outputs (building ``RequestOutput``s and reading
their text), and bookkeeping (the rest of ``Engine.step``: appending tokens, finish checks,
detokenization where eager). The profiled pass is slower than the plain one (a timer per span);
shares come from it, the headline ms/step from the plain pass.
``model_ms`` is the model's share of a step: its forward pass and LM head (profiled; kernels,
arithmetic and memory traffic included). On a CPU that is not negligible even for the micro model
at 256 rows, so ``engine_ms``, the plain ms/step minus ``model_ms``, is what is left for the
engine itself: scheduling, metadata, sampling, bookkeeping and outputs. ``dense_ms`` is the
floor no engine avoids: the model's dense projections and LM head (``F.linear`` on its own
weights, one row per sequence) timed alone, with warm caches.

``--compare REF`` also runs this script on the ``mcl_runtime`` package of git revision REF (e.g.
``main``; built once as a wheel in a temporary folder, C++ extension included, so that kernel
changes count) in a subprocess on the same machine and prints both side by side with the ratio.
``--repeat K`` runs K rounds (this
tree and REF in turn) and reports the median per setting and the best round (on a shared machine
other processes only ever add time), with every round's value in the JSON.
``--compile`` builds the engine with ``compile=True`` (the static decode path, one compiled graph
per batch bucket; the first steps of each bucket compile, in the warm-up) and skips the profiled
pass (its hooks would break the graph).
Writes benchmarks/results/host_overhead_<device>[_compile].json (``cpu`` or the GPU's name, as
``nvidia-h200``; --smoke: only with --out-dir).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from common import (
    QWEN25_7B_INSTRUCT,
    ROOT,
    base_parser,
    device_slug,
    environment,
    parse_with_smoke,
    patch,
    resolve_device,
    save_result,
    synchronize,
    write_model_folder,
    write_peft_adapter,
)

if TYPE_CHECKING:
    from mcl_runtime.engine.llm_engine import Engine

PARTS = ("scheduling", "metadata", "forward", "lm_head", "sampling", "bookkeeping", "outputs")
MODEL_PARTS = ("forward", "lm_head")
CONSUMERS = ("generate", "step", "stream")
NUM_ADAPTERS = 4
# Engine methods that build outputs, by the names the engine has had (wrapped where they exist).
OUTPUT_METHODS = ("_emit", "_output", "_outputs")

MICRO = {
    **QWEN25_7B_INSTRUCT,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "max_window_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "bos_token_id": 509,
    "eos_token_id": 511,
}


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__)
    p.set_defaults(dtype="float32")
    p.add_argument("--seqs", type=int, nargs="+", default=[1, 32, 256], help="running sequences")
    p.add_argument("--steps", type=int, default=60, help="timed decode steps per setting")
    p.add_argument("--warmup", type=int, default=5, help="untimed decode steps before timing")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapters")
    p.add_argument(
        "--overlap",
        choices=["auto", "on", "off"],
        default="auto",
        help="Engine(overlap=...) where the engine has the knob (auto: its default)",
    )
    p.add_argument("--compare", default=None, metavar="REF", help="also measure git revision REF, side by side")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds (with --compare: this tree and REF in turn); ms/step is the median over rounds",
    )
    p.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)  # the --compare subprocess
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)  # its folders, written by us
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: host overhead is serial)")
    p.add_argument("--compile", action="store_true", help="Engine(compile=True); no profiled pass")
    return parse_with_smoke(p, dict(seqs=[1, 8], steps=4, warmup=1))


def micro_model(root: Path, rank: int, written: bool = False) -> tuple[Path, dict[str, Path]]:
    """The micro model and its adapters under ``root`` (already there when ``written``: the
    --compare subprocess runs an older package that may not write them the same way)."""
    if written:
        return root / "base", {f"a{i}": root / f"a{i}" for i in range(NUM_ADAPTERS)}
    base = write_model_folder(root / "base", MICRO)
    adapters = {
        f"a{i}": write_peft_adapter(root / f"a{i}", MICRO, rank=rank, seed=i, dtype=torch.float32)
        for i in range(NUM_ADAPTERS)
    }
    return base, adapters


def build_engine(base: Path, adapters: dict[str, Path], device: torch.device, args: argparse.Namespace) -> Engine:
    from mcl_runtime import Engine

    kwargs: dict[str, Any] = dict(
        model=base,
        adapters=adapters,
        device=str(device),
        dtype=args.dtype,
        backend=args.backend,
        max_loras=NUM_ADAPTERS,
        max_lora_rank=args.rank,
        max_num_seqs=max(args.seqs),
        load_format="dummy",
        kv_cache_blocks=max(args.seqs) * ((args.prompt_len + args.warmup + 3 * args.steps + 64) // 16 + 2),
    )
    if args.overlap != "auto" and "overlap" in inspect.signature(Engine).parameters:
        kwargs["overlap"] = args.overlap == "on"
    if args.compile:
        kwargs["compile"] = True
    return Engine(**kwargs)


class Profile:
    """Wraps the engine's step, scheduler, runner, model forward and output builders with host timers
    (device synchronised at span ends on CUDA) until ``close``; one dict of seconds per step."""

    def __init__(self, engine: Engine) -> None:
        self.device = engine.device
        self.cur: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self._marks: dict[str, float] = {}
        runner = engine.runner
        self._undo = [
            patch(engine, "step", self._timed(engine.step, "step")),
            patch(engine.scheduler, "schedule", self._timed(engine.scheduler.schedule, "scheduling")),
            patch(runner, "run", self._timed(runner.run, "run")),
        ]
        methods = [name for name in OUTPUT_METHODS if hasattr(engine, name)]
        self._undo += [patch(engine, name, self._timed(getattr(engine, name), "outputs")) for name in methods]
        module = sys.modules[type(engine).__module__]
        if not methods and hasattr(module, "request_outputs"):  # the engine calls the builder directly
            self._undo.append(patch(module, "request_outputs", self._timed(module.request_outputs, "outputs")))
        if hasattr(engine.model, "compute_logits"):
            self._undo.append(
                patch(engine.model, "compute_logits", self._timed(engine.model.compute_logits, "lm_head"))
            )
        self._hooks = [
            engine.model.register_forward_pre_hook(lambda m, a: self._mark("forward_start")),
            engine.model.register_forward_hook(lambda m, a, o: self._mark("forward_end")),
        ]
        graphs = getattr(runner, "graphs", None)  # a replayed CUDA graph calls no forward hook
        if graphs is not None:
            self._undo.append(patch(graphs, "run", self._forward_marks(graphs.run)))

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def _mark(self, name: str) -> None:
        self._marks[name] = self._now()

    def _forward_marks(self, fn: Callable) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._mark("forward_start")
            out = fn(*args, **kwargs)
            self._mark("forward_end")
            return out

        return wrapped

    def _timed(self, fn: Callable, name: str) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            t0 = self._now()
            if name == "run":
                self._marks["run_start"] = t0
                lm_head_before = self.cur["lm_head"]
            out = fn(*args, **kwargs)
            t1 = self._now()
            self.cur[name] += t1 - t0
            if name == "run" and "forward_start" in self._marks:
                m = self._marks
                self.cur["metadata"] += m["forward_start"] - m["run_start"]
                self.cur["forward"] += m["forward_end"] - m["forward_start"]
                self.cur["sampling"] += t1 - m["forward_end"] - (self.cur["lm_head"] - lm_head_before)
                m.clear()
            return out

        return wrapped

    def end_step(self, consumer_s: float) -> None:
        c = self.cur
        step = {p: c[p] for p in ("scheduling", "metadata", "forward", "lm_head", "sampling")}
        step["outputs"] = c["outputs"] + consumer_s
        step["bookkeeping"] = c["step"] - c["scheduling"] - c["run"] - c["outputs"]
        step["total"] = c["step"] + consumer_s
        self.steps.append(step)
        self.cur = defaultdict(float)

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()
        for h in self._hooks:
            h.remove()


def consume(outs: list, consumer: str) -> None:
    if consumer == "stream":
        for out in outs:
            for o in out.outputs:
                o.text  # noqa: B018 - reading it is the point
    else:
        for out in outs:
            if out.finished:
                out.outputs[0].text  # noqa: B018


def dense_ms(engine: Engine, n: int, reps: int = 30) -> float:
    """Median ms of the model's dense projections and LM head on ``n`` rows through the engine's
    backend, nothing else."""
    model = engine.model
    modules = [m for i in range(len(model.layers)) for m in model.lora_modules(i).values()]
    weights = [(m.in_features, m.weight, m.bias) for m in modules]
    weights.append((model.config.hidden_size, model.lm_head_weight, None))
    xs = {k: torch.randn(n, k, dtype=engine.dtype, device=engine.device) for k, _, _ in weights}
    times = []
    with torch.inference_mode():
        for _ in range(reps + 3):
            synchronize(engine.device)
            t0 = time.perf_counter()
            for k, w, b in weights:
                engine.backend.linear(xs[k], w, b)
            synchronize(engine.device)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[3:])


def prefilling(engine: Engine) -> bool:
    """A request waits or has not started its prefill (engines whose scheduler runs rows of a
    table, and older ones whose scheduler runs Sequence objects)."""
    scheduler = engine.scheduler
    if scheduler.waiting:
        return True
    table = getattr(engine, "table", None)
    if table is not None and hasattr(table, "num_computed"):
        return bool((table.num_computed[scheduler.running] == 0).any())
    return any(s.num_computed == 0 for s in scheduler.running)


def measure(engine: Engine, n: int, consumer: str, args: argparse.Namespace, profile: bool) -> dict:
    """Median ms per decode step (and mean parts when profiling) with ``n`` running sequences."""
    from mcl_runtime import SamplingParams

    names = [f"a{i}" for i in range(NUM_ADAPTERS)] + [None]
    gen = torch.Generator().manual_seed(n)
    params = SamplingParams(max_tokens=args.warmup + args.steps + 8, ignore_eos=True)
    if consumer == "stream" and "output_kind" in {f.name for f in dataclasses.fields(SamplingParams)}:
        params = dataclasses.replace(params, output_kind="delta")  # what the server streams from
    stream = (
        {"stream": True}
        if consumer == "stream" and "stream" in inspect.signature(engine.add_request).parameters
        else {}
    )
    ids = [
        engine.add_request(
            None,
            torch.randint(0, 500, (args.prompt_len,), generator=gen).tolist(),
            params,
            names[i % len(names)],
            **stream,
        )
        for i in range(n)
    ]
    # generate asks for the finished requests only, as Engine.generate does (where the engine can)
    finished_only = consumer == "generate" and "finished_only" in inspect.signature(engine.step).parameters
    step_kwargs = {"finished_only": True} if finished_only else {}
    while prefilling(engine):
        consume(engine.step(**step_kwargs), consumer)
    for _ in range(args.warmup + 1):  # + 1: the step that samples after the last prefill
        consume(engine.step(**step_kwargs), consumer)
    prof = Profile(engine) if profile else None
    times = []
    try:
        for _ in range(args.steps):
            synchronize(engine.device)
            t0 = time.perf_counter()
            outs = engine.step(**step_kwargs)
            t1 = time.perf_counter()
            consume(outs, consumer)
            synchronize(engine.device)
            t2 = time.perf_counter()
            times.append(t2 - t0)
            if prof:
                prof.end_step(t2 - t1)
    finally:
        if prof:
            prof.close()
        for rid in ids:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
    running = len(engine.scheduler.running)
    assert running == 0, f"{running} sequences still running after the aborts"
    result = {"ms_per_step": 1e3 * statistics.median(times)}
    if prof:
        result["parts_ms"] = {p: 1e3 * statistics.fmean(s[p] for s in prof.steps) for p in PARTS}
        result["profiled_ms_per_step"] = 1e3 * statistics.fmean(s["total"] for s in prof.steps)
        result["model_ms"] = 1e3 * statistics.median(sum(s[p] for p in MODEL_PARTS) for s in prof.steps)
    return result


def run_all(args: argparse.Namespace, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_host_") as tmp:
        base, adapters = micro_model(args.model_dir or Path(tmp), args.rank, written=args.model_dir is not None)
        engine = build_engine(base, adapters, device, args)
        measure(engine, min(args.seqs), "generate", args, profile=False)  # warm-up
        results: dict[str, dict] = {}
        for consumer in CONSUMERS:
            for n in args.seqs:
                plain = measure(engine, n, consumer, args, profile=False)
                if not args.compile:
                    plain.update(measure(engine, n, consumer, args, profile=True), ms_per_step=plain["ms_per_step"])
                    plain["engine_ms"] = plain["ms_per_step"] - plain["model_ms"]
                results[f"{consumer}/{n}"] = {**plain, "dense_ms": dense_ms(engine, n)}
    overlap = getattr(engine, "overlap", None)
    return {"package": str(Path(sys.modules["mcl_runtime"].__file__).parent), "overlap": overlap, "results": results}


@contextlib.contextmanager
def revision(ref: str, rank: int) -> Iterator[Path]:
    """A folder holding the package of git revision ``ref``, built as a wheel with its own C++
    extension (so that kernel changes count too), and the micro model; removed afterwards."""
    import mcl_runtime

    with tempfile.TemporaryDirectory(prefix="bench_host_ref_") as tmp:
        tmp = Path(tmp)
        names = subprocess.run(
            ["git", "ls-tree", "--name-only", ref], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        wanted = [
            n for n in ("mcl_runtime", "kernels", "csrc", "CMakeLists.txt", "setup.py", "pyproject.toml") if n in names
        ]
        archive = subprocess.run(["git", "archive", ref, *wanted], cwd=ROOT, capture_output=True, check=True)
        (tmp / "src").mkdir()
        subprocess.run(["tar", "-x", "-C", str(tmp / "src")], input=archive.stdout, check=True)
        print(f"building {ref} (a wheel, with its C++ extension) ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "wheel"), str(tmp / "src")],
            check=True,
        )
        wheel = next((tmp / "wheel").glob("*.whl"))
        shutil.unpack_archive(wheel, tmp / "site", "zip")
        if any(Path(mcl_runtime.__file__).parent.glob("_C*.so")) and not any(
            (tmp / "site" / "mcl_runtime").glob("_C*.so")
        ):
            raise RuntimeError(f"{ref}'s C++ extension did not build: its figures would not be comparable")
        micro_model(tmp / "model", rank)
        yield tmp


def run_revision(tree: Path, args: argparse.Namespace) -> dict:
    """This script on the package built by ``revision``, in a subprocess."""
    argv = list(sys.argv[1:])
    i = argv.index("--compare")
    del argv[i : i + 2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "site"), str(ROOT / "benchmarks")])}
    subprocess.run(
        [sys.executable, __file__, *argv, "--json-only", "--out-dir", str(tree), "--model-dir", str(tree / "model")],
        env=env,
        check=True,
        cwd=tree,
    )
    return json.loads((tree / "host_overhead_json_only.json").read_text())


def print_table(label: str, data: dict, other: dict | None = None, other_label: str = "") -> None:
    print(f"\n{label}" + (f" vs {other_label}" if other else ""))
    for key, r in data["results"].items():
        parts = ", ".join(
            f"{p} {r['parts_ms'][p]:.2f} ({100 * r['parts_ms'][p] / r['profiled_ms_per_step']:.0f}%)"
            for p in PARTS
            if "parts_ms" in r
        )
        line = f"  {key:>13}: {r['ms_per_step']:7.3f} ms/step"
        if other and key in other["results"]:
            o = other["results"][key]["ms_per_step"]
            line += f"   {other_label} {o:7.3f} ms/step   {o / r['ms_per_step']:5.2f}x faster"
        if len(r.get("rounds_ms_per_step", ())) > 1:
            best = f"{r['best_round_ms_per_step']:.3f}"
            if other and key in other["results"]:
                best += f" vs {other['results'][key]['best_round_ms_per_step']:.3f}"
            line += f"   (best round {best})"
        if "dense_ms" in r:
            line += f"   (dense GEMMs alone {r['dense_ms']:.2f} ms)"
        print(line)
        if "engine_ms" in r:
            line = f"  {'':>13}  engine's own {r['engine_ms']:.3f} ms, model {r['model_ms']:.3f} ms"
            if other and "engine_ms" in other["results"].get(key, {}):
                o = other["results"][key]["engine_ms"]
                line += f"   {other_label} engine's own {o:.3f} ms   {o / r['engine_ms']:5.2f}x"
            print(line)
        if parts:
            print(f"  {'':>13}  parts (profiled, ms): {parts}")


def merge_rounds(rounds: list[dict]) -> dict:
    """One result from several rounds: the median ms/step per setting, the best round (other
    processes on a shared machine only ever add time) and every round's value; parts from the
    first round."""
    merged = {**rounds[0], "results": {}}
    for key, first in rounds[0]["results"].items():
        values = [r["results"][key]["ms_per_step"] for r in rounds]
        merged["results"][key] = {
            **first,
            "ms_per_step": statistics.median(values),
            "best_round_ms_per_step": min(values),
            "rounds_ms_per_step": values,
        }
        if "engine_ms" in first:
            for name in ("model_ms", "engine_ms"):
                each = [r["results"][key][name] for r in rounds]
                merged["results"][key].update({name: statistics.median(each), f"rounds_{name}": each})
    return merged


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args)
    if args.json_only:
        save_result("host_overhead_json_only", run_all(args, device), args.out_dir, False, announce=False)
        return
    ours_rounds, ref_rounds = [], []
    with revision(args.compare, args.rank) if args.compare else contextlib.nullcontext() as tree:
        for _ in range(max(1, args.repeat)):  # interleaved, so that both see the same machine
            ours_rounds.append(run_all(args, device))
            if tree is not None:
                ref_rounds.append(run_revision(tree, args))
    ours = merge_rounds(ours_rounds)
    ref = merge_rounds(ref_rounds) if ref_rounds else None
    if ref:
        print_table(f"{args.compare} (before)", ref)
    print_table("this tree", ours, ref, args.compare or "")
    payload = {
        "benchmark": "host_overhead",
        "env": environment(device),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": os.getloadavg(),  # other processes on the machine, at the end
        "config": {
            "model": "Qwen2 1 layer, hidden 64, dummy weights, demo tokenizer",
            "adapters": NUM_ADAPTERS,
            "lora_rank": args.rank,
            "seqs": args.seqs,
            "steps": args.steps,
            "prompt_len": args.prompt_len,
            "dtype": args.dtype,
            "overlap": args.overlap,
            "engine_ms": "plain ms/step minus model_ms (the profiled forward and LM head, median)",
            "compile": args.compile,
            "rounds": max(1, args.repeat),
            "consumers": {
                "generate": "step(finished_only=True), reads outputs when finished",
                "step": "step(), reads outputs when finished",
                "stream": "reads every output's text every step",
            },
        },
        "ours": ours,
    }
    if ref:
        payload["before"] = {"revision": args.compare, **ref}
        payload["speedup"] = {
            k: ref["results"][k]["ms_per_step"] / r["ms_per_step"]
            for k, r in ours["results"].items()
            if k in ref["results"]
        }
        payload["engine_speedup"] = {
            k: ref["results"][k]["engine_ms"] / r["engine_ms"]
            for k, r in ours["results"].items()
            if "engine_ms" in ref["results"].get(k, {}) and "engine_ms" in r
        }
    save_result(
        f"host_overhead_{device_slug(device)}{'_compile' if args.compile else ''}", payload, args.out_dir, args.smoke
    )


if __name__ == "__main__":
    main()
