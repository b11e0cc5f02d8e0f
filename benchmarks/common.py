"""Shared pieces of the engine benchmarks: real model configs, random-weight model and PEFT folders,
workloads, a step-by-step request runner, the machine's description and result files.

Imported as a sibling module (``python benchmarks/x.py`` puts ``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from mcl_runtime.engine.llm_engine import Engine
    from mcl_runtime.engine.scheduler import ScheduledBatch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
GIB = 1 << 30
AGENTS = ("retrieval", "planning", "coding", "debugging")

# config.json of Qwen/Qwen2.5-7B-Instruct and Qwen/Qwen2.5-32B-Instruct, as published.
QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}
QWEN25_32B_INSTRUCT = {
    **QWEN25_7B_INSTRUCT,
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "max_window_layers": 70,
    "num_attention_heads": 40,
    "num_hidden_layers": 64,
    "num_key_value_heads": 8,
}
# Qwen/Qwen2.5-Coder-7B-Instruct publishes the same shapes as Qwen2.5-7B-Instruct.
QWEN25_CODER_7B_INSTRUCT = dict(QWEN25_7B_INSTRUCT)
# config.json of Qwen/Qwen3-8B, as published: q/k norms, head_dim 128 (not hidden / heads), no qkv bias.
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# config.json of Qwen/Qwen2.5-0.5B-Instruct and Qwen/Qwen2.5-1.5B-Instruct, as published (tied embeddings).
QWEN25_05B_INSTRUCT = {
    **QWEN25_7B_INSTRUCT,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_window_layers": 21,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
}
QWEN25_15B_INSTRUCT = {
    **QWEN25_05B_INSTRUCT,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
}
# Shapes the load_format="dummy" benchmarks take (``--shape``).
MODEL_SHAPES = {
    "qwen2.5-0.5b-instruct": QWEN25_05B_INSTRUCT,
    "qwen2.5-1.5b-instruct": QWEN25_15B_INSTRUCT,
    "qwen2.5-7b-instruct": QWEN25_7B_INSTRUCT,
    "qwen2.5-coder-7b-instruct": QWEN25_CODER_7B_INSTRUCT,
    "qwen3-8b": QWEN3_8B,
    "qwen2.5-32b-instruct": QWEN25_32B_INSTRUCT,
}
SMOKE_VOCAB = 1024  # above the demo tokenizer's 512 ids


def shrink_config(cfg: dict, width_div: float = 56.0, depth_div: float = 7.0, vocab: int = SMOKE_VOCAB) -> dict:
    """The same architecture scaled down (width, depth and vocab) for ``--smoke`` runs on a CPU."""
    hidden = max(32, round(cfg["hidden_size"] / width_div / 16) * 16)
    heads = hidden // 16
    kv = max(1, round(heads * cfg["num_key_value_heads"] / cfg["num_attention_heads"]))
    while heads % kv:
        kv -= 1
    layers = max(1, round(cfg["num_hidden_layers"] / depth_div))
    head_dim = {"head_dim": 16} if cfg.get("head_dim") else {}
    return {
        **cfg,
        **head_dim,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": max(32, round(cfg["intermediate_size"] / width_div / 16) * 16),
        "num_hidden_layers": layers,
        "max_window_layers": layers,
        "vocab_size": vocab,
        "bos_token_id": 509,
        "eos_token_id": 511,
    }  # the demo tokenizer's ids


# ---- model and adapter folders ---------------------------------------------------------------
def write_model_folder(folder: Path, cfg: dict) -> Path:
    """config.json plus the demo model's tokenizer files: all ``Engine(load_format="dummy")`` needs."""
    from mcl_runtime.demo import demo_model_dir

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    demo = demo_model_dir() / "base"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / name, folder / name)
    return folder


