"""Load a Hugging Face model folder (config.json + model.safetensors or sharded safetensors)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from mcl_runtime.errors import ModelLoadError
from mcl_runtime.model.config import ModelConfig, load_config
from mcl_runtime.model.decoder import DecoderLM

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
_FUSED = {"q_proj": ("self_attn", "qkv_proj", 0), "k_proj": ("self_attn", "qkv_proj", 1),
          "v_proj": ("self_attn", "qkv_proj", 2), "o_proj": ("self_attn", "o_proj", 0),
          "gate_proj": ("mlp", "gate_up_proj", 0), "up_proj": ("mlp", "gate_up_proj", 1),
          "down_proj": ("mlp", "down_proj", 0)}


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{index} is malformed: {exc}") from exc
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{model_dir}: shards named in the index are missing: {missing}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(model_dir.glob("*.safetensors"))
    if shards:
        return shards
    raise ModelLoadError(f"{model_dir} has no model.safetensors (or index); *.bin checkpoints are not "
                         "supported, convert them to safetensors")


def _target(model: DecoderLM, name: str) -> tuple[torch.Tensor, slice | None]:
    """The parameter (and the rows of a fused parameter) that checkpoint tensor ``name`` fills."""
    if name == "model.embed_tokens.weight":
        return model.embed_tokens.weight, None
    if name == "model.norm.weight":
        return model.norm.weight, None
    if name == "lm_head.weight":
        return model.lm_head_weight, None
    m = _LAYER_KEY.match(name)
    if m:
        layer = model.layers[int(m.group(1))]
        proj, kind = m.group(3), m.group(4)
        if proj in _FUSED and _FUSED[proj][0] == m.group(2):
            module = getattr(getattr(layer, _FUSED[proj][0]), _FUSED[proj][1])
            j = _FUSED[proj][2]
            param = module.weight if kind == "weight" else module.bias
            if param is None:
                raise ModelLoadError(f"checkpoint has {name} but the config says this layer has no bias")
            return param, slice(module.offsets[j], module.offsets[j + 1])
    m = re.match(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$", name)
    if m:
        return getattr(model.layers[int(m.group(1))], m.group(2)).weight, None
    raise KeyError(name)


def _expected_keys(cfg: ModelConfig) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        keys.add("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        keys |= {f"{p}self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        keys |= {f"{p}mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
        if cfg.qkv_bias:
            keys |= {f"{p}self_attn.{n}.bias" for n in ("q_proj", "k_proj", "v_proj")}
    return keys


LOAD_FORMATS = ("auto", "dummy")


def fill_dummy_weights(model: DecoderLM, seed: int = 0, bound: float = 1e-3) -> None:
    """Fill every weight and bias in place with uniform values in [-bound, bound] (norm weights stay
    ones); no checkpoint is read and nothing is materialised twice. For benchmarks in real shapes."""
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if not name.endswith("layernorm.weight") and name != "norm.weight":
            param.data.uniform_(-bound, bound, generator=gen)


def load_model(model_dir: str | Path, num_slots: int, max_rank: int, dtype: torch.dtype,
               device: torch.device, load_format: str = "auto") -> DecoderLM:
    """``load_format="auto"`` reads the safetensors; ``"dummy"`` needs only config.json and fills
    the weights with random values (like vLLM's ``--load-format dummy``)."""
    model_dir = Path(model_dir)
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} does not exist")
    cfg = load_config(model_dir)
    model = DecoderLM(cfg, num_slots, max_rank, dtype, device)
    if load_format == "dummy":
        fill_dummy_weights(model)
        return model.eval()
    seen: set[str] = set()
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    try:
                        param, rows = _target(model, name)
                    except KeyError:
                        continue  # e.g. rotary inv_freq buffers saved by old checkpoints
                    tensor = f.get_tensor(name)
                    dst = param.data if rows is None else param.data[rows]
                    if tuple(dst.shape) != tuple(tensor.shape):
                        raise ModelLoadError(f"{path.name}: {name} has shape {tuple(tensor.shape)}, "
                                             f"config.json implies {tuple(dst.shape)}")
                    dst.copy_(tensor.to(dtype))
                    seen.add(name)
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors raises its own error type for corrupt files
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if cfg.tie_word_embeddings:
        seen.discard("lm_head.weight")
    missing = sorted(_expected_keys(cfg) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"{model_dir}: {len(missing)} weights missing from the checkpoint: {shown}")
    return model.eval()
