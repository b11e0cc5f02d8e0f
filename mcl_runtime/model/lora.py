"""Load PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors).

An adapter is read into host memory once, validated against the base model, and then copied
into a slot of the stacked per-layer buffers (``LinearWithLoRA.set_slot``) when it is needed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from mcl_runtime.errors import AdapterLoadError
from mcl_runtime.hub import resolve_path
from mcl_runtime.model.arch import BY_NAME, FUSED
from mcl_runtime.model.config import ModelConfig, read_folder_json

_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")

# One fused module's slices: (A [r, in], B [out_j, r]) or None, and the module's scaling.
ModuleLoRA = tuple[list[tuple[torch.Tensor, torch.Tensor] | None], float]


@dataclass
class LoRAAdapter:
    name: str
    path: Path
    rank: int  # largest rank over modules
    layers: list[dict[str, ModuleLoRA]]  # per layer: fused module name -> slices


def _read_config(path: Path) -> dict:
    cfg_path = path / "adapter_config.json"
    cfg = read_folder_json(path, cfg_path.name, "PEFT adapter", AdapterLoadError)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise AdapterLoadError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r}")
    if cfg.get("modules_to_save"):
        unsupported.append("modules_to_save")
    if unsupported:
        raise AdapterLoadError(f"{cfg_path}: unsupported LoRA options: {', '.join(unsupported)}")
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    st, pt = path / "adapter_model.safetensors", path / "adapter_model.bin"
    try:
        if st.is_file():
            return load_file(str(st), device="cpu")
        if pt.is_file():
            return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file: safetensors and torch raise their own types
        raise AdapterLoadError(f"cannot read the weights in {path}: {exc}") from exc
    raise AdapterLoadError(f"{path} has no adapter_model.safetensors")


def _alpha_for(module_name: str, cfg: dict) -> float:
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module_name):
            return float(alpha)
    return float(cfg.get("lora_alpha", 8))


def load_peft_adapter(name: str, path: str | Path, model_cfg: ModelConfig, max_rank: int) -> LoRAAdapter:
    """Read and validate an adapter (a folder, or a hub id resolved through the Hugging Face cache);
    raises ``AdapterLoadError`` naming what does not fit."""
    path = resolve_path(path, AdapterLoadError, "adapter")
    cfg = _read_config(path)
    tensors = _read_tensors(path)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if not m or m.group(3) not in BY_NAME or BY_NAME[m.group(3)].parent != m.group(2):
            raise AdapterLoadError(
                f"{path}: weight {key!r} is not a LoRA of a q/k/v/o/gate/up/down "
                f"projection of a {model_cfg.model_type} decoder"
            )
        pairs.setdefault((int(m.group(1)), m.group(3)), {})[m.group(4)] = tensor
    if not pairs:
        raise AdapterLoadError(f"{path}: the adapter has no LoRA weights")
    shapes = model_cfg.projection_shapes()
    layers: list[dict[str, list]] = [{} for _ in range(model_cfg.num_layers)]
    scalings: dict[tuple[int, str], list[float]] = {}
    top_rank = 0
    for (layer, proj), ab in sorted(pairs.items()):
        where = f"{path}: layer {layer} {proj}"
        if layer >= model_cfg.num_layers:
            raise AdapterLoadError(
                f"{where}: the base model has only {model_cfg.num_layers} layers "
                "(adapter trained for another base model?)"
            )
        if set(ab) != {"A", "B"}:
            raise AdapterLoadError(f"{where}: lora_A or lora_B is missing")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        fan_in, fan_out = shapes[proj]
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r, fan_in) or tuple(b.shape) != (fan_out, r):
            raise AdapterLoadError(
                f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the "
                f"base projection ({fan_in} -> {fan_out}): adapter trained for another base model?"
            )
        if r > max_rank:
            raise AdapterLoadError(f"{where}: rank {r} exceeds max_lora_rank={max_rank}")
        target = BY_NAME[proj]
        alpha = _alpha_for(f"model.layers.{layer}.{target.parent}.{proj}", cfg)
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        fused, j, n_slices = target.fused, target.index, len(FUSED[target.fused])
        slices = layers[layer].setdefault(fused, [None] * n_slices)
        slices[j] = (a.float(), b.float())
        scalings.setdefault((layer, fused), [0.0] * n_slices)[j] = scaling
        top_rank = max(top_rank, r)
    return LoRAAdapter(
        name,
        path,
        top_rank,
        [
            {fused: _fold_scaling(slices, scalings[(i, fused)]) for fused, slices in layer.items()}
            for i, layer in enumerate(layers)
        ],
    )


def _fold_scaling(slices: list, scalings: list[float]) -> ModuleLoRA:
    """One scaling per fused module: slices whose scaling differs get the ratio folded into B."""
    base = next(s for s, ab in zip(scalings, slices) if ab is not None)
    out = []
    for ab, s in zip(slices, scalings):
        if ab is not None and s != base:
            ab = (ab[0], ab[1] * (s / base))
        out.append(ab)
    return out, base
