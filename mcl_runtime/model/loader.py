"""Load a Hugging Face model folder (config.json + model.safetensors or sharded safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from mcl_runtime.errors import ModelLoadError
from mcl_runtime.model.config import load_config
from mcl_runtime.model.decoder import DecoderLM


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
    raise ModelLoadError(
        f"{model_dir} has no model.safetensors (or index); *.bin checkpoints are not "
        "supported, convert them to safetensors"
    )


LOAD_FORMATS = ("auto", "dummy")


def fill_dummy_weights(model: DecoderLM, seed: int = 0, bound: float = 1e-3) -> None:
    """Fill every weight and bias in place with uniform values in [-bound, bound] (norm weights stay
    ones); no checkpoint is read and nothing is materialised twice. For benchmarks in real shapes."""
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if not name.endswith("norm.weight"):
            param.data.uniform_(-bound, bound, generator=gen)


def load_model(
    model_dir: str | Path,
    num_slots: int,
    max_rank: int,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
) -> DecoderLM:
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
    params = model.checkpoint_params()
    seen: set[str] = set()
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in params:
                        if name.endswith(".bias") and name.removesuffix("bias") + "weight" in params:
                            raise ModelLoadError(f"checkpoint has {name} but the config says this layer has no bias")
                        continue  # e.g. rotary inv_freq buffers saved by old checkpoints
                    param, rows = params[name]
                    tensor = f.get_tensor(name)
                    dst = param.data if rows is None else param.data[rows]
                    if tuple(dst.shape) != tuple(tensor.shape):
                        raise ModelLoadError(
                            f"{path.name}: {name} has shape {tuple(tensor.shape)}, "
                            f"config.json implies {tuple(dst.shape)}"
                        )
                    dst.copy_(tensor.to(dtype))
                    seen.add(name)
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors raises its own error type for corrupt files
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    missing = sorted(set(params) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"{model_dir}: {len(missing)} weights missing from the checkpoint: {shown}")
    return model.eval()
