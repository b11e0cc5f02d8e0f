"""Agent-wise LoRA fine-tuning: one PEFT LoRA adapter per agent on a Hugging Face base folder.

- Data: ``data.py``'s JSONL; prompts rendered with the base folder's chat template through
  ``mcl_runtime.tokenizer.Tokenizer`` (what the server and the pipeline send), loss on the answer
  tokens only. Examples longer than ``max_length`` tokens are skipped (counted in the log).
- Batches: length-bucketed (shuffled, then sorted by length within groups of 64 batches, then the
  batches shuffled; reshuffled each epoch), right-padded. The loss of an optimizer step is the mean
  over all answer tokens of its ``grad_accum`` micro-batches.
- LoRA on the projections of ``target_modules`` the model has (default all seven linear ones, the
  ones the engine serves), rank 32, alpha 64; AdamW, cosine schedule with linear warmup, gradient
  clipping; bf16 weights on CUDA (LoRA weights stay fp32), fp32 on CPU; optional gradient
  checkpointing; seeded.
- Output folder: the PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``), the
  JSON training log ``train_log.json`` (config, data counts, loss per step) and ``loss_curve.png``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mcl_runtime.agents.prompts import AGENTS
from mcl_runtime.agents.records import write_json
from mcl_runtime.hub import resolve_path
from mcl_runtime.model.arch import PROJECTION_NAMES
from mcl_runtime.tokenizer import Tokenizer
from mcl_runtime.train.data import IGNORE_INDEX, EncodedExample, encode_example, read_examples

LORA_TARGETS = PROJECTION_NAMES
BUCKET_BATCHES = 64
LOG_NAME, PLOT_NAME = "train_log.json", "loss_curve.png"


@dataclass(frozen=True)
class SFTConfig:
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGETS
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs: the data is cycled until reached
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 4096
    seed: int = 0
    gradient_checkpointing: bool = False
    device: str | None = None  # default: cuda when available, else cpu
    dtype: str | None = None  # default: bfloat16 on cuda, float32 on cpu
    progress: bool = True

    def __post_init__(self) -> None:
        positive = ("rank", "epochs", "batch_size", "grad_accum", "max_length")
        bad = [k for k in positive if getattr(self, k) < 1]
        if self.max_steps is not None and self.max_steps < 1:
            bad.append("max_steps")
        if bad:
            raise ValueError(f"{', '.join(bad)} must be at least 1")
        if self.lr <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("need lr > 0, alpha > 0, 0 <= dropout < 1 and 0 <= warmup_ratio < 1")
        unknown = set(self.target_modules) - set(LORA_TARGETS)
        if not self.target_modules or unknown:
            raise ValueError(
                f"target_modules must be a non-empty subset of {LORA_TARGETS} (the projections "
                f"the engine serves); got unknown {sorted(unknown)}"
            )
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


# ---------------------------------------------------------------- data


def encode_all(tokenizer: Tokenizer, examples: list[dict], max_length: int) -> tuple[list[EncodedExample], int]:
    """The examples that fit in ``max_length`` tokens, and how many did not."""
    encoded = [encode_example(tokenizer, e["messages"]) for e in examples]
    fitting = [e for e in encoded if len(e.input_ids) <= max_length]
    return fitting, len(encoded) - len(fitting)


def bucketed_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches (example indices) of similar lengths, in random order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), group):
        by_length = sorted(order[start : start + group], key=lambda i: lengths[i])
        batches += [by_length[j : j + batch_size] for j in range(0, len(by_length), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_stream(lengths: Sequence[int], batch_size: int, seed: int) -> Iterator[tuple[int, list[int]]]:
    """(epoch, batch) forever, reshuffled each epoch."""
    rng = random.Random(seed)
    for epoch in itertools.count():
        for batch in bucketed_batches(lengths, batch_size, rng):
            yield epoch, batch


def collate(examples: list[EncodedExample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# ---------------------------------------------------------------- model


def resolve_device(config: SFTConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.dtype is not None:
        return device, getattr(torch, config.dtype)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def lora_model(base: Path, config: SFTConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The base model with fresh LoRA layers (seeded by the caller) on the targets it has."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    targets = sorted(set(config.target_modules) & present)
    if not targets:
        raise ValueError(f"{base} has none of the projections {list(config.target_modules)}")
    model.config.use_cache = False
    if config.gradient_checkpointing:
        _enable_checkpointing(model)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora).to(device)


def _enable_checkpointing(model: torch.nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def answer_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the answer tokens; the LM head runs on those positions only."""
    inner = model.get_base_model()
    hidden = inner.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = inner.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum")


