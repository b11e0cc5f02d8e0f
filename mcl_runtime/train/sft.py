"""Agent-wise LoRA fine-tuning with TRL's ``SFTTrainer`` and a peft ``LoraConfig``: one adapter per agent
on a Hugging Face base folder, on one device or several (launched with ``accelerate launch``).

- Data: ``data.py``'s JSONL, each example a prompt-completion pair rendered with the base folder's
  chat template and tokenized by ``mcl_runtime.tokenizer.Tokenizer`` (what the server and the
  pipeline send), prompt and completion each on its own as at inference; TRL gets them pre-tokenized
  with their ``labels`` (-100 on the prompt), so the loss is on the last assistant message and its
  end-of-turn token only, and TRL's dataset preparation (labels from a mask, truncation, dropping
  examples without labels: three passes over the data, each written to Arrow) is skipped, having
  nothing to do; with ``packing`` it runs for the packing. Examples longer than ``max_length`` tokens
  are skipped (counted in the log), never truncated. Batches are grouped by length
  (``trainer.LengthBuckets``), or packed padding-free with ``packing``. An eval split is
  ``eval_fraction`` of the data or a file of its own.
- The trainer is ``trainer.SFTTrainer``: TRL's, with its LM head run on the answer tokens only where
  TRL's has no Triton kernel (the CPU), the same loss, gradients and metrics.
- The loss of an optimizer step is the mean over all answer tokens of its ``grad_accum``
  micro-batches on every process (transformers' ``average_tokens_across_devices``), so N processes
  with batch B give the steps of one process with batch N*B.
- LoRA on the projections of ``target_modules`` (default all seven linear ones, the ones the engine
  serves), rank 32, alpha 64; AdamW, cosine schedule with linear warmup, gradient clipping, seeded;
  bf16 autocast over bf16 base weights on CUDA (LoRA weights stay fp32), fp32 on CPU; optional
  gradient checkpointing; checkpoints every ``save_steps`` in ``out/checkpoint-N``, resumable.
- Distribution is accelerate's (DDP, FSDP, DeepSpeed), chosen at launch; this module has no code path
  of its own for it. Only the main process writes the log and the plot.
- Output folder: the PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``), the JSON
  training log ``train_log.json`` (config, data counts, loss per optimizer step, eval loss) and
  ``loss_curve.png``.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mcl_runtime.agents.prompts import AGENTS
from mcl_runtime.agents.records import write_json
from mcl_runtime.errors import ModelLoadError
from mcl_runtime.hub import resolve_path
from mcl_runtime.model.arch import PROJECTION_NAMES
from mcl_runtime.model.config import load_config
from mcl_runtime.model.loader import safetensors_files
from mcl_runtime.tokenizer import Tokenizer
from mcl_runtime.train.data import IGNORE_INDEX, prompt_completion, read_examples

LORA_TARGETS = PROJECTION_NAMES
LOG_NAME, PLOT_NAME = "train_log.json", "loss_curve.png"
REPORT_TO = ("none", "tensorboard")


@dataclass(frozen=True)
class SFTConfig:
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGETS
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs: the data is cycled until reached
    batch_size: int = 4  # per process
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 4096
    seed: int = 0
    gradient_checkpointing: bool = False
    packing: bool = False  # padding-free: the examples of a batch in one row, attention kept within each
    save_steps: int | None = None  # a checkpoint in out/checkpoint-N every N optimizer steps
    eval_fraction: float = 0.0  # held out of the training data for evaluation
    eval_steps: int | None = None  # evaluate every N steps (default: at each checkpoint and at the end)
    report_to: str = "none"
    device: str | None = None  # default: cuda when available, else cpu
    bf16: bool | None = None  # bf16 autocast; default: on with CUDA
    dtype: str | None = None  # base weights; default: bfloat16 with bf16, else float32
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("rank", "epochs", "batch_size", "grad_accum", "max_length")
        optional = ("max_steps", "save_steps", "eval_steps")
        bad = [k for k in positive + optional if getattr(self, k) is not None and getattr(self, k) < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be at least 1")
        if self.lr <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("need lr > 0, alpha > 0, 0 <= dropout < 1 and 0 <= warmup_ratio < 1")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        unknown = set(self.target_modules) - set(LORA_TARGETS)
        if not self.target_modules or unknown:
            raise ValueError(
                f"target_modules must be a non-empty subset of {LORA_TARGETS} (the projections "
                f"the engine serves); got unknown {sorted(unknown)}"
            )
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.bf16 and self.dtype == "float16":
            raise ValueError("bf16 autocast over float16 weights: pick one of bf16 and dtype=float16")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {REPORT_TO}, got {self.report_to!r}")


# ---------------------------------------------------------------- data


@dataclass
class Split:
    """TRL's pre-tokenized rows (``input_ids``, ``labels``: -100 on the prompt) and how many examples were
    left out for being longer than ``max_length``."""

    rows: list[dict[str, list[int]]]
    skipped_too_long: int


def prompt_completion_rows(tokenizer: Tokenizer, examples: list[dict], max_length: int) -> Split:
    """The examples that fit in ``max_length`` tokens as rows TRL trains on: the prompt and the
    completion tokenized on their own by the engine's tokenizer, exactly the tokens of inference (a
    joint tokenization can merge tokens across the boundary). The labels are those TRL builds from a
    completion mask: the completion's tokens, -100 on the prompt; every row has some (an answer
    renders to at least its end-of-turn token)."""
    rows = []
    for example in examples:
        prompt, completion = prompt_completion(tokenizer, example["messages"])
        if len(prompt) + len(completion) <= max_length:
            rows.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion})
    return Split(rows, len(examples) - len(rows))


def load_hf_tokenizer(base: Path) -> Any:
    """The base folder's transformers tokenizer (TRL pads with it and saves it with each checkpoint)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{base}: transformers cannot load its tokenizer: {exc}") from exc


