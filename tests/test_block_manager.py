"""Block manager: semantics on both implementations, and a differential test that replays random
traces through the C++ and the Python one and compares every output and the state after each step."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mcl_runtime.engine.block_manager import HAVE_EXT, PyBlockManager
from mcl_runtime.engine.block_manager_ref import _mix64, block_hash

if HAVE_EXT:
    from mcl_runtime import _C

NO_EXT = "the C++ extension mcl_runtime._C is not built (or MCL_NO_EXT=1)"
IMPLS = [
    pytest.param(PyBlockManager, id="py"),
    pytest.param(
        _C.BlockManager if HAVE_EXT else None, id="cpp", marks=pytest.mark.skipif(not HAVE_EXT, reason=NO_EXT)
    ),
]


@pytest.fixture(params=IMPLS)
def BM(request):
    return request.param


def filled(BM, num_blocks: int, block_size: int, seqs: dict[int, list[int]], adapter_id: int = 0, **kw):
    bm = BM(num_blocks, block_size, **kw)
    for seq_id, tokens in seqs.items():
        cached = bm.add_sequence(seq_id, tokens, adapter_id)
        assert bm.append_tokens(seq_id, tokens[cached:])
    return bm


# ---- semantics ---------------------------------------------------------------------------------


def test_allocation_and_append_across_block_boundaries(BM):
    bm = BM(8, 4)
    assert (bm.num_blocks, bm.block_size, bm.enable_prefix_caching) == (8, 4, True)
    assert bm.add_sequence(1, [5, 6, 7], 0) == 0
    assert bm.get_block_table(1) == [] and bm.get_num_tokens(1) == 0
    tables = []
    for t in range(9):
        assert bm.append_tokens(1, [t])
        tables.append(bm.get_block_table(1))
    assert tables[0] == tables[3] == [0]
    assert tables[4] == tables[7] == [0, 1]
    assert tables[8] == [0, 1, 2]
    assert bm.get_num_tokens(1) == 9
    assert bm.ref_counts() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert bm.num_free_blocks == 5
    assert bm.append_tokens(1, [])
    assert bm.append_tokens(1, list(range(7)))  # 16 tokens: exactly 4 blocks
    assert bm.get_block_table(1) == [0, 1, 2, 3] and bm.get_num_tokens(1) == 16


def test_fork_shares_blocks_and_copy_on_write(BM):
    bm = filled(BM, 8, 4, {1: list(range(6))})
    bm.fork(1, 2)
    assert bm.has_sequence(2) and bm.get_block_table(2) == [0, 1] and bm.get_num_tokens(2) == 6
    assert bm.ref_counts()[:2] == [2, 2]
    assert bm.blocks_needed(2, 1) == 1 and bm.blocks_needed(2, 0) == 0  # copy of the shared last block
    assert bm.pop_block_copies() == []
    assert bm.append_tokens(2, [100])
    assert bm.get_block_table(2) == [0, 2] and bm.get_block_table(1) == [0, 1]
    assert bm.pop_block_copies() == [(1, 2)]
    assert bm.pop_block_copies() == []
    assert bm.ref_counts()[:3] == [2, 1, 1]
    assert bm.append_tokens(1, [6])  # the parent's last block is no longer shared: written in place
    assert bm.get_block_table(1) == [0, 1] and bm.pop_block_copies() == []


def test_fork_at_block_boundary_needs_no_copy(BM):
    bm = filled(BM, 8, 4, {1: list(range(8))})
    bm.fork(1, 2)
    assert bm.blocks_needed(2, 1) == 1
    assert bm.append_tokens(2, [9])
    assert bm.get_block_table(2) == [0, 1, 2] and bm.pop_block_copies() == []


def test_free_releases_last_block_first(BM):
    bm = filled(BM, 8, 4, {1: list(range(12))}, enable_prefix_caching=False)
    bm.fork(1, 2)
    bm.free(1)
    assert not bm.has_sequence(1) and bm.ref_counts()[:3] == [1, 1, 1] and bm.num_free_blocks == 5
    bm.free(2)
    assert bm.ref_counts() == [0] * 8 and bm.num_free_blocks == 8 and bm.num_cached_blocks == 0
    bm.add_sequence(3, [], 0)
    assert bm.append_tokens(3, list(range(32)))
    assert bm.get_block_table(3) == [3, 4, 5, 6, 7, 2, 1, 0]  # FIFO free list, released 2, 1, 0


def test_prefix_cache_hit_reuses_identical_blocks(BM):
    prompt = list(range(100, 110))
    bm = filled(BM, 8, 4, {1: prompt})
    assert bm.num_cached_blocks == 2  # two full blocks, the partial third is not registered
    assert bm.add_sequence(2, prompt, 0) == 8
    assert bm.get_block_table(2) == [0, 1] and bm.get_num_tokens(2) == 8
    assert bm.ref_counts()[:3] == [2, 2, 1]
    assert bm.append_tokens(2, prompt[8:])
    assert bm.get_block_table(2) == [0, 1, 3]
    assert bm.add_sequence(3, prompt[:6] + [0, 0, 0], 0) == 4  # diverges in the second block
    assert bm.add_sequence(4, [7] + prompt[1:], 0) == 0


def test_prefix_cache_is_per_adapter(BM):
    prompt = list(range(10))
    bm = filled(BM, 8, 4, {1: prompt}, adapter_id=3)
    assert bm.add_sequence(2, prompt, 0) == 0
    assert bm.add_sequence(3, prompt, -1) == 0
    assert bm.add_sequence(4, prompt, 3) == 8


def test_last_token_is_never_cached(BM):
    prompt = list(range(8))
    bm = filled(BM, 8, 4, {1: prompt})
    assert bm.num_cached_blocks == 2
    assert bm.add_sequence(2, prompt, 0) == 4
    assert bm.add_sequence(3, prompt + [8], 0) == 8
    assert bm.add_sequence(4, [], 0) == 0 and bm.add_sequence(5, [0], 0) == 0


def test_prefix_caching_disabled(BM):
    prompt = list(range(10))
    bm = filled(BM, 8, 4, {1: prompt}, enable_prefix_caching=False)
    assert bm.num_cached_blocks == 0 and bm.add_sequence(2, prompt, 0) == 0


M64 = 2**64 - 1


def _state(parent: int, adapter_id: int, tokens: list[int]) -> int:
    """block_hash's internal state after ``tokens``: block_hash(p, tokens + [t], a) == _mix64(state ^ t)."""
    h = _mix64((parent + 0x9E3779B97F4A7C15) & M64)
    for x in [adapter_id, *tokens]:
        h = _mix64(h ^ (x & M64))
    return h