# ---------------------------------------------------------------- training


def train_adapter(
    base: str | Path, data: Sequence[str | Path], out: str | Path, config: SFTConfig | None = None
) -> dict:
    """Train one LoRA adapter on the JSONL files ``data``; write it, its log and loss curve to ``out``."""
    config = config or SFTConfig()
    base, out = resolve_path(base), Path(out)
    if isinstance(data, (str, Path)):
        raise TypeError("data must be a list of JSONL paths, not one path")
    tokenizer = Tokenizer.from_pretrained(base)
    examples = [e for path in data for e in read_examples(path)]
    encoded, skipped = encode_all(tokenizer, examples, config.max_length)
    if not encoded:
        raise ValueError(
            f"no training examples in {[str(p) for p in data]} ({skipped} longer than max_length={config.max_length})"
        )
    device, dtype = resolve_device(config)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = lora_model(base, config, device, dtype)
    steps_per_epoch = math.ceil(math.ceil(len(encoded) / config.batch_size) / config.grad_accum)
    total = config.max_steps or steps_per_epoch * config.epochs
    start = time.monotonic()
    steps = _optimize(model, encoded, config, total, device, _pad_id(tokenizer))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_embedding_layers=False)
    log = {
        "base": str(base),
        "data": [str(p) for p in data],
        "config": asdict(config),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "examples": len(encoded),
        "skipped_too_long": skipped,
        "answer_tokens": sum(e.num_target_tokens for e in encoded),
        "total_steps": total,
        "seconds": time.monotonic() - start,
        "steps": steps,
        "first_loss": steps[0]["loss"],
        "final_loss": steps[-1]["loss"],
    }
    write_json(out / LOG_NAME, log)
    plot_losses(steps, out / PLOT_NAME, f"LoRA r={config.rank} on {base.name}: {out.name}")
    return log


def _pad_id(tokenizer: Tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def _optimize(
    model: torch.nn.Module,
    encoded: list[EncodedExample],
    config: SFTConfig,
    total: int,
    device: torch.device,
    pad_id: int,
) -> list[dict]:
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total), total)
    stream = batch_stream([len(e.input_ids) for e in encoded], config.batch_size, config.seed)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16
        else contextlib.nullcontext()
    )
    model.train()
    steps = []
    with tqdm(total=total, disable=not config.progress, desc="sft") as bar:
        for step in range(1, total + 1):
            micro = [next(stream) for _ in range(config.grad_accum)]
            batches = [collate([encoded[i] for i in batch], pad_id, device) for _, batch in micro]
            loss, tokens = _accumulate(model, batches, autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps.append(
                {"step": step, "epoch": micro[-1][0], "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
    model.eval()
    return steps


def _accumulate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], autocast) -> tuple[float, int]:
    """Backward over the micro-batches of one step; the mean loss per answer token and their count."""
    tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    total = 0.0
    for batch in batches:
        with autocast:
            loss_sum = answer_loss_sum(model, batch)
        (loss_sum / tokens).backward()
        total += loss_sum.item()
    return total / tokens, tokens


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
    base: str | Path, data_dirs: Sequence[str | Path], out_root: str | Path, config: SFTConfig | None = None
) -> dict[str, dict]:
    """One adapter per agent that has examples in ``<data_dir>/<agent>.jsonl`` (files of several
    folders, e.g. collected and corrected, are concatenated), into ``<out_root>/<agent>/``."""
    logs = {}
    for agent in AGENTS:
        files = [Path(d) / f"{agent}.jsonl" for d in data_dirs]
        files = [f for f in files if f.is_file() and f.stat().st_size > 0]
        if files:
            logs[agent] = train_adapter(base, files, Path(out_root) / agent, config)
    if not logs:
        raise ValueError(f"no agent data (<agent>.jsonl for {', '.join(AGENTS)}) in {[str(d) for d in data_dirs]}")
    return logs
