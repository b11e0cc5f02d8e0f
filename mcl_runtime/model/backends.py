"""Per-step batch metadata and the two compute backends (torch reference, Triton kernels).

A step's metadata is built once (``build_forward_context``) and shared by every layer. Layers call
``ctx.backend.store_kv / attention / apply_lora``; backends see tensors and metadata, never
requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class AttentionMeta:
    slot_mapping: torch.Tensor   # [T] int64
    block_tables: torch.Tensor   # [B, M] int32
    context_lens: torch.Tensor   # [B] int32, new tokens included
    cu_seqlens_q: torch.Tensor   # [B + 1] int32
    num_decodes: int             # the first num_decodes sequences have one query token
    max_q_len: int
    max_context_len: int
    extra: dict = field(default_factory=dict)  # backend-specific tensors built in prepare()


@dataclass
class LoRAMeta:
    seg_starts: torch.Tensor     # [nseg + 1] int32 token offsets of same-slot runs
    seg_slots: torch.Tensor      # [nseg] int32, -1 = no adapter
    max_seg_len: int
    token_slots: torch.Tensor    # [T] int64, -1 = no adapter
    rows: torch.Tensor | None    # tokens that have an adapter; None = all of them
    extra: dict = field(default_factory=dict)


@dataclass
class ForwardContext:
    backend: "TorchBackend"
    kv_cache: torch.Tensor       # [L, 2, num_blocks, block_size, Hkv, D]
    attn: AttentionMeta
    lora: LoRAMeta | None        # None when no token of the step has an adapter
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


def lora_segments(slots: np.ndarray, q_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Runs of equal adapter slot over sequences, as token offsets (host side)."""
    starts_seq = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]]) if len(slots) else np.zeros(0, np.int64)
    cu = np.r_[0, np.cumsum(q_lens)]
    seg_starts = np.r_[cu[starts_seq], cu[-1]].astype(np.int32)
    seg_slots = slots[starts_seq].astype(np.int32)
    max_len = int(np.diff(seg_starts).max()) if len(seg_slots) else 0
    return seg_starts, seg_slots, max_len


class TorchBackend:
    """Plain torch: padded SDPA over K/V gathered through the block tables, and LoRA as two dense
    GEMMs over all slots with a per-token slot mask (no Python loop over requests or adapters)."""

    name = "torch"

    def prepare(self, attn: AttentionMeta, lora: LoRAMeta | None, num_slots: int) -> None:
        cu = attn.cu_seqlens_q.long()
        q_lens = cu[1:] - cu[:-1]
        T = attn.slot_mapping.shape[0]
        arange_q = torch.arange(attn.max_q_len, device=cu.device)
        seq_of_token = torch.repeat_interleave(torch.arange(q_lens.shape[0], device=cu.device), q_lens, output_size=T)
        attn.extra.update(
            seq_of_token=seq_of_token,
            idx_in_seq=torch.arange(T, device=cu.device) - cu[:-1][seq_of_token],
            q_pos=attn.context_lens.long()[:, None] - q_lens[:, None] + arange_q,
            q_valid=arange_q[None, :] < q_lens[:, None])
        if lora is not None:
            slots = lora.token_slots if lora.rows is None else lora.token_slots[lora.rows]
            lora.extra["onehot"] = F.one_hot(slots, num_slots).to(torch.float32)

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 attn: AttentionMeta) -> None:
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, attn.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, attn.slot_mapping, v)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                  attn: AttentionMeta) -> torch.Tensor:
        ex = attn.extra
        B, M = attn.block_tables.shape
        bs, Hkv, D = k_cache.shape[1:]
        k = k_cache[attn.block_tables.long()].view(B, M * bs, Hkv, D).transpose(1, 2)
        v = v_cache[attn.block_tables.long()].view(B, M * bs, Hkv, D).transpose(1, 2)
        if "mask" not in ex:
            key_pos = torch.arange(M * bs, device=q.device)
            allowed = key_pos[None, None, :] <= ex["q_pos"][:, :, None]
            ex["mask"] = torch.where(ex["q_valid"][:, :, None], allowed, key_pos[None, None, :] == 0)[:, None]
        q_pad = q.new_zeros(B, attn.max_q_len, q.shape[1], D)
        q_pad[ex["seq_of_token"], ex["idx_in_seq"]] = q
        o = F.scaled_dot_product_attention(q_pad.transpose(1, 2), k, v, attn_mask=ex["mask"], scale=scale,
                                           enable_gqa=q.shape[1] != Hkv)
        return o.transpose(1, 2)[ex["seq_of_token"], ex["idx_in_seq"]]

    def apply_lora(self, x: torch.Tensor, y: torch.Tensor, mod, lora: LoRAMeta) -> None:
        rows = lora.rows
        xs = x if rows is None else x.index_select(0, rows)
        S, n, R = mod.lora_a.shape[0], mod.n_slices, mod.max_rank
        u = (xs @ mod.lora_a.view(S * n * R, -1).T).view(-1, S, n, R)
        u = u * (lora.extra["onehot"] * mod.scaling).to(u.dtype)[:, :, None, None]
        for j in range(n):
            sl = slice(mod.offsets[j], mod.offsets[j + 1])
            delta = torch.einsum("tsr,snr->tn", u[:, :, j], mod.lora_b[:, sl])
            if rows is None:
                y[:, sl] += delta
            else:
                y[:, sl].index_add_(0, rows, delta)