def check_base(base: Path) -> None:
    """A ``ModelLoadError`` naming the file unless ``base`` is a model folder the engine can serve."""
    load_config(base)
    safetensors_files(base)


# ---------------------------------------------------------------- training


def trl_arguments(config: SFTConfig, out: Path, has_eval: bool) -> Any:
    """TRL's ``SFTConfig`` for ours: every setting whose default differs from ours is given."""
    import torch
    import trl

    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    cuda = config.device == "cuda" or (config.device is None and torch.cuda.is_available())
    bf16 = cuda if config.bf16 is None else config.bf16
    dtype = config.dtype or ("bfloat16" if bf16 else "float32")
    eval_steps = config.eval_steps or config.save_steps
    # transformers renamed gradient checkpointing to activation checkpointing (the old name warns)
    fields = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return trl.SFTConfig(
        output_dir=str(out),
        model_init_kwargs={"dtype": dtype},
        use_cpu=not cuda,
        bf16=bf16,
        fp16=dtype == "float16",
        seed=config.seed,
        data_seed=config.seed,
        learning_rate=config.lr,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,  # below 1: a fraction of the steps, rounded up
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        **{checkpointing: config.gradient_checkpointing},
        train_sampling_strategy="random" if config.packing else "group_by_length",
        completion_only_loss=True,
        max_length=config.max_length,
        # the rows come with their labels and within max_length: only packing leaves TRL work to do
        dataset_kwargs={"skip_prepare_dataset": not config.packing},
        packing=config.packing,
        packing_strategy="bfd",
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=cuda,
        logging_steps=1,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        eval_strategy="steps" if has_eval and eval_steps else "no",
        eval_steps=eval_steps,
        report_to=[] if config.report_to == "none" else [config.report_to],
        disable_tqdm=not config.progress,
    )


def last_checkpoint(out: Path) -> Path:
    """The newest ``checkpoint-N`` folder of ``out``; ``FileNotFoundError`` when there is none."""
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(out) if out.is_dir() else None
    if found is None:
        raise FileNotFoundError(
            f"nothing to resume in {out}: it has no checkpoint-N folder (write them with --save-steps N)"
        )
    return Path(found)


@dataclass
class Prepared:
    """A TRL trainer ready to train, and the data it was given."""

    trainer: Any  # trainer.SFTTrainer
    train: Split
    evaluation: Split | None


