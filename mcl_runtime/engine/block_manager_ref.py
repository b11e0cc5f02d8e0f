"""Pure-Python reference of the paged KV block manager (``csrc/block_manager.cpp`` is the fast one).

Both implementations have exactly this interface and behaviour; ``tests/test_block_manager.py``
replays random traces through both and compares every output and the final state.

Model: ``num_blocks`` KV blocks of ``block_size`` token slots each. A sequence owns a list of
blocks (its block table) and a count of tokens whose KV is stored (or being stored this step).
Blocks are reference counted: ``fork`` shares all of a parent's blocks with a child, and the first
append into a shared, partially filled last block copies it (copy-on-write; the copy is reported
by ``pop_block_copies`` so the model runner copies the KV before the forward pass).

Prefix cache: when a block becomes full, it is registered under the chained hash of
(parent block's hash, its ``block_size`` token ids, adapter id). ``add_sequence`` reuses
registered blocks for the longest run of full blocks of its tokens, never including the last
token (its logits must be computed). A block whose reference count drops to zero stays
registered and becomes *evictable*; new blocks come from the free list first (FIFO), then from the
least recently freed evictable block, which loses its registration. Registration stores the
block's tokens, parent hash and adapter, so a hash collision is a miss, never wrong KV. A block
after the first is registered only if its parent block is the one registered under the parent
hash, so KV computed after a prefix that merely collides with a cached one is never registered
(a child is always evicted before its parent, so the parent stays registered while it is).

Determinism (relied on by the differential test): the free list starts as ``0..num_blocks-1``
and is FIFO; ``free`` releases a sequence's blocks last-to-first; evictable blocks are evicted in
the order they became evictable.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np

_MASK = (1 << 64) - 1


def _mix64(h: int) -> int:
    """splitmix64 finalizer on an unsigned 64-bit value."""
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
    return h ^ (h >> 31)


def block_hash(parent_hash: int, token_ids: list[int], adapter_id: int) -> int:
    """Chained hash of one full block. ``parent_hash`` is 0 for the first block."""
    h = _mix64((parent_hash + 0x9E3779B97F4A7C15) & _MASK)
    h = _mix64(h ^ (adapter_id & _MASK))
    for t in token_ids:
        h = _mix64(h ^ (t & _MASK))
    return h


class _Seq:
    __slots__ = ("blocks", "num_tokens", "last_tokens", "last_hash", "adapter_id")

    def __init__(self, adapter_id: int) -> None:
        self.blocks: list[int] = []
        self.num_tokens = 0
        self.last_tokens: list[int] = []  # tokens of the partially filled last block
        self.last_hash = 0  # hash of the last full block (0: none yet)
        self.adapter_id = adapter_id


class _CachedBlock:
    __slots__ = ("hash", "parent_hash", "adapter_id", "tokens")

    def __init__(self, h: int, parent_hash: int, adapter_id: int, tokens: list[int]) -> None:
        self.hash, self.parent_hash, self.adapter_id, self.tokens = h, parent_hash, adapter_id, tokens


class PyBlockManager:
    """Reference implementation; see the module docstring for the semantics."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        if num_blocks > 2**31 - 1:
            raise ValueError(f"num_blocks must be < 2**31 (block ids are int32), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, int] = {}  # hash -> block id
        self._block_info: dict[int, _CachedBlock] = {}  # block id -> registration
        self._seqs: dict[int, _Seq] = {}
        self._copies: list[tuple[int, int]] = []

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def get_block_table(self, seq_id: int) -> list[int]:
        return list(self._seq(seq_id).blocks)

    def get_num_tokens(self, seq_id: int) -> int:
        return self._seq(seq_id).num_tokens

    def ref_counts(self) -> list[int]:
        return list(self._ref)

    def blocks_needed(self, seq_id: int, num_new_tokens: int) -> int:
        """Blocks ``append_tokens(seq_id, <num_new_tokens tokens>)`` would take from the pool."""
        seq = self._seq(seq_id)
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        total = seq.num_tokens + num_new_tokens
        needed = -(-total // self.block_size) - len(seq.blocks)
        partial = seq.num_tokens % self.block_size
        if num_new_tokens > 0 and partial and self._ref[seq.blocks[-1]] > 1:
            needed += 1  # copy-on-write of the shared last block
        return max(needed, 0)

    def can_append(self, seq_id: int, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_new_tokens) <= self.num_free_blocks

    # ---- mutations -------------------------------------------------------------------------
    def add_sequence(self, seq_id: int, token_ids: list[int], adapter_id: int) -> int:
        """Register a new sequence; reuse cached blocks for its prefix. Returns cached tokens."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already exists")
        seq = _Seq(adapter_id)
        self._seqs[seq_id] = seq
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        parent = 0
        for i in range((len(token_ids) - 1) // bs):
            tokens = list(token_ids[i * bs : (i + 1) * bs])
            h = block_hash(parent, tokens, adapter_id)
            block = self._lookup(h, parent, adapter_id, tokens)
            if block is None:
                break
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            seq.blocks.append(block)
            parent = h
        seq.num_tokens = len(seq.blocks) * bs
        seq.last_hash = parent
        return seq.num_tokens

    def append_tokens(self, seq_id: int, token_ids: list[int]) -> bool:
        """Reserve KV slots for ``token_ids`` (computed this step). False, with no change, if the
        pool lacks blocks."""
        seq = self._seq(seq_id)
        if not token_ids:
            return True
        if self.blocks_needed(seq_id, len(token_ids)) > self.num_free_blocks:
            return False
        bs = self.block_size
        if seq.num_tokens % bs and self._ref[seq.blocks[-1]] > 1:
            old = seq.blocks[-1]
            new = self._allocate()
            self._release(old)
            seq.blocks[-1] = new
            self._copies.append((old, new))
        for t in token_ids:
            if seq.num_tokens % bs == 0:
                seq.blocks.append(self._allocate())
            seq.last_tokens.append(int(t))
            seq.num_tokens += 1
            if seq.num_tokens % bs == 0:
                self._on_block_full(seq)
        return True

    def append_one_each(self, seq_ids: list[int], tokens: list[int]) -> int:
        """``append_tokens(seq_ids[i], [tokens[i]])`` for each i in order until one returns False;
        returns how many were appended (the decodes of a step in one call)."""
        if len(seq_ids) != len(tokens):
            raise ValueError("seq_ids and tokens differ in length")
        for i, (seq_id, token) in enumerate(zip(seq_ids, tokens)):
            if not self.append_tokens(seq_id, [token]):
                return i
        return len(seq_ids)

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (copy-on-write on its next append)."""
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id} already exists")
        parent = self._seq(parent_id)
        child = _Seq(parent.adapter_id)
        child.blocks = list(parent.blocks)
        child.num_tokens = parent.num_tokens
        child.last_tokens = list(parent.last_tokens)
        child.last_hash = parent.last_hash
        for b in child.blocks:
            self._ref[b] += 1
        self._seqs[child_id] = child

    def free(self, seq_id: int) -> None:
        """Remove a sequence and release its blocks (last block first)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id}")
        for b in reversed(seq.blocks):
            self._release(b)

    def pop_block_copies(self) -> list[tuple[int, int]]:
        """(src, dst) block copies made by copy-on-write since the last call."""
        copies, self._copies = self._copies, []
        return copies

    def build_metadata(self, seq_ids: list[int], num_new_tokens: list[int]):
        """Per-step batch metadata for sequences whose last ``num_new_tokens[i]`` tokens are
        computed this step. Returns numpy arrays::

            positions     int64 [T]      position of each new token, T = sum(num_new_tokens)
            slot_mapping  int64 [T]      block_id * block_size + offset of each new token's KV
            block_tables  int32 [B, M]   each sequence's blocks, padded with 0, M = max blocks
            context_lens  int32 [B]      tokens stored after this step
            cu_seqlens_q  int32 [B + 1]  start of each sequence's new tokens in the flat batch
        """
        if len(seq_ids) != len(num_new_tokens):
            raise ValueError("seq_ids and num_new_tokens differ in length")
        bs = self.block_size
        seqs = [self._seq(s) for s in seq_ids]
        for s, seq, n in zip(seq_ids, seqs, num_new_tokens):
            if n < 0 or n > seq.num_tokens:
                raise ValueError(f"sequence {s} has {seq.num_tokens} tokens, asked for {n} new")
        total = int(sum(num_new_tokens))
        width = max((len(s.blocks) for s in seqs), default=0)
        positions = np.empty(total, dtype=np.int64)
        slots = np.empty(total, dtype=np.int64)
        tables = np.zeros((len(seqs), width), dtype=np.int32)
        ctx = np.empty(len(seqs), dtype=np.int32)
        cu = np.zeros(len(seqs) + 1, dtype=np.int32)
        t = 0
        for i, (seq, n) in enumerate(zip(seqs, num_new_tokens)):
            tables[i, : len(seq.blocks)] = seq.blocks
            ctx[i] = seq.num_tokens
            for p in range(seq.num_tokens - n, seq.num_tokens):
                positions[t] = p
                slots[t] = seq.blocks[p // bs] * bs + p % bs
                t += 1
            cu[i + 1] = t
        return positions, slots, tables, ctx, cu

    # ---- internals -------------------------------------------------------------------------
    def _seq(self, seq_id: int) -> _Seq:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id}")
        return seq

    def _lookup(self, h: int, parent: int, adapter_id: int, tokens: list[int]) -> int | None:
        block = self._cached.get(h)
        if block is None:
            return None
        info = self._block_info[block]
        if info.parent_hash != parent or info.adapter_id != adapter_id or info.tokens != tokens:
            return None
        return block

    def _on_block_full(self, seq: _Seq) -> None:
        tokens, seq.last_tokens = seq.last_tokens, []
        parent = seq.last_hash
        h = block_hash(parent, tokens, seq.adapter_id)
        seq.last_hash = h
        block = seq.blocks[-1]
        parent_registered = len(seq.blocks) == 1 or self._cached.get(parent) == seq.blocks[-2]
        if self.enable_prefix_caching and parent_registered and h not in self._cached and block not in self._block_info:
            self._cached[h] = block
            self._block_info[block] = _CachedBlock(h, parent, seq.adapter_id, tokens)

    def _allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            info = self._block_info.pop(block)
            del self._cached[info.hash]
        self._ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] == 0:
            if block in self._block_info:
                self._evictable[block] = None
            else:
                self._free.append(block)
