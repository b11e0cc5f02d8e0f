"""Qwen2 / Llama decoder over a flattened batch with a paged KV cache and per-token LoRA.

``forward(input_ids [T], ctx)`` runs every token of a step (prefill chunks and decodes of all
adapters together); ``ctx`` carries the step's metadata and the backend (torch or triton).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcl_runtime.model.config import ModelConfig
from mcl_runtime.model.layers import LinearWithLoRA, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq

# Projection name -> (module attribute, slice index) for the fused projections.
LORA_TARGETS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = LinearWithLoRA(cfg.hidden_size, [cfg.q_size, cfg.kv_size, cfg.kv_size], cfg.qkv_bias,
                                       num_slots, max_rank, dtype, device)
        self.o_proj = LinearWithLoRA(cfg.q_size, [cfg.hidden_size], cfg.o_bias, num_slots, max_rank, dtype, device)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x, ctx).split(self.qkv_proj.out_sizes, dim=-1)
        q = apply_rope(q.view(T, self.num_heads, self.head_dim), ctx.cos, ctx.sin)
        k = apply_rope(k.view(T, self.num_kv_heads, self.head_dim), ctx.cos, ctx.sin)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = ctx.kv_cache[self.layer_idx]
        ctx.backend.store_kv(k, v, k_cache, v_cache, ctx.attn)
        o = ctx.backend.attention(q, k_cache, v_cache, self.scale, ctx.attn, k, v)
        return self.o_proj(o.reshape(T, -1), ctx)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = LinearWithLoRA(cfg.hidden_size, [inter, inter], cfg.mlp_bias, num_slots, max_rank, dtype, device)
        self.down_proj = LinearWithLoRA(inter, [cfg.hidden_size], cfg.mlp_bias, num_slots, max_rank, dtype, device)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, ctx).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, ctx)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, layer_idx, num_slots, max_rank, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, num_slots, max_rank, dtype, device)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, num_slots, max_rank, dtype, device)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device),
                                               requires_grad=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device),
                             persistent=False)

    def lora_modules(self, layer_idx: int) -> dict[str, LinearWithLoRA]:
        layer = self.layers[layer_idx]
        return {"qkv_proj": layer.self_attn.qkv_proj, "o_proj": layer.self_attn.o_proj,
                "gate_up_proj": layer.mlp.gate_up_proj, "down_proj": layer.mlp.down_proj}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after the final norm."""
        x = self.embed_tokens(input_ids)
        ctx.cos, ctx.sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight).float()
