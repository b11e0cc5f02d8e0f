"""C++ CPU kernels of ``mcl_runtime._C`` for torch tensors: paged attention (``csrc/paged_attention.cpp``),
which reads the paged cache in place through the block tables (no gather, no padding to the longest
context, no mask); multi-LoRA over a step's adapter segments (``csrc/lora_cpu.cpp``); the
elementwise steps of a decoder layer (``csrc/layer_ops.cpp``): the fused residual add + RMSNorm,
the rotary embedding in place and the MLP's SiLU-and-multiply; and the sampler's greedy argmax
(``csrc/sampling_ops.cpp``). Each tensor reaches C++ as its DLPack capsule (``to_dlpack``, about
0.5 us), which checks devices, dtypes, shapes and strides itself."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack

from mcl_runtime.extension import EXT

_CURRENT = getattr(EXT, "KERNEL_ABI", 0) == 6
if EXT is not None and not _CURRENT:
    warnings.warn(
        "mcl_runtime._C is a stale build (its CPU kernels take another calling convention); "
        "using torch's ops on the CPU. Rebuild with `pip install -e .`",
        RuntimeWarning,
        stacklevel=2,
    )
HAS_CPU_ATTENTION = _CURRENT and hasattr(EXT, "PagedAttentionPlan")
# lora_apply_cpu, rms_norm_cpu, rope_cpu, silu_and_mul_cpu
HAS_CPU_LAYER_OPS = _CURRENT and hasattr(EXT, "lora_apply")
HAS_CPU_ARGMAX = _CURRENT and hasattr(EXT, "argmax_rows")
# Floats per vector in the kernels' loops on this CPU: 16 with AVX-512, 8 without (0: not built).
CPU_VECTOR_LANES = int(EXT.VECTOR_LANES) if _CURRENT else 0
# The LoRA kernel's bfloat16 pair arithmetic (AVX512-BF16's vdpbf16ps): built and on this CPU.
HAS_CPU_BF16_DOT = HAS_CPU_LAYER_OPS and bool(EXT.HAS_BF16_DOT)


class PagedAttentionCPU:
    """``paged_prefill_attention``'s semantics on CPU tensors, for one step's metadata checked once
    (every block-table entry a sequence uses included) and applied per layer: sequence b owns query
    rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` (q_len_b of them; 1 for a decode), row i of them sits
    at position ``p = context_lens[b] - q_len_b + i`` and
    ``o[row, h] = softmax(scale * q[row, h] @ K_b[:p+1, h // G].T) @ V_b[:p+1, h // G]``.

    Metadata: block_tables [B, M], cu_seqlens_q [B+1], context_lens [B], int32 contiguous, and the
    cache's block size. Per call: q [T, Hq, D] (unit stride along D), k_cache/v_cache
    [num_blocks, block_size, Hkv, D] contiguous, one float dtype throughout (float32, float16 or
    bfloat16; float32 scores and sums). Writes into ``out`` (q's shape and dtype, unit stride along
    D; new when None) and returns it; rows not covered by cu_seqlens_q are left as they were.
    ``num_threads`` > 1 cuts the work (keys read) into up to that many parts, where there is enough
    of it, run on torch's OpenMP threads (the extension links the same runtime; built without
    OpenMP, on threads of its own). ``lanes``: the width of the scores' dot-product tiles, 8 or 16
    (None: 16 on a CPU with AVX-512, whose 32 vector registers hold a 16 x 16 tile; else 8); the
    results differ only in rounding (tests run both on any machine). Bad arguments raise
    ValueError / TypeError.
    """

    def __init__(
        self, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_size: int
    ) -> None:
        if not HAS_CPU_ATTENTION:
            raise RuntimeError(
                "paged_attention_cpu needs the C++ extension mcl_runtime._C (built by "
                "`pip install -e .`; MCL_NO_EXT=1 disables it)"
            )
        self._plan = EXT.PagedAttentionPlan(
            to_dlpack(block_tables), to_dlpack(context_lens), to_dlpack(cu_seqlens_q), int(block_size)
        )

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
        *,
        out: torch.Tensor | None = None,
        num_threads: int = 1,
        lanes: int | None = None,
    ) -> torch.Tensor:
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype)
        self._plan.run(
            to_dlpack(out), to_dlpack(q), to_dlpack(k_cache), to_dlpack(v_cache), float(scale), num_threads, lanes or 0
        )
        return out


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_threads: int = 1,
    lanes: int | None = None,
) -> torch.Tensor:
    """One call of ``PagedAttentionCPU`` (which see): the metadata checked and applied once."""
    plan = PagedAttentionCPU(block_tables, cu_seqlens_q, context_lens, k_cache.shape[1] if k_cache.dim() == 4 else 0)
    return plan(q, k_cache, v_cache, scale, out=out, num_threads=num_threads, lanes=lanes)


@torch.library.custom_op("mcl::paged_attention_cpu", mutates_args=())
def paged_attention_cpu_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``paged_attention_cpu`` as an opaque op of a ``torch.compile`` graph (the compiled decode);
    returns a new contiguous ``[T, Hq, D]``."""
    return paged_attention_cpu(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)


@paged_attention_cpu_op.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale) -> torch.Tensor:
    return q.new_empty(q.shape)


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row of ``x [T, N]``: ``weight * (h / sqrt(mean(h^2) + eps))`` with ``h = x``, or with
    ``residual [T, N]`` ``h = x + residual``, which is also written into ``residual`` (in place: the
    layer's new residual). Statistics in float32; in float16/bfloat16, ``h`` and the normalised row
    are rounded to the dtype before the weight (transformers' order). ``weight [N]``; one dtype
    throughout, unit stride along N. Returns a new ``[T, N]``."""
    out = torch.empty_like(x)
    if x.numel():
        EXT.rms_norm(
            to_dlpack(out),
            to_dlpack(x),
            None if residual is None else to_dlpack(residual),
            to_dlpack(weight),
            float(eps),
        )
    return out


def rope_cpu(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, H, D]`` rotated in place (transformers' half-split convention) by ``cos``/``sin``
    ``[T, D]`` (contiguous, x's dtype), each product and sum rounded as torch's ops round them:
    bit for bit ``x * cos[:, None] + rotate_half(x) * sin[:, None]``. ``x`` needs unit stride along
    D (rows and heads may be strided: a view of the fused qkv). Returns ``x``."""
    if x.numel():
        EXT.rope(to_dlpack(x), to_dlpack(cos), to_dlpack(sin))
    return x


def silu_and_mul_cpu(x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
    """``silu(gate) * up`` of ``x [T, 2I]`` = ``gate | up`` (the fused gate_up projection's output)
    in one pass: a new ``[T, I]``. ``silu(g) = g / (1 + exp(-g))``: in float16/bfloat16 looked up in
    a table of every 16-bit value's silu, correctly rounded to the dtype (computed once, in double),
    which is rounded as ``F.silu(gate) * up`` rounds it, before the product; in float32 computed in
    float32 (exp to about 1 ulp, not torch's own, so not bit for bit). ``x`` needs unit stride along
    its columns (rows may be strided). ``num_threads`` > 1 splits the rows (and long rows' columns)
    over torch's OpenMP threads where the work is worth it."""
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    EXT.silu_and_mul(to_dlpack(out), to_dlpack(x), num_threads)
    return out


def argmax_cpu(x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of ``x [T, V]`` (float32, float16 or bfloat16, V >= 1, unit stride along
    V): the first maximum of each row, NaN counting as the maximum (the first NaN), 16-bit values
    compared as their float32 values. ``num_threads`` > 1 splits the rows over torch's OpenMP
    threads where there are enough. Returns a new int64 ``[T]``."""
    out = torch.empty(x.shape[0], dtype=torch.int64)
    if x.shape[0]:
        EXT.argmax_rows(to_dlpack(out), to_dlpack(x), num_threads)
    return out


def lora_pairs_possible(dtype: torch.dtype, max_rank: int, in_features: int) -> bool:
    """Whether ``lora_apply_cpu`` can take its pair arithmetic (see ``LoRAWeightsCPU``) for LoRA
    buffers of this dtype, rank and input width on this machine (the kernel's own rule)."""
    return HAS_CPU_LAYER_OPS and EXT.can_lora_pairs(str(dtype).removeprefix("torch."), max_rank, in_features)


class LoRAWeightsCPU:
    """One projection's LoRA buffers as the C++ kernel reads them, their DLPack capsules made once:
    lora_a [S, n*R, in] and lora_b [S, out, R] (the model's layout), one dtype; scaling [S] float32,
    ranks [S, n] int32, the slices' output offsets. The kernel reads B transposed, ``[S, R, out]``
    (each rank's row of a chunk of outputs is contiguous, so a chunk is converted with vector loads),
    copied here once: these weights stand for ``version`` of the buffers, and ``matches`` says whether
    they still do (the same tensors at the same version; the owner counts its writes).

    ``bf16_dot`` picks the kernel's arithmetic: float32 multiply-adds with 16-bit inputs converted,
    or, for bfloat16 with an even R and ``in`` a multiple of 32 on a CPU with AVX512-BF16
    (``HAS_CPU_BF16_DOT``), bfloat16 pair dot products into float32 sums, x and A as they are and the
    shrink's result rounded to bfloat16 (as a bfloat16 ``x @ A.T`` rounds it), for which B is copied
    in pairs of ranks, ``[S, R/2, out, 2]``. None takes the pairs where they can be, False never,
    True insists (ValueError where it cannot)."""

    def __init__(
        self,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: torch.Tensor,
        ranks: torch.Tensor,
        slice_offsets: Sequence[int],
        version: int = 0,
        bf16_dot: bool | None = None,
    ) -> None:
        self.tensors = (lora_a, lora_b, scaling, ranks)
        self.version = version
        S, out, R = lora_b.shape
        possible = lora_pairs_possible(lora_b.dtype, R, lora_a.shape[2])
        if bf16_dot and not possible:
            raise ValueError(
                "bf16_dot=True needs bfloat16 weights, an even rank, an input width that is a multiple of 32 "
                "and a CPU with AVX512-BF16"
            )
        self.pairs = possible if bf16_dot is None else bf16_dot
        if self.pairs:  # [S, R/2, out, 2]: element (i, o, p) = B[o, 2i + p]
            self.lora_bt = lora_b.view(S, out, R // 2, 2).permute(0, 2, 1, 3).contiguous()
        else:
            self.lora_bt = lora_b.transpose(1, 2).contiguous()
        self.args = tuple(to_dlpack(t) for t in (lora_a, self.lora_bt, scaling, ranks)) + (
            np.asarray(slice_offsets, np.int64),
        )

    def matches(
        self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor, ranks: torch.Tensor, version: int
    ) -> bool:
        mine = self.tensors
        same = mine[0] is lora_a and mine[1] is lora_b and mine[2] is scaling and mine[3] is ranks
        return same and self.version == version


def lora_apply_cpu(
    x: torch.Tensor,
    y: torch.Tensor,
    weights: LoRAWeightsCPU,
    seg_starts: np.ndarray,
    seg_slots: np.ndarray,
    num_threads: int = 1,
    lanes: int | None = None,
) -> torch.Tensor:
    """``lora_apply``'s semantics on CPU tensors, every segment in one call: for segment i (tokens
    ``s[i]:s[i+1]``, slot ``w = seg_slots[i]``, -1 = no adapter) and slice j (rank ``r = ranks[w, j]``)
    ``y[s[i]:s[i+1], off_j:off_{j+1}] += scaling[w] * x[..] @ A[w, jR:jR+r].T @ B[w, off_j:off_{j+1}, :r].T``
    with the buffers of ``weights``. x [T, in], y [T, out] (in place; unit stride along features),
    in the weights' dtype; the segments as host int32 arrays. Sums in float32, y rounded once.
    ``num_threads`` > 1 shares the work out over up to that many of torch's OpenMP threads where it
    is worth it (the same bits). The arithmetic is the weights' (``LoRAWeightsCPU.pairs``);
    ``lanes``: tokens per block of the float32 arithmetic's shrink, 8 or 16 (None: the machine's,
    as for ``PagedAttentionCPU``). Returns y."""
    EXT.lora_apply(to_dlpack(y), to_dlpack(x), *weights.args, seg_starts, seg_slots, num_threads, lanes or 0)
    return y
