"""The kernels as torch custom ops (``torch.ops.mcl.*``), each with a fake implementation.

``torch.compile(fullgraph=True)`` cannot trace into a Triton launch wrapper (host-side planning,
checks, workspace sizing), but it can keep an opaque custom op in its graph: the fake
implementation tells it the outputs' shapes and which arguments are written in place. Semantics
and shapes are those of the wrapped functions in ``lora.py`` and ``attention.py``.

Inside an op the wrapper still plans its launch on the host (``lora_shrink`` picks ``split_k`` and
allocates its partial sums when given none), which is what traced code cannot do itself.
Eager code calls the wrappers directly (it needs no tracing, so it skips the dispatcher's per-call work);
the Triton backend switches to these ops while dynamo traces.
"""

from __future__ import annotations

import torch

from .attention import paged_decode_attention, paged_prefill_attention, store_kv
from .lora import lora_expand, lora_shrink


@torch.library.custom_op("mcl::lora_shrink", mutates_args=("out", "partials"))
def lora_shrink_op(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    max_seg_len: int,
    out: torch.Tensor,
    split_k: int | None = None,
    partials: torch.Tensor | None = None,
) -> None:
    lora_shrink(x, lora_a, seg_starts, seg_slots, ranks, max_seg_len, out=out, split_k=split_k, partials=partials)


@lora_shrink_op.register_fake
def _(x, lora_a, seg_starts, seg_slots, ranks, max_seg_len, out, split_k=None, partials=None) -> None:
    return None


@torch.library.custom_op("mcl::lora_expand", mutates_args=("y",))
def lora_expand_op(
    u: torch.Tensor,
    lora_b: torch.Tensor,
    y: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    scaling: torch.Tensor,
    slice_offsets: list[int],
    max_seg_len: int,
) -> None:
    lora_expand(u, lora_b, y, seg_starts, seg_slots, ranks, scaling, slice_offsets, max_seg_len)


@lora_expand_op.register_fake
def _(u, lora_b, y, seg_starts, seg_slots, ranks, scaling, slice_offsets, max_seg_len) -> None:
    return None


@torch.library.custom_op("mcl::store_kv", mutates_args=("k_cache", "v_cache"))
def store_kv_op(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    store_kv(k, v, k_cache, v_cache, slot_mapping)


@store_kv_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping) -> None:
    return None


@torch.library.custom_op("mcl::paged_decode_attention", mutates_args=())
def paged_decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int,
) -> torch.Tensor:
    return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len)


@paged_decode_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len) -> torch.Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("mcl::paged_prefill_attention", mutates_args=())
def paged_prefill_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_q_len: int,
) -> torch.Tensor:
    return paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_q_len)


@paged_prefill_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_q_len) -> torch.Tensor:
    return torch.empty_like(q)
