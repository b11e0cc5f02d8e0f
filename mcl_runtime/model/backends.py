"""Per-step batch metadata, the backend protocol and the backend registry.

A step's metadata is built once (by the model runner, then ``backend.prepare``) and shared by every
layer. Layers call ``ctx.backend.linear / store_kv / attention / apply_lora / rms_norm / rope /
silu_and_mul``; backends see tensors and metadata, never requests. Three backends implement the protocol:

* ``reference`` (``reference_backend.py``): plain torch, one obvious way per op; the semantics the
  other backends are tested against.
* ``cpu`` (``cpu_backend.py``, the default on the CPU): the C++ kernels of ``mcl_runtime._C`` and the
  rules that route each part of a step to them or to a faster torch path. ``torch`` is another name
  for it.
* ``triton`` (``triton_backend.py``, the default on CUDA): the Triton kernels of ``mcl_runtime.kernels``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@dataclass
class AttentionMeta:
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, M] int32
    context_lens: torch.Tensor  # [B] int32, new tokens included
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    # [0, d, d + p, B]: decodes (one query token each) | prefill chunks without cached context |
    # prefill chunks with cached context
    group_bounds: list[int]
    max_q_len: int
    max_context_len: int
    block_size: int
    context_lens_host: np.ndarray  # [B] host copies of context_lens and cu_seqlens_q, so that
    cu_seqlens_q_host: np.ndarray  # [B + 1] shapes are known without device syncs
    # Shapes fixed by a batch-size bucket (compiled / CUDA-graph decode): every sequence is a
    # decode, B and M are the bucket's, and no host value that changes per step sizes a tensor.
    static: bool = False
    plan: Any = None  # what the backend's prepare() built for this step's attention

    @property
    def num_decodes(self) -> int:
        return self.group_bounds[1]


@dataclass
class LoRAMeta:
    seg_starts: torch.Tensor  # [nseg + 1] int32 token offsets of same-slot runs
    seg_slots: torch.Tensor  # [nseg] int32, -1 = no adapter
    max_seg_len: int
    max_rank: int  # largest rank among the step's adapters
    seg_starts_host: np.ndarray  # host copies of seg_starts / seg_slots
    seg_slots_host: np.ndarray
    token_slots: torch.Tensor | None = None  # [T] int32 slot of each token (static steps)
    plan: Any = None  # what the backend's prepare() built for this step's LoRA


@runtime_checkable
class Backend(Protocol):
    """What a layer may ask of the step's compute backend."""

    name: str

    def prepare_weights(
        self, weights: list[torch.Tensor], keep_plain: bool = True, max_rows: int | None = None
    ) -> list[torch.Tensor]:
        """After the weights are loaded and before the KV cache is sized (so the memory it takes is
        counted), once per ``linear`` weight or group of them: the backend may keep copies of
        ``weights`` in a layout of its own. Base weights do not change afterwards. With
        ``keep_plain=False`` it returns the weights whose plain tensors it no longer reads (their
        owner may free them). ``max_rows``: the most rows a ``linear`` call will have (the step
        token budget), None if unknown."""

    def prepare(self, attn: AttentionMeta, lora: LoRAMeta | None) -> None:
        """Once per step, before the forward: the backend's own metadata into ``attn.plan`` /
        ``lora.plan`` (the latter as ``prepare_lora``)."""

    def prepare_lora(self, lora: LoRAMeta) -> None:
        """The backend's own metadata of ``lora`` into ``lora.plan``: ``prepare``'s for the step's
        LoRA, and once per step for the rows the last layer keeps (``ForwardContext.keep``)."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [T, in] @ weight[out, in].T + bias [out]`` -> ``[T, out]`` (the base projections and the
        LM head)."""

    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, attn: AttentionMeta
    ) -> None:
        """This step's keys/values ``[T, Hkv, D]`` into the paged cache at ``attn.slot_mapping``."""

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
        """``q [T, Hq, D]`` over the cache (``k``/``v``: the step's new keys/values, already
        stored); returns ``[T, Hq, D]``. Query row ``i`` of a sequence with ``q_len`` new tokens and
        context ``ctx`` sits at position ``ctx - q_len + i`` and sees the keys at positions up to
        its own; the ``G = Hq // Hkv`` query heads ``h`` with ``h // G == j`` share KV head ``j``."""

    def apply_lora(self, x: torch.Tensor, y: torch.Tensor, mod, lora: LoRAMeta) -> None:
        """``y += LoRA(x)`` in place, per token with that token's adapter slot (``mod``: a
        ``LinearWithLoRA``; the layout of its buffers is described there)."""

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """transformers' RMSNorm of the last axis: ``weight * (h / sqrt(mean(h^2) + eps))``,
        normalised in float32 and rounded to the dtype before the weight. ``h = x``, or, given the
        layer's ``residual``, ``h = x + residual`` and the result is ``(normed, h)`` (``h``, the new
        residual, may be ``residual`` itself, written in place)."""

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x [T, heads, D]`` rotated with transformers' half-split convention by ``cos``/``sin``
        ``[T, D]``: ``x * cos + rotate_half(x) * sin``. May rotate ``x`` in place; returns the result."""

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's activation: ``x [T, 2I]`` is ``gate | up`` (the fused gate_up projection's
        output); returns ``silu(gate) * up`` ``[T, I]``, ``silu`` rounded to the dtype before the
        product (transformers' ``act_fn(gate) * up``)."""


