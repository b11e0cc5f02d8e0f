"""Paged attention kernels vs the torch references: the Triton ones (interpreter on CPU) and the
C++ CPU kernel (``paged_attention_cpu``, which has the prefill kernel's semantics and so also runs
the decode cases with one query row per sequence).

Tolerance rule (flash-attention style): the kernel's error against the fp32 reference must be at
most twice the error of the same-dtype torch reference against it, plus a small atol. Cache slots
that no sequence owns hold NaN, so reading past a context or through a padded block-table entry
shows up as NaN.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from mcl_runtime.kernels import (
    HAS_CPU_ATTENTION,
    paged_attention_cpu,
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    store_kv,
    store_kv_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cpu_prefill(q, k_cache, v_cache, table, cu, ctx, scale, max_q_len):
    return paged_attention_cpu(q.cpu(), k_cache.cpu(), v_cache.cpu(), table.cpu(), cu.cpu(), ctx.cpu(), scale).to(
        q.device
    )


def cpu_decode(q, k_cache, v_cache, table, ctx, scale, max_context_len, num_splits=None):
    cu = torch.arange(len(ctx) + 1, dtype=torch.int32, device=ctx.device)
    return cpu_prefill(q, k_cache, v_cache, table, cu, ctx, scale, 1)


NO_CPU = pytest.mark.skipif(not HAS_CPU_ATTENTION, reason="the C++ extension mcl_runtime._C is not built")
PREFILL_IMPLS = [pytest.param(paged_prefill_attention, id="triton"), pytest.param(cpu_prefill, id="cpu", marks=NO_CPU)]
DECODE_IMPLS = [pytest.param(paged_decode_attention, id="triton"), pytest.param(cpu_decode, id="cpu", marks=NO_CPU)]


def dtype_id(d: torch.dtype) -> str:
    return str(d).split(".")[-1]


def check_rule(out: torch.Tensor, ref32: torch.Tensor, ref_lp: torch.Tensor, what: str) -> None:
    assert not out.isnan().any(), f"{what}: NaN in the output"
    atol = 1e-5 * max(1.0, ref32.abs().max().item())
    err = (out.float() - ref32).abs().max().item()
    base = (ref_lp.float() - ref32).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: kernel error {err:.3g} > 2 x torch error {base:.3g} + {atol:.1g}"


def make_cache(
    context_lens: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    spare_blocks: int = 3,
):
    """Random cache whose blocks are handed out in shuffled order; free slots (and padding block 0) are NaN."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    nblocks = [-(-c // block_size) for c in context_lens]
    num_blocks = 1 + sum(nblocks) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    order = list(range(1, num_blocks))
    rng.shuffle(order)
    table = torch.zeros(len(context_lens), max(max(nblocks, default=1), 1) + 1, dtype=torch.int32)
    for b, (ctx, n) in enumerate(zip(context_lens, nblocks)):
        blocks = [order.pop() for _ in range(n)]
        table[b, :n] = torch.tensor(blocks, dtype=torch.int32)
        for i, blk in enumerate(blocks):
            used = min(block_size, ctx - i * block_size)
            k_cache[blk, :used] = torch.randn(used, num_kv_heads, head_dim, generator=gen)
            v_cache[blk, :used] = torch.randn(used, num_kv_heads, head_dim, generator=gen)
    ctx = torch.tensor(context_lens, dtype=torch.int32)
    return k_cache.to(DEVICE, dtype), v_cache.to(DEVICE, dtype), table.to(DEVICE), ctx.to(DEVICE)


def decode_case(
    dtype, head_dim, block_size, num_heads, num_kv_heads, context_lens, num_splits, seed=0, impl=paged_decode_attention
):
    k_cache, v_cache, table, ctx = make_cache(context_lens, block_size, num_kv_heads, head_dim, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen).to(DEVICE, dtype)
    scale = head_dim**-0.5
    out = impl(q, k_cache, v_cache, table, ctx, scale, max(context_lens), num_splits=num_splits)
    ref32 = paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), table, ctx, scale)
    ref_lp = paged_decode_attention_ref(q, k_cache, v_cache, table, ctx, scale, compute_dtype=dtype)
    assert out.shape == q.shape and out.dtype == dtype
    return out, ref32, ref_lp