def write_full_vocab_tokenizer(folder: Path, vocab_size: int, endoftext_id: int) -> None:
    """The demo model's byte-level BPE tokenizer stretched over ``vocab_size`` ids, laid out as Qwen2.5's:
    BPE tokens below ``endoftext_id``, then the special tokens (``<|endoftext|>``, ``<|im_start|>``,
    ``<|im_end|>``) as added tokens, and every other id a filler token (``<f123>``) that encoding of
    ordinary text never produces. So any id a random-weight model samples decodes, in our tokenizer
    and in transformers' alike (``tokenizers`` numbers added tokens from the end of the BPE vocabulary,
    so the fillers above the specials are added tokens too)."""
    from mcl_runtime.demo import SPECIAL_TOKENS, demo_model_dir

    demo = demo_model_dir() / "base"
    tok = json.loads((demo / "tokenizer.json").read_text())
    tok_config = json.loads((demo / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    if len(vocab) > endoftext_id or endoftext_id + len(SPECIAL_TOKENS) > vocab_size:
        raise ValueError(f"specials at {endoftext_id} do not fit between {len(vocab)} BPE tokens and {vocab_size}")
    fillers = {f"<f{i}>": i for i in [*range(len(vocab), endoftext_id), *range(endoftext_id + 3, vocab_size)]}
    if fillers.keys() & vocab.keys():
        raise ValueError("a filler token is a BPE token of the demo tokenizer")
    vocab.update({name: i for name, i in fillers.items() if i < endoftext_id})
    added = [(endoftext_id + i, content, True) for i, content in enumerate(SPECIAL_TOKENS)]
    added += [(i, name, False) for name, i in fillers.items() if i > endoftext_id]
    tok["added_tokens"] = [
        {**_ADDED_TOKEN, "id": i, "content": content, "special": special} for i, content, special in added
    ]
    tok_config["added_tokens_decoder"] = {
        str(i): {**_ADDED_TOKEN, "content": content, "special": special} for i, content, special in added
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


_ADDED_TOKEN = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_random_weights(folder: Path, cfg: dict, seed: int = 0, std: float = 0.02) -> None:
    """``model.safetensors`` of a Qwen2 config: every matrix and bias drawn N(0, std) (as
    ``initializer_range`` says), norms one, in the config's ``torch_dtype``."""
    from safetensors.torch import save_file

    from mcl_runtime.model.arch import BY_NAME

    if cfg["model_type"] != "qwen2":
        raise ValueError(f"random weights are written for qwen2 configs, not {cfg['model_type']!r}")
    dtype = getattr(torch, cfg.get("torch_dtype", "float32"))
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).mul_(std).to(dtype)

    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    tensors = {"model.embed_tokens.weight": draw(vocab, h), "model.norm.weight": torch.ones(h, dtype=dtype)}
    if not cfg.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = draw(vocab, h)
    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}.{norm}.weight"] = torch.ones(h, dtype=dtype)
        for proj, (fan_in, fan_out) in lora_shapes(cfg).items():
            key = f"{prefix}.{BY_NAME[proj].parent}.{proj}"
            tensors[f"{key}.weight"] = draw(fan_out, fan_in)
            if proj in ("q_proj", "k_proj", "v_proj"):
                tensors[f"{key}.bias"] = draw(fan_out)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_hf_model(folder: Path, cfg: dict, seed: int = 0) -> Path:
    """A real Hugging Face folder in ``cfg``'s shapes that any engine loads as it is: config.json,
    generation_config.json, random weights (``write_random_weights``) and a tokenizer covering the
    whole vocabulary (``write_full_vocab_tokenizer``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    eos = [cfg["eos_token_id"], cfg["bos_token_id"]]
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos, "do_sample": False}, indent=2)
    )
    write_full_vocab_tokenizer(folder, cfg["vocab_size"], cfg["bos_token_id"])
    write_random_weights(folder, cfg, seed)
    return folder


def lora_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each LoRA-targetable projection of a config.json's contents."""
    # Imported late: bench_host_overhead --compare imports this module over an older package.
    from mcl_runtime.model.config import parse_config

    return parse_config(cfg).projection_shapes()


def write_peft_adapter(
    folder: Path,
    cfg: dict,
    rank: int = 32,
    alpha: int = 64,
    seed: int = 0,
    targets: tuple[str, ...] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> Path:
    """A PEFT LoRA folder with random A and B (small values) on ``targets`` of every layer, drawn on
    ``device`` (a GPU draws a 7B adapter's 80 M values at once; the host would take seconds)."""
    from safetensors.torch import save_file

    from mcl_runtime.model.arch import BY_NAME

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = lora_shapes(cfg)
    targets = tuple(targets or shapes)

    def draw(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen, device=device) - 0.5).mul_(0.02).to(dtype).cpu()

    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for proj in targets:
            fan_in, fan_out = shapes[proj]
            key = f"base_model.model.model.layers.{layer}.{BY_NAME[proj].parent}.{proj}"
            tensors[f"{key}.lora_A.weight"] = draw(rank, fan_in)
            tensors[f"{key}.lora_B.weight"] = draw(fan_out, rank)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": alpha,
                "lora_dropout": 0.0,
                "target_modules": list(targets),
                "bias": "none",
                "base_model_name_or_path": None,
            },
            indent=2,
        )
    )
    return folder


