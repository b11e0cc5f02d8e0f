"""Paged attention over the block KV cache (docs/cpu_kernels.md, "Shared layouts").

Cache: ``k_cache``, ``v_cache`` [num_blocks, block_size, Hkv, D]; token ``t`` of sequence ``b`` lives
in block ``block_tables[b, t // block_size]`` at offset ``t % block_size``. ``context_lens[b]``
counts the tokens in the cache after this step, the step's new ones included (written by
``store_kv`` before attention runs). GQA: the ``Hq // Hkv`` query heads of one KV head are rows of
one tile, so each K/V block is read once per group. Softmax statistics and accumulation in fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    cast,
    check_dim,
    check_dtype,
    check_same_device,
    dot_precision,
    interpreting,
    mma,
    num_sms,
)

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    k_cache_ptr,
    v_cache_ptr,
    bt_row_ptr,
    kv_head,
    start,
    hi,
    qk_scale,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One BLOCK_N key tile of ``_attend_tiles``."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_n = start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hi
    page = tl.load(bt_row_ptr + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
    in_page = offs_n % PAGE
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(
        k_cache_ptr
        + (page * stride_kb + in_page * stride_ks + kv_head * stride_kh)[:, None]
        + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    s = mma(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32), PRECISION, INTERPRET) * qk_scale
    visible = n_mask[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= q_pos[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; shift by 0 then so that exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_cache_ptr
        + (page * stride_vb + in_page * stride_vs + kv_head * stride_vh)[:, None]
        + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    acc = mma(cast(p, v.dtype, INTERPRET), v, acc * alpha[:, None], PRECISION, INTERPRET)
    m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_tiles(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    k_cache_ptr,
    v_cache_ptr,
    bt_row_ptr,
    kv_head,
    lo,
    hi,
    qk_scale,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) with keys lo..hi-1 (log2 domain). q [M, BLOCK_D];
    with CAUSAL, row i only sees keys <= q_pos[i]."""
    if INTERPRET:  # the Triton 3.6 interpreter cannot run `range` to a tensor bound
        start = lo
        while start < hi:
            acc, m_i, l_i = _attend_tile(
                acc,
                m_i,
                l_i,
                q,
                q_pos,
                k_cache_ptr,
                v_cache_ptr,
                bt_row_ptr,
                kv_head,
                start,
                hi,
                qk_scale,
                stride_kb,
                stride_ks,
                stride_kh,
                stride_kd,
                stride_vb,
                stride_vs,
                stride_vh,
                stride_vd,
                BLOCK_N,
                PAGE,
                HEAD_DIM,
                BLOCK_D,
                CAUSAL,
                PRECISION,
                INTERPRET,
            )
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc,
                m_i,
                l_i,
                q,
                q_pos,
                k_cache_ptr,
                v_cache_ptr,
                bt_row_ptr,
                kv_head,
                start,
                hi,
                qk_scale,
                stride_kb,
                stride_ks,
                stride_kh,
                stride_kd,
                stride_vb,
                stride_vs,
                stride_vh,
                stride_vd,
                BLOCK_N,
                PAGE,
                HEAD_DIM,
                BLOCK_D,
                CAUSAL,
                PRECISION,
                INTERPRET,
            )
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["num_splits", "tokens_per_split"])
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    bt_ptr,
    ctx_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    qk_scale,
    group,
    num_heads,
    num_splits,
    tokens_per_split,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_od,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    lo = split * tokens_per_split
    hi = tl.minimum(ctx, lo + tokens_per_split)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < group
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * group + offs_g
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc, m_i, l_i = _attend_tiles(
        acc,
        m_i,
        l_i,
        q,
        offs_g,
        k_cache_ptr,
        v_cache_ptr,
        bt_ptr + b.to(tl.int64) * stride_bt,
        kv_head,
        lo,
        hi,
        qk_scale,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_kd,
        stride_vb,
        stride_vs,
        stride_vh,
        stride_vd,
        BLOCK_N,
        PAGE,
        HEAD_DIM,
        BLOCK_D,
        False,
        PRECISION,
        INTERPRET,
    )
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if not SPLIT:
        tl.store(
            out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
            cast(o, out_ptr.dtype.element_ty, INTERPRET),
            mask=g_mask[:, None] & d_mask[None, :],
        )
    else:
        # part_o [B, Hq, num_splits, HEAD_DIM] fp32 (normalised), part_lse [B, Hq, num_splits] (log2).
        row = (b.to(tl.int64) * num_heads + heads) * num_splits + split
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=g_mask[:, None] & d_mask[None, :])
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    num_heads,
    num_splits,
    stride_ob,
    stride_oh,
    stride_od,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    row = (b.to(tl.int64) * num_heads + h) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    parts = tl.load(
        part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0
    )
    denom = tl.sum(w, 0)
    o = tl.sum(w[:, None] * parts, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d * stride_od,
        cast(o, out_ptr.dtype.element_ty, INTERPRET),
        mask=d_mask,
    )


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    bt_ptr,
    cu_q_ptr,
    ctx_ptr,
    out_ptr,
    qk_scale,
    group,
    tok_per_tile,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_od,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    m_tile = tl.program_id(0)
    b = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    tok0 = m_tile * tok_per_tile
    if tok0 < q_len:
        ctx = tl.load(ctx_ptr + b)
        # Rows are (token, head-in-group) pairs: tok_per_tile tokens x group heads.
        rows = tl.arange(0, BLOCK_M)
        tok = tok0 + rows // group
        heads = kv_head * group + rows % group
        row_mask = (rows < tok_per_tile * group) & (tok < q_len)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        io_mask = row_mask[:, None] & d_mask[None, :]
        q_rows = (q_start + tok).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=io_mask,
            other=0.0,
        )
        prefix = ctx - q_len
        q_pos = prefix + tok
        last_pos = prefix + tl.minimum(tok0 + tok_per_tile, q_len) - 1
        hi = tl.minimum(last_pos + 1, ctx)
        # Keys [0, full) are visible to every row of the tile: no causal mask there.
        full = tl.maximum(tl.minimum(((prefix + tok0 + 1) // BLOCK_N) * BLOCK_N, hi), 0)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        acc, m_i, l_i = _attend_tiles(
            acc,
            m_i,
            l_i,
            q,
            q_pos,
            k_cache_ptr,
            v_cache_ptr,
            bt_row,
            kv_head,
            0,
            full,
            qk_scale,
            stride_kb,
            stride_ks,
            stride_kh,
            stride_kd,
            stride_vb,
            stride_vs,
            stride_vh,
            stride_vd,
            BLOCK_N,
            PAGE,
            HEAD_DIM,
            BLOCK_D,
            False,
            PRECISION,
            INTERPRET,
        )
        acc, m_i, l_i = _attend_tiles(
            acc,
            m_i,
            l_i,
            q,
            q_pos,
            k_cache_ptr,
            v_cache_ptr,
            bt_row,
            kv_head,
            full,
            hi,
            qk_scale,
            stride_kb,
            stride_ks,
            stride_kh,
            stride_kd,
            stride_vb,
            stride_vs,
            stride_vh,
            stride_vd,
            BLOCK_N,
            PAGE,
            HEAD_DIM,
            BLOCK_D,
            True,
            PRECISION,
            INTERPRET,
        )
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
            cast(o, out_ptr.dtype.element_ty, INTERPRET),
            mask=io_mask,
        )


def _check_cache(
    name: str,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    num_seqs: int,
) -> tuple[int, int]:
    """Validates the common arguments; returns (group size, block size)."""
    check_dim(name, "q", q, 3)
    check_dim(name, "k_cache", k_cache, 4)
    check_dtype(name, "q", q, FLOAT_DTYPES)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{name}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(
            f"{name}: q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"{name}: q head_dim {q.shape[2]} != cache head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"{name}: query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    check_dtype(name, "block_tables", block_tables, (torch.int32,))
    check_dtype(name, "context_lens", context_lens, (torch.int32,))
    check_dim(name, "block_tables", block_tables, 2)
    if block_tables.shape[0] != num_seqs or tuple(context_lens.shape) != (num_seqs,):
        raise ValueError(
            f"{name}: block_tables [B, M] and context_lens [B] must have B={num_seqs}, got "
            f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )
    if block_tables.stride(1) != 1 or not context_lens.is_contiguous():
        raise ValueError(f"{name}: block_tables rows and context_lens must be contiguous")
    check_same_device(name, q, k_cache, v_cache, block_tables, context_lens)
    return num_heads // num_kv_heads, block_size


def _check_scale(name: str, scale: float, what: str, length: int) -> None:
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{name}: scale must be a finite Python float, got {scale!r}")
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"{name}: {what} must be a non-negative Python int, got {length!r}")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention, one query token per sequence, over its paged cache.

    ``o[b, h] = softmax(scale * q[b, h] @ K_b[:, h // G].T) @ V_b[:, h // G]`` where
    ``K_b = k_cache[block_tables[b, t // bs], t % bs]`` for ``t < context_lens[b]`` (the query is the
    last of those tokens, so no causal mask is needed), G = Hq // Hkv.

    Shapes: q [B, Hq, D], k_cache/v_cache [num_blocks, block_size, Hkv, D] (q's dtype),
    block_tables [B, M] int32, context_lens [B] int32. Returns o [B, Hq, D] in q's dtype;
    a sequence with context 0 gets zeros. ``max_context_len`` (host int, >= every context length)
    sizes the split-KV grid: long contexts are split over ``num_splits`` programs per (sequence,
    KV head) whose partial results a second kernel merges (``num_splits`` None: chosen from the
    device size; 1: no split).
    """
    name = "paged_decode_attention"
    B = q.shape[0] if q.dim() == 3 else -1
    group, page = _check_cache(name, q, k_cache, v_cache, block_tables, context_lens, B)
    _check_scale(name, scale, "max_context_len", max_context_len)
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q)
    if B == 0 or num_heads == 0:
        return out
    interp = interpreting()
    block_n = 16 if interp else 64
    block_d = max(16, triton.next_power_of_2(head_dim))
    max_context_len = max(max_context_len, 1)
    if num_splits is None:
        programs = B * num_kv_heads
        target = 2 * num_sms(q.device)
        min_tokens = 4 * block_n
        num_splits = max(1, min(triton.cdiv(target, programs), triton.cdiv(max_context_len, min_tokens), 64))
    elif not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"{name}: num_splits must be a positive int, got {num_splits!r}")
    tokens_per_split = triton.cdiv(triton.cdiv(max_context_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_context_len, tokens_per_split)
    if num_splits > 1:
        part_o = torch.empty((B, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out
    _paged_decode_kernel[(B, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_o,
        part_lse,
        float(scale) * _LOG2E,
        group,
        num_heads,
        num_splits,
        tokens_per_split,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        *k_cache.stride(),
        *v_cache.stride(),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        PAGE=page,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        SPLIT=num_splits > 1,
        PRECISION=dot_precision(q.dtype),
        INTERPRET=interp,
        num_warps=4,
        num_stages=2,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(B, num_heads)](
            part_o,
            part_lse,
            out,
            num_heads,
            num_splits,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            INTERPRET=interp,
            num_warps=4,
        )
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_q_len: int,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves.

    Sequence b owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` (q_len_b of them, 1 for a
    decode); query i sits at position ``p = context_lens[b] - q_len_b + i`` and
    ``o[row, h] = softmax(scale * q[row, h] @ K_b[:p+1, h // G].T) @ V_b[:p+1, h // G]`` with
    ``K_b``/``V_b`` gathered through ``block_tables[b]`` as in ``paged_decode_attention``.

    Shapes: q [T, Hq, D], k_cache/v_cache [num_blocks, block_size, Hkv, D] (q's dtype),
    block_tables [B, M] int32, cu_seqlens_q [B+1] int32, context_lens [B] int32. Returns
    o [T, Hq, D] in q's dtype; rows not covered by cu_seqlens_q are left uninitialised.
    ``max_q_len`` (host int) must be >= every q_len_b; it sizes the grid.
    """
    name = "paged_prefill_attention"
    check_dtype(name, "cu_seqlens_q", cu_seqlens_q, (torch.int32,))
    check_dim(name, "cu_seqlens_q", cu_seqlens_q, 1)
    B = cu_seqlens_q.shape[0] - 1
    if B < 0 or not cu_seqlens_q.is_contiguous():
        raise ValueError(f"{name}: cu_seqlens_q must be a contiguous [B+1] tensor")
    group, page = _check_cache(name, q, k_cache, v_cache, block_tables, context_lens, B)
    check_same_device(name, q, cu_seqlens_q)
    _check_scale(name, scale, "max_q_len", max_q_len)
    T, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q)
    max_q_len = min(max_q_len, T)
    if B == 0 or max_q_len == 0 or num_heads == 0:
        return out
    interp = interpreting()
    block_m = max(16 if interp else 64, triton.next_power_of_2(group))
    block_n = 16 if interp else 64
    tok_per_tile = block_m // group
    grid = (triton.cdiv(max_q_len, tok_per_tile), B, num_kv_heads)
    _paged_prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        context_lens,
        out,
        float(scale) * _LOG2E,
        group,
        tok_per_tile,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        *k_cache.stride(),
        *v_cache.stride(),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PAGE=page,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PRECISION=dot_precision(q.dtype),
        INTERPRET=interp,
        num_warps=4 if head_dim <= 64 else 8,
        num_stages=2,
    )
    return out


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Writes this step's keys/values into the cache, in place:
    ``k_cache[slot // bs, slot % bs] = k[t]`` (same for v) with ``slot = slot_mapping[t]``.

    Shapes: k, v [T, Hkv, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] (k's dtype, first two
    dims mergeable, e.g. ``kv[l, 0]`` of the engine's cache); slot_mapping [T] int64, every entry a
    valid slot in [0, num_blocks * block_size).
    """
    name = "store_kv"
    check_dim(name, "k", k, 3)
    check_dim(name, "k_cache", k_cache, 4)
    check_dtype(name, "slot_mapping", slot_mapping, (torch.int64,))
    if k.shape != v.shape or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{name}: k/v shapes {tuple(k.shape)}/{tuple(v.shape)} and cache shapes "
            f"{tuple(k_cache.shape)}/{tuple(v_cache.shape)} must match pairwise"
        )
    if tuple(k.shape[1:]) != tuple(k_cache.shape[2:]) or tuple(slot_mapping.shape) != (k.shape[0],):
        raise ValueError(
            f"{name}: expected k [T, Hkv, D] with (Hkv, D) = {tuple(k_cache.shape[2:])} and "
            f"slot_mapping [T], got {tuple(k.shape)} and {tuple(slot_mapping.shape)}"
        )
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise TypeError(f"{name}: k/v dtype ({k.dtype}) must match the cache dtype ({k_cache.dtype})")
    if k.device != k_cache.device or v.device != v_cache.device or slot_mapping.device != k.device:
        raise ValueError(f"{name}: all tensors must be on one device")
    try:
        k_flat = k_cache.view(-1, *k_cache.shape[2:])
        v_flat = v_cache.view(-1, *v_cache.shape[2:])
    except RuntimeError as exc:
        raise ValueError(f"{name}: cache blocks and slots must be mergeable into one dimension ({exc})") from None
    k_flat.index_copy_(0, slot_mapping, k)
    v_flat.index_copy_(0, slot_mapping, v)
