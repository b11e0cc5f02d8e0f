"""Batched sampling: penalties, min_tokens, greedy, temperature, min-p, top-k, top-p, each row
with its own seed. Every step is a tensor operation over all rows (vLLM's semantics); rows whose
parameters are neutral (penalty 1 or 0, min_p 0) come out bit for bit as without them.

Randomness is counter-based: the Gumbel noise for row ``i`` and vocabulary entry ``v`` is a hash
of (seed_i, step_i, v), so a seeded request samples the same tokens whatever shares its batch,
and after a preemption, with no per-request generator objects and no loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mcl_runtime.kernels import HAS_CPU_ARGMAX, argmax_cpu

_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for h in [0, 2^32), in int64 without overflow (c split in 16-bit halves)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3 finalizer on values in [0, 2^32) held in int64."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[N, V]`` float32 Gumbel(0, 1) noise determined by (seed, step, token id)."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    row = _fmix32(lo ^ _fmix32((hi + _mul32(steps & _M32, 0x9E3779B1)) & _M32))
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    h = _fmix32(row[:, None] ^ _fmix32((_mul32(vocab, 0x27D4EB2F) + 0x165667B1) & _M32))
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


@dataclass
class Penalties:
    """Repetition/presence/frequency penalties of a step's rows (neutral rows: 1, 0, 0)."""

    token_ids: torch.Tensor  # [N, L] int64: prompt then output ids, padded with the vocab size
    is_output: torch.Tensor  # [N, L] bool: the id is an output token (False on padding)
    repetition: torch.Tensor  # [N] float32
    presence: torch.Tensor  # [N] float32
    frequency: torch.Tensor  # [N] float32


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    n, vocab = logits.shape
    counts = torch.zeros(n, vocab + 1, device=logits.device).scatter_add_(1, p.token_ids, p.is_output.float())
    seen = torch.zeros(n, vocab + 1, dtype=torch.bool, device=logits.device).scatter_(
        1, p.token_ids, torch.ones_like(p.token_ids, dtype=torch.bool)
    )
    counts, seen = counts[:, :vocab], seen[:, :vocab]
    rep = p.repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - p.frequency[:, None] * counts - p.presence[:, None] * (counts > 0)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` (first maximum, NaN counts as the maximum). On the CPU through the
    C++ kernel (any float dtype, on torch's threads) or, without it, NumPy for float32 (same
    result; torch's CPU reduction is several times slower)."""
    if logits.device.type == "cpu" and logits.dim() == 2 and logits.shape[1] and logits.stride(1) == 1:
        if HAS_CPU_ARGMAX and logits.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return argmax_cpu(logits, torch.get_num_threads())
        if logits.dtype == torch.float32:
            return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of a step, built once on the host. An all-greedy batch carries
    only what greedy decoding reads (penalties and banned ids)."""

    all_greedy: bool
    temperatures: torch.Tensor | None = None  # [N] float32
    top_ks: torch.Tensor | None = None  # [N] int64, vocab size when off
    top_ps: torch.Tensor | None = None  # [N] float32
    seeds: torch.Tensor | None = None  # [N] int64
    steps: torch.Tensor | None = None  # [N] int64: output tokens so far (the sample's index)
    any_top_k_or_p: bool = False
    min_ps: torch.Tensor | None = None  # [N] float32 when some row has min_p > 0
    penalties: Penalties | None = None  # when some row is penalized
    banned: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids) set to -inf: min_tokens

    @property
    def argmax_only(self) -> bool:
        """Whether ``sample`` is each row's argmax of the logits as given (any dtype)."""
        return self.all_greedy and self.penalties is None and self.banned is None


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Next token per row of ``logits [N, V]`` (float32, or any float dtype where
    ``batch.argmax_only``; may be modified in place)."""
    if batch.banned is not None:
        logits[batch.banned] = float("-inf")
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    greedy_tokens = argmax(logits)
    if batch.all_greedy:
        return greedy_tokens
    temps = batch.temperatures.clamp(min=1e-5)[:, None]
    scaled = logits / temps
    if batch.min_ps is not None:
        probs = scaled.softmax(dim=-1)
        scaled = scaled.masked_fill(probs < batch.min_ps[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
    noise = gumbel_noise(batch.seeds, batch.steps, logits.shape[-1])
    if batch.any_top_k_or_p:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        drop = (ranks >= batch.top_ks[:, None]) | ((probs.cumsum(dim=-1) - probs) > batch.top_ps[:, None])
        scores = sorted_logits.masked_fill(drop, float("-inf")) + noise.gather(1, order)
        sampled = order.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1)
    else:
        sampled = (scaled + noise).argmax(dim=-1)
    return torch.where(batch.temperatures == 0, greedy_tokens, sampled)