def weight_params(cfg: dict) -> int:
    """Parameters of a Qwen2/Llama config (q/k/v biases, as Qwen2 has them): weight bytes / itemsize."""
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    s = lora_shapes(cfg)
    qkv = s["q_proj"][1] + 2 * s["k_proj"][1]
    per_layer = h * qkv + qkv + s["o_proj"][0] * h + 3 * h * i + 2 * h
    return vocab * h * (1 if cfg.get("tie_word_embeddings") else 2) + layers * per_layer + h


def lora_bytes(cfg: dict, rank: int, itemsize: int = 2, targets: tuple[str, ...] | None = None) -> int:
    """Bytes of one adapter's A and B matrices (what a decode step reads for it); all projections
    when ``targets`` is None."""
    shapes = lora_shapes(cfg)
    return cfg["num_hidden_layers"] * sum(rank * (shapes[p][0] + shapes[p][1]) for p in targets or shapes) * itemsize


# ---- workloads --------------------------------------------------------------------------------
@dataclass
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]
    adapters: list[str | None]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    def kv_blocks(self, block_size: int) -> int:
        """KV blocks that hold every request at its full length at once."""
        return sum(math.ceil((len(p) + m) / block_size) for p, m in zip(self.prompts, self.max_tokens))


def make_workload(
    n: int,
    prompt_len: tuple[int, int],
    gen_len: tuple[int, int],
    adapters: list[str | None],
    seed: int,
    id_range: tuple[int, int] = (0, 509),
) -> Workload:
    """``n`` random token-id prompts (lengths uniform in the closed ranges), adapters in the given order."""
    rng = np.random.default_rng(seed)
    prompts = [
        rng.integers(*id_range, size=int(rng.integers(prompt_len[0], prompt_len[1] + 1))).tolist() for _ in range(n)
    ]
    gens = [int(rng.integers(gen_len[0], gen_len[1] + 1)) for _ in range(n)]
    return Workload(prompts, gens, [adapters[i % len(adapters)] for i in range(n)])


# ---- running requests -------------------------------------------------------------------------
@dataclass
class StepRecord:
    seconds: float
    prefill_tokens: int
    decode_tokens: int


