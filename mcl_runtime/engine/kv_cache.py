"""How big the paged KV cache is, and its allocation.

The size comes from, first to last: ``kv_cache_blocks`` (exact), ``kv_cache_memory`` (bytes), or a
fraction of the memory available once the weights are loaded (``kv_cache_memory_fraction``; default
``DEFAULT_MEMORY_FRACTION``) less a reserve for activations and the rest of the process
(``RESERVE_BYTES``), like vLLM's ``--kv-cache-memory-bytes`` / ``--gpu-memory-utilization``. The
available memory is the GPU's free memory on CUDA; on the CPU it is the host's ``MemAvailable``, within
the cgroup's limit when the process runs in a container. The cache never exceeds what ``max_num_seqs``
sequences of ``max_model_len`` tokens can fill, and a cache smaller than ``max_num_seqs`` sequences of
``TYPICAL_SEQUENCE_TOKENS`` is a warning (the batch the scheduler can form is then bound by the cache).

On the CPU the cache is allocated as lazily zeroed pages (``calloc``: the kernel's zero pages), so a
large cache costs resident memory only for the blocks that sequences write; on CUDA it is zeroed at once.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_MEMORY_FRACTION = 0.9
RESERVE_BYTES = {"cpu": 1 * GIB, "cuda": 2 * GIB}
TYPICAL_SEQUENCE_TOKENS = 2048
MIN_BLOCKS = 16
_ALIGN = 64  # bytes: a cache line, the widest vector load of the CPU kernels


@dataclass(frozen=True)
class KVCachePlan:
    """The cache's size and where it came from (``source``, for the start-up log)."""

    num_blocks: int
    block_size: int
    block_bytes: int
    source: str

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def describe(self) -> str:
        return (
            f"KV cache: {self.num_tokens:,} tokens ({self.num_blocks:,} blocks of {self.block_size}, "
            f"{self.num_bytes / GIB:.2f} GiB; {self.source})"
        )


def parse_bytes(text: str | int) -> int:
    """``4GiB``, ``512MiB``, ``4GB``, ``1.5e9`` or a plain integer as a number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if m is None:
        raise ValueError(f"expected a size such as 4GiB, 512MiB or 1e9, got {text!r}")
    unit = (m.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 1 << 10, "MI": 1 << 20, "GI": GIB, "TI": 1 << 40}
    return int(float(m.group(1)) * scale[unit])


def host_available_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes the host can still give this process: ``MemAvailable``, or less under a cgroup v2 limit."""
    fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
    available = int(fields["MemAvailable"].split()[0]) * 1024
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(available, 0)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available_memory()


def plan_kv_cache(
    block_bytes: int,
    block_size: int,
    device: torch.device,
    max_num_seqs: int,
    max_model_len: int,
    kv_cache_blocks: int | None = None,
    kv_cache_memory: int | None = None,
    kv_cache_memory_fraction: float | None = None,
    available: int | None = None,
) -> KVCachePlan:
    """The number of blocks (see the module docstring); ``available`` defaults to the device's
    available memory now (call it after the weights are loaded)."""
    options = {
        "kv_cache_blocks": kv_cache_blocks,
        "kv_cache_memory": kv_cache_memory,
        "kv_cache_memory_fraction": kv_cache_memory_fraction,
    }
    given = [name for name, value in options.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of kv_cache_blocks, kv_cache_memory, kv_cache_memory_fraction: {given}")
    if kv_cache_blocks is not None:
        if not isinstance(kv_cache_blocks, int) or kv_cache_blocks < 1:
            raise ValueError(f"kv_cache_blocks must be a positive integer, got {kv_cache_blocks!r}")
        return KVCachePlan(kv_cache_blocks, block_size, block_bytes, "kv_cache_blocks")
    if kv_cache_memory is not None:
        if kv_cache_memory < block_bytes:
            raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes holds no block of {block_bytes} bytes")
        return KVCachePlan(kv_cache_memory // block_bytes, block_size, block_bytes, "kv_cache_memory")
    fraction = DEFAULT_MEMORY_FRACTION if kv_cache_memory_fraction is None else kv_cache_memory_fraction
    if not 0 < fraction <= 1:
        raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {fraction!r}")
    available = available_memory(device) if available is None else available
    reserve = RESERVE_BYTES.get(device.type, RESERVE_BYTES["cpu"])
    budget = int(available * fraction) - reserve
    wanted = max_num_seqs * math.ceil(max_model_len / block_size)
    num_blocks = max(min(budget // block_bytes, wanted), MIN_BLOCKS)
    source = (
        f"{fraction:g} of {available / GIB:.1f} GiB available less {reserve / GIB:.0f} GiB"
        if num_blocks < wanted
        else f"max_num_seqs={max_num_seqs} x max_model_len={max_model_len}"
    )
    return KVCachePlan(num_blocks, block_size, block_bytes, source)


def check_kv_cache(plan: KVCachePlan, max_num_seqs: int, max_model_len: int) -> str | None:
    """The warning for a cache too small for ``max_num_seqs`` sequences of typical length, or None."""
    typical = min(max_model_len, TYPICAL_SEQUENCE_TOKENS)
    if plan.num_tokens >= max_num_seqs * typical:
        return None
    return (
        f"the KV cache holds {plan.num_tokens:,} tokens, fewer than max_num_seqs={max_num_seqs} sequences of "
        f"{typical} tokens ({max_num_seqs * typical:,}): about {max(plan.num_tokens // typical, 1)} such sequences "
        "run at once. Give it more memory (kv_cache_memory / --kv-cache-memory) or lower max_num_seqs."
    )


def log_kv_cache(plan: KVCachePlan, max_num_seqs: int, max_model_len: int) -> None:
    logger.info(plan.describe())
    warning = check_kv_cache(plan, max_num_seqs, max_model_len)
    if warning:
        logger.warning(warning)


def allocate_kv_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor; on the CPU backed by lazily zeroed pages (resident only once written)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.zeros(nbytes + _ALIGN, dtype=np.uint8)  # calloc: large blocks come from mmap, already zero
    start = -raw.ctypes.data % _ALIGN
    return torch.from_numpy(raw[start : start + nbytes]).view(dtype).view(shape)
