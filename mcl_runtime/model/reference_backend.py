"""The reference backend: plain torch, one obvious formula per op, no C++ kernels and no routing.

It defines what the other backends compute; tests hold them to it (and it to transformers + peft).
Speed is not its job, but it runs whole steps without a Python loop over requests or adapters:

* attention: each kind of sequence in the step (decodes, prompts, chunks after cached context) is
  one padded batch: queries padded to the group's longest, keys gathered from the paged cache up to
  its longest context, a mask of which key each query sees, and transformers' eager attention
  (scores in the dtype, softmax in float32, GQA by repeating the KV heads);
* LoRA: every adapter slot's product for every token, each token keeping its own slot's;
* RMSNorm and RoPE: transformers' formulas in torch's ops (the cpu and triton backends fall back
  to these functions too).

Static steps (``attn.static``) keep every shape fixed by the bucket (keys padded to the block
table's width), so the reference also runs under ``Engine(compile=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mcl_runtime.model.backends import AttentionMeta, LoRAMeta


def store_kv_torch(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, attn: AttentionMeta
) -> None:
    """``Backend.store_kv``: token ``t``'s key and value into flat cache slot ``attn.slot_mapping[t]``
    (block ``slot // block_size``, row ``slot % block_size``)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, attn.slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, attn.slot_mapping, v)


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``Backend.rms_norm`` in torch's ops (the new residual is a new tensor); bit for bit
    transformers' ``weight * (h.float() * rsqrt(mean(h^2) + eps)).to(dtype)``."""
    if residual is not None:
        h = x + residual
        return rms_norm_torch(h, weight, eps), h
    if x.dtype in (torch.float32, torch.float64):
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``Backend.rope`` in torch's ops (a new tensor)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """``Backend.silu_and_mul`` in torch's ops: transformers' ``act_fn(gate) * up``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # in place: no second [T, I] tensor


@dataclass
class PaddedGroup:
    """Sequences ``b`` of one kind, as one padded batch: their tokens are rows ``t0:t1``; token ``t``
    is query ``token_idx[t]`` of sequence ``token_seq[t]``."""

    t0: int
    t1: int
    token_seq: torch.Tensor  # [t1 - t0] int64
    token_idx: torch.Tensor  # [t1 - t0] int64
    block_tables: torch.Tensor  # [b, blocks] int64: the blocks of the first num_keys positions
    visible: torch.Tensor  # [b, max_q, num_keys] bool: query i of sequence s sees key position j
    max_q: int
    num_keys: int


class ReferenceBackend:
    name = "reference"
    linear = staticmethod(F.linear)
    store_kv = staticmethod(store_kv_torch)
    rms_norm = staticmethod(rms_norm_torch)
    rope = staticmethod(rope_torch)
    silu_and_mul = staticmethod(silu_and_mul_torch)

    def prepare_weights(
        self, weights: list[torch.Tensor], keep_plain: bool = True, max_rows: int | None = None
    ) -> list[torch.Tensor]:
        return []  # linear() uses the weights as they are

    def prepare(self, attn: AttentionMeta, lora: LoRAMeta | None) -> None:
        bounds = attn.group_bounds
        attn.plan = [self._group(attn, b0, b1) for b0, b1 in zip(bounds, bounds[1:]) if b0 < b1]
        if lora is not None:
            self.prepare_lora(lora)

    def prepare_lora(self, lora: LoRAMeta) -> None:
        """The adapter slot of each token."""
        lora.plan = lora.token_slots
        if lora.plan is None:
            T = int(lora.seg_starts_host[-1])
            lora.plan = torch.repeat_interleave(lora.seg_slots, lora.seg_starts.diff(), output_size=T)

    @staticmethod
    def _group(attn: AttentionMeta, b0: int, b1: int) -> PaddedGroup:
        """Sequences ``b0:b1`` (one kind; their tokens contiguous) as one padded batch."""
        dev = attn.context_lens.device
        cu_h = attn.cu_seqlens_q_host
        t0, t1 = int(cu_h[b0]), int(cu_h[b1])
        max_q = int(np.diff(cu_h[b0 : b1 + 1]).max())
        if attn.static:  # every position the block table can hold: no per-step value sizes a tensor
            num_keys = attn.block_tables.shape[1] * attn.block_size
        else:
            num_keys = int(attn.context_lens_host[b0:b1].max())
        cu = attn.cu_seqlens_q[b0 : b1 + 1].long()
        q_lens, ctx = cu[1:] - cu[:-1], attn.context_lens[b0:b1].long()
        token_seq = torch.repeat_interleave(torch.arange(b1 - b0, device=dev), q_lens, output_size=t1 - t0)
        token_idx = torch.arange(t0, t1, device=dev) - cu[:-1][token_seq]
        key_pos = torch.arange(num_keys, device=dev)
        query_pos = ctx[:, None] - q_lens[:, None] + torch.arange(max_q, device=dev)  # [b, max_q]
        # Causal, and never past the context (padding queries see the whole context: no empty rows).
        visible = (key_pos <= query_pos[:, :, None]) & (key_pos < ctx[:, None, None])
        blocks = -(-num_keys // attn.block_size)
        tables = attn.block_tables[b0:b1, :blocks].long()
        return PaddedGroup(t0, t1, token_seq, token_idx, tables, visible, max_q, num_keys)

    def attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
        attn: AttentionMeta,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> torch.Tensor:
        """Every query over the cache (which already holds the step's ``k``/``v``)."""
        return torch.cat([self._attend(q, k_cache, v_cache, scale, g) for g in attn.plan])

    @staticmethod
    def _attend(
        q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, g: PaddedGroup
    ) -> torch.Tensor:
        b, Hq, D, Hkv = len(g.block_tables), q.shape[1], q.shape[2], k_cache.shape[2]
        where = (g.token_seq, g.token_idx)
        queries = q.new_zeros(b, g.max_q, Hq, D).index_put_(where, q[g.t0 : g.t1])

        def gathered(cache: torch.Tensor) -> torch.Tensor:  # [b, num_keys, Hq, D]
            per_seq = cache[g.block_tables].flatten(1, 2)[:, : g.num_keys]
            return per_seq.repeat_interleave(Hq // Hkv, dim=2)

        scores = torch.einsum("bqhd,bkhd->bhqk", queries, gathered(k_cache)) * scale
        scores = scores.masked_fill(~g.visible[:, None], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.einsum("bhqk,bkhd->bqhd", probs, gathered(v_cache))[where]

    def apply_lora(self, x: torch.Tensor, y: torch.Tensor, mod, lora: LoRAMeta) -> None:
        """``y[t] += scaling[s] * x[t] @ A[s].T @ B[s].T`` per slice, ``s`` the slot of token ``t``
        (none for -1), computed for every slot and masked: the buffers are zero past each rank."""
        slots = lora.plan
        R = mod.max_rank
        own = slots[:, None] == torch.arange(mod.lora_a.shape[0], device=slots.device)  # [T, S]
        gain = torch.where(own, mod.scaling, 0.0).to(x.dtype)
        u = torch.einsum("ti,sri->tsr", x, mod.lora_a) * gain[:, :, None]  # [T, S, n_slices * R]
        for j in range(mod.n_slices):
            o0, o1 = mod.offsets[j], mod.offsets[j + 1]
            y[:, o0:o1] += torch.einsum("tsr,sor->to", u[:, :, j * R : (j + 1) * R], mod.lora_b[:, o0:o1])
