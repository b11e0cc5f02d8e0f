"""Persistent input buffers of a step: written on the host, copied in one transfer.

A ``StepBuffers`` gives each field (a name, a shape of one or two dimensions, a dtype of 32 or 64
bits) a fixed region of one int32 host buffer (pinned on CUDA; 64-bit fields take two words per
entry, 8-byte aligned). ``commit()`` copies the whole buffer to its device twin in one host-to-device
copy (on the CPU the device tensors are views of the host buffer: no copy), and the device views of
a region never move, which is what a captured CUDA graph needs.

The model runner keeps two: the step's metadata (``metadata_fields``: token ids, positions, KV
slots, per-token adapter slots, where PENDING input ids come from, context lengths, query offsets,
LoRA segments, block tables, the rows the last layer keeps and their LoRA segments) and
the sampling parameters of its samples (``sampling_fields``), copied once each per step.
"""

from __future__ import annotations

import numpy as np
import torch

Field = tuple[tuple[int, ...], torch.dtype]
_NUMPY = {torch.int32: np.int32, torch.int64: np.int64, torch.float32: np.float32}


def metadata_fields(max_tokens: int, max_seqs: int, max_blocks: int) -> dict[str, Field]:
    return {
        "input_ids": ((max_tokens,), torch.int64),
        "positions": ((max_tokens,), torch.int64),
        "slot_mapping": ((max_tokens,), torch.int64),
        "token_slots": ((max_tokens,), torch.int32),
        "pending_dst": ((max_tokens,), torch.int64),
        "pending_src": ((max_tokens,), torch.int64),
        "context_lens": ((max_seqs,), torch.int32),
        "cu_seqlens_q": ((max_seqs + 1,), torch.int32),
        "seg_starts": ((max_seqs + 1,), torch.int32),
        "seg_slots": ((max_seqs,), torch.int32),
        "block_tables": ((max_seqs, max_blocks), torch.int32),
        "keep_rows": ((max_seqs,), torch.int64),
        "keep_seg_starts": ((max_seqs + 1,), torch.int32),
        "keep_seg_slots": ((max_seqs,), torch.int32),
    }


def sampling_fields(max_samples: int) -> dict[str, Field]:
    """One entry per sample (a request's first step samples its ``n`` completions)."""
    return {
        "temperatures": ((max_samples,), torch.float32),
        "top_ps": ((max_samples,), torch.float32),
        "min_ps": ((max_samples,), torch.float32),
        "top_ks": ((max_samples,), torch.int64),
        "seeds": ((max_samples,), torch.int64),
        "steps": ((max_samples,), torch.int64),
    }


class StepBuffers:
    def __init__(self, fields: dict[str, Field], device: torch.device) -> None:
        self.fields = fields
        self._regions: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, (shape, dtype) in fields.items():
            words = int(np.prod(shape)) * dtype.itemsize // 4
            self._regions[name] = (offset, words)
            offset += words + words % 2  # keep every region 8-byte aligned
        cuda = device.type == "cuda"
        self.host = torch.zeros(offset, dtype=torch.int32, pin_memory=cuda)
        self.device_buf = torch.zeros(offset, dtype=torch.int32, device=device) if cuda else self.host
        host_np = self.host.numpy()
        self._host_regions = {
            name: self._region(host_np, name, lambda a, dtype: a.view(_NUMPY[dtype])) for name in fields
        }
        self._views: dict[str, tuple[int, torch.Tensor]] = {}  # each field's last device view: sizes repeat
        self._copied: torch.cuda.Event | None = None  # the last commit's copy, which reads the host buffer

    def _region(self, buf, name: str, view):
        off, words = self._regions[name]
        shape, dtype = self.fields[name]
        return view(buf[off : off + words], dtype).reshape(shape)

    def write(self, name: str, values: np.ndarray) -> None:
        """``values`` into the start of field ``name`` (2-D fields: the leading rows and columns). With
        overlapped steps the previous step's copy may still be queued: it must read the buffer first."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        region = self._host_regions[name]
        if region.ndim == 1:
            region[: len(values)] = values
        else:
            region[: values.shape[0], : values.shape[1]] = values

    def commit(self) -> None:
        if self.device_buf is not self.host:
            self.device_buf.copy_(self.host, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()

    def view(self, name: str, n: int) -> torch.Tensor:
        """The device tensor of the first ``n`` entries (2-D fields: ``n`` full rows)."""
        last = self._views.get(name)
        if last is None or last[0] != n:
            last = self._views[name] = (n, self._region(self.device_buf, name, lambda t, dtype: t.view(dtype))[:n])
        return last[1]
