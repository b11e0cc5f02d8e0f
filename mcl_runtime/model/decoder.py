"""Qwen2 / Llama / Qwen3 / Mistral decoder over a flattened batch with a paged KV cache and per-token LoRA.

``forward(input_ids [T], positions [T], ctx)`` runs every token of a step (prefill chunks and decodes
of all adapters together); ``ctx`` carries the step's metadata and the backend that computes
attention, LoRA, RMSNorm, the rotary embedding and the MLP's SiLU-and-multiply (``backends.py``).
With ``ctx.keep`` the last layer finishes only the rows the step reads past its attention (a prompt
chunk's other rows need only their keys and values there), and the forward returns those rows.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mcl_runtime.model.arch import FUSED
from mcl_runtime.model.backends import KeptRows
from mcl_runtime.model.config import ModelConfig
from mcl_runtime.model.layers import LinearWithLoRA, RMSNorm, rope_cos_sin, rope_inv_freq


def fused_linear(
    cfg: ModelConfig, fused: str, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
) -> LinearWithLoRA:
    """The fused module ``fused`` of ``arch.FUSED``: its slices' sizes and bias from the config."""
    parts = FUSED[fused]
    return LinearWithLoRA(
        getattr(cfg, parts[0].fan_in),
        [getattr(cfg, p.fan_out) for p in parts],
        getattr(cfg, parts[0].bias),
        num_slots,
        max_rank,
        dtype,
        device,
    )


class Attention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer_idx: int, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = fused_linear(cfg, "qkv_proj", num_slots, max_rank, dtype, device)
        self.o_proj = fused_linear(cfg, "o_proj", num_slots, max_rank, dtype, device)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.o_proj(self.attend(x, ctx), ctx)

    def attend(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """The projections, rotation, cache write and attention: ``[T, Hq * D]``, before ``o_proj``."""
        T, Hq, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x, ctx)
        qk = qkv[:, : (Hq + Hkv) * D].view(T, Hq + Hkv, D)  # q and k heads side by side: one rotation
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :Hq], ctx), self.k_norm(qk[:, Hq:], ctx)), dim=1)
        qk = ctx.backend.rope(qk, ctx.cos, ctx.sin)
        q, k, v = qk[:, :Hq], qk[:, Hq:], qkv[:, (Hq + Hkv) * D :].view(T, Hkv, D)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        ctx.backend.store_kv(k, v, k_cache, v_cache, ctx.attn)
        return ctx.backend.attention(q, k_cache, v_cache, self.scale, ctx.attn, k, v).reshape(T, -1)


class MLP(nn.Module):
    def __init__(
        self, cfg: ModelConfig, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.gate_up_proj = fused_linear(cfg, "gate_up_proj", num_slots, max_rank, dtype, device)
        self.down_proj = fused_linear(cfg, "down_proj", num_slots, max_rank, dtype, device)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.down_proj(ctx.backend.silu_and_mul(self.gate_up_proj(x, ctx)), ctx)


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer_idx: int, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, layer_idx, num_slots, max_rank, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, num_slots, max_rank, dtype, device)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, ctx, keep: KeptRows | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp output, residual)``: the residual stream is added in the next norm (fused there).
        With ``keep``, everything past the attention is computed for the rows ``keep.index`` only
        (with their LoRA segments), and both outputs have those rows."""
        if residual is None:
            h, residual = self.input_layernorm(x, ctx), x
        else:
            h, residual = self.input_layernorm(x, ctx, residual)
        if keep is None:
            h = self.self_attn(h, ctx)
        else:
            o = self.self_attn.attend(h, ctx).index_select(0, keep.index)
            ctx = dataclasses.replace(ctx, lora=keep.lora)
            h, residual = self.self_attn.o_proj(o, ctx), residual.index_select(0, keep.index)
        h, residual = self.post_attention_layernorm(h, ctx, residual)
        return self.mlp(h, ctx), residual


class DecoderLM(nn.Module):
    def __init__(
        self, cfg: ModelConfig, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, num_slots, max_rank, dtype, device) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(
                torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False
            )
        # cos/sin of every position, computed once (vLLM's cos_sin_cache): a step indexes its rows.
        # torch's cos/sin give the same value for an element whatever the tensor's shape, so these are
        # bit for bit the per-step tables.
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
        cos, sin = rope_cos_sin(torch.arange(cfg.max_position_embeddings, device=device), inv_freq, dtype)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def lora_modules(self, layer_idx: int) -> dict[str, LinearWithLoRA]:
        """The fused modules of a layer by ``arch.FUSED`` name."""
        layer = self.layers[layer_idx]
        return {fused: getattr(getattr(layer, parts[0].parent), fused) for fused, parts in FUSED.items()}

    def linear_weights(self) -> list[torch.Tensor]:
        """The weights the forward passes to ``backend.linear``: every projection's and the LM head's."""
        projections = [m.weight for i in range(len(self.layers)) for m in self.lora_modules(i).values()]
        return projections + [self.lm_head_weight]

    def release_weights(self, weights: list[torch.Tensor]) -> None:
        """Frees the storage of ``linear`` weights that the backend serves from copies of its own
        (each becomes an empty tensor, so a stray read fails loudly). A tied LM head stays: the
        embedding reads it."""
        for w in weights:
            if w is not self.embed_tokens.weight:
                w.data = torch.empty(0, dtype=w.dtype, device=w.device)

    def checkpoint_params(self) -> dict[str, tuple[torch.Tensor, slice | None]]:
        """Checkpoint tensor name -> the parameter it fills (and the rows of a fused one)."""
        table: dict[str, tuple[torch.Tensor, slice | None]] = {
            f"model.{name}.weight": (module.weight, None)
            for name, module in self.named_modules()
            if isinstance(module, (RMSNorm, nn.Embedding))
        }
        if not self.config.tie_word_embeddings:
            table["lm_head.weight"] = (self.lm_head_weight, None)
        for i in range(len(self.layers)):
            for fused, module in self.lora_modules(i).items():
                for p in FUSED[fused]:
                    rows = slice(module.offsets[p.index], module.offsets[p.index + 1])
                    key = f"model.layers.{i}.{p.parent}.{p.name}"
                    table[key + ".weight"] = (module.weight, rows)
                    if module.bias is not None:
                        table[key + ".bias"] = (module.bias, rows)
        return table

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """Hidden states after the final norm: ``[T, hidden]``, or ``[K, hidden]`` of the rows
        ``ctx.keep`` names."""
        x = self.embed_tokens(input_ids)
        ctx.cos, ctx.sin = self.rope_cos.index_select(0, positions), self.rope_sin.index_select(0, positions)
        residual = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, ctx, ctx.keep if i == last else None)
        return self.norm(x, ctx, residual)[0]

    def compute_logits(
        self, hidden: torch.Tensor, backend, out: torch.Tensor | None = None, float32: bool = True
    ) -> torch.Tensor:
        """Float32 logits ``[T, vocab]`` of hidden states ``[T, hidden]`` (``backend.linear``); a 16-bit
        head's written into ``out`` (``[T, vocab]`` float32) when given, else into a new tensor.
        ``float32=False``: the head's output in the model's dtype, as it is."""
        logits = backend.linear(hidden, self.lm_head_weight)
        if not float32:
            return logits
        if out is None or logits.dtype == torch.float32:
            return logits.float()
        return out.copy_(logits)