def _unmix64(h: int) -> int:
    """Inverse of _mix64 (splitmix64's finalizer is a bijection)."""
    h ^= (h >> 31) ^ (h >> 62)
    h = h * pow(0x94D049BB133111EB, -1, 2**64) & M64
    h ^= (h >> 27) ^ (h >> 54)
    h = h * pow(0xBF58476D1CE4E5B9, -1, 2**64) & M64
    return h ^ (h >> 30) ^ (h >> 60)


def _int64(x: int) -> int:
    return x - 2**64 if x >= 2**63 else x


def test_hash_collisions_are_misses(BM):
    """Blocks built to collide with a cached block's hash must be misses: different tokens, or the
    same tokens after a different parent and adapter (the hash is a bijection of each input, so
    equal tokens and hash imply that both the parent and the adapter differ)."""
    a = [1, 2, 3, 4]
    h12 = block_hash(0, a[:2], 0)
    bm = filled(BM, 16, 2, {1: a + [0]})
    assert bm.num_cached_blocks == 2

    other_tokens = [3, _int64(_state(0, 0, [1]) ^ 2 ^ _state(0, 0, [3]))]
    assert block_hash(0, other_tokens, 0) == h12
    assert bm.add_sequence(2, other_tokens + [0], 0) == 0
    assert bm.append_tokens(2, other_tokens + [0])  # filled, but its hash is taken: not registered
    assert bm.num_cached_blocks == 2

    # Parent hash p with block_hash(p, [3, 4], 1) == block_hash(h12, [3, 4], 0), then a cached
    # adapter-1 block [5, u] whose hash is p.
    p = (_unmix64(_mix64((h12 + 0x9E3779B97F4A7C15) & M64) ^ 1) - 0x9E3779B97F4A7C15) & M64
    u = _int64(_unmix64(p) ^ _state(0, 1, [5]))
    assert block_hash(0, [5, u], 1) == p and block_hash(p, [3, 4], 1) == block_hash(h12, [3, 4], 0)
    assert bm.add_sequence(3, [5, u, 0], 1) == 0 and bm.append_tokens(3, [5, u, 0])
    assert bm.add_sequence(4, [5, u, 3, 4, 0], 1) == 2
    assert bm.add_sequence(5, a + [0], 0) == 4


