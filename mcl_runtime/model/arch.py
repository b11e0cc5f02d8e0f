"""The supported decoder architectures, one entry each: everything that differs between them.

A decoder layer has seven linear projections. The engine fuses them into four modules (q/k/v into
``qkv_proj``, gate/up into ``gate_up_proj``); ``PROJECTIONS`` says, for each checkpoint/PEFT name,
which layer submodule holds it in a checkpoint, which fused module and slice it fills, its
(in, out) sizes as ``ModelConfig`` attributes, and which bias flag applies. The decoder, the
checkpoint and PEFT loaders, the demo builder and training all read this table.

Adding an architecture is one ``Architecture`` entry (usually ``replace`` of a similar one) plus
whatever its differences need in ``decoder.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Projection:
    name: str  # checkpoint and PEFT target name
    parent: str  # submodule of a decoder layer in checkpoints
    fused: str  # the engine's fused module
    index: int  # slice of the fused module (slices are in this order)
    fan_in: str  # ModelConfig attribute: input size
    fan_out: str  # ModelConfig attribute: output size
    bias: str  # ModelConfig attribute: whether the projection has a bias


PROJECTIONS: tuple[Projection, ...] = (
    Projection("q_proj", "self_attn", "qkv_proj", 0, "hidden_size", "q_size", "qkv_bias"),
    Projection("k_proj", "self_attn", "qkv_proj", 1, "hidden_size", "kv_size", "qkv_bias"),
    Projection("v_proj", "self_attn", "qkv_proj", 2, "hidden_size", "kv_size", "qkv_bias"),
    Projection("o_proj", "self_attn", "o_proj", 0, "q_size", "hidden_size", "o_bias"),
    Projection("gate_proj", "mlp", "gate_up_proj", 0, "hidden_size", "intermediate_size", "mlp_bias"),
    Projection("up_proj", "mlp", "gate_up_proj", 1, "hidden_size", "intermediate_size", "mlp_bias"),
    Projection("down_proj", "mlp", "down_proj", 0, "intermediate_size", "hidden_size", "mlp_bias"),
)
PROJECTION_NAMES: tuple[str, ...] = tuple(p.name for p in PROJECTIONS)
BY_NAME: dict[str, Projection] = {p.name: p for p in PROJECTIONS}
FUSED: dict[str, tuple[Projection, ...]] = {
    fused: tuple(sorted((p for p in PROJECTIONS if p.fused == fused), key=lambda p: p.index))
    for fused in dict.fromkeys(p.fused for p in PROJECTIONS)
}


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    hf_class: str  # transformers class (config.json's architectures)
    qkv_bias: bool | None = None  # None: config.json's attention_bias decides
    o_bias: bool | None = None
    mlp_bias: bool | None = False  # None: config.json's mlp_bias decides
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (q_norm, k_norm)
    default_head_dim: int | None = None  # when config.json has no head_dim (else hidden // heads)
    window_switch: str | None = None  # config key that turns sliding_window on (None: on when set)


LLAMA = Architecture("llama", "LlamaForCausalLM", mlp_bias=None)
QWEN2 = Architecture("qwen2", "Qwen2ForCausalLM", qkv_bias=True, o_bias=False, window_switch="use_sliding_window")
QWEN3 = replace(
    QWEN2,
    model_type="qwen3",
    hf_class="Qwen3ForCausalLM",
    qkv_bias=None,
    o_bias=None,
    qk_norm=True,
    default_head_dim=128,
)
MISTRAL = replace(
    LLAMA, model_type="mistral", hf_class="MistralForCausalLM", qkv_bias=False, o_bias=False, mlp_bias=False
)

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (QWEN2, LLAMA, QWEN3, MISTRAL)}