@dataclass
class RunResult:
    wall_s: float
    output_tokens: int
    prompt_tokens: int
    ttft_s: list[float]
    tpot_s: list[float]
    steps: list[StepRecord] = field(default_factory=list)
    peak_kv_blocks: int = 0
    slot_loads: int = 0
    jit_compiles: int | None = None

    def summary(self) -> dict:
        decode = [s for s in self.steps if s.prefill_tokens == 0]
        prefill = [s for s in self.steps if s.prefill_tokens > 0]
        dec_time = sum(s.seconds for s in decode)
        pre_time = sum(s.seconds for s in prefill)
        return {
            "wall_s": self.wall_s,
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "output_tok_s": self.output_tokens / self.wall_s,
            "ttft_mean_s": statistics.fmean(self.ttft_s),
            "ttft_p50_s": statistics.median(self.ttft_s),
            "tpot_mean_s": statistics.fmean(self.tpot_s) if self.tpot_s else None,
            "decode_step_median_s": statistics.median(s.seconds for s in decode) if decode else None,
            "decode_tok_s": sum(s.decode_tokens for s in decode) / dec_time if dec_time else None,
            "prefill_tok_s": sum(s.prefill_tokens for s in prefill) / pre_time if pre_time else None,
            "num_steps": len(self.steps),
            "num_decode_steps": len(decode),
            "peak_kv_blocks": self.peak_kv_blocks,
            "adapter_slot_loads": self.slot_loads,
            "jit_compiles_in_run": self.jit_compiles,
        }


def patch(obj: object, name: str, value: Any) -> Callable[[], None]:
    """Set an instance attribute (shadowing a method); returns the function that undoes it."""
    had, old = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, value)

    def undo() -> None:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)

    return undo


class StepComposition:
    """Wraps an engine's ``scheduler.schedule`` (until ``close``) to count the prefill and decode
    tokens of each step."""

    def __init__(self, engine: Engine) -> None:
        self._schedule = engine.scheduler.schedule
        self.close = patch(engine.scheduler, "schedule", self._wrapped)
        self.last = (0, 0)

    def _wrapped(self) -> ScheduledBatch:
        batch = self._schedule()
        decode = int(((batch.num_new == 1) & (batch.steps > 0)).sum())  # one token of a sequence with outputs
        self.last = (batch.num_tokens - decode, decode)
        return batch


class TritonCompiles:
    """Counts Triton JIT compilations (compiled, or loaded from the disk cache) while open, so a
    result can show that no compile fell inside its timed region. ``count`` is None where Triton
    has no compile hook (before 3.4, or not installed)."""

    def __init__(self) -> None:
        self.count: int | None = None
        try:
            from triton import knobs
        except ImportError:
            return
        self._runtime, self._prev = knobs.runtime, knobs.runtime.jit_post_compile_hook
        self.count = 0
        self._runtime.jit_post_compile_hook = self._hook

    def _hook(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        return self._prev(*args, **kwargs) if self._prev else None

    def close(self) -> int | None:
        if self.count is not None:
            self._runtime.jit_post_compile_hook = self._prev
        return self.count


def warmup_workload(wl: Workload, max_tokens: int = 20) -> Workload:
    """The same prompts, adapters and batch with fewer generated tokens: every prefill shape of the
    timed run, and its first decode steps, compile before the timing starts."""
    return Workload(wl.prompts, [min(m, max_tokens) for m in wl.max_tokens], wl.adapters)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_workload(engine: Engine, wl: Workload) -> RunResult:
    """Submit every request at once, step until all finish; greedy, ``ignore_eos`` so that each
    request generates exactly its ``max_tokens``."""
    from mcl_runtime import SamplingParams

    comp = StepComposition(engine)
    loads0 = engine.stats()["adapter_slot_loads"]
    synchronize(engine.device)
    compiles = TritonCompiles()
    t0 = time.perf_counter()
    ids = {
        engine.add_request(None, p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True), a): m
        for p, m, a in zip(wl.prompts, wl.max_tokens, wl.adapters)
    }
    first: dict[str, float] = {}
    ttft, tpot, steps, peak = [], [], [], 0
    try:
        while engine.has_unfinished_requests():
            ts = time.perf_counter()
            outs = engine.step()
            te = time.perf_counter()
            steps.append(StepRecord(te - ts, *comp.last))
            peak = max(peak, engine.stats()["kv_blocks_used"])
            for out in outs:
                if out.request_id not in first and out.token_ids:
                    first[out.request_id] = te
                    ttft.append(te - t0)
                if out.finished and len(out.token_ids) > 1:
                    tpot.append((te - first[out.request_id]) / (len(out.token_ids) - 1))
    finally:
        comp.close()
        jit = compiles.close()
    wall = time.perf_counter() - t0
    return RunResult(
        wall,
        sum(ids.values()),
        wl.num_prompt_tokens,
        ttft,
        tpot,
        steps,
        peak,
        engine.stats()["adapter_slot_loads"] - loads0,
        jit,
    )


