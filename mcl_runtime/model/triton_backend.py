"""The Triton backend: SGMV LoRA and paged attention through the kernels in ``mcl_runtime.kernels``;
the KV store too, and RMSNorm and the rotary embedding in torch's ops (the reference backend's).

Kernel scratch (the LoRA shrink output and its split-K partial sums) comes from one workspace per
backend, i.e. per engine, grown rarely and reused by every projection of every step. A buffer that
is outgrown is kept alive: a captured CUDA graph may still point at it.

While dynamo traces (``Engine(compile=True)``) the kernels are called as the custom ops of
``mcl_runtime.kernels.ops`` (same names and arguments), so the forward is one graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcl_runtime import kernels
from mcl_runtime.model.backends import AttentionMeta, LoRAMeta
from mcl_runtime.model.reference_backend import rms_norm_torch, rope_torch, silu_and_mul_torch


def _kernels():
    return torch.ops.mcl if torch.compiler.is_compiling() else kernels


class TritonBackend:
    name = "triton"
    linear = staticmethod(F.linear)  # cuBLAS

    def __init__(self) -> None:
        if kernels.HAS_TRITON:
            from mcl_runtime.kernels import ops  # noqa: F401  (registers torch.ops.mcl)
        self._workspace: dict[str, torch.Tensor] = {}
        self._outgrown: list[torch.Tensor] = []

    def _scratch(self, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """A float32 view ``shape`` of the workspace buffer ``name`` (reallocated only to grow)."""
        numel = 1
        for s in shape:
            numel *= s
        buf = self._workspace.get(name)
        if buf is None or buf.numel() < numel or buf.device != device:
            if buf is not None:
                self._outgrown.append(buf)
            buf = self._workspace[name] = torch.empty(
                max(numel, 2 * (buf.numel() if buf is not None else 0)), dtype=torch.float32, device=device
            )
        return buf[:numel].view(shape)

    def prepare_weights(
        self, weights: list[torch.Tensor], keep_plain: bool = True, max_rows: int | None = None
    ) -> list[torch.Tensor]:
        return []  # linear() uses the weights as they are

    def prepare(self, attn: AttentionMeta, lora: LoRAMeta | None) -> None:
        """The plan of a step of decodes and prefills: the prefills' query offsets from 0."""
        nd = attn.num_decodes
        if 0 < nd < attn.context_lens.shape[0]:
            attn.plan = attn.cu_seqlens_q[nd:] - nd

    def prepare_lora(self, lora: LoRAMeta) -> None:
        pass  # the kernels read the segments as they are

    def store_kv(self, k, v, k_cache, v_cache, attn: AttentionMeta) -> None:
        _kernels().store_kv(k, v, k_cache, v_cache, attn.slot_mapping)

    def attention(self, q, k_cache, v_cache, scale: float, attn: AttentionMeta, k=None, v=None) -> torch.Tensor:
        nd = attn.num_decodes
        B = attn.context_lens.shape[0]
        # Static steps size the decode grid by the block-table width, so that it never changes.
        max_ctx = attn.block_tables.shape[1] * attn.block_size if attn.static else attn.max_context_len
        if nd == B:
            return _kernels().paged_decode_attention(
                q, k_cache, v_cache, attn.block_tables, attn.context_lens, scale, max_ctx
            )
        if nd == 0:
            return _kernels().paged_prefill_attention(
                q, k_cache, v_cache, attn.block_tables, attn.cu_seqlens_q, attn.context_lens, scale, attn.max_q_len
            )
        out = torch.empty_like(q)
        out[:nd] = _kernels().paged_decode_attention(
            q[:nd], k_cache, v_cache, attn.block_tables[:nd], attn.context_lens[:nd], scale, max_ctx
        )
        out[nd:] = _kernels().paged_prefill_attention(
            q[nd:],
            k_cache,
            v_cache,
            attn.block_tables[nd:],
            attn.plan,
            attn.context_lens[nd:],
            scale,
            attn.max_q_len,
        )
        return out

    def apply_lora(self, x, y, mod, lora: LoRAMeta) -> None:
        T, cols = x.shape[0], mod.lora_a.shape[1]
        if torch.compiler.is_compiling():  # the op plans split-K and its partial sums itself
            u, split_k, partials = torch.empty(T, cols, dtype=torch.float32, device=x.device), None, None
        else:
            u = self._scratch("shrink", (T, cols), x.device)
            split_k = kernels.shrink_split_k(x, mod.lora_a, mod.n_slices, lora.seg_slots.shape[0], lora.max_seg_len)
            partials = self._scratch("partials", (split_k, T, cols), x.device) if split_k > 1 else None
        _kernels().lora_shrink(
            x,
            mod.lora_a,
            lora.seg_starts,
            lora.seg_slots,
            mod.ranks,
            lora.max_seg_len,
            out=u,
            split_k=split_k,
            partials=partials,
        )
        _kernels().lora_expand(
            u,
            mod.lora_b,
            y,
            lora.seg_starts,
            lora.seg_slots,
            mod.ranks,
            mod.scaling,
            list(mod.offsets),
            lora.max_seg_len,
        )

    rms_norm = staticmethod(rms_norm_torch)
    rope = staticmethod(rope_torch)
    silu_and_mul = staticmethod(silu_and_mul_torch)