def test_blocks_after_a_colliding_prefix_are_not_registered(BM):
    """[3, t] has the hash of the cached [1, 2]: the [3, 4] computed after it must not be reused by
    [1, 2, 3, 4], whose chain hashes are the same."""
    t = _int64(_state(0, 0, [1]) ^ 2 ^ _state(0, 0, [3]))
    bm = filled(BM, 16, 2, {1: [1, 2, 0], 2: [3, t, 3, 4, 0]})
    assert bm.num_cached_blocks == 1
    assert bm.add_sequence(3, [1, 2, 3, 4, 0], 0) == 2 and bm.get_block_table(3) == [0]


def test_freed_cached_blocks_are_evicted_least_recently_freed_first(BM):
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9, 8, 8, 8, 8]
    bm = filled(BM, 4, 4, {1: a})
    bm.free(1)  # releases block 1, then block 0: both stay cached and become evictable
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2 and bm.ref_counts() == [0] * 4
    bm.add_sequence(2, b, 0)
    assert bm.append_tokens(2, b)  # free list first: blocks 2, 3
    assert bm.get_block_table(2) == [2, 3] and bm.num_cached_blocks == 4
    assert bm.append_tokens(2, [0])  # evicts block 1 (a's second block), freed before block 0
    assert bm.get_block_table(2) == [2, 3, 1] and bm.num_cached_blocks == 3
    assert bm.add_sequence(3, a + [0], 0) == 4  # a's first block is still cached, and reused
    assert bm.get_block_table(3) == [0] and bm.num_free_blocks == 0
    assert not bm.can_append(2, 4) and not bm.append_tokens(2, [0, 0, 0, 0])
    assert bm.get_num_tokens(2) == 9


def test_reused_evictable_block_leaves_the_lru(BM):
    a, b, c = [1] * 5, [2] * 5, [3] * 5
    bm = filled(BM, 4, 4, {1: a, 2: b})
    bm.free(1)
    bm.free(2)  # evictable, oldest first: blocks 0, 2 (1 and 3 were partial: free list)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    assert bm.add_sequence(3, a, 0) == 4 and bm.get_block_table(3) == [0]
    bm.add_sequence(4, c, 0)
    assert bm.append_tokens(4, c)  # free list 1, 3 first, then evicts block 2, not the reused 0
    assert bm.get_block_table(4) == [1, 3] and bm.num_cached_blocks == 3
    bm.add_sequence(5, [], 0)
    assert bm.append_tokens(5, [4])
    assert bm.get_block_table(5) == [2] and bm.num_cached_blocks == 2


def test_blocks_needed_and_can_append(BM):
    bm = filled(BM, 3, 4, {1: [0] * 5})
    assert [bm.blocks_needed(1, n) for n in (0, 1, 3, 4, 7, 8)] == [0, 0, 0, 1, 1, 2]
    assert bm.can_append(1, 7) and not bm.can_append(1, 8)
    assert not bm.append_tokens(1, [0] * 8)
    assert bm.get_num_tokens(1) == 5 and bm.get_block_table(1) == [0, 1] and bm.num_free_blocks == 1


def test_build_metadata_hand_checked(BM):
    bm = filled(BM, 8, 4, {1: list(range(6)), 2: [7, 7, 7]})
    positions, slots, tables, ctx, cu = bm.build_metadata([1, 2], [2, 3])
    assert positions.dtype == np.int64 and slots.dtype == np.int64
    assert tables.dtype == ctx.dtype == cu.dtype == np.int32
    assert positions.tolist() == [4, 5, 0, 1, 2]
    assert slots.tolist() == [1 * 4 + 0, 1 * 4 + 1, 2 * 4 + 0, 2 * 4 + 1, 2 * 4 + 2]
    assert tables.tolist() == [[0, 1], [2, 0]]
    assert ctx.tolist() == [6, 3] and cu.tolist() == [0, 2, 5]
    positions, slots, tables, ctx, cu = bm.build_metadata([2, 1, 2], [1, 0, 0])
    assert positions.tolist() == [2] and slots.tolist() == [10] and cu.tolist() == [0, 1, 1, 1]
    assert tables.tolist() == [[2, 0], [0, 1], [2, 0]]
    positions[:] = 0  # the arrays are ordinary writable arrays
    empty = bm.build_metadata([], [])
    assert [a.shape for a in empty] == [(0,), (0,), (0, 0), (0,), (1,)]


