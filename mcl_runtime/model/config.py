"""Model configuration read from a Hugging Face ``config.json`` (the architectures of ``arch.py``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mcl_runtime.errors import ModelLoadError
from mcl_runtime.model.arch import ARCHITECTURES, PROJECTIONS, Architecture

SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hidden_act: str
    qk_norm: bool = False
    sliding_window: int | None = None
    checkpoint_dtype: str | None = None  # config.json's torch_dtype (transformers 5: dtype), if a float dtype

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.model_type]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear projection of a layer, by checkpoint/PEFT name."""
        return {p.name: (getattr(self, p.fan_in), getattr(self, p.fan_out)) for p in PROJECTIONS}

    def context_len(self, requested: int | None = None) -> int:
        """The context the engine serves: ``requested`` capped at the model's positions. A sliding
        window shorter than that context is refused (full attention would compute it wrong)."""
        context = min(requested or self.max_position_embeddings, self.max_position_embeddings)
        if self.sliding_window is not None and self.sliding_window < context:
            raise ModelLoadError(
                f"this {self.model_type} model uses sliding-window attention over {self.sliding_window} tokens, "
                f"which the engine does not implement, and the context would be {context} tokens: pass "
                f"max_model_len={self.sliding_window} (--max-model-len) or less to serve it exactly"
            )
        return context


def _rope_params(raw: dict) -> tuple[float, dict | None]:
    """rope_theta and scaling from either the classic keys or transformers 5's ``rope_parameters``."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or None
    theta = raw.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def _flag(fixed: bool | None, raw: dict, key: str) -> bool:
    return bool(raw.get(key, False)) if fixed is None else fixed


def _sliding_window(arch: Architecture, raw: dict) -> int | None:
    window = raw.get("sliding_window")
    if window is None or (arch.window_switch is not None and not raw.get(arch.window_switch)):
        return None
    return int(window)


def _checkpoint_dtype(raw: dict) -> str | None:
    dtype = raw.get("torch_dtype", raw.get("dtype"))
    return dtype if dtype in ("float32", "float16", "bfloat16") else None


def parse_config(raw: dict, where: str = "config.json") -> ModelConfig:
    """A ``ModelConfig`` from the contents of a ``config.json`` (``where`` names it in errors)."""
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    arch = ARCHITECTURES[model_type]
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ModelLoadError(f"{where}: hidden_act {hidden_act!r} is not supported (only silu)")
    try:
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        theta, scaling = _rope_params(raw)
        return ModelConfig(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or arch.default_head_dim or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=_flag(arch.qkv_bias, raw, "attention_bias"),
            o_bias=_flag(arch.o_bias, raw, "attention_bias"),
            mlp_bias=_flag(arch.mlp_bias, raw, "mlp_bias"),
            hidden_act=hidden_act,
            qk_norm=arch.qk_norm,
            sliding_window=_sliding_window(arch, raw),
            checkpoint_dtype=_checkpoint_dtype(raw),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: missing or invalid field: {exc}") from exc


def read_folder_json(folder: Path, name: str, kind: str, error: type[Exception] = ModelLoadError) -> dict:
    """``folder/name`` parsed; ``error`` says the folder is no ``kind`` folder, or the file no JSON."""
    path = Path(folder) / name
    if not path.is_file():
        raise error(f"{folder} is not a {kind} folder: no {name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON: {exc}") from exc


def load_config(model_dir: Path) -> ModelConfig:
    raw = read_folder_json(model_dir, "config.json", "Hugging Face model")
    return parse_config(raw, str(Path(model_dir) / "config.json"))
