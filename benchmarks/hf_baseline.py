"""transformers + peft as the baseline a user would pick: one HF model with several PEFT adapters.

Two ways to serve a multi-adapter batch with it:
- ``generate_grouped``: one ``generate`` per adapter (``set_adapter``), prompts left-padded;
- ``generate_mixed``: one ``generate`` over the whole batch with peft's ``adapter_names``
  (mixed-adapter batches; peft loops over the adapters inside each LoRA layer).
Both force exactly ``max_new_tokens`` per prompt (``min_new_tokens``), greedy.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

BASE = "__base__"  # peft's name for "no adapter" in adapter_names


def load_hf_peft(
    model_dir: Path, adapters: dict[str, Path], device: torch.device, dtype: torch.dtype, random_weights: bool = False
) -> nn.Module:
    """The base model (its safetensors, or random weights from its config.json) with the adapters."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_weights:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def _generate(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, pad_id: int, **kwargs: object
) -> list[list[int]]:
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id, device)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        **kwargs,
    )
    return out[:, ids.shape[1] :].tolist()


def _sync(model: nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_grouped(
    model: nn.Module, prompts: list[list[int]], adapters: list[str | None], max_new_tokens: int, pad_id: int
) -> tuple[float, list[list[int]]]:
    """One batched generate per adapter group, in order of first appearance; (seconds, tokens)."""
    outputs: list[list[int] | None] = [None] * len(prompts)
    _sync(model)
    t0 = time.perf_counter()
    for name in dict.fromkeys(adapters):
        idx = [i for i, a in enumerate(adapters) if a == name]
        if name is None:
            with model.disable_adapter():
                toks = _generate(model, [prompts[i] for i in idx], max_new_tokens, pad_id)
        else:
            model.set_adapter(name)
            toks = _generate(model, [prompts[i] for i in idx], max_new_tokens, pad_id)
        for i, t in zip(idx, toks):
            outputs[i] = t
    _sync(model)
    return time.perf_counter() - t0, outputs


def generate_mixed(
    model: nn.Module, prompts: list[list[int]], adapters: list[str | None], max_new_tokens: int, pad_id: int
) -> tuple[float, list[list[int]]]:
    """The whole batch in one generate with per-row adapters (peft mixed-adapter batches)."""
    names = [BASE if a is None else a for a in adapters]
    _sync(model)
    t0 = time.perf_counter()
    toks = _generate(model, prompts, max_new_tokens, pad_id, adapter_names=names)
    _sync(model)
    return time.perf_counter() - t0, toks