def test_errors(BM):
    for args in [(0, 4), (4, 0), (-1, 16)]:
        with pytest.raises(ValueError):
            BM(*args)
    bm = filled(BM, 4, 4, {1: [1, 2, 3]})
    with pytest.raises(ValueError, match="already exists"):
        bm.add_sequence(1, [], 0)
    with pytest.raises(ValueError, match="already exists"):
        bm.fork(9, 1)  # the existing child is reported before the unknown parent
    for call in [
        lambda: bm.get_block_table(9),
        lambda: bm.get_num_tokens(9),
        lambda: bm.append_tokens(9, [1]),
        lambda: bm.blocks_needed(9, 1),
        lambda: bm.can_append(9, 1),
        lambda: bm.fork(9, 2),
        lambda: bm.free(9),
        lambda: bm.build_metadata([1, 9], [1, 1]),
    ]:
        with pytest.raises(KeyError, match="unknown sequence 9"):
            call()
    with pytest.raises(ValueError, match="differ in length"):
        bm.build_metadata([1], [1, 1])
    with pytest.raises(ValueError, match="asked for 4 new"):
        bm.build_metadata([1], [4])
    with pytest.raises(ValueError, match="asked for -1 new"):
        bm.build_metadata([1, 1], [-1, 2])
    with pytest.raises(ValueError):
        bm.blocks_needed(1, -1)
    bm.free(1)
    assert not bm.has_sequence(1) and bm.num_free_blocks == 4


@pytest.mark.skipif(not HAVE_EXT, reason=NO_EXT)
def test_block_hash_is_bit_identical():
    rng = random.Random(0)
    cases = [(0, [], 0), ((1 << 64) - 1, [-1, (1 << 63) - 1, -(1 << 63)], -(1 << 63))]
    cases += [
        (
            rng.getrandbits(64),
            [rng.randrange(-(1 << 40), 1 << 40) for _ in range(rng.randrange(20))],
            rng.randrange(-5, 5),
        )
        for _ in range(200)
    ]
    for parent, tokens, adapter in cases:
        assert _C.block_hash(parent, tokens, adapter) == block_hash(parent, tokens, adapter)


# ---- differential test ---------------------------------------------------------------------------


def call(bm, op: tuple):
    """Apply one operation; returns a comparable result (numpy arrays as (dtype, shape, values))."""
    name, *args = op
    try:
        out = getattr(bm, name)(*args)
    except (KeyError, ValueError) as exc:
        return ("raised", type(exc).__name__, str(exc))
    if name == "build_metadata":
        return [(a.dtype.str, a.shape, a.tolist()) for a in out]
    return out


def state(bm, seq_ids: list[int]) -> tuple:
    return (
        bm.num_free_blocks,
        bm.num_cached_blocks,
        bm.ref_counts(),
        [(bm.get_block_table(s), bm.get_num_tokens(s)) for s in seq_ids],
    )


