"""What grammar-constrained decoding costs per decode step (demo model, four adapters).

    python benchmarks/bench_structured.py [--smoke] [--out-dir DIR] [--batches 1 32 256]

For each batch size B, B requests (random 16-token prompts, spread over the adapters) decode
``--steps`` timed steps after their prefill, once with every row under a JSON schema (a string of
at least 400 characters, so no row can finish early) and once with none (EOS ignored): the same
batch shapes, side by side, alternating for ``--rounds`` rounds; the median step time of each
mode is kept. Also timed: the grammar's own share of a constrained step (batched bitmask fill +
apply, and the matchers' token accepts). Wall and process CPU time are both recorded (on a
shared machine the CPU time is the steadier). Goal: <= 5% of the step at batch 32.
Writes benchmarks/results/structured_<device>.json (--smoke: only with --out-dir).
"""

from __future__ import annotations

import os
import time

import numpy as np
from common import AGENTS, base_parser, device_slug, environment, parse_with_smoke, save_result

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "minLength": 400, "maxLength": 800}},
    "required": ["answer"],
    "additionalProperties": False,
}


def parse_args():
    p = base_parser(__doc__)
    p.set_defaults(dtype="float32")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per run")
    p.add_argument("--rounds", type=int, default=3)
    return parse_with_smoke(p, {"batches": [1, 4], "steps": 3, "rounds": 1})


def clocks() -> tuple[float, float]:
    """(wall, CPU of this process, all threads) seconds: on a shared machine the CPU time is the steadier."""
    return time.perf_counter(), time.process_time()


class GrammarClock:
    """Wall and CPU seconds spent in the grammar hooks (bitmask fill + apply, token accepts)."""

    def __init__(self, engine) -> None:
        self.seconds = np.zeros(2)
        from mcl_runtime.engine.structured import Constraint

        engine.grammars  # noqa: B018 - built on first use, with the runner's masker
        masker = engine.runner.grammar

        def timed(fn):
            def wrapper(*args):
                start = clocks()
                try:
                    return fn(*args)
                finally:
                    self.seconds += np.subtract(clocks(), start)

            return wrapper

        engine.runner.grammar = timed(masker)
        Constraint.accept = timed(Constraint.accept)  # the class's: each request's constraint is new


def decode_steps(engine, batch: int, steps: int, constrained: bool, rng: np.random.Generator) -> list[np.ndarray]:
    from mcl_runtime import SamplingParams

    params = SamplingParams(
        max_tokens=steps + 2,
        temperature=1.0,
        seed=1,
        ignore_eos=not constrained,
        structured={"json": SCHEMA} if constrained else None,
    )
    vocab = engine.tokenizer.vocab_size - 8
    for i in range(batch):
        engine.add_request(None, rng.integers(0, vocab, 16).tolist(), params, adapter=AGENTS[i % len(AGENTS)])
    while engine.scheduler.waiting or (engine.table.num_out[engine.scheduler.running] == 0).any():
        engine.step()
    times = []
    for _ in range(steps):
        start = clocks()
        engine.step()
        times.append(np.subtract(clocks(), start))
    while engine.has_unfinished_requests():
        engine.step()
    return times


def main() -> None:
    args = parse_args()
    from mcl_runtime import Engine
    from mcl_runtime.demo import demo_adapter_dirs, demo_model_dir
    from mcl_runtime.engine.params import StructuredOutput

    engine = Engine(
        model=demo_model_dir() / "base",
        adapters=demo_adapter_dirs(),
        device=args.device or "cpu",
        dtype=args.dtype,
        backend=args.backend,
        kv_cache_blocks=4096,
        max_num_seqs=max(args.batches),
    )
    engine.grammars.compile(StructuredOutput(json=SCHEMA))  # compiled once, outside the timings
    clock = GrammarClock(engine)
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batches:
        per_mode: dict[str, list[np.ndarray]] = {"none": [], "all": []}
        grammar_s, constrained_steps = np.zeros(2), 0
        decode_steps(engine, batch, 2, True, rng)  # warm-up
        for _ in range(args.rounds):
            for mode in ("none", "all"):
                before = clock.seconds.copy()
                per_mode[mode] += decode_steps(engine, batch, args.steps, mode == "all", rng)
                if mode == "all":
                    grammar_s += clock.seconds - before
                    constrained_steps += args.steps + 1  # the prefill step's sample also runs the grammar
        none_ms, all_ms = (1e3 * np.median(per_mode[m], axis=0) for m in ("none", "all"))
        grammar_ms = 1e3 * grammar_s / constrained_steps
        row = {"batch": batch}
        for i, kind in enumerate(("wall", "cpu")):
            row[kind] = {
                "step_ms_unconstrained": none_ms[i],
                "step_ms_constrained": all_ms[i],
                "overhead_pct": 100 * (all_ms[i] - none_ms[i]) / none_ms[i],
                "grammar_ms_per_step": grammar_ms[i],
                "grammar_pct_of_unconstrained_step": 100 * grammar_ms[i] / none_ms[i],
            }
            print(
                f"batch {batch:4d} {kind:4s}: step {none_ms[i]:8.2f} ms unconstrained, {all_ms[i]:8.2f} ms all "
                f"constrained ({row[kind]['overhead_pct']:+.1f}%); grammar hooks {grammar_ms[i]:.2f} ms/step "
                f"({row[kind]['grammar_pct_of_unconstrained_step']:.1f}% of the unconstrained step)"
            )
        rows.append(row)
    env = environment(engine.device)
    print(f"measured on {env['device']}; goal: <= 5% at batch 32")
    save_result(
        f"structured_{device_slug(engine.device)}",
        {
            "description": "per decode step: every row under a JSON schema vs none, demo model, 4 adapters",
            "schema": SCHEMA,
            "steps": args.steps,
            "rounds": args.rounds,
            "environment": env,
            "rows": rows,
            "load_average_after": os.getloadavg(),
            "note": "wall: end-to-end step time (noisy on a shared CPU); cpu: this process's CPU time, all threads; "
            "grammar_ms_per_step times the grammar hooks alone",
            "goal": "overhead <= 5% of the step at batch 32",
        },
        args.out_dir,
        args.smoke,
    )


if __name__ == "__main__":
    main()