def sft_trainer(
    base: str | Path,
    data: Sequence[str | Path],
    out: str | Path,
    config: SFTConfig | None = None,
    eval_data: Sequence[str | Path] = (),
) -> Prepared:
    """TRL's ``SFTTrainer`` with a fresh LoRA on ``base`` over the JSONL files ``data``, checkpointing
    into ``out``; evaluated on the JSONL files ``eval_data``, else on ``config.eval_fraction`` of ``data``."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback

    from mcl_runtime.train.trainer import SFTTrainer

    config = config or SFTConfig()
    base = resolve_path(base)
    if isinstance(data, (str, Path)):
        raise TypeError("data must be a list of JSONL paths, not one path")
    if eval_data and config.eval_fraction:
        raise ValueError("give either eval_data or eval_fraction, not both")
    if config.eval_steps and not (eval_data or config.eval_fraction):
        raise ValueError("eval_steps needs an eval split (eval_fraction or eval_data)")
    check_base(base)
    if config.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("report_to=tensorboard needs the tensorboard package (pip install tensorboard)")
    tokenizer, hf_tokenizer = Tokenizer.from_pretrained(base), load_hf_tokenizer(base)
    examples = [e for path in data for e in read_examples(path)]
    held_out = [e for path in eval_data for e in read_examples(path)]
    names = ", ".join(str(p) for p in data)
    if not examples:
        raise ValueError(f"no training examples in {names}: the files are empty")
    if config.eval_fraction:
        random.Random(config.seed).shuffle(examples)
        cut = max(1, round(config.eval_fraction * len(examples)))
        if cut >= len(examples):
            raise ValueError(f"eval_fraction={config.eval_fraction} leaves none of the {len(examples)} examples")
        held_out, examples = examples[:cut], examples[cut:]
    train = prompt_completion_rows(tokenizer, examples, config.max_length)
    if not train.rows:
        raise ValueError(
            f"no training example in {names} fits in max_length={config.max_length} tokens "
            f"({train.skipped_too_long} are longer)"
        )
    evaluation = prompt_completion_rows(tokenizer, held_out, config.max_length) if held_out else None
    if evaluation is not None and not evaluation.rows:
        raise ValueError(f"no eval example fits in max_length={config.max_length} tokens")

    args = trl_arguments(config, Path(out), evaluation is not None)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=str(base),
        args=args,
        train_dataset=Dataset.from_list(train.rows),
        eval_dataset=Dataset.from_list(evaluation.rows) if evaluation else None,
        processing_class=hf_tokenizer,
        peft_config=lora,
    )
    if not config.progress:
        trainer.remove_callback(PrinterCallback)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if trainer.accelerator.num_processes != launched:
        raise ValueError(
            f"launched as {launched} processes, but each trains alone (accelerate sees "
            f"{trainer.accelerator.num_processes}): the launcher and the device disagree"
        )
    return Prepared(trainer, train, evaluation)


def train_adapter(
    base: str | Path,
    data: Sequence[str | Path],
    out: str | Path,
    config: SFTConfig | None = None,
    eval_data: Sequence[str | Path] = (),
    resume: bool | str | Path = False,
) -> dict:
    """Train one LoRA adapter (``sft_trainer``'s) and write it, its log and loss curve to ``out``;
    ``resume`` is True (the last checkpoint in ``out``) or a checkpoint folder."""
    config, out = config or SFTConfig(), Path(out)
    checkpoint = last_checkpoint(out) if resume is True else Path(resume) if resume else None
    if checkpoint is not None and not (checkpoint / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint (no trainer_state.json)")
    start = time.monotonic()
    prepared = sft_trainer(base, data, out, config, eval_data)
    trainer, train, evaluation = prepared.trainer, prepared.train, prepared.evaluation
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if evaluation is not None and trainer.args.eval_strategy == "no":
        trainer.evaluate()
    trainer.save_model(str(out))
    log = {
        "base": str(base),
        "data": [str(p) for p in data],
        "eval_data": [str(p) for p in eval_data],
        "config": asdict(config),
        "processes": trainer.accelerator.num_processes,
        "device": str(trainer.args.device),
        "dtype": str(trainer.model.get_base_model().dtype).removeprefix("torch."),
        "bf16": trainer.args.bf16,
        "examples": len(train.rows),
        "eval_examples": len(evaluation.rows) if evaluation else 0,
        "skipped_too_long": train.skipped_too_long + (evaluation.skipped_too_long if evaluation else 0),
        "answer_tokens": sum(sum(label != IGNORE_INDEX for label in row["labels"]) for row in train.rows),
        "total_steps": trainer.state.max_steps,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "seconds": time.monotonic() - start,
        **_history(trainer.state.log_history),
    }
    if trainer.is_world_process_zero():
        write_json(out / LOG_NAME, log)
        plot_losses(log["steps"], out / PLOT_NAME, f"LoRA r={config.rank} on {Path(base).name}: {out.name}")
    trainer.accelerator.wait_for_everyone()
    return log


def _history(log_history: list[dict]) -> dict:
    """The trainer's log as ours: one entry per optimizer step, the eval losses, first and final loss."""
    names = {"learning_rate": "lr", "mean_token_accuracy": "token_accuracy"}
    keep = ("epoch", "loss", "learning_rate", "grad_norm", "mean_token_accuracy", "num_tokens")
    steps = [
        {"step": h["step"], **{names.get(k, k): h[k] for k in keep if k in h}}
        for h in log_history
        if "loss" in h and "step" in h
    ]
    evals = [{"step": h["step"], "loss": h["eval_loss"]} for h in log_history if "eval_loss" in h]
    history = {"steps": steps, "first_loss": steps[0]["loss"], "final_loss": steps[-1]["loss"], "eval": evals}
    if evals:
        history["final_eval_loss"] = evals[-1]["loss"]
    return history


def plot_losses(steps: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], marker="." if len(steps) < 100 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def train_agents(
    base: str | Path,
    data_dirs: Sequence[str | Path],
    out_root: str | Path,
    config: SFTConfig | None = None,
    resume: bool = False,
) -> dict[str, dict]:
    """One adapter per agent that has examples in ``<data_dir>/<agent>.jsonl`` (files of several
    folders, e.g. collected and corrected, are concatenated), into ``<out_root>/<agent>/``;
    ``resume`` continues each from its last checkpoint."""
    logs = {}
    for agent in AGENTS:
        files = [Path(d) / f"{agent}.jsonl" for d in data_dirs]
        files = [f for f in files if f.is_file() and f.stat().st_size > 0]
        if files:
            if logs:  # the previous adapter's trainer and model, held in reference cycles, before the next loads
                gc.collect()
            logs[agent] = train_adapter(base, files, Path(out_root) / agent, config, resume=resume)
    if not logs:
        raise ValueError(f"no agent data (<agent>.jsonl for {', '.join(AGENTS)}) in {[str(d) for d in data_dirs]}")
    return logs
