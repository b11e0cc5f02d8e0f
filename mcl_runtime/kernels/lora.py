"""SGMV LoRA kernels (punica-style shrink/expand over contiguous adapter segments).

Layouts (docs/cpu_kernels.md, "Shared layouts"):
  lora_a [S, n_slices * R, H_in]   slice j uses rows j*R:(j+1)*R
  lora_b [S, N_total, R]           slice j writes output columns off_j:off_j+N_j
  ranks [S, n_slices] int32        rank r of slot w for slice j (0: slice not targeted)
  scaling [S] float32
  seg_starts [nseg + 1] int32, seg_slots [nseg] int32 (-1: no adapter)

Padding (rows of A / columns of B beyond a slot's rank) and segments without adapter cost no
memory traffic: tiles past the rank exit early or are masked, and loop bounds come from ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@triton.jit
def _segment_tile(seg_starts_ptr, seg_slots_ptr, seg, m_tile, BLOCK_M: tl.constexpr):
    """(slot, first row, end row) of row tile ``m_tile`` of segment ``seg``."""
    start = tl.load(seg_starts_ptr + seg)
    return tl.load(seg_slots_ptr + seg), start + m_tile * BLOCK_M, tl.load(seg_starts_ptr + seg + 1)


@triton.jit
def _shrink_tile(
    acc,
    x_rows,
    a_cols,
    k0,
    H,
    m_mask,
    r_mask,
    stride_xh,
    stride_ah,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < H
    xt = tl.load(x_rows + offs_k[None, :] * stride_xh, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    at = tl.load(a_cols + offs_k[:, None] * stride_ah, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
    return mma(xt, at, acc, PRECISION, INTERPRET)


@triton.jit(do_not_specialize=["m_tiles", "split_k", "k_per_split"])
def _sgmv_shrink_kernel(
    x_ptr,
    a_ptr,
    out_ptr,
    seg_starts_ptr,
    seg_slots_ptr,
    ranks_ptr,
    H,
    R,
    n_slices,
    m_tiles,
    split_k,
    k_per_split,
    stride_xt,
    stride_xh,
    stride_as,
    stride_ar,
    stride_ah,
    stride_ot,
    stride_oc,
    stride_os,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One (segment, row tile, rank tile) per program along axis 0, (slice, K split) along axis 1.
    With split-K, split s writes its partial sum to ``out + s * stride_os`` (reduced in order by
    ``_sgmv_split_reduce_kernel``, so the result never depends on scheduling)."""
    pid = tl.program_id(0)
    r_tiles = tl.cdiv(R, BLOCK_R)
    seg = pid // (m_tiles * r_tiles)
    m_tile = (pid // r_tiles) % m_tiles
    r_tile = pid % r_tiles
    slice_id = tl.program_id(1) // split_k
    split = tl.program_id(1) % split_k

    slot, row0, end = _segment_tile(seg_starts_ptr, seg_slots_ptr, seg, m_tile, BLOCK_M)
    if (slot >= 0) & (row0 < end):  # empty segments, base rows and tiles past the segment exit here
        rank = tl.load(ranks_ptr + slot * n_slices + slice_id)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_r = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
        m_mask = offs_m < end
        out_ptrs = (
            out_ptr
            + split.to(tl.int64) * stride_os
            + offs_m.to(tl.int64)[:, None] * stride_ot
            + (slice_id * R + offs_r)[None, :] * stride_oc
        )
        out_mask = m_mask[:, None] & (offs_r < R)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if r_tile * BLOCK_R < rank:
            r_mask = offs_r < rank
            k_lo = split * k_per_split
            x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xt
            a_cols = a_ptr + slot.to(tl.int64) * stride_as + (slice_id * R + offs_r)[None, :] * stride_ar
            # The Triton 3.6 interpreter cannot run `range` to a tensor bound: a while loop there.
            if INTERPRET:
                k = 0
                while k < k_per_split:
                    acc = _shrink_tile(
                        acc,
                        x_rows,
                        a_cols,
                        k_lo + k,
                        H,
                        m_mask,
                        r_mask,
                        stride_xh,
                        stride_ah,
                        BLOCK_K,
                        PRECISION,
                        INTERPRET,
                    )
                    k += BLOCK_K
            else:
                for k in range(0, k_per_split, BLOCK_K):
                    acc = _shrink_tile(
                        acc,
                        x_rows,
                        a_cols,
                        k_lo + k,
                        H,
                        m_mask,
                        r_mask,
                        stride_xh,
                        stride_ah,
                        BLOCK_K,
                        PRECISION,
                        INTERPRET,
                    )
        # Columns past the rank are written as zeros, so no buffer ever needs zero-filling.
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit(do_not_specialize=["m_tiles", "split_k"])
def _sgmv_split_reduce_kernel(
    part_ptr,
    out_ptr,
    seg_starts_ptr,
    seg_slots_ptr,
    cols,
    m_tiles,
    split_k,
    stride_ps,
    stride_pt,
    stride_ot,
    stride_oc,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out = sum_s partials[s]`` in the fixed order s = 0, 1, ... over the rows of segments with
    an adapter (the rows the shrink wrote)."""
    seg = tl.program_id(0) // m_tiles
    m_tile = tl.program_id(0) % m_tiles
    slot, row0, end = _segment_tile(seg_starts_ptr, seg_slots_ptr, seg, m_tile, BLOCK_M)
    if (slot >= 0) & (row0 < end):
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (offs_m < end)[:, None] & (offs_c < cols)[None, :]
        rows = offs_m.to(tl.int64)[:, None] * stride_pt + offs_c[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        s = 0
        while s < split_k:  # (not `range`: see _sgmv_shrink_kernel)
            acc += tl.load(part_ptr + s * stride_ps + rows, mask=mask, other=0.0)
            s += 1
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_ot + offs_c[None, :] * stride_oc, acc, mask=mask)


@triton.jit
def _expand_tile(
    acc,
    u_rows,
    b_cols,
    r0,
    rank,
    r_pad,
    m_mask,
    n_mask,
    stride_uc,
    stride_br,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    offs_r = r0 + tl.arange(0, BLOCK_R)
    ut = tl.load(u_rows + offs_r[None, :] * stride_uc, mask=m_mask[:, None] & (offs_r < rank)[None, :], other=0.0)
    bt = tl.load(b_cols + offs_r[:, None] * stride_br, mask=(offs_r < r_pad)[:, None] & n_mask[None, :], other=0.0)
    return mma(cast(ut, b_cols.dtype.element_ty, INTERPRET), bt, acc, PRECISION, INTERPRET)


@triton.jit(do_not_specialize=["m_tiles"])
def _sgmv_expand_kernel(
    u_ptr,
    b_ptr,
    y_ptr,
    seg_starts_ptr,
    seg_slots_ptr,
    ranks_ptr,
    scaling_ptr,
    R,
    n_slices,
    m_tiles,
    n_tiles,
    stride_ut,
    stride_uc,
    stride_bs,
    stride_bn,
    stride_br,
    stride_yt,
    stride_yn,
    SLICE_OFFSETS: tl.constexpr,
    N_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    R_ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = pid // (m_tiles * n_tiles)
    m_tile = (pid // n_tiles) % m_tiles
    n_tile = pid % n_tiles
    slice_id = tl.program_id(1)

    n_lo = 0
    n_hi = 0
    for j in tl.static_range(N_SLICES):
        n_lo = tl.where(slice_id == j, SLICE_OFFSETS[j], n_lo)
        n_hi = tl.where(slice_id == j, SLICE_OFFSETS[j + 1], n_hi)
    col0 = n_lo + n_tile * BLOCK_N

    slot, row0, end = _segment_tile(seg_starts_ptr, seg_slots_ptr, seg, m_tile, BLOCK_M)
    if (slot >= 0) & (row0 < end) & (col0 < n_hi):
        rank = tl.load(ranks_ptr + slot * n_slices + slice_id)
        if rank > 0:
            offs_m = row0 + tl.arange(0, BLOCK_M)
            offs_n = col0 + tl.arange(0, BLOCK_N)
            m_mask = offs_m < end
            n_mask = offs_n < n_hi
            u_rows = u_ptr + offs_m.to(tl.int64)[:, None] * stride_ut + slice_id * R * stride_uc
            b_cols = b_ptr + slot.to(tl.int64) * stride_bs + offs_n[None, :] * stride_bn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # B's tile is masked by the rank rounded up to BLOCK_R (whole 16-element runs, so the
            # loads vectorise); u is masked by the rank itself, so B's padding columns meet zeros.
            r_pad = rank
            if R_ALIGNED:
                r_pad = tl.multiple_of(tl.cdiv(rank, BLOCK_R) * BLOCK_R, BLOCK_R)
            if INTERPRET:  # (see _sgmv_shrink_kernel)
                r0 = 0
                while r0 < rank:
                    acc = _expand_tile(
                        acc,
                        u_rows,
                        b_cols,
                        r0,
                        rank,
                        r_pad,
                        m_mask,
                        n_mask,
                        stride_uc,
                        stride_br,
                        BLOCK_R,
                        PRECISION,
                        INTERPRET,
                    )
                    r0 += BLOCK_R
            else:
                for r0 in range(0, rank, BLOCK_R):
                    acc = _expand_tile(
                        acc,
                        u_rows,
                        b_cols,
                        r0,
                        rank,
                        r_pad,
                        m_mask,
                        n_mask,
                        stride_uc,
                        stride_br,
                        BLOCK_R,
                        PRECISION,
                        INTERPRET,
                    )
            scale = tl.load(scaling_ptr + slot)
            y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_yt + offs_n[None, :] * stride_yn
            y_mask = m_mask[:, None] & n_mask[None, :]
            y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, cast(y + scale * acc, y_ptr.dtype.element_ty, INTERPRET), mask=y_mask)


def _block_m(max_seg_len: int) -> int:
    if max_seg_len <= 16:
        return 16
    if max_seg_len <= 32 or interpreting():
        return 32
    return 64


def _check_segments(
    name: str,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    num_slots: int,
    n_slices: int,
    max_seg_len: int,
) -> int:
    check_dtype(name, "seg_starts", seg_starts, (torch.int32,))
    check_dtype(name, "seg_slots", seg_slots, (torch.int32,))
    check_dtype(name, "ranks", ranks, (torch.int32,))
    check_dim(name, "seg_slots", seg_slots, 1)
    check_dim(name, "seg_starts", seg_starts, 1)
    nseg = seg_slots.shape[0]
    if seg_starts.shape[0] != nseg + 1:
        raise ValueError(
            f"{name}: seg_starts must have len(seg_slots) + 1 = {nseg + 1} entries, got {seg_starts.shape[0]}"
        )
    if tuple(ranks.shape) != (num_slots, n_slices):
        raise ValueError(
            f"{name}: ranks must have shape (S, n_slices) = {(num_slots, n_slices)}, got {tuple(ranks.shape)}"
        )
    if not seg_starts.is_contiguous() or not seg_slots.is_contiguous() or not ranks.is_contiguous():
        raise ValueError(f"{name}: seg_starts, seg_slots and ranks must be contiguous")
    if not isinstance(max_seg_len, int) or max_seg_len < 0:
        raise ValueError(f"{name}: max_seg_len must be a non-negative Python int, got {max_seg_len!r}")
    return nseg


@dataclass(frozen=True)
class _ShrinkPlan:
    block_m: int
    block_r: int
    block_k: int
    m_tiles: int
    programs: int
    split_k: int
    k_per_split: int


def _shrink_plan(
    H: int, R: int, n_slices: int, nseg: int, max_seg_len: int, device: torch.device, split_k: int | None
) -> _ShrinkPlan:
    block_m = _block_m(max_seg_len)
    block_r = min(64, max(16, triton.next_power_of_2(R)))
    block_k = 64 if block_m == 64 or interpreting() else 128
    m_tiles = triton.cdiv(max_seg_len, block_m)
    programs = nseg * m_tiles * triton.cdiv(R, block_r)
    if split_k is None:
        # Few tiles (decode) and a long H: split H so that the GPU has about two waves of programs.
        target = 2 * num_sms(device)
        split_k = 1
        if not interpreting() and programs * n_slices < target:
            split_k = max(1, min(triton.cdiv(target, programs * n_slices), H // (4 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(max(H, 1), split_k), block_k) * block_k
    return _ShrinkPlan(block_m, block_r, block_k, m_tiles, programs, triton.cdiv(max(H, 1), k_per_split), k_per_split)


def shrink_split_k(x: torch.Tensor, lora_a: torch.Tensor, n_slices: int, nseg: int, max_seg_len: int) -> int:
    """The number of K splits ``lora_shrink`` picks for these shapes (to size its ``partials``)."""
    T, H = x.shape
    if nseg == 0 or min(max_seg_len, T) == 0:
        return 1
    return _shrink_plan(H, lora_a.shape[1] // n_slices, n_slices, nseg, min(max_seg_len, T), x.device, None).split_k


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    max_seg_len: int,
    out: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
    partials: torch.Tensor | None = None,
) -> torch.Tensor:
    """SGMV shrink: ``u = x @ A.T`` per segment and slice, in float32.

    For each segment i with ``w = seg_slots[i] >= 0`` and each slice j, with ``r = ranks[w, j]``::

        u[s[i]:s[i+1], j*R : j*R+r]     = x[s[i]:s[i+1]] @ A[w, j*R : j*R+r].T
        u[s[i]:s[i+1], j*R+r : (j+1)*R] = 0

    Shapes: x [T, H] (fp32/fp16/bf16), lora_a [S, n_slices*R, H] (x's dtype),
    seg_starts [nseg+1] int32, seg_slots [nseg] int32, ranks [S, n_slices] int32.
    Returns u [T, n_slices*R] float32 (fp32 accumulation, no rounding to x's dtype).
    ``max_seg_len`` (host int) must be >= the longest segment; it sizes the grid, so a caller that
    passes a fixed bound (and fixed-length segment tensors, padded with empty segments) gets the
    same launch every step. ``out``: optional float32 buffer [T, n_slices*R] to write into. Rows
    outside segments with an adapter are never written (zero when ``out`` is None).
    ``split_k`` (> 1, or chosen by ``shrink_split_k`` when None) splits H: each split writes its
    partial sum into ``partials`` (float32 [split_k, T, n_slices*R], allocated when None) and a
    second kernel adds them in a fixed order, so results do not depend on GPU scheduling.
    """
    name = "lora_shrink"
    check_dim(name, "x", x, 2)
    check_dim(name, "lora_a", lora_a, 3)
    check_dtype(name, "x", x, FLOAT_DTYPES)
    if lora_a.dtype != x.dtype:
        raise TypeError(f"{name}: lora_a dtype {lora_a.dtype} must match x dtype {x.dtype}")
    T, H = x.shape
    S, rows, h_a = lora_a.shape
    if ranks.dim() != 2 or ranks.shape[1] < 1:
        raise ValueError(f"{name}: ranks must be [S, n_slices], got shape {tuple(ranks.shape)}")
    n_slices = ranks.shape[1]
    if h_a != H or rows % n_slices:
        raise ValueError(
            f"{name}: lora_a must be [S, n_slices*R, H] with H={H}, n_slices={n_slices}; got {tuple(lora_a.shape)}"
        )
    R = rows // n_slices
    nseg = _check_segments(name, seg_starts, seg_slots, ranks, S, n_slices, max_seg_len)
    device = check_same_device(name, x, lora_a, seg_starts, seg_slots, ranks)
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"{name}: split_k must be a positive int, got {split_k!r}")
    if out is None:
        out = torch.zeros((T, n_slices * R), dtype=torch.float32, device=device)
    else:
        _check_f32_buffer(name, "out", out, (T, n_slices * R))
        check_same_device(name, x, out)
    max_seg_len = min(max_seg_len, T)
    if nseg == 0 or max_seg_len == 0 or R == 0 or H == 0:
        return out

    plan = _shrink_plan(H, R, n_slices, nseg, max_seg_len, device, split_k)
    target = out
    if plan.split_k > 1:
        shape = (plan.split_k, T, n_slices * R)
        if partials is None:
            partials = torch.empty(shape, dtype=torch.float32, device=device)
        _check_f32_buffer(name, "partials", partials, shape)
        target = partials
    _sgmv_shrink_kernel[(plan.programs, n_slices * plan.split_k)](
        x,
        lora_a,
        target,
        seg_starts,
        seg_slots,
        ranks,
        H,
        R,
        n_slices,
        plan.m_tiles,
        plan.split_k,
        plan.k_per_split,
        x.stride(0),
        x.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_a.stride(2),
        target.stride(-2),
        target.stride(-1),
        target.stride(0) if plan.split_k > 1 else 0,
        BLOCK_M=plan.block_m,
        BLOCK_R=plan.block_r,
        BLOCK_K=plan.block_k,
        PRECISION=dot_precision(x.dtype),
        INTERPRET=interpreting(),
        num_warps=4,
        num_stages=3,
    )
    if plan.split_k > 1:
        cols = n_slices * R
        block_c = min(128, max(16, triton.next_power_of_2(cols)))
        _sgmv_split_reduce_kernel[(nseg * plan.m_tiles, triton.cdiv(cols, block_c))](
            partials,
            out,
            seg_starts,
            seg_slots,
            cols,
            plan.m_tiles,
            plan.split_k,
            partials.stride(0),
            partials.stride(1),
            out.stride(0),
            out.stride(1),
            BLOCK_M=plan.block_m,
            BLOCK_C=block_c,
            num_warps=4,
        )
    return out


def _check_f32_buffer(name: str, what: str, buf: torch.Tensor, shape: tuple[int, ...]) -> None:
    if (
        buf.dtype != torch.float32
        or tuple(buf.shape) != shape
        or buf.stride(-1) != 1
        or (buf.dim() == 3 and not buf.is_contiguous())
    ):
        raise ValueError(
            f"{name}: {what} must be float32 of shape {shape} with contiguous rows, got {buf.dtype} {tuple(buf.shape)}"
        )


def lora_expand(
    u: torch.Tensor,
    lora_b: torch.Tensor,
    y: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    scaling: torch.Tensor,
    slice_offsets: Sequence[int],
    max_seg_len: int,
) -> None:
    """SGMV expand, added in place into ``y`` (the add into the base layer's output is fused).

    For each segment i with ``w = seg_slots[i] >= 0`` and each slice j, with ``r = ranks[w, j]``
    and ``off_j = slice_offsets[j]``, ``off_{j+1} = slice_offsets[j+1]``::

        y[s[i]:s[i+1], off_j:off_{j+1}] += scaling[w] * u[s[i]:s[i+1], j*R : j*R+r] @ B[w, off_j:off_{j+1}, :r].T

    Shapes: u [T, n_slices*R] (any float dtype, usually lora_shrink's float32 output; cast to
    B's dtype before the product, accumulation in fp32), lora_b [S, N_total, R],
    y [T, N_total] (lora_b's dtype; may be a strided view), scaling [S] float32,
    ranks [S, n_slices] int32, slice_offsets: n_slices+1 non-decreasing host ints in
    [0, N_total]. Rows of segments with slot -1 and slices of rank 0 are not touched.
    ``max_seg_len`` (host int) must be >= the longest segment.
    """
    name = "lora_expand"
    check_dim(name, "u", u, 2)
    check_dim(name, "lora_b", lora_b, 3)
    check_dim(name, "y", y, 2)
    check_dtype(name, "u", u, FLOAT_DTYPES)
    check_dtype(name, "lora_b", lora_b, FLOAT_DTYPES)
    check_dtype(name, "scaling", scaling, (torch.float32,))
    if y.dtype != lora_b.dtype:
        raise TypeError(f"{name}: y dtype {y.dtype} must match lora_b dtype {lora_b.dtype}")
    S, N_total, R = lora_b.shape
    if ranks.dim() != 2 or ranks.shape[1] < 1:
        raise ValueError(f"{name}: ranks must be [S, n_slices], got shape {tuple(ranks.shape)}")
    n_slices = ranks.shape[1]
    T = y.shape[0]
    if tuple(y.shape) != (T, N_total) or tuple(u.shape) != (T, n_slices * R):
        raise ValueError(
            f"{name}: expected y [T, N_total] = {(T, N_total)} and u [T, n_slices*R] = "
            f"{(T, n_slices * R)}, got y {tuple(y.shape)}, u {tuple(u.shape)}"
        )
    if tuple(scaling.shape) != (S,) or not scaling.is_contiguous():
        raise ValueError(f"{name}: scaling must be a contiguous [S] = [{S}] tensor, got {tuple(scaling.shape)}")
    offsets = tuple(slice_offsets)
    if (
        len(offsets) != n_slices + 1
        or not all(isinstance(o, int) for o in offsets)
        or offsets[0] < 0
        or offsets[-1] > N_total
        or any(a > b for a, b in zip(offsets, offsets[1:]))
    ):
        raise ValueError(
            f"{name}: slice_offsets must be {n_slices + 1} non-decreasing ints in [0, {N_total}], got {slice_offsets!r}"
        )
    nseg = _check_segments(name, seg_starts, seg_slots, ranks, S, n_slices, max_seg_len)
    check_same_device(name, u, lora_b, y, seg_starts, seg_slots, ranks, scaling)
    max_seg_len = min(max_seg_len, T)
    max_n = max(b - a for a, b in zip(offsets, offsets[1:]))
    if nseg == 0 or max_seg_len == 0 or R == 0 or max_n == 0:
        return

    block_m = _block_m(max_seg_len)
    block_n = 32 if interpreting() else (64 if max_n <= 64 else 128)
    m_tiles = triton.cdiv(max_seg_len, block_m)
    n_tiles = triton.cdiv(max_n, block_n)
    grid = (nseg * m_tiles * n_tiles, n_slices)
    _sgmv_expand_kernel[grid](
        u,
        lora_b,
        y,
        seg_starts,
        seg_slots,
        ranks,
        scaling,
        R,
        n_slices,
        m_tiles,
        n_tiles,
        u.stride(0),
        u.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        y.stride(0),
        y.stride(1),
        SLICE_OFFSETS=offsets,
        N_SLICES=n_slices,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=16,
        R_ALIGNED=R % 16 == 0,
        PRECISION=dot_precision(lora_b.dtype),
        INTERPRET=interpreting(),
        num_warps=4 if block_m * block_n <= 4096 else 8,
        num_stages=2,
    )


def lora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    scaling: torch.Tensor,
    slice_offsets: Sequence[int],
    max_seg_len: int,
    buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """``lora_shrink`` then ``lora_expand``: for each segment i with ``w = seg_slots[i] >= 0``
    and slice j (``r = ranks[w, j]``)::

        y[s[i]:s[i+1], off_j:off_{j+1}] += scaling[w] * (x[s[i]:s[i+1]] @ A[w, jR:jR+r].T) @ B[w, off_j:off_{j+1}, :r].T

    x [T, H], y [T, N_total] updated in place and returned; ``buffer``: optional float32
    [T, n_slices*R] scratch for the intermediate (see ``lora_shrink``'s ``out``).
    """
    u = lora_shrink(x, lora_a, seg_starts, seg_slots, ranks, max_seg_len, out=buffer)
    lora_expand(u, lora_b, y, seg_starts, seg_slots, ranks, scaling, slice_offsets, max_seg_len)
    return y
