"""The torch backend: plain torch, no Python loop over requests or adapters (the CPU path and
the reference the Triton backend is tested against)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mcl_runtime.kernels import HAS_CPU_ATTENTION, LoRAWeightsCPU, PagedAttentionCPU, lora_apply_cpu, use_cpu_layer_ops
from mcl_runtime.kernels.cpu import paged_attention_cpu_op
from mcl_runtime.model.backends import AttentionMeta, LoRAMeta


class TorchBackend:
    """Plain torch, no Python loop over requests or adapters.

    Attention: on the CPU with at most ``KERNEL_MAX_THREADS`` torch threads, the decodes and the
    small prefill groups go to the C++ kernel ``paged_attention_cpu`` (on torch's threads), which
    reads the paged cache in place. ``cpu_attention``: None for that rule, True for the kernel at
    any thread count, False for never (always False without the C++ extension). Static steps on the
    CPU (the compiled decode) always use it, as the custom op ``torch.ops.mcl.paged_attention_cpu``:
    it reads each sequence's context length from the tensor, so the bucket's shapes need no mask
    over the table. The rest form padded groups of one kind each (decodes; prompts without cached
    context; prefill chunks with cached context); decodes, and prompts, of spread-out lengths are
    split into up to three groups of similar length, each naming its rows, so that less padding is
    gathered and multiplied. Keys come from the paged cache through ``index_select`` into reused
    buffers; prompts attend to their own new keys through SDPA's causal path. The query heads
    sharing a KV head are folded into the query-length axis (prompts: SDPA's ``enable_gqa``), so
    K/V are never repeated for GQA.
    LoRA: on the CPU (eager steps) one call of the C++ kernel ``lora_apply_cpu`` per projection
    covers every adapter segment (``cpu_lora=False``: never). Otherwise tokens of each adapter segment
    are cut into tiles of at most ``LORA_TILE`` tokens; one gather + ``bmm`` per projection covers
    every tile of every adapter (punica's "gather + bmm").
    Static steps (``attn.static``, the compiled decode) keep every shape fixed by the bucket: the
    decodes attend through the kernel or, without it, over the whole block-table width under a
    mask, and each token is its own LoRA tile (base rows get gain 0), so nothing sized by a
    per-step host value enters the graph.
    """

    name = "torch"
    LORA_TILE = 128
    # Up to this many torch threads the kernel measured faster than the padded path
    # (bench_engine_cpu.py, 2 cores: each round runs both); beyond, the padded path is kept (not measured).
    KERNEL_MAX_THREADS = 2

    def __init__(self, cpu_attention: bool | None = None, cpu_lora: bool = True) -> None:
        self.cpu_attention = cpu_attention if HAS_CPU_ATTENTION else False
        self.cpu_lora = cpu_lora
        # Reused gather buffers: on CPU a fresh multi-MB tensor per layer costs more in page
        # faults than the gather itself.
        self._workspace: dict[str, torch.Tensor] = {}
        self._tiles_key: tuple[bytes, bytes] | None = None  # the last step's LoRA segments and their tiles
        self._cpu_weights: dict[int, LoRAWeightsCPU] = {}  # per LinearWithLoRA (by id; it holds the tensors)
        self._tiles: dict = {}

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = int(np.prod(shape))
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            grown = max(numel, int(buf.numel() * 1.5) if buf is not None else 0)  # contexts grow every step
            buf = self._workspace[name] = torch.empty(grown, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)

    def prepare(self, attn: AttentionMeta, lora: LoRAMeta | None) -> None:
        kernel = (
            self.cpu_attention is not False
            and attn.context_lens.device.type == "cpu"
            and (attn.static or self.cpu_attention or torch.get_num_threads() <= self.KERNEL_MAX_THREADS)
        )
        attn.extra["groups"] = self._kernel_groups(attn) if kernel else self._padded_groups(attn)
        if lora is not None and lora.token_slots is None and not self._lora_kernel(attn.context_lens):
            key = (lora.seg_starts_host.tobytes(), lora.seg_slots_host.tobytes())
            if self._tiles_key != key:  # decode steps over the same sequences keep their segments
                self._tiles_key, self._tiles = key, self._lora_tiles(lora)
            lora.extra.update(self._tiles)

    def _padded_groups(self, attn: AttentionMeta) -> list[dict]:
        bounds = attn.group_bounds
        parts = None if attn.static else self._split(attn.context_lens_host[: bounds[1]], power=1)
        groups = [self._decode_group(attn, part) for part in parts] if parts else []
        first = 1 if parts else 0
        return groups + [
            g for b0, b1 in zip(bounds[first:], bounds[first + 1 :]) for g in self._groups_of(attn, b0, b1)
        ]

    # Prefill groups of at most this many padded (query, key) pairs go to the kernel too: there the
    # padded path's dozen ops cost more than the arithmetic.
    PADDED_SMALL = 1 << 16

    def _kernel_groups(self, attn: AttentionMeta) -> list[dict]:
        """The decodes and each small prefill group through the C++ kernel (one call per run of
        consecutive such sequences); the other prefill groups padded."""
        bounds, groups, lo = attn.group_bounds, [], 0
        for i, (b0, b1) in enumerate(zip(bounds, bounds[1:])):
            if i == 0 or self._small(attn, b0, b1):
                continue
            if lo < b0:
                groups.append(self._kernel_group(attn, lo, b0))
            groups += self._groups_of(attn, b0, b1)
            lo = b1
        if lo < bounds[-1]:
            groups.append(self._kernel_group(attn, lo, bounds[-1]))
        return groups

    @classmethod
    def _small(cls, attn: AttentionMeta, b0: int, b1: int) -> bool:
        if b0 == b1:
            return True
        q = np.diff(attn.cu_seqlens_q_host[b0 : b1 + 1])
        ctx = attn.context_lens_host[b0:b1]
        max_q = int(q.max())
        return (b1 - b0) * max_q * (max_q if (q == ctx).all() else int(ctx.max())) <= cls.PADDED_SMALL

    @staticmethod
    def _kernel_group(attn: AttentionMeta, b0: int, b1: int) -> dict:
        """Sequences ``b0:b1`` through the kernel: its metadata checked once per step (``kernel``),
        the tensors for the compiled graph's custom op."""
        tables, ctx, cu = attn.block_tables[b0:b1], attn.context_lens[b0:b1], attn.cu_seqlens_q[b0 : b1 + 1]
        return dict(
            kernel=PagedAttentionCPU(tables, cu, ctx, attn.block_size),
            threads=torch.get_num_threads(),
            block_tables=tables,
            context_lens=ctx,
            cu_seqlens_q=cu,
        )

    def _groups_of(self, attn: AttentionMeta, b0: int, b1: int) -> list[dict]:
        """Sequences ``b0:b1`` of one kind (contiguous tokens) as one padded group, or, when they are
        prompts without cached context of spread-out lengths, as two or three groups by length."""
        q_lens = np.diff(attn.cu_seqlens_q_host[b0 : b1 + 1])
        if not attn.static and len(q_lens) > 1 and (q_lens == attn.context_lens_host[b0:b1]).all():
            parts = self._split(q_lens, power=2)
            if parts:
                return [self._prompt_group(attn, b0 + part) for part in parts]
        group = self._group(attn, b0, b1)
        return [group] if group else []

    @staticmethod
    def _group(attn: AttentionMeta, b0: int, b1: int) -> dict | None:
        """Padded-attention metadata for sequences ``b0:b1`` (their tokens are contiguous)."""
        if b0 == b1:
            return None
        dev = attn.context_lens.device
        cu_h = attn.cu_seqlens_q_host
        q_lens_h, ctx_h = np.diff(cu_h[b0 : b1 + 1]), attn.context_lens_host[b0:b1]
        max_q = int(q_lens_h.max())
        from_scratch = not attn.static and bool((q_lens_h == ctx_h).all())
        bs = attn.block_size
        if attn.static:
            L = attn.block_tables.shape[1] * bs
        else:
            L = max_q if from_scratch else int(ctx_h.max())
        t0, t1 = int(cu_h[b0]), int(cu_h[b1])
        ctx = attn.context_lens[b0:b1]
        group = dict(t0=t0, t1=t1, seqs=b1 - b0, max_q=max_q, from_scratch=from_scratch)
        if max_q == 1:  # decodes: one query row per sequence, at position ctx - 1
            group["masked"] = _decode_mask(ctx, L)
        else:
            cu = attn.cu_seqlens_q[b0 : b1 + 1].long()
            q_lens = cu[1:] - cu[:-1]
            seq_of_token = torch.repeat_interleave(torch.arange(b1 - b0, device=dev), q_lens, output_size=t1 - t0)
            idx_in_seq = torch.arange(t0, t1, device=dev) - cu[:-1][seq_of_token]
            group.update(seq_of_token=seq_of_token, idx_in_seq=idx_in_seq)
        if max_q > 1 and not from_scratch:  # chunks after cached context: query i at position ctx - q_len + i
            key_pos, arange_q = torch.arange(L, device=dev), torch.arange(max_q, device=dev)
            allowed = key_pos[None, None, :] <= (ctx.long()[:, None] - q_lens[:, None] + arange_q)[:, :, None]
            q_valid = arange_q[None, :] < q_lens[:, None]
            group["mask"] = torch.where(q_valid[:, :, None], allowed, key_pos[None, None, :] == 0)  # [b, max_q, L]
        if not from_scratch:
            group["kv_index"] = _kv_index(attn.block_tables[b0:b1], L, bs)
        return group

    # Decodes (prompts) are split by length when that leaves at most SPLIT_GAIN of the padded work.
    SPLIT_GAIN = 0.8

    @classmethod
    def _split(cls, lengths: np.ndarray, power: int) -> list[np.ndarray] | None:
        """Indices of ``lengths`` as two or three sets of similar length, or None when one padded
        group costs little more. A set's cost: its size times its longest length to ``power``
        (decodes: 1, the keys gathered and multiplied; prompts under the causal mask: 2)."""
        if len(lengths) < 2 or lengths.max() <= 1:
            return None
        order = np.argsort(lengths, kind="stable")
        cost = lambda parts: sum(len(p) * int(lengths[p[-1]]) ** power for p in parts)  # noqa: E731
        parts = min((np.array_split(order, k) for k in range(2, min(3, len(lengths)) + 1)), key=cost)
        if cost(parts) > cls.SPLIT_GAIN * len(lengths) * int(lengths.max()) ** power:
            return None
        return [np.sort(p) for p in parts]

    @staticmethod
    def _decode_group(attn: AttentionMeta, seqs: np.ndarray) -> dict:
        """Padded-attention metadata for the decodes ``seqs`` (token ``i`` is sequence ``i``'s)."""
        dev = attn.context_lens.device
        rows = torch.from_numpy(seqs.astype(np.int64)).to(dev)
        L = int(attn.context_lens_host[seqs].max())
        ctx = attn.context_lens.index_select(0, rows)
        return dict(
            rows=rows,
            seqs=len(seqs),
            max_q=1,
            from_scratch=False,
            masked=_decode_mask(ctx, L),
            kv_index=_kv_index(attn.block_tables.index_select(0, rows), L, attn.block_size),
        )

    @staticmethod
    def _prompt_group(attn: AttentionMeta, seqs: np.ndarray) -> dict:
        """Padded-attention metadata for the prompts ``seqs`` (no cached context): their tokens
        (``rows``), each token's sequence in the group and its index in that sequence."""
        cu = attn.cu_seqlens_q_host
        q_lens = cu[seqs + 1] - cu[seqs]
        seq_of_token = np.repeat(np.arange(len(seqs)), q_lens)
        idx_in_seq = np.arange(len(seq_of_token)) - np.repeat(np.cumsum(q_lens) - q_lens, q_lens)
        dev = attn.context_lens.device
        index = lambda a: torch.from_numpy(a.astype(np.int64)).to(dev)  # noqa: E731
        return dict(
            rows=index(cu[seqs][seq_of_token] + idx_in_seq),
            seqs=len(seqs),
            max_q=int(q_lens.max()),
            from_scratch=True,
            seq_of_token=index(seq_of_token),
            idx_in_seq=index(idx_in_seq),
        )

    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, attn: AttentionMeta
    ) -> None:
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, attn.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, attn.slot_mapping, v)

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
        """``q [T, Hq, D]`` over the cache; ``k``/``v`` are this step's new keys and values
        (already stored), used directly when a group has no cached context."""
        groups = attn.extra["groups"]  # at most five: decodes (up to three), two kinds of prefill
        if torch.compiler.is_compiling() and "kernel" in groups[0]:  # a static step: one group
            g = groups[0]
            return paged_attention_cpu_op(
                q, k_cache, v_cache, g["block_tables"], g["cu_seqlens_q"], g["context_lens"], scale
            )
        if len(groups) == 1 and "rows" not in groups[0] and "kernel" not in groups[0]:
            return self._attend_group(q, k, v, k_cache, v_cache, scale, groups[0])
        out = torch.empty_like(q)
        for g in groups:
            if "kernel" in g:
                g["kernel"](q, k_cache, v_cache, scale, out=out, num_threads=g["threads"])
                continue
            o = self._attend_group(q, k, v, k_cache, v_cache, scale, g)
            if "rows" in g:
                out.index_copy_(0, g["rows"], o)
            else:
                out[g["t0"] : g["t1"]] = o
        return out

    def _attend_group(self, q, k, v, k_cache, v_cache, scale: float, g: dict) -> torch.Tensor:
        """Attention of one group as batched GEMMs over (KV head, sequence) pairs."""
        if g["from_scratch"] and g["max_q"] > 1:
            return self._attend_prompts(q, k, v, scale, g)
        Hkv, D = k_cache.shape[2:]
        G = q.shape[1] // Hkv
        B, M = g["seqs"], g["max_q"]
        keys, values = (
            self._kv_heads_first(new, cache, g, name) for new, cache, name in ((k, k_cache, "k"), (v, v_cache, "v"))
        )
        q = q.index_select(0, g["rows"]) if "rows" in g else q[g["t0"] : g["t1"]]
        if M == 1:  # decodes: two small GEMMs beat SDPA's CPU kernel on one query row
            q_heads = q.view(B, Hkv, G, D).transpose(0, 1).reshape(Hkv * B, G, D)
            scores = torch.bmm(q_heads, keys.transpose(1, 2)).float().mul_(scale)
            scores.view(Hkv, B, G, -1).masked_fill_(g["masked"], float("-inf"))
            o = torch.bmm(scores.softmax(dim=-1).to(q.dtype), values)  # [Hkv * B, G, D]
            return o.view(Hkv, B, G, D).transpose(0, 1).reshape(B, Hkv * G, D)
        where = (g["seq_of_token"], g["idx_in_seq"])
        # Query heads of one KV head are folded into the query axis: [Hkv * B, G * M, D].
        q_pad = q.new_zeros(B, M, Hkv, G, D).index_put_(where, q.view(-1, Hkv, G, D))
        q_pad = q_pad.permute(2, 0, 3, 1, 4).reshape(Hkv * B, G * M, D)
        mask = g["mask"][:, None].expand(B, G, M, -1).reshape(1, B, G * M, -1)
        o = F.scaled_dot_product_attention(
            q_pad.view(Hkv, B, G * M, D),
            keys.view(Hkv, B, -1, D),
            values.view(Hkv, B, -1, D),
            attn_mask=mask,
            scale=scale,
        )
        o = o.view(Hkv, B, G, M, D).permute(1, 3, 0, 2, 4)  # [B, M, Hkv, G, D]
        return o[where].reshape(-1, Hkv * G, D)

    @staticmethod
    def _attend_prompts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, g: dict) -> torch.Tensor:
        """Attention of prompts without cached context, right-padded to the longest: under the causal
        mask a real query never sees a padding key (each lies past every real query of its sequence),
        so SDPA needs no mask and skips the keys above the diagonal."""
        where = (g["seq_of_token"], g["idx_in_seq"])

        def padded(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [B, H, max_q, D]
            x = x.index_select(0, g["rows"]) if "rows" in g else x[g["t0"] : g["t1"]]
            return x.new_zeros(g["seqs"], g["max_q"], *x.shape[1:]).index_put_(where, x).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            padded(q), padded(k), padded(v), is_causal=True, scale=scale, enable_gqa=True
        )
        return o.transpose(1, 2)[where]

    def _kv_heads_first(self, new: torch.Tensor, cache: torch.Tensor, g: dict, name: str) -> torch.Tensor:
        """The group's keys (or values) as ``[Hkv * B, L, D]``: from the step's new ones (``new``) when
        the group has no cached context, else gathered from the paged cache into reused buffers."""
        Hkv, D = cache.shape[2:]
        B = g["seqs"]
        if g["from_scratch"]:  # one-token prompts (longer ones: _attend_prompts)
            return new[g["t0"] : g["t1"]].transpose(0, 1).reshape(Hkv * B, 1, D)
        n = g["kv_index"].shape[0]
        flat = cache.view(-1, Hkv, D)
        if torch.compiler.is_compiling():  # Inductor plans a compiled graph's memory itself
            return flat.index_select(0, g["kv_index"]).transpose(0, 1).reshape(Hkv * B, n // B, D)
        heads_first = self._buffer(name, (Hkv, n, D), cache)
        for h in range(Hkv):  # one gather per KV head, straight into the heads-first layout
            torch.index_select(flat[:, h], 0, g["kv_index"], out=heads_first[h])
        return heads_first.view(Hkv * B, n // B, D)

    def _lora_tiles(self, lora: LoRAMeta) -> dict:
        """Tiles of <= LORA_TILE tokens of one adapter each: token indices padded with the tile's
        first token, a 0/1 weight per entry (0 on the padding, whose delta then adds nothing), and
        each tile's slot: a slice when the tiles' slots are consecutive (one tile per adapter, in
        slot order: the weights are then a view, not a gather)."""
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
        slots = lora.seg_slots_host[keep][seg].astype(np.int64)
        consecutive = bool((np.diff(slots) == 1).all())
        return {
            "tile_index": torch.from_numpy(index.reshape(-1).astype(np.int64)).to(dev),
            "tile_weight": None if valid.all() else torch.from_numpy(valid[:, :, None].astype(np.float32)).to(dev),
            "tile_slots": slice(int(slots[0]), int(slots[-1]) + 1) if consecutive else torch.from_numpy(slots).to(dev),
            "tile_shape": (len(seg), len(offs)),
        }

    def _lora_kernel(self, t: torch.Tensor) -> bool:
        """Eager CPU inference uses the C++ kernel (one call per projection) where it is built."""
        return self.cpu_lora and use_cpu_layer_ops(t)

    def _lora_weights(self, mod) -> LoRAWeightsCPU:
        """``mod``'s LoRA buffers as the CPU kernel reads them, converted once per buffer tensor."""
        weights = self._cpu_weights.get(id(mod))
        if weights is None or not weights.matches(mod.lora_a, mod.lora_b, mod.scaling, mod.ranks):
            weights = self._cpu_weights[id(mod)] = LoRAWeightsCPU(
                mod.lora_a, mod.lora_b, mod.scaling, mod.ranks, mod.offsets
            )
        return weights

    def apply_lora(self, x: torch.Tensor, y: torch.Tensor, mod, lora: LoRAMeta) -> None:
        """``y[t] += scaling[s] * x[t] @ A[s].T @ B[s].T`` with ``s`` the slot of token ``t``: on the
        CPU one kernel call over the segments, else one gather + ``bmm`` per tile:
        ``y[tile_index] += w * x[tile_index] @ A[slot].T @ B[slot].T``."""
        if lora.token_slots is None and self._lora_kernel(x):
            lora_apply_cpu(
                x, y, self._lora_weights(mod), lora.seg_starts_host, lora.seg_slots_host, torch.get_num_threads()
            )
            return
        if lora.token_slots is not None:  # static step: one tile per token, base rows with gain 0
            slots = lora.token_slots.clamp(min=0).long()
            weight = (lora.token_slots >= 0).to(torch.float32)[:, None, None]
            y += self._lora_delta(x[:, None], slots, weight, mod.max_rank, mod).view(y.shape)
            return
        ex = lora.extra
        n_tiles, width = ex["tile_shape"]
        xt = x.index_select(0, ex["tile_index"]).view(n_tiles, width, -1)
        delta = self._lora_delta(xt, ex["tile_slots"], ex["tile_weight"], lora.max_rank, mod)
        y.index_add_(0, ex["tile_index"], delta.view(n_tiles * width, -1))

    @staticmethod
    def _lora_delta(
        xt: torch.Tensor, slots: torch.Tensor | slice, weight: torch.Tensor | None, r: int, mod
    ) -> torch.Tensor:
        """``scaling[slot] * weight * xt @ A[slot].T @ B[slot].T`` as ``[tiles, width, out]`` for tiles
        ``xt [tiles, width, in]`` of adapter ``slots [tiles]`` (or a slice of consecutive slots), each
        slice's rank cut at ``r``."""
        n, R = mod.n_slices, mod.max_rank
        pick = (lambda t: t[slots]) if isinstance(slots, slice) else (lambda t: t.index_select(0, slots))
        a, b = pick(mod.lora_a), pick(mod.lora_b)
        if r < R:
            a, b = a.view(len(a), n, R, -1)[:, :, :r].reshape(len(a), n * r, -1), b[:, :, :r]
        u = torch.bmm(xt, a.transpose(1, 2))
        scale = pick(mod.scaling).view(-1, 1, 1)  # float32, as the weights
        u.mul_((scale if weight is None else scale * weight).to(xt.dtype))
        b = b.transpose(1, 2)  # [tiles, rank, out]
        if n == 1:
            return torch.bmm(u, b)
        return torch.cat(
            [torch.bmm(u[:, :, j * r : (j + 1) * r], b[:, :, mod.offsets[j] : mod.offsets[j + 1]]) for j in range(n)],
            dim=-1,
        )


def _kv_index(block_tables: torch.Tensor, L: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of the first ``L`` positions of each row's block table, ``[B * L]``."""
    blocks = -(-L // block_size)
    slots = block_tables[:, :blocks].long().mul_(block_size)[:, :, None] + torch.arange(
        block_size, device=block_tables.device
    )
    return slots.view(len(block_tables), blocks * block_size)[:, :L].reshape(-1)


def _decode_mask(ctx: torch.Tensor, L: int) -> torch.Tensor:
    """``[1, B, 1, L]`` True at the key positions past each decode's context ``ctx [B]``."""
    return (torch.arange(L, device=ctx.device)[None, :] >= ctx[:, None])[None, :, None]