def kv_block_bytes(engine: Engine) -> int:
    kv = engine.kv_cache
    return kv[:, :, 0].numel() * kv.element_size()


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def engine_memory(engine: Engine, cfg: dict) -> dict:
    """Bytes of the base weights (from the shapes of ``cfg``, the model's config.json: the backend may
    hold them in a layout of its own), the LoRA slot buffers and the allocated KV cache."""
    model = engine.model
    lora = [b for n, b in model.named_buffers() if ".lora_" in n]
    return {
        "weights_bytes": weight_params(cfg) * engine.dtype.itemsize,
        "lora_slots_bytes": tensor_bytes(lora),
        "kv_allocated_bytes": engine.kv_cache.numel() * engine.kv_cache.element_size(),
    }


def release_memory() -> None:
    """Collect garbage and return cached device memory; call after ``del engine`` (or model)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_peak(device: torch.device | str) -> int | None:
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None


def reset_cuda_peak(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---- the machine and result files -------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"{cpu_model()} ({n} torch thread{'s' if n != 1 else ''})"


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str:
    """HEAD (+dirty) of this checkout; where it has no git (the device tool's copy of a working tree),
    ``$MCL_COMMIT`` as the command line passed it, else "unknown"."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        if sha:
            return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("MCL_COMMIT") or "unknown"


def environment(device: torch.device | str) -> dict:
    """What the numbers were measured on: device, versions, commit."""
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": _commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def baseline_availability() -> dict[str, str]:
    """Serving systems a user might pick instead, and whether they can run here."""
    out = {}
    for name in ("vllm", "sglang"):
        if importlib.util.find_spec(name) is None:
            out[name] = "not installed where this benchmark ran: not measured"
        else:
            out[name] = f"installed ({_version(name)}) but not driven by this script: not measured"
    return out


def device_slug(device: torch.device | str) -> str:
    """Short name of the device for result file names: ``cpu`` or the GPU model (``nvidia-h200``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")[:40]


def interleaved(fns: dict[str, Callable[[], object]], reps: int, block: int = 10) -> dict[str, float]:
    """Median per-call microseconds of each function, timed in alternating blocks of ``block`` calls."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, reps // block)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            times[name].append(1e6 * (time.perf_counter() - t0) / block)
    return {name: statistics.median(t) for name, t in times.items()}


def save_result(name: str, payload: dict, out_dir: Path | None, smoke: bool, announce: bool = True) -> Path | None:
    """Write ``<out_dir>/<name>.json``. A smoke run writes only where ``--out-dir`` says, marked smoke."""
    if smoke and out_dir is None:
        return None
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"smoke": smoke, **payload}, indent=2, default=float) + "\n")
    if announce:
        print(f"wrote {path}")
    return path


