"""Per-step batch metadata, the backend protocol and the backend registry.

A step's metadata is built once (by the model runner, then ``backend.prepare``) and shared by every
layer. Layers call ``ctx.backend.store_kv / attention / apply_lora``; backends see tensors and
metadata, never requests. Two backends implement the protocol: ``torch`` (plain torch, the
reference and the CPU path, ``torch_backend.py``) and ``triton`` (the kernels of
``mcl_runtime.kernels``, ``triton_backend.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

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
    extra: dict = field(default_factory=dict)  # backend-specific tensors built in prepare()

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
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """What a layer may ask of the step's compute backend."""

    name: str

    def prepare(self, attn: AttentionMeta, lora: LoRAMeta | None) -> None:
        """Once per step, before the forward: backend-specific metadata into ``attn.extra`` /
        ``lora.extra``."""

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
        stored); returns ``[T, Hq, D]``."""

    def apply_lora(self, x: torch.Tensor, y: torch.Tensor, mod, lora: LoRAMeta) -> None:
        """``y += LoRA(x)`` in place, per token with that token's adapter slot (``mod``: a
        ``LinearWithLoRA``)."""


@dataclass
class ForwardContext:
    backend: Backend
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache) [num_blocks, block_size, Hkv, D]
    attn: AttentionMeta
    lora: LoRAMeta | None  # None when no token of the step has an adapter
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
    "torch": "mcl_runtime.model.torch_backend:TorchBackend",
    "triton": "mcl_runtime.model.triton_backend:TritonBackend",
}


def register_backend(name: str, target: str) -> None:
    """Makes ``make_backend(name)`` build ``target`` (``"package.module:Class"``)."""
    BACKENDS[name] = target


def make_backend(name: str) -> Backend:
    target = BACKENDS.get(name)
    if target is None:
        raise ValueError(f"unknown backend {name!r} (choose one of {', '.join(sorted(BACKENDS))})")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()
