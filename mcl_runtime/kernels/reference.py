"""Plain torch references for the Triton kernels (same signatures and semantics).

They loop over segments / sequences on the host and are meant for tests and debugging, not for
speed (the reference backend, ``mcl_runtime/model/reference_backend.py``, runs whole steps). LoRA
references compute in the inputs' dtype (pass fp32 copies for an fp32 reference); attention
references compute in ``compute_dtype`` (default float32) with the softmax always in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lora_shrink_ref(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    max_seg_len: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``u[s[i]:s[i+1], jR:jR+r] = x[s[i]:s[i+1]] @ A[w, jR:jR+r].T`` (products in x's dtype),
    zero beyond the rank; returns u [T, n_slices*R] float32. ``max_seg_len`` is unused."""
    T = x.shape[0]
    n_slices = ranks.shape[1]
    R = lora_a.shape[1] // n_slices
    if out is None:
        out = torch.zeros((T, n_slices * R), dtype=torch.float32, device=x.device)
    starts = seg_starts.tolist()
    rank_table = ranks.tolist()
    for i, w in enumerate(seg_slots.tolist()):
        lo, hi = starts[i], starts[i + 1]
        if w < 0 or hi <= lo:
            continue
        for j in range(n_slices):
            r = rank_table[w][j]
            out[lo:hi, j * R : (j + 1) * R] = 0
            if r > 0:
                out[lo:hi, j * R : j * R + r] = (x[lo:hi] @ lora_a[w, j * R : j * R + r].T).float()
    return out


def lora_expand_ref(
    u: torch.Tensor,
    lora_b: torch.Tensor,
    y: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    scaling: torch.Tensor,
    slice_offsets: Sequence[int],
    max_seg_len: int = 0,
) -> None:
    """``y[s[i]:s[i+1], off_j:off_{j+1}] += scaling[w] * u[.., jR:jR+r] @ B[w, off_j:off_{j+1}, :r].T``
    in y's dtype (u is cast to it first), in place. ``max_seg_len`` is unused."""
    n_slices = ranks.shape[1]
    R = lora_b.shape[2]
    starts = seg_starts.tolist()
    rank_table = ranks.tolist()
    scales = scaling.tolist()
    for i, w in enumerate(seg_slots.tolist()):
        lo, hi = starts[i], starts[i + 1]
        if w < 0 or hi <= lo:
            continue
        for j in range(n_slices):
            r = rank_table[w][j]
            n0, n1 = slice_offsets[j], slice_offsets[j + 1]
            if r == 0 or n1 == n0:
                continue
            delta = u[lo:hi, j * R : j * R + r].to(y.dtype) @ lora_b[w, n0:n1, :r].T
            y[lo:hi, n0:n1] += scales[w] * delta


def lora_apply_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    scaling: torch.Tensor,
    slice_offsets: Sequence[int],
    max_seg_len: int = 0,
    buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """``lora_shrink_ref`` then ``lora_expand_ref``; y updated in place and returned."""
    u = lora_shrink_ref(x, lora_a, seg_starts, seg_slots, ranks, max_seg_len, out=buffer)
    lora_expand_ref(u, lora_b, y, seg_starts, seg_slots, ranks, scaling, slice_offsets)
    return y


def _gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, ctx: int) -> torch.Tensor:
    block_size = cache.shape[1]
    nblocks = -(-ctx // block_size)
    blocks = cache[block_table_row[:nblocks].long()]
    return blocks.reshape(nblocks * block_size, *cache.shape[2:])[:ctx]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float, compute_dtype: torch.dtype
) -> torch.Tensor:
    """q [L, Hq, D] at positions q_pos [L] over k, v [ctx, Hkv, D]; causal (key t <= q_pos)."""
    group = q.shape[1] // k.shape[1]
    k = k.to(compute_dtype).repeat_interleave(group, dim=1)
    v = v.to(compute_dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("lhd,khd->hlk", q.to(compute_dtype), k).float() * scale
    keys = torch.arange(k.shape[0], device=q.device)
    visible = keys[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("hlk,khd->lhd", probs.to(compute_dtype), v).to(q.dtype)


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Token t goes to block ``slot_mapping[t] // block_size``, offset ``% block_size``."""
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        k_cache[slot // block_size, slot % block_size] = k[t]
        v_cache[slot // block_size, slot % block_size] = v[t]


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_q_len: int = 0,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cache (see paged_prefill_attention).
    Rows of q not covered by cu_seqlens_q are zero."""
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    ctxs = context_lens.tolist()
    for b, ctx in enumerate(ctxs):
        lo, hi = cu[b], cu[b + 1]
        if hi <= lo or ctx <= 0:
            continue
        k = _gather_kv(k_cache, block_tables[b], ctx)
        v = _gather_kv(v_cache, block_tables[b], ctx)
        q_pos = torch.arange(ctx - (hi - lo), ctx, device=q.device)
        out[lo:hi] = _attend(q[lo:hi], k, v, q_pos, scale, compute_dtype)
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int = 0,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One query per sequence at position context_lens[b] - 1 over keys 0..context_lens[b]-1."""
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_prefill_attention_ref(
        q, k_cache, v_cache, block_tables, cu, context_lens, scale, 1, compute_dtype=compute_dtype
    )
