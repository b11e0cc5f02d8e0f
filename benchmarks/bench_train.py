"""Training throughput: ``train sft`` on TRL's SFTTrainer (this checkout) against the hand-written loop
it replaced (``mcl_runtime`` of git ``--ref``, default 11676f1), on the demo model, side by side.

    python benchmarks/bench_train.py [--smoke] [--ref 11676f1] [--examples 256] [--batch-size 8]
        [--rounds 3] [--threads N] [--out-dir DIR]

Both sides train the same LoRA (rank 32, alpha 64, the seven projections, dropout 0.05) on the same
generated examples (a system prompt, a user prompt of ``--prompt-chars`` characters, an answer of
``--answer-chars``), one epoch, in their own interpreter with their own copy of ``mcl_runtime`` on
``sys.path`` (the ``--ref`` copy is ``git archive REF mcl_runtime``), alternated ``--rounds`` times.
Both train on the same tokens (``tests/test_train_sft.py`` checks that the masks are equal).

Figures per side (medians over the rounds): the training loop's seconds (the old ``_optimize``; the
TRL trainer's ``train()``, both with optimizer set-up) and the whole ``train_adapter`` call's (model
load, data preparation, training, saving the adapter, log and plot; the libraries are imported
before the clock starts), as tokens per second
(prompt + answer tokens of every example, once per epoch). The ratio is TRL / old (above 1: TRL is
faster).

Writes ``benchmarks/results/train_cpu.json`` (``--smoke``: 8 examples, one round, only with ``--out-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_judge import export_ref, machine
from common import RESULTS_DIR, save_result

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REF = "11676f1"  # the last commit with the hand-written loop
LORA = {"rank": 32, "alpha": 64.0, "dropout": 0.05, "lr": 2e-4, "epochs": 1, "seed": 0, "progress": False}
WORDS = "def return for while list dict sorted range len print if else input split int str max min sum".split()


def make_data(path: Path, examples: int, prompt_chars: int, answer_chars: int, seed: int = 0) -> Path:
    """Chat examples of random code-like words, the prompt and answer lengths varying by +-50%."""
    rng = random.Random(seed)

    def text(chars: int) -> str:
        words: list[str] = []
        target = rng.randint(chars // 2, chars * 3 // 2)
        while sum(len(w) + 1 for w in words) < target:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    with open(path, "w") as f:
        for _ in range(examples):
            messages = [
                {"role": "system", "content": "You are a programmer."},
                {"role": "user", "content": text(prompt_chars)},
                {"role": "assistant", "content": text(answer_chars)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def train_side(base: str, data: str, out: str, batch_size: int, threads: int | None) -> dict:
    """Worker side: train with the importable ``mcl_runtime`` and time it."""
    import torch

    import mcl_runtime.train.sft as sft

    if threads:
        torch.set_num_threads(threads)

    loop: list[float] = []

    def timed(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                loop.append(time.perf_counter() - start)

        return run

    import matplotlib.figure  # noqa: F401  (both sides import these lazily: not timed)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    if hasattr(sft, "sft_trainer"):
        import trl

        side, trl.SFTTrainer.train = "trl", timed(trl.SFTTrainer.train)
    else:
        side, sft._optimize = "loop", timed(sft._optimize)
    start = time.perf_counter()
    log = sft.train_adapter(base, [data], out, sft.SFTConfig(batch_size=batch_size, device="cpu", **LORA))
    return {
        "side": side,
        "total_seconds": time.perf_counter() - start,
        "loop_seconds": loop[0],
        "steps": log["total_steps"],
        "first_loss": log["first_loss"],
        "final_loss": log["final_loss"],
        "torch_threads": torch.get_num_threads(),
    }


def run_side(pythonpath: Path, base: Path, data: Path, out: Path, batch_size: int, threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "MPLBACKEND": "Agg"}
    if pythonpath != ROOT:
        env["MCL_NO_EXT"] = "1"  # the old copy has no compiled extension (training needs none)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(base), str(data), str(out)]
    cmd += ["--batch-size", str(batch_size)] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(cmd, cwd=pythonpath, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{pythonpath} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def count_tokens(base: Path, data: Path) -> int:
    """Prompt + answer tokens of every example (both sides train on exactly these)."""
    from mcl_runtime.tokenizer import Tokenizer
    from mcl_runtime.train.data import prompt_completion, read_examples

    tok = Tokenizer.from_pretrained(base)
    return sum(len(p) + len(c) for p, c in (prompt_completion(tok, e["messages"]) for e in read_examples(data)))


def summarize(runs: list[dict], tokens: int) -> dict:
    loop = statistics.median(r["loop_seconds"] for r in runs)
    total = statistics.median(r["total_seconds"] for r in runs)
    return {
        "loop_seconds_median": loop,
        "total_seconds_median": total,
        "loop_tokens_per_s": tokens / loop,
        "total_tokens_per_s": tokens / total,
        "loop_seconds_all": [r["loop_seconds"] for r in runs],
        "total_seconds_all": [r["total_seconds"] for r in runs],
        **{k: runs[-1][k] for k in ("steps", "first_loss", "final_loss", "torch_threads")},
    }


def compare(args: argparse.Namespace) -> dict:
    from mcl_runtime.demo import demo_model_dir

    base = demo_model_dir() / "base"
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        data = make_data(tmp / "data.jsonl", args.examples, args.prompt_chars, args.answer_chars)
        tokens = count_tokens(base, data)
        (tmp / "ref").mkdir()
        sides = {"trl": ROOT, "loop": export_ref(args.ref, tmp / "ref")}
        runs: dict[str, list[dict]] = {"trl": [], "loop": []}
        for r in range(args.rounds):
            for side, root in sides.items():
                if root is None:
                    continue
                runs[side].append(run_side(root, base, data, tmp / f"{side}{r}", args.batch_size, args.threads))
                print(f"round {r} {side}: {runs[side][-1]}", file=sys.stderr)
    result = {"tokens_per_epoch": tokens, **{side: summarize(rs, tokens) for side, rs in runs.items() if rs}}
    if runs["loop"]:
        result["trl_over_loop_loop_tokens_per_s"] = (
            result["trl"]["loop_tokens_per_s"] / result["loop"]["loop_tokens_per_s"]
        )
        result["trl_over_loop_total_tokens_per_s"] = (
            result["trl"]["total_tokens_per_s"] / result["loop"]["total_tokens_per_s"]
        )
    else:
        result["loop"] = {"skipped": f"no git ref {args.ref!r} in this checkout"}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="8 examples, one round; numbers are not results")
    p.add_argument("--ref", default=DEFAULT_REF, help="git ref of the hand-written loop")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--prompt-chars", type=int, default=600)
    p.add_argument("--answer-chars", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads of each side (default: torch's)")
    p.add_argument("--note", help="the run's conditions, recorded in the JSON (e.g. a shared, busy machine)")
    p.add_argument("--out-dir", type=Path, default=None, help=f"where the JSON goes (default {RESULTS_DIR})")
    p.add_argument("--worker", nargs=3, metavar=("BASE", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(train_side(*args.worker, args.batch_size, args.threads)))
        return
    if args.smoke:
        args.examples, args.rounds, args.batch_size = 8, 1, 4
    keys = ("examples", "prompt_chars", "answer_chars", "batch_size", "rounds", "threads")
    settings = {k: getattr(args, k) for k in keys}
    host = machine()
    payload = {
        "benchmark": "train",
        "device": f"cpu ({host['cpu']}, {host['cpu_count']} cores)",
        "machine": host,
        "note": args.note,
        "ref_loop": args.ref,
        "config": {**LORA, **settings},
        "results": compare(args),
    }
    res = payload["results"]
    for side in ("loop", "trl"):
        if "loop_tokens_per_s" in res[side]:
            s = res[side]
            print(
                f"{side:>4}: {s['loop_tokens_per_s']:9.0f} tokens/s training, {s['total_tokens_per_s']:9.0f} tokens/s "
                f"end to end ({s['steps']} steps, loss {s['first_loss']:.3f} -> {s['final_loss']:.3f})"
            )
    if "trl_over_loop_loop_tokens_per_s" in res:
        print(
            f"TRL / old loop: {res['trl_over_loop_loop_tokens_per_s']:.2f}x training, "
            f"{res['trl_over_loop_total_tokens_per_s']:.2f}x end to end"
        )
    save_result("train_cpu", payload, args.out_dir, args.smoke)


if __name__ == "__main__":
    main()