# (head_dim, block_size, Hq, Hkv): MHA, GQA with a power-of-two group, GQA with group 3.
CONFIGS = [(32, 4, 4, 2), (64, 16, 2, 2), (32, 16, 6, 2)]


@pytest.mark.parametrize("impl", DECODE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "D{}-bs{}-h{}-kv{}".format(*c))
def test_decode(config, dtype: torch.dtype, impl) -> None:
    head_dim, block_size, hq, hkv = config
    out, ref32, ref_lp = decode_case(dtype, head_dim, block_size, hq, hkv, [1, 13, 37, 6], None, impl=impl)
    check_rule(out, ref32, ref_lp, "decode")


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_decode_split_kv(num_splits: int) -> None:
    """Split-KV with its reduction kernel, including splits that are empty for short sequences."""
    out, ref32, ref_lp = decode_case(torch.bfloat16, 32, 4, 4, 1, [40, 3, 17], num_splits, seed=2)
    check_rule(out, ref32, ref_lp, f"decode split {num_splits}")


@pytest.mark.parametrize("impl", DECODE_IMPLS)
def test_decode_zero_context_gives_zeros(impl) -> None:
    out, ref32, _ = decode_case(torch.float32, 32, 16, 2, 1, [0, 5], 2, seed=3, impl=impl)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1], ref32[1], atol=1e-5, rtol=1e-5)


