"""Persistent input and metadata buffers of a step: written on the host, copied in one transfer.

Every per-step array (token ids, positions, KV slots, per-token adapter slots, context lengths,
query offsets, LoRA segments, block tables) has a fixed region of one int32 host buffer (pinned on
CUDA; 64-bit fields take two int32 words each). ``commit()`` copies the whole buffer to its device
twin in one host-to-device copy (on the CPU the device tensors are views of the host buffer: no
copy), and the device views of a region never move, which is what a captured CUDA graph needs.
"""
from __future__ import annotations

import numpy as np
import torch

_INT64_FIELDS = ("input_ids", "positions", "slot_mapping")


class StepBuffers:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device) -> None:
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        sizes = {"input_ids": 2 * max_tokens, "positions": 2 * max_tokens, "slot_mapping": 2 * max_tokens,
                 "token_slots": max_tokens, "context_lens": max_seqs, "cu_seqlens_q": max_seqs + 1,
                 "seg_starts": max_seqs + 1, "seg_slots": max_seqs, "block_tables": max_seqs * max_blocks}
        self._regions, offset = {}, 0
        for name, size in sizes.items():
            self._regions[name] = (offset, size)
            offset += size + size % 2  # keep 64-bit fields 8-byte aligned
        cuda = device.type == "cuda"
        self.host = torch.zeros(offset, dtype=torch.int32, pin_memory=cuda)
        self.device_buf = torch.zeros(offset, dtype=torch.int32, device=device) if cuda else self.host
        self._np = self.host.numpy()
        self._copied: torch.cuda.Event | None = None   # the last commit's copy, which reads the host buffer

    def write(self, name: str, values: np.ndarray) -> None:
        """``values`` into the start of region ``name`` (block tables: rows of ``max_blocks``). With
        overlapped steps the previous step's copy may still be queued: it must read the buffer first."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        off, size = self._regions[name]
        region = self._np[off:off + size]
        if name in _INT64_FIELDS:
            region.view(np.int64)[:len(values)] = values
        elif name == "block_tables":
            rows, width = values.shape
            region.reshape(self.max_seqs, self.max_blocks)[:rows, :width] = values
        else:
            region[:len(values)] = values

    def commit(self) -> None:
        if self.device_buf is not self.host:
            self.device_buf.copy_(self.host, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()

    def view(self, name: str, n: int) -> torch.Tensor:
        """The device tensor of the first ``n`` entries (block tables: ``n`` rows ``[n, max_blocks]``)."""
        off, size = self._regions[name]
        region = self.device_buf[off:off + size]
        if name in _INT64_FIELDS:
            return region.view(torch.int64)[:n]
        if name == "block_tables":
            return region.view(self.max_seqs, self.max_blocks)[:n]
        return region[:n]