def base_parser(doc: str) -> argparse.ArgumentParser:
    """Options every engine benchmark takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny configs on the CPU (CI); numbers are not results")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available; --smoke: cpu)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--backend",
        default=None,
        choices=["cpu", "reference", "torch", "triton"],
        help="default: triton on cuda, cpu on cpu",
    )
    p.add_argument("--out-dir", type=Path, default=None, help=f"where the JSON goes (default {RESULTS_DIR})")
    return p


def add_shape_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shape",
        default="qwen2.5-7b-instruct",
        choices=sorted(MODEL_SHAPES),
        help="published model shapes of the random-weight (load_format='dummy') model",
    )


def model_shape(args: argparse.Namespace) -> dict:
    """config.json contents of ``--shape``, shrunk with ``--smoke``."""
    cfg = MODEL_SHAPES[args.shape]
    return shrink_config(cfg) if args.smoke else dict(cfg)


def parse_with_smoke(p: argparse.ArgumentParser, smoke_defaults: dict) -> argparse.Namespace:
    """Parse the command line; with ``--smoke`` the defaults become ``smoke_defaults`` (explicit options win)."""
    known, _ = p.parse_known_args()
    if known.smoke:
        p.set_defaults(**smoke_defaults)
    return p.parse_args()


def resolve_device(args: argparse.Namespace) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")


def copy_bandwidth(device: torch.device | str, nbytes: int, repeats: int = 10) -> float:
    """Bytes moved per second by ``dst.copy_(src)`` (read + write counted: 2 * nbytes per copy), median."""
    src = torch.rand(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


# ---- Triton kernel benchmarks (bench_attention.py, bench_lora_kernels.py) ---------------------
def interpret_triton_for_cpu_smoke() -> None:
    """``--smoke`` without a GPU runs the Triton kernels in its interpreter; call before importing them."""
    if "--smoke" in sys.argv and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def kernel_parser(doc: str) -> argparse.ArgumentParser:
    """Options every kernel benchmark takes; ``doc`` is the script's docstring (its first paragraph is shown)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds; output to a temp dir")
    p.add_argument("--out-dir", type=Path, default=None, help="where to write the JSON and PNG")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="skip the cases that would start after this (they are listed in the JSON)",
    )
    return p


def kernel_setup(smoke: bool, has_triton: bool) -> tuple[torch.device, dict]:
    """The device of a kernel benchmark (CUDA; the CPU only for ``--smoke``) and its environment, printed."""
    if not has_triton:
        raise SystemExit("triton is not installed")
    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        raise SystemExit("this benchmark needs a CUDA device (use --smoke on CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    info = {**environment(device), "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}
    print(
        f"device: {info['device']}, torch {info['torch']}, triton {info['triton']}"
        + (" (interpreter)" if info["interpreter"] else "")
    )
    return device, info


def kernel_ms(fn: Callable[[], object], device: torch.device | str) -> float:
    """Milliseconds per call (CUDA: median of triton's do_bench, L2 flushed, after one untimed call on
    the same inputs so that JIT compiles stay out of the timing; CPU: one wall-clock call)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        fn()
        synchronize(device)
        return float(triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def kernel_timing(device: torch.device | str) -> str:
    """How ``kernel_ms`` times on ``device``, for the result's config."""
    return "triton.testing.do_bench median, L2 flushed" if torch.device(device).type == "cuda" else "wall clock"


def kernel_figure(ncols: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A matplotlib figure with one row of ``ncols`` plots (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=figsize)


def save_figure(fig: Any, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class KernelResult:
    """``<out_dir>/<name>_<device>.json``, rewritten after every case (a run cut short keeps what it
    measured, marked ``complete: false``), and the ``.png`` beside it at the end. A smoke run is
    ``<name>_smoke``, in a temporary folder unless ``--out-dir`` says where."""

    def __init__(self, name: str, out_dir: Path | None, smoke: bool, device: torch.device | str) -> None:
        if out_dir is None and smoke:
            out_dir = Path(tempfile.mkdtemp(prefix=f"bench_{name}_smoke_"))
        self.name = f"{name}_{'smoke' if smoke else device_slug(device)}"
        self.out_dir, self.smoke = out_dir, smoke

    def save(self, payload: dict, complete: bool = False) -> Path:
        path = save_result(self.name, {**payload, "complete": complete}, self.out_dir, self.smoke, announce=False)
        assert path is not None
        return path

    def finish(self, payload: dict, plot: Callable[[Path], None], complete: bool = True) -> Path:
        path = self.save(payload, complete)
        plot(path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}" + (" (smoke run: not a result)" if self.smoke else ""))
        return path