class TritonBackend(TorchBackend):
    """SGMV LoRA and paged attention through the Triton kernels in ``mcl_runtime.kernels``."""

    name = "triton"

    def __init__(self) -> None:
        from mcl_runtime import kernels
        self.k = kernels

    def prepare(self, attn: AttentionMeta, lora: LoRAMeta | None, num_slots: int) -> None:
        pass

    def store_kv(self, k, v, k_cache, v_cache, attn: AttentionMeta) -> None:
        self.k.store_kv(k, v, k_cache, v_cache, attn.slot_mapping)

    def attention(self, q, k_cache, v_cache, scale: float, attn: AttentionMeta) -> torch.Tensor:
        nd = attn.num_decodes
        B = attn.context_lens.shape[0]
        if nd == B:
            return self.k.paged_decode_attention(q, k_cache, v_cache, attn.block_tables, attn.context_lens,
                                                 scale, attn.max_context_len)
        if nd == 0:
            return self.k.paged_prefill_attention(q, k_cache, v_cache, attn.block_tables, attn.cu_seqlens_q,
                                                  attn.context_lens, scale, attn.max_q_len)
        out = torch.empty_like(q)
        out[:nd] = self.k.paged_decode_attention(q[:nd], k_cache, v_cache, attn.block_tables[:nd],
                                                 attn.context_lens[:nd], scale, attn.max_context_len)
        cu = attn.extra.get("cu_prefill")
        if cu is None:
            cu = attn.extra["cu_prefill"] = attn.cu_seqlens_q[nd:] - nd
        out[nd:] = self.k.paged_prefill_attention(q[nd:], k_cache, v_cache, attn.block_tables[nd:], cu,
                                                  attn.context_lens[nd:], scale, attn.max_q_len)
        return out

    def apply_lora(self, x, y, mod, lora: LoRAMeta) -> None:
        u = self.k.lora_shrink(x, mod.lora_a, lora.seg_starts, lora.seg_slots, mod.ranks, lora.max_seg_len)
        self.k.lora_expand(u, mod.lora_b, y, lora.seg_starts, lora.seg_slots, mod.ranks, mod.scaling,
                           mod.offsets, lora.max_seg_len)


def make_backend(name: str) -> TorchBackend:
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        return TritonBackend()
    raise ValueError(f"unknown backend {name!r} (choose 'torch' or 'triton')")
