"""Paged attention on the CPU: the C++ kernel of ``csrc/paged_attention.cpp`` (in ``mcl_runtime._C``)
for torch tensors. It reads the paged cache in place through the block tables: no gather, no
padding to the longest context, no mask."""
from __future__ import annotations

import torch

from mcl_runtime.extension import EXT

HAS_CPU_ATTENTION = EXT is not None and hasattr(EXT, "paged_attention")  # False for a stale build

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _array(t: torch.Tensor):
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def paged_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                        scale: float, *, out: torch.Tensor | None = None, num_threads: int = 1) -> torch.Tensor:
    """``paged_prefill_attention``'s semantics on CPU tensors: sequence b owns query rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` (q_len_b of them; 1 for a decode), row i of them sits at
    position ``p = context_lens[b] - q_len_b + i`` and
    ``o[row, h] = softmax(scale * q[row, h] @ K_b[:p+1, h // G].T) @ V_b[:p+1, h // G]``.

    Shapes: q [T, Hq, D] (unit stride along D), k_cache/v_cache [num_blocks, block_size, Hkv, D]
    contiguous, block_tables [B, M], cu_seqlens_q [B+1], context_lens [B] int32 contiguous; one
    float dtype throughout (float32, float16 or bfloat16; float32 scores and sums). Writes into
    ``out`` (q's shape and dtype, unit stride along D; new when None) and returns it; rows not
    covered by cu_seqlens_q are left as they were. ``num_threads`` > 1 splits the work over threads
    of the kernel's own; right after a parallel torch op they compete with torch's OpenMP workers,
    which spin for a while (measured slower than 1 thread on 2 cores, ``OMP_WAIT_POLICY=passive``
    aside), hence the default of 1. Bad arguments raise ValueError / TypeError.
    """
    if not HAS_CPU_ATTENTION:
        raise RuntimeError("paged_attention_cpu needs the C++ extension mcl_runtime._C (built by "
                           "`pip install -e .`; MCL_NO_EXT=1 disables it)")
    dtype = _DTYPES.get(q.dtype)
    if dtype is None:
        raise TypeError(f"paged_attention_cpu: q must be float32, float16 or bfloat16, got {q.dtype}")
    tensors = (q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens) + (() if out is None else (out,))
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("paged_attention_cpu: every tensor must be on the CPU")
    if out is None:
        out = torch.empty_like(q)
    EXT.paged_attention(_array(out), _array(q), _array(k_cache), _array(v_cache), block_tables.numpy(),
                        context_lens.numpy(), cu_seqlens_q.numpy(), float(scale), dtype, num_threads)
    return out


@torch.library.custom_op("mcl::paged_attention_cpu", mutates_args=())
def paged_attention_cpu_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """``paged_attention_cpu`` as an opaque op of a ``torch.compile`` graph (the compiled decode);
    returns a new contiguous ``[T, Hq, D]``."""
    return paged_attention_cpu(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                               out=torch.empty(q.shape, dtype=q.dtype))


@paged_attention_cpu_op.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale) -> torch.Tensor:
    return q.new_empty(q.shape)
