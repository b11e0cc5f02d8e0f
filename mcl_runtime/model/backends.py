"""Per-step batch metadata and the two compute backends (torch reference, Triton kernels).

A step's metadata is built once (by the model runner, then ``backend.prepare``) and shared by every
layer. Layers call ``ctx.backend.store_kv / attention / apply_lora``; backends see tensors and
metadata, never requests.
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
    group_bounds: list[int]      # [0, d, d + p, B]: decodes (one query token each) | prefill chunks
                                 # without cached context | prefill chunks with cached context
    max_q_len: int
    max_context_len: int
    block_size: int
    context_lens_host: np.ndarray  # [B] host copies of context_lens and cu_seqlens_q, so that
    cu_seqlens_q_host: np.ndarray  # [B + 1] shapes are known without device syncs
    extra: dict = field(default_factory=dict)  # backend-specific tensors built in prepare()

    @property
    def num_decodes(self) -> int:
        return self.group_bounds[1]


@dataclass
class LoRAMeta:
    seg_starts: torch.Tensor     # [nseg + 1] int32 token offsets of same-slot runs
    seg_slots: torch.Tensor      # [nseg] int32, -1 = no adapter
    max_seg_len: int
    max_rank: int                # largest rank among the step's adapters
    seg_starts_host: np.ndarray  # host copies of seg_starts / seg_slots
    seg_slots_host: np.ndarray
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
    """Plain torch, no Python loop over requests or adapters.

    Attention: the step's sequences form at most three padded groups with contiguous tokens
    (decodes; prefill chunks without cached context; prefill chunks with cached context). Keys
    come from the paged cache through ``index_select`` into reused buffers, or straight from the
    new tokens when the group has no cached context. The query heads sharing a KV head are folded
    into the query-length axis, so K/V are never repeated for GQA.
    LoRA: tokens of each adapter segment are cut into tiles of at most ``LORA_TILE`` tokens;
    one gather + ``bmm`` per projection covers every tile of every adapter (punica's "gather + bmm").
    """

    name = "torch"
    LORA_TILE = 128

    def __init__(self) -> None:
        # Reused gather buffers: on CPU a fresh multi-MB tensor per layer costs more in page
        # faults than the gather itself.
        self._workspace: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = int(np.prod(shape))
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            grown = max(numel, int(buf.numel() * 1.5) if buf is not None else 0)  # contexts grow every step
            buf = self._workspace[name] = torch.empty(grown, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)

    def prepare(self, attn: AttentionMeta, lora: LoRAMeta | None) -> None:
        bounds = attn.group_bounds
        attn.extra["groups"] = [g for b0, b1 in zip(bounds, bounds[1:]) if (g := self._group(attn, b0, b1))]
        if lora is not None:
            lora.extra.update(self._lora_tiles(lora))

    @staticmethod
    def _group(attn: AttentionMeta, b0: int, b1: int) -> dict | None:
        """Padded-attention metadata for sequences ``b0:b1`` (their tokens are contiguous)."""
        if b0 == b1:
            return None
        dev = attn.context_lens.device
        cu_h = attn.cu_seqlens_q_host
        q_lens_h, ctx_h = np.diff(cu_h[b0:b1 + 1]), attn.context_lens_host[b0:b1]
        max_q = int(q_lens_h.max())
        from_scratch = bool((q_lens_h == ctx_h).all())
        L = max_q if from_scratch else int(ctx_h.max())
        t0, t1 = int(cu_h[b0]), int(cu_h[b1])
        cu = attn.cu_seqlens_q[b0:b1 + 1].long()
        q_lens, ctx = cu[1:] - cu[:-1], attn.context_lens[b0:b1].long()
        seq_of_token = torch.repeat_interleave(torch.arange(b1 - b0, device=dev), q_lens, output_size=t1 - t0)
        idx_in_seq = torch.arange(t0, t1, device=dev) - cu[:-1][seq_of_token]
        arange_q = torch.arange(max_q, device=dev)
        key_pos = torch.arange(L, device=dev)
        q_pos = arange_q[None, :] if from_scratch else ctx[:, None] - q_lens[:, None] + arange_q
        allowed = key_pos[None, None, :] <= q_pos[:, :, None]
        q_valid = arange_q[None, :] < q_lens[:, None]
        mask = torch.where(q_valid[:, :, None], allowed, key_pos[None, None, :] == 0)  # [b, max_q, L]
        group = dict(t0=t0, t1=t1, seqs=b1 - b0, max_q=max_q, seq_of_token=seq_of_token,
                     idx_in_seq=idx_in_seq, mask=mask, from_scratch=from_scratch)
        if not from_scratch:
            bs = attn.block_size
            tables = attn.block_tables[b0:b1].long()
            group["kv_index"] = (tables[:, key_pos // bs] * bs + key_pos % bs).reshape(-1)
        return group

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 attn: AttentionMeta) -> None:
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, attn.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, attn.slot_mapping, v)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                  attn: AttentionMeta, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [T, Hq, D]`` over the cache; ``k``/``v`` are this step's new keys and values
        (already stored), used directly when a group has no cached context."""
        out = torch.empty_like(q)
        for g in attn.extra["groups"]:  # at most three, fixed by the batch layout
            out[g["t0"]:g["t1"]] = self._attend_group(q, k, v, k_cache, v_cache, scale, g)
        return out

    def _attend_group(self, q, k, v, k_cache, v_cache, scale: float, g: dict) -> torch.Tensor:
        """Attention of one group as batched GEMMs over (KV head, sequence) pairs."""
        Hkv, D = k_cache.shape[2:]
        G = q.shape[1] // Hkv
        B, M = g["seqs"], g["max_q"]
        sl = slice(g["t0"], g["t1"])
        where = (g["seq_of_token"], g["idx_in_seq"])
        keys, values = (self._kv_heads_first(new[sl], cache, g, name) for new, cache, name in
                        ((k, k_cache, "k"), (v, v_cache, "v")))
        # Query heads of one KV head are folded into the query axis: [Hkv * B, G * M, D].
        q_pad = q.new_zeros(B, M, Hkv, G, D).index_put_(where, q[sl].view(-1, Hkv, G, D))
        q_pad = q_pad.permute(2, 0, 3, 1, 4).reshape(Hkv * B, G * M, D)
        if M == 1:  # decodes: two small GEMMs beat SDPA's CPU kernel on one query row
            scores = torch.bmm(q_pad, keys.transpose(1, 2)).float() * scale
            scores.view(Hkv, B, G, -1).masked_fill_(~g["mask"][None], float("-inf"))
            o = torch.bmm(scores.softmax(dim=-1).to(q.dtype), values)      # [Hkv * B, G, D]
        else:
            mask = g["mask"][:, None].expand(B, G, M, -1).reshape(1, B, G * M, -1)
            o = F.scaled_dot_product_attention(q_pad.view(Hkv, B, G * M, D), keys.view(Hkv, B, -1, D),
                                               values.view(Hkv, B, -1, D), attn_mask=mask, scale=scale)
        o = o.view(Hkv, B, G, M, D).permute(1, 3, 0, 2, 4)                  # [B, M, Hkv, G, D]
        return o[where].reshape(-1, Hkv * G, D)

    def _kv_heads_first(self, new: torch.Tensor, cache: torch.Tensor, g: dict, name: str) -> torch.Tensor:
        """The group's keys (or values) as ``[Hkv * B, L, D]``: from the new tokens when the group
        has no cached context, else gathered from the paged cache into reused buffers."""
        Hkv, D = cache.shape[2:]
        B = g["seqs"]
        if g["from_scratch"]:
            padded = new.new_zeros(B, g["max_q"], Hkv, D).index_put_((g["seq_of_token"], g["idx_in_seq"]), new)
            return padded.permute(2, 0, 1, 3).reshape(Hkv * B, g["max_q"], D)
        n = g["kv_index"].shape[0]
        heads_first = self._buffer(name, (Hkv, n, D), cache)
        flat = cache.view(-1, Hkv, D)
        for h in range(Hkv):  # one gather per KV head, straight into the heads-first layout
            torch.index_select(flat[:, h], 0, g["kv_index"], out=heads_first[h])
        return heads_first.view(Hkv * B, n // B, D)

    def _lora_tiles(self, lora: LoRAMeta) -> dict:
        """Tiles of <= LORA_TILE tokens of one adapter each: token indices padded with the tile's
        first token (the duplicates are dropped after the bmm), and each tile's slot."""
        keep = lora.seg_slots_host >= 0
        a, b = lora.seg_starts_host[:-1][keep], lora.seg_starts_host[1:][keep]
        n_tiles = -(-(b - a) // self.LORA_TILE)
        seg = np.repeat(np.arange(len(a)), n_tiles)
        k = np.arange(len(seg)) - np.repeat(np.cumsum(n_tiles) - n_tiles, n_tiles)
        first = a[seg] + k * self.LORA_TILE
        length = np.minimum(first + self.LORA_TILE, b[seg]) - first
        offs = np.arange(int(length.max()))
        valid = offs[None, :] < length[:, None]
        index = np.where(valid, first[:, None] + offs[None, :], first[:, None])
        dev = lora.seg_starts.device
        return {"tile_index": torch.from_numpy(index.reshape(-1).astype(np.int64)).to(dev),
                "tile_valid": torch.from_numpy(np.flatnonzero(valid.reshape(-1))).to(dev),
                "tile_slots": torch.from_numpy(lora.seg_slots_host[keep][seg].astype(np.int64)).to(dev),
                "tile_shape": (len(seg), len(offs))}

    def apply_lora(self, x: torch.Tensor, y: torch.Tensor, mod, lora: LoRAMeta) -> None:
        ex, r = lora.extra, lora.max_rank
        n_tiles, width = ex["tile_shape"]
        slots, valid = ex["tile_slots"], ex["tile_valid"]
        S, n, R = mod.lora_a.shape[0], mod.n_slices, mod.max_rank
        xt = x.index_select(0, ex["tile_index"]).view(n_tiles, width, -1)
        a = mod.lora_a.view(S, n, R, -1)[slots, :, :r].reshape(n_tiles, n * r, -1)
        u = torch.bmm(xt, a.transpose(1, 2)) * mod.scaling[slots].to(x.dtype)[:, None, None]
        rows = ex["tile_index"].index_select(0, valid)
        for j in range(n):
            sl = slice(mod.offsets[j], mod.offsets[j + 1])
            b = mod.lora_b[slots, sl, :r]
            delta = torch.bmm(u[:, :, j * r:(j + 1) * r], b.transpose(1, 2)).view(n_tiles * width, -1)
            y[:, sl].index_add_(0, rows, delta.index_select(0, valid))


class TritonBackend(TorchBackend):
    """SGMV LoRA and paged attention through the Triton kernels in ``mcl_runtime.kernels``."""

    name = "triton"

    def __init__(self) -> None:
        super().__init__()
        from mcl_runtime import kernels
        self.k = kernels

    def prepare(self, attn: AttentionMeta, lora: LoRAMeta | None) -> None:
        pass

    def store_kv(self, k, v, k_cache, v_cache, attn: AttentionMeta) -> None:
        self.k.store_kv(k, v, k_cache, v_cache, attn.slot_mapping)

    def attention(self, q, k_cache, v_cache, scale: float, attn: AttentionMeta, k=None, v=None) -> torch.Tensor:
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
