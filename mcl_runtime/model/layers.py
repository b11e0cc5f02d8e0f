"""Building blocks of the decoder: RMSNorm, rotary embedding tables, and linear layers with per-slot LoRA.

The arithmetic of RMSNorm, the rotation and the LoRA products is the step's backend's
(``ctx.backend``, see ``backends.py``); numerics follow Hugging Face transformers (Qwen2/Llama) so
that fp32 greedy decoding matches it token for token.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mcl_runtime.errors import ModelLoadError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, ctx, residual: torch.Tensor | None = None):
        """``ctx.backend.rms_norm``: the normalised ``x``, or, given the layer's ``residual``,
        ``(normed, h)`` with ``h = x + residual`` (the new residual)."""
        return ctx.backend.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies as transformers computes them (default, linear and llama3 scaling)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ModelLoadError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[T, head_dim]`` of ``positions`` (the decoder computes them once, for every position)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class LinearWithLoRA(nn.Module):
    """``y = x @ W.T + b`` plus, per token, the LoRA of that token's adapter slot.

    A fused projection has slices (q/k/v, or gate/up) of sizes ``out_sizes``; each slot holds
    one adapter's weights in the layout of docs/cpu_kernels.md ("Shared layouts")::

        lora_a  [S, n_slices * R, in]   slice j uses rows j*R : j*R + ranks[slot, j]
        lora_b  [S, sum(out_sizes), R]  slice j writes columns offsets[j] : offsets[j+1]
        scaling [S]                     lora_alpha / r (or / sqrt(r) with rsLoRA)
        ranks   [S, n_slices]           0 where the adapter does not target the slice

    ``set_slot`` is their one writer; it counts its writes in ``lora_version``, which a backend's
    copies of these buffers in another layout are checked against.
    """

    def __init__(
        self,
        in_features: int,
        out_sizes: list[int],
        bias: bool,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        out = sum(out_sizes)
        self.in_features = in_features
        self.out_sizes = list(out_sizes)
        self.offsets = tuple([0] + list(torch.tensor(out_sizes).cumsum(0).tolist()))
        self.max_rank = max_rank
        self.weight = nn.Parameter(torch.empty(out, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out, dtype=dtype, device=device), requires_grad=False) if bias else None
        n = len(out_sizes)
        self.register_buffer("lora_a", torch.zeros(num_slots, n * max_rank, in_features, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(num_slots, out, max_rank, dtype=dtype, device=device))
        self.register_buffer("scaling", torch.zeros(num_slots, dtype=torch.float32, device=device))
        self.register_buffer("ranks", torch.zeros(num_slots, n, dtype=torch.int32, device=device))
        self.lora_version = 0

    @property
    def n_slices(self) -> int:
        return len(self.out_sizes)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        y = ctx.backend.linear(x, self.weight, self.bias)
        if ctx.lora is not None:
            ctx.backend.apply_lora(x, y, self, ctx.lora)
        return y

    def set_slot(self, slot: int, slices: list[tuple[torch.Tensor, torch.Tensor] | None], scaling: float) -> None:
        """Write one adapter's ``(A [r, in], B [out_j, r])`` per slice (None: not targeted)."""
        R = self.max_rank
        self.lora_version += 1
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.ranks[slot].zero_()
        self.scaling[slot] = scaling
        for j, ab in enumerate(slices):
            if ab is None:
                continue
            a, b = ab
            r = a.shape[0]
            self.lora_a[slot, j * R : j * R + r].copy_(a)
            self.lora_b[slot, self.offsets[j] : self.offsets[j + 1], :r].copy_(b)
            self.ranks[slot, j] = r

    def clear_slot(self, slot: int) -> None:
        self.set_slot(slot, [None] * self.n_slices, 0.0)