@dataclass
class KeptRows:
    """The rows whose hidden states a step reads: each sampling sequence's last token. The last
    layer computes its keys and values (and attention) for every row, then its output projection,
    MLP and the final norm for these rows only, and the forward returns ``[K, hidden]``, in order."""

    index: torch.Tensor  # [K] int64 token rows, K >= 1
    lora: LoRAMeta | None  # their adapter segments (over the K rows); None when none has an adapter


@dataclass
class ForwardContext:
    backend: Backend
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache) [num_blocks, block_size, Hkv, D]
    attn: AttentionMeta
    lora: LoRAMeta | None  # None when no token of the step has an adapter
    keep: KeptRows | None = None  # None: the forward returns every row
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


def lora_segments(slots: np.ndarray, q_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Runs of equal adapter slot over sequences, as token offsets (host side)."""
    if not len(slots):
        return np.zeros(1, np.int32), np.zeros(0, np.int32), 0
    change = np.empty(len(slots), dtype=bool)
    change[0] = True
    np.not_equal(slots[1:], slots[:-1], out=change[1:])
    starts_seq = np.flatnonzero(change)
    cu = np.zeros(len(q_lens) + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu[1:])
    seg_starts = np.append(cu[starts_seq], cu[-1]).astype(np.int32)
    return seg_starts, slots[starts_seq].astype(np.int32), int(np.diff(seg_starts).max())


# name -> "module:class"; modules are imported on first use (the triton one needs Triton).
BACKENDS: dict[str, str] = {
    "reference": "mcl_runtime.model.reference_backend:ReferenceBackend",
    "cpu": "mcl_runtime.model.cpu_backend:CPUBackend",
    "torch": "mcl_runtime.model.cpu_backend:CPUBackend",  # another name of "cpu"
    "triton": "mcl_runtime.model.triton_backend:TritonBackend",
}


def register_backend(name: str, target: str) -> None:
    """Makes ``make_backend(name)`` build ``target`` (``"package.module:Class"``)."""
    BACKENDS[name] = target


def make_backend(backend: str | Backend) -> Backend:
    """The registered backend ``backend`` (built with its defaults), or ``backend`` itself when it
    is already a backend object (one built with other options, e.g. ``CPUBackend(layer_kernels=False)``)."""
    if not isinstance(backend, str):
        if not isinstance(backend, Backend):
            raise TypeError(f"backend must be a name or a Backend, got {type(backend).__name__}")
        return backend
    target = BACKENDS.get(backend)
    if target is None:
        raise ValueError(f"unknown backend {backend!r} (choose one of {', '.join(sorted(BACKENDS))})")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()
