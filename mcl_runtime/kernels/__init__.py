"""Triton kernels (importable as ``mcl_runtime.kernels``): SGMV LoRA shrink/expand and paged attention,
with plain torch references of each in ``reference``; and ``paged_attention_cpu``, the C++ CPU
paged attention, multi-LoRA (``lora_apply_cpu``), the fused residual add + RMSNorm, rotary
embedding and SiLU-and-multiply of a decoder layer (``rms_norm_cpu``, ``rope_cpu``,
``silu_and_mul_cpu``) and the sampler's greedy argmax
(``argmax_cpu``), of the ``mcl_runtime._C`` extension (``HAS_CPU_ATTENTION`` / ``HAS_CPU_LAYER_OPS``
/ ``HAS_CPU_ARGMAX`` say whether they are built; ``HAS_CPU_BF16_DOT`` whether the LoRA kernel has
its AVX512-BF16 arithmetic on this CPU).

Without Triton the package still imports; ``HAS_TRITON`` is then False and calling a Triton kernel
raises a RuntimeError (the torch references keep working).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .cpu import (
    HAS_CPU_ARGMAX,
    HAS_CPU_ATTENTION,
    HAS_CPU_BF16_DOT,
    HAS_CPU_LAYER_OPS,
    LoRAWeightsCPU,
    PagedAttentionCPU,
    argmax_cpu,
    lora_apply_cpu,
    paged_attention_cpu,
    rms_norm_cpu,
    rope_cpu,
    silu_and_mul_cpu,
)
from .reference import (
    lora_apply_ref,
    lora_expand_ref,
    lora_shrink_ref,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    store_kv_ref,
)

__all__ = [
    "HAS_TRITON",
    "HAS_CPU_ATTENTION",
    "HAS_CPU_LAYER_OPS",
    "HAS_CPU_ARGMAX",
    "HAS_CPU_BF16_DOT",
    "PagedAttentionCPU",
    "paged_attention_cpu",
    "LoRAWeightsCPU",
    "lora_apply_cpu",
    "rms_norm_cpu",
    "rope_cpu",
    "silu_and_mul_cpu",
    "argmax_cpu",
    "lora_shrink",
    "lora_expand",
    "lora_apply",
    "shrink_split_k",
    "paged_decode_attention",
    "paged_prefill_attention",
    "store_kv",
    "lora_shrink_ref",
    "lora_expand_ref",
    "lora_apply_ref",
    "paged_decode_attention_ref",
    "paged_prefill_attention_ref",
    "store_kv_ref",
]

try:
    from .attention import paged_decode_attention, paged_prefill_attention, store_kv
    from .lora import lora_apply, lora_expand, lora_shrink, shrink_split_k

    HAS_TRITON = True
except ImportError as _exc:
    if not (_exc.name or "").startswith("triton"):
        raise
    HAS_TRITON = False
    _IMPORT_ERROR = str(_exc)

    def _missing(fn_name: str) -> Callable[..., Any]:
        def fn(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(
                f"mcl_runtime.kernels.{fn_name} needs Triton, which could not be imported "
                f"({_IMPORT_ERROR}); install triton or use the cpu or reference backend"
            )

        fn.__name__ = fn_name
        return fn

    lora_shrink = _missing("lora_shrink")
    lora_expand = _missing("lora_expand")
    lora_apply = _missing("lora_apply")
    shrink_split_k = _missing("shrink_split_k")
    paged_decode_attention = _missing("paged_decode_attention")
    paged_prefill_attention = _missing("paged_prefill_attention")
    store_kv = _missing("store_kv")