def prefill_case(
    dtype, head_dim, block_size, num_heads, num_kv_heads, q_lens, context_lens, seed=0, impl=paged_prefill_attention
):
    k_cache, v_cache, table, ctx = make_cache(context_lens, block_size, num_kv_heads, head_dim, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(DEVICE, dtype)
    scale = head_dim**-0.5
    out = impl(q, k_cache, v_cache, table, cu, ctx, scale, max(q_lens))
    ref32 = paged_prefill_attention_ref(q.float(), k_cache.float(), v_cache.float(), table, cu, ctx, scale)
    ref_lp = paged_prefill_attention_ref(q, k_cache, v_cache, table, cu, ctx, scale, compute_dtype=dtype)
    assert out.shape == q.shape and out.dtype == dtype
    return out, ref32, ref_lp


@pytest.mark.parametrize("impl", PREFILL_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "D{}-bs{}-h{}-kv{}".format(*c))
def test_prefill_chunked_with_decodes(config, dtype: torch.dtype, impl) -> None:
    """Decodes (q_len 1), a fresh prompt, chunks over a cached prefix, an empty sequence; lengths
    that are not multiples of the block or tile sizes."""
    head_dim, block_size, hq, hkv = config
    q_lens = [1, 1, 19, 7, 0, 3]
    context_lens = [9, 1, 19, 30, 4, 22]
    out, ref32, ref_lp = prefill_case(dtype, head_dim, block_size, hq, hkv, q_lens, context_lens, impl=impl)
    check_rule(out, ref32, ref_lp, "prefill")


@pytest.mark.parametrize("impl", PREFILL_IMPLS)
def test_prefill_non_power_of_two_head_dim(impl) -> None:
    out, ref32, ref_lp = prefill_case(torch.float32, 24, 8, 3, 1, [5, 12], [5, 20], seed=4, impl=impl)
    check_rule(out, ref32, ref_lp, "prefill D=24")


def test_prefill_of_decodes_matches_decode_kernel() -> None:
    context_lens = [5, 21, 2]
    k_cache, v_cache, table, ctx = make_cache(context_lens, 4, 1, 32, torch.float32, seed=5)
    q = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    cu = torch.arange(4, dtype=torch.int32, device=DEVICE)
    a = paged_prefill_attention(q, k_cache, v_cache, table, cu, ctx, 0.3, 1)
    b = paged_decode_attention(q, k_cache, v_cache, table, ctx, 0.3, 21)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_store_kv_then_attend() -> None:
    """Write a step's K/V through slot_mapping, then prefill over cache + new tokens."""
    dtype, block_size, hkv, head_dim = torch.float16, 4, 2, 32
    prefix, q_lens = [6, 0], [3, 5]
    ctx_lens = [p + n for p, n in zip(prefix, q_lens)]
    k_cache, v_cache, table, ctx = make_cache(ctx_lens, block_size, hkv, head_dim, dtype, seed=7)
    gen = torch.Generator().manual_seed(8)
    k_new = torch.randn(sum(q_lens), hkv, head_dim, generator=gen).to(DEVICE, dtype)
    v_new = torch.randn(sum(q_lens), hkv, head_dim, generator=gen).to(DEVICE, dtype)
    slots = []
    for b, (p, n) in enumerate(zip(prefix, q_lens)):
        for pos in range(p, p + n):
            slots.append(int(table[b, pos // block_size]) * block_size + pos % block_size)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k_new, v_new, k_ref, v_ref, slot_mapping)
    store_kv(k_new, v_new, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache.nan_to_num(7.0), k_ref.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), v_ref.nan_to_num(7.0))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    q = torch.randn(8, 4, head_dim, generator=gen).to(DEVICE, dtype)
    out = paged_prefill_attention(q, k_cache, v_cache, table, cu, ctx, 0.2, 5)
    ref32 = paged_prefill_attention_ref(q.float(), k_cache.float(), v_cache.float(), table, cu, ctx, 0.2)
    ref_lp = paged_prefill_attention_ref(q, k_cache, v_cache, table, cu, ctx, 0.2, compute_dtype=dtype)
    check_rule(out, ref32, ref_lp, "prefill after store_kv")


def _decode_args():
    k_cache, v_cache, table, ctx = make_cache([3, 5], 4, 2, 32, torch.float32, seed=9)
    q = torch.randn(2, 4, 32).to(DEVICE)
    return dict(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=table, context_lens=ctx, scale=0.1, max_context_len=5
    )


@pytest.mark.parametrize(
    "change,exc",
    [
        (lambda a: a.update(q=a["q"].half()), TypeError),
        (lambda a: a.update(q=a["q"][:, :, :16]), ValueError),
        (lambda a: a.update(q=a["q"][:, :3]), ValueError),
        (lambda a: a.update(block_tables=a["block_tables"].long()), TypeError),
        (lambda a: a.update(context_lens=a["context_lens"][:1]), ValueError),
        (lambda a: a.update(v_cache=a["v_cache"][:, :2]), ValueError),
        (lambda a: a.update(max_context_len=-3), ValueError),
        (lambda a: a.update(scale=float("nan")), ValueError),
    ],
    ids=[
        "q-dtype",
        "head-dim",
        "heads-not-multiple",
        "block-tables-int64",
        "batch-mismatch",
        "cache-shapes",
        "max-context-negative",
        "scale-nan",
    ],
)
def test_decode_bad_arguments_raise(change, exc) -> None:
    args = _decode_args()
    change(args)
    with pytest.raises(exc):
        paged_decode_attention(**args)


def test_prefill_and_store_kv_bad_arguments_raise() -> None:
    args = _decode_args()
    q = args["q"]
    with pytest.raises(TypeError):
        paged_prefill_attention(
            q,
            args["k_cache"],
            args["v_cache"],
            args["block_tables"],
            torch.tensor([0, 1, 2], device=DEVICE),
            args["context_lens"],
            0.1,
            1,
        )
    with pytest.raises(ValueError):
        paged_prefill_attention(
            q,
            args["k_cache"],
            args["v_cache"],
            args["block_tables"],
            torch.tensor([0, 2], dtype=torch.int32, device=DEVICE),
            args["context_lens"],
            0.1,
            2,
        )
    k = torch.zeros(2, 2, 32, device=DEVICE)
    with pytest.raises(TypeError):
        store_kv(k, k, args["k_cache"], args["v_cache"], torch.tensor([0, 1], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError):
        store_kv(k[:, :, :16], k[:, :, :16], args["k_cache"], args["v_cache"], torch.tensor([0, 1], device=DEVICE))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("batch,context", [(1, 8192), (64, 1000), (256, 128)])
def test_decode_large_cuda(dtype: torch.dtype, batch: int, context: int) -> None:
    rng = random.Random(batch)
    lens = [rng.randint(1, context) for _ in range(batch)]
    lens[0] = context
    out, ref32, ref_lp = decode_case(dtype, 128, 16, 28, 4, lens, None, seed=batch)
    check_rule(out, ref32, ref_lp, "decode cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_prefill_large_cuda(dtype: torch.dtype) -> None:
    q_lens = [1] * 16 + [512, 1000, 77]
    context_lens = [300 + 7 * i for i in range(16)] + [512, 3000, 2000]
    out, ref32, ref_lp = prefill_case(dtype, 128, 16, 28, 4, q_lens, context_lens, seed=11)
    check_rule(out, ref32, ref_lp, "prefill cuda")


@NO_CPU
@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("head_dim", [40, 16, 128])
@pytest.mark.parametrize("block_size", [1, 5, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cpu_block_sizes_and_head_dims(dtype: torch.dtype, block_size: int, head_dim: int, lanes: int) -> None:
    """Block sizes below, between and above the kernel's 8- and 16-key tiles (both widths, whichever
    the machine would pick); D = 40 (the kernel for any head dim: a tail of columns past the tiles)
    and two of the head dims compiled in."""

    def impl(q, k_cache, v_cache, table, cu, ctx, scale, max_q_len):
        return paged_attention_cpu(
            q.cpu(), k_cache.cpu(), v_cache.cpu(), table.cpu(), cu.cpu(), ctx.cpu(), scale, lanes=lanes
        ).to(q.device)

    out, ref32, ref_lp = prefill_case(
        dtype, head_dim, block_size, 6, 2, [1, 1, 9, 4], [23, 1, 9, 50], seed=14, impl=impl
    )
    check_rule(out, ref32, ref_lp, f"cpu bs{block_size} D{head_dim} lanes{lanes}")


@NO_CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cpu_strided_q_into_out_rows_and_threads(dtype: torch.dtype) -> None:
    """q as a view of a fused projection (strided rows), written into the first rows of a bigger
    ``out`` (the rest untouched); 1 and 3 threads give the same bits (enough keys for the work to be
    cut in three, once inside the prefill chunk)."""
    q_lens, context_lens = [1, 1, 300, 1], [4000, 3, 300, 5000]
    k_cache, v_cache, table, ctx = make_cache(context_lens, 16, 2, 16, dtype, seed=12)
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    T = sum(q_lens)
    fused = torch.randn(T, 4 + 2 + 2, 16).to(dtype)
    q = fused[:, :4]
    ref32 = paged_prefill_attention_ref(q.float(), k_cache.float(), v_cache.float(), table, cu, ctx, 0.25)
    ref_lp = paged_prefill_attention_ref(q, k_cache, v_cache, table, cu, ctx, 0.25, compute_dtype=dtype)
    outs = []
    for threads in (1, 3):
        out = torch.full((T + 3, 4, 16), 7.0, dtype=dtype)
        paged_attention_cpu(
            q.cpu(), k_cache.cpu(), v_cache.cpu(), table.cpu(), cu, ctx.cpu(), 0.25, out=out[:T], num_threads=threads
        )
        assert torch.equal(out[T:], torch.full_like(out[T:], 7.0))
        outs.append(out[:T])
    check_rule(outs[0].to(DEVICE), ref32, ref_lp, "cpu strided")
    assert torch.equal(outs[0], outs[1])


@NO_CPU
@pytest.mark.parametrize(
    "change,exc",
    [
        (lambda a: a.update(q=a["q"].half()), TypeError),
        (
            lambda a: a.update(q=a["q"].double(), k_cache=a["k_cache"].double(), v_cache=a["v_cache"].double()),
            TypeError,
        ),
        (lambda a: a.update(q=a["q"].bfloat16(), k_cache=a["k_cache"].half(), v_cache=a["v_cache"].half()), TypeError),
        (lambda a: a.update(q=a["q"][:, :, :16]), ValueError),
        (lambda a: a.update(q=a["q"][:, :3]), ValueError),
        (lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError),
        (lambda a: a.update(block_tables=a["block_tables"].long()), TypeError),
        (lambda a: a.update(context_lens=a["context_lens"][:1]), ValueError),
        (lambda a: a.update(context_lens=a["context_lens"] * 100), ValueError),
        (lambda a: a.update(block_tables=a["block_tables"] + 1000), ValueError),
        (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 2, 1], dtype=torch.int32)), ValueError),
        (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 1, 9], dtype=torch.int32)), ValueError),
        (lambda a: a.update(v_cache=a["v_cache"][:, :2]), ValueError),
        (lambda a: a.update(lanes=4), ValueError),
    ],
    ids=[
        "q-dtype",
        "float64",
        "bf16-vs-f16",
        "head-dim",
        "heads-not-multiple",
        "q-strided-D",
        "block-tables-int64",
        "batch-mismatch",
        "context-past-table",
        "block-out-of-cache",
        "cu-decreasing",
        "cu-past-q",
        "cache-shapes",
        "lanes",
    ],
)
def test_cpu_bad_arguments_raise(change, exc) -> None:
    k_cache, v_cache, table, ctx = make_cache([3, 5], 4, 2, 32, torch.float32, seed=9)
    args = dict(
        q=torch.randn(2, 4, 32),
        k_cache=k_cache.cpu(),
        v_cache=v_cache.cpu(),
        block_tables=table.cpu(),
        cu_seqlens_q=torch.arange(3, dtype=torch.int32),
        context_lens=ctx.cpu(),
        scale=0.1,
    )
    change(args)
    with pytest.raises(exc):
        paged_attention_cpu(**args)


@NO_CPU
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_cpu_16_bit_conversions_match_torch(dtype: torch.dtype) -> None:
    """The kernel converts 16-bit floats by hand: two keys of equal score average their values, so
    the output is ``((a + b) / 2).to(dtype)`` exactly as torch rounds it, for random bit patterns
    (subnormals, overflow to inf and NaN included)."""
    bits = torch.randint(-32768, 32768, (2, 1 << 14), generator=torch.Generator().manual_seed(13), dtype=torch.int32)
    a, b = bits.to(torch.int16).view(dtype)
    T = a.numel() // 16
    v = torch.stack([a.view(T, 16), b.view(T, 16)], 1).view(T, 2, 1, 16)  # one block of two keys per row
    k = torch.zeros_like(v)
    out = paged_attention_cpu(
        torch.zeros(T, 1, 16, dtype=dtype),
        k,
        v,
        torch.arange(T, dtype=torch.int32)[:, None],
        torch.arange(T + 1, dtype=torch.int32),
        torch.full((T,), 2, dtype=torch.int32),
        1.0,
    )
    expected = ((a.float() + b.float()) * 0.5).to(dtype).view(T, 1, 16)
    same = (
        (out.view(torch.int16) == expected.view(torch.int16))
        | (out.isnan() & expected.isnan())
        | ((out == 0) & (expected == 0))
    )
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} differ"


@NO_CPU
def test_cpu_custom_op_for_compiled_graphs() -> None:
    """``torch.ops.mcl.paged_attention_cpu`` (the compiled decode's attention): torch's op checks
    (schema, fake implementation), and a fullgraph-compiled call equal to the eager kernel."""
    from mcl_runtime.kernels.cpu import paged_attention_cpu_op

    k_cache, v_cache, table, ctx = make_cache([7, 1, 20], 4, 2, 32, torch.float32, seed=15)
    args = (
        torch.randn(3, 4, 32),
        k_cache.cpu(),
        v_cache.cpu(),
        table.cpu(),
        torch.arange(4, dtype=torch.int32),
        ctx.cpu(),
        0.2,
    )
    torch.library.opcheck(paged_attention_cpu_op, args)
    compiled = torch.compile(lambda *a: paged_attention_cpu_op(*a) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), paged_attention_cpu(*args) * 2, rtol=0, atol=0)