def random_trace(rng: random.Random, bms: list, num_ops: int, block_size: int) -> dict[str, int]:
    """Drive every manager in ``bms`` through the same random operations, checking that they agree
    after each one. Returns how often the interesting paths were taken."""
    bases = [[rng.randrange(6) for _ in range(rng.randrange(1, 80))] for _ in range(6)]
    live: list[int] = []
    next_id = 0
    seen = dict(cache_hits=0, append_failures=0, copies=0, evictions=0)
    ref = bms[0]
    for _ in range(num_ops):
        r = rng.random()
        if len(live) >= 16 and r < 0.2:
            r = 0.2  # at most 16 live sequences: free one instead of adding one
        if r < 0.15 or not live:
            base = rng.choice(bases)
            prompt = base[: rng.randrange(len(base) + 1)] + [rng.randrange(6) for _ in range(rng.randrange(6))]
            ops = [("add_sequence", next_id, prompt, rng.choice([0, 0, 1, 2, -1]))]
            live.append(next_id)
            next_id += 1
        elif r < 0.2:
            ops = [("fork", rng.choice(live), next_id)]
            live.append(next_id)
            next_id += 1
        elif r < 0.3:
            s = rng.choice(live)
            ops = [("free", s)]
            live.remove(s)
        elif r < 0.6:
            s = rng.choice(live)
            n = 1 if rng.random() < 0.6 else rng.randrange(3 * block_size + 2)
            ops = [("append_tokens", s, [rng.randrange(6) for _ in range(n)])]
        elif r < 0.66:  # one token each for a step's decodes, until one does not fit
            batch = rng.sample(live, rng.randrange(1, len(live) + 1))
            ops = [("append_one_each", batch, [rng.randrange(6) for _ in batch])]
        elif r < 0.82:
            batch = rng.sample(live, rng.randrange(1, len(live) + 1))
            ops = [("build_metadata", batch, [rng.randrange(min(ref.get_num_tokens(s), 4) + 1) for s in batch])]
        elif r < 0.87:
            ops = [("pop_block_copies",)]
        elif r < 0.97:
            s = rng.choice(live)
            n = rng.randrange(2 * block_size + 2)
            ops = [("blocks_needed", s, n), ("can_append", s, n)]
        else:  # errors: unknown sequences, existing ids, bad lengths
            ops = [
                rng.choice(
                    [
                        ("free", next_id + 7),
                        ("append_tokens", -3, [1]),
                        ("fork", next_id + 1, live[0]),
                        ("add_sequence", live[0], [1, 2], 0),
                        ("build_metadata", live[:1], [1, 1]),
                        ("build_metadata", live[:1], [10**6]),
                        ("get_block_table", -1),
                        ("append_one_each", live[:1], []),
                        ("append_one_each", [live[0], -3], [1, 1]),
                    ]
                )
            ]
        for op in ops:
            cached_before = ref.num_cached_blocks
            outs = [call(bm, op) for bm in bms]
            assert all(o == outs[0] for o in outs[1:]), f"{op}: {outs}"
            out = outs[0]
            if op[0] == "add_sequence" and isinstance(out, int):
                seen["cache_hits"] += out > 0
                prompt = op[2]
                op = ("append_tokens", op[1], prompt[out:])
                cached_before = ref.num_cached_blocks
                outs = [call(bm, op) for bm in bms]
                assert all(o == outs[0] for o in outs[1:]), f"{op}: {outs}"
                out = outs[0]
            if (op[0] == "append_tokens" and out is False) or (op[0] == "append_one_each" and out != len(op[1])):
                seen["append_failures"] += 1
            if op[0] == "pop_block_copies":
                seen["copies"] += len(out)
            if op[0] in ("append_tokens", "add_sequence") and ref.num_cached_blocks < cached_before:
                seen["evictions"] += 1
        states = [state(bm, live) for bm in bms]
        assert all(s == states[0] for s in states[1:]), f"state differs after {ops}"
    return seen


@pytest.mark.skipif(not HAVE_EXT, reason=NO_EXT)
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_differential_random_trace(seed: int, block_size: int):
    num_blocks = 320 // block_size  # 320 token slots for up to 16 sequences of up to ~100 tokens
    bms = [PyBlockManager(num_blocks, block_size), _C.BlockManager(num_blocks, block_size)]
    seen = random_trace(random.Random(seed * 100 + block_size), bms, 10_000, block_size)
    assert seen["cache_hits"] and seen["append_failures"] and seen["evictions"], seen
    assert seen["copies"] or block_size == 1, seen  # one-token blocks are never partially filled


@pytest.mark.skipif(not HAVE_EXT, reason=NO_EXT)
def test_differential_random_trace_without_prefix_caching():
    bms = [PyBlockManager(64, 4, False), _C.BlockManager(64, 4, False)]
    seen = random_trace(random.Random(7), bms, 3_000, 4)
    assert seen["append_failures"] > 0 and seen["copies"] > 0 and seen["cache_hits"] == 0


def test_random_trace_runs_on_the_reference():
    """Keeps the trace generator exercised (and the reference self-consistent) without the extension."""
    bms = [PyBlockManager(64, 4), PyBlockManager(64, 4)]
    seen = random_trace(random.Random(3), bms, 2_000, 4)
    assert seen["cache_hits"] > 0 and seen["append_failures"] > 0
