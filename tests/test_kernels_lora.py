"""SGMV LoRA kernels vs the torch references: the Triton kernels (interpreter on CPU) and the C++ CPU
kernel ``lora_apply_cpu``.

Tolerance rule (flash-attention style): the kernel's error against an fp32 reference must be at
most twice the error of the same-dtype torch reference against that fp32 reference, plus a small atol.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mcl_runtime.kernels import (
    HAS_CPU_BF16_DOT,
    HAS_CPU_LAYER_OPS,
    LoRAWeightsCPU,
    lora_apply,
    lora_apply_cpu,
    lora_apply_ref,
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RANK_CHOICES = (8, 16, 32, 64)
POPULARITY = ["distinct", "uniform", "zipf", "identical", "skewed"]


def check_rule(out: torch.Tensor, ref32: torch.Tensor, ref_lp: torch.Tensor, what: str) -> None:
    atol = 1e-5 * max(1.0, ref32.abs().max().item())
    err = (out.float() - ref32).abs().max().item()
    base = (ref_lp.float() - ref32).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: kernel error {err:.3g} > 2 x torch error {base:.3g} + {atol:.1g}"


def make_lora(
    num_slots: int,
    hidden: int,
    max_rank: int,
    slice_ns: tuple[int, ...],
    dtype: torch.dtype,
    gen: torch.Generator,
    zero_slices: bool = True,
    rank_choices: tuple[int, ...] = RANK_CHOICES,
):
    """Adapter slots with ranks mixed from RANK_CHOICES (and one untargeted slice), padded to max_rank
    with zeros as the engine lays them out."""
    n_slices = len(slice_ns)
    offsets = [0]
    for n in slice_ns:
        offsets.append(offsets[-1] + n)
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ranks = torch.tensor(
        [[rng.choice([r for r in rank_choices if r <= max_rank]) for _ in range(n_slices)] for _ in range(num_slots)],
        dtype=torch.int32,
    )
    if zero_slices and n_slices > 1:
        ranks[1, n_slices - 1] = 0
    lora_a = torch.randn(num_slots, n_slices * max_rank, hidden, generator=gen) / hidden**0.5
    lora_b = torch.randn(num_slots, offsets[-1], max_rank, generator=gen) / 4
    for w in range(num_slots):
        for j in range(n_slices):
            r = int(ranks[w, j])
            lora_a[w, j * max_rank + r : (j + 1) * max_rank] = 0
            lora_b[w, offsets[j] : offsets[j + 1], r:] = 0
    scaling = torch.rand(num_slots, generator=gen) * 2 + 0.25
    return (lora_a.to(DEVICE, dtype), lora_b.to(DEVICE, dtype), ranks.to(DEVICE), scaling.to(DEVICE), tuple(offsets))


def popularity_slots(pattern: str, num_requests: int, num_slots: int, rng: random.Random) -> list[int]:
    if pattern == "distinct":
        return rng.sample(range(num_slots), num_requests)
    if pattern == "uniform":
        return [rng.randrange(num_slots) for _ in range(num_requests)]
    if pattern == "zipf":
        weights = [1.0 / (k + 1) ** 1.5 for k in range(num_slots)]
        return rng.choices(range(num_slots), weights=weights, k=num_requests)
    if pattern == "identical":
        return [rng.randrange(num_slots)] * num_requests
    if pattern == "skewed":
        hot = rng.randrange(num_slots)
        return [hot if rng.random() < 0.8 else rng.randrange(num_slots) for _ in range(num_requests)]
    raise ValueError(pattern)


def make_segments(slots: list[int], lengths: list[int], num_decodes: int, empty_segment: bool = True):
    """Engine layout: decodes first, then prefill chunks, each group sorted by slot; one segment per
    run of equal slots. Returns (T, seg_starts, seg_slots, max_seg_len)."""
    groups = [
        sorted(zip(slots[:num_decodes], lengths[:num_decodes])),
        sorted(zip(slots[num_decodes:], lengths[num_decodes:])),
    ]
    starts, seg_slots, pos = [0], [], 0
    for gi, group in enumerate(groups):
        prev = None
        for slot, n in group:
            if slot == prev:
                starts[-1] += n
            else:
                seg_slots.append(slot)
                starts.append(pos + n)
            pos += n
            prev = slot
        if empty_segment and gi == 0:
            seg_slots.append(0)
            starts.append(pos)
    max_seg_len = max((b - a for a, b in zip(starts, starts[1:])), default=0)
    return (
        pos,
        torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        torch.tensor(seg_slots, dtype=torch.int32, device=DEVICE),
        max_seg_len,
    )


def engine_batch(
    pattern: str, num_slots: int, seed: int, num_decodes: int = 4, num_prefills: int = 4, no_adapter_prob: float = 0.25
):
    rng = random.Random(seed)
    n = num_decodes + num_prefills
    slots = popularity_slots(pattern, n, num_slots, rng)
    slots = [-1 if rng.random() < no_adapter_prob else s for s in slots]
    lengths = [1] * num_decodes + [rng.randint(2, 9) for _ in range(num_prefills)]
    return make_segments(slots, lengths, num_decodes)


def run_all(x, y, lora_a, lora_b, seg_starts, seg_slots, ranks, scaling, offsets, max_seg_len):
    """Kernel shrink/expand, fp32 references and same-dtype references."""
    u = lora_shrink(x, lora_a, seg_starts, seg_slots, ranks, max_seg_len)
    u_ref32 = lora_shrink_ref(x.float(), lora_a.float(), seg_starts, seg_slots, ranks)
    u_reflp = lora_shrink_ref(x, lora_a, seg_starts, seg_slots, ranks)
    y_k = y.clone()
    lora_expand(u, lora_b, y_k, seg_starts, seg_slots, ranks, scaling, offsets, max_seg_len)
    y_ref32 = y.float().clone()
    lora_expand_ref(u_ref32, lora_b.float(), y_ref32, seg_starts, seg_slots, ranks, scaling, offsets)
    y_reflp = lora_apply_ref(x, y.clone(), lora_a, lora_b, seg_starts, seg_slots, ranks, scaling, offsets)
    return u, u_ref32, u_reflp, y_k, y_ref32, y_reflp


@pytest.mark.parametrize(
    "pattern,dtype",
    [(p, torch.bfloat16) for p in POPULARITY] + [("uniform", torch.float32), ("uniform", torch.float16)],
    ids=lambda v: v if isinstance(v, str) else str(v).split(".")[-1],
)
def test_sgmv_popularity_multislice(pattern: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(POPULARITY.index(pattern))
    num_slots, hidden, max_rank = 8, 96, 64
    lora_a, lora_b, ranks, scaling, offsets = make_lora(num_slots, hidden, max_rank, (48, 20, 20), dtype, gen)
    T, seg_starts, seg_slots, max_seg_len = engine_batch(pattern, num_slots, seed=POPULARITY.index(pattern))
    x = torch.randn(T, hidden, generator=gen).to(DEVICE, dtype)
    y = torch.randn(T, offsets[-1], generator=gen).to(DEVICE, dtype)
    u, u_ref32, u_reflp, y_k, y_ref32, y_reflp = run_all(
        x, y, lora_a, lora_b, seg_starts, seg_slots, ranks, scaling, offsets, max_seg_len
    )
    assert u.dtype == torch.float32 and u.shape == (T, 3 * max_rank)
    check_rule(u, u_ref32, u_reflp, "shrink")
    check_rule(y_k, y_ref32, y_reflp, "expand")
    # Rows without adapter are left exactly as they were.
    for i, w in enumerate(seg_slots.tolist()):
        if w < 0:
            a, b = seg_starts[i].item(), seg_starts[i + 1].item()
            assert torch.equal(y_k[a:b], y[a:b])
            assert not u[a:b].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_decode_many_single_token_segments(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    num_slots, hidden, max_rank = 6, 64, 32
    lora_a, lora_b, ranks, scaling, offsets = make_lora(num_slots, hidden, max_rank, (40,), dtype, gen)
    slots = [3, 0, -1, 5, 5, 2, 1, -1, 4, 0, 3, 2, 1, 5, 4, 0, -1, 2, 3, 1]
    seg_slots = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    seg_starts = torch.arange(len(slots) + 1, dtype=torch.int32, device=DEVICE)
    x = torch.randn(len(slots), hidden, generator=gen).to(DEVICE, dtype)
    y = torch.randn(len(slots), offsets[-1], generator=gen).to(DEVICE, dtype)
    u, u_ref32, u_reflp, y_k, y_ref32, y_reflp = run_all(
        x, y, lora_a, lora_b, seg_starts, seg_slots, ranks, scaling, offsets, 1
    )
    check_rule(u, u_ref32, u_reflp, "shrink")
    check_rule(y_k, y_ref32, y_reflp, "expand")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_long_segments_and_trailing_rows(dtype: torch.dtype) -> None:
    """Segments longer than one row tile (interpreter tiles hold 32 rows), lengths not multiples of
    it, and rows past seg_starts[-1] that must stay untouched."""
    gen = torch.Generator().manual_seed(2)
    lora_a, lora_b, ranks, scaling, offsets = make_lora(3, 80, 64, (24, 40), dtype, gen)
    seg_starts = torch.tensor([0, 37, 37, 39], dtype=torch.int32, device=DEVICE)
    seg_slots = torch.tensor([2, 0, 1], dtype=torch.int32, device=DEVICE)
    T = 40
    x = torch.randn(T, 80, generator=gen).to(DEVICE, dtype)
    y = torch.randn(T, offsets[-1], generator=gen).to(DEVICE, dtype)
    u, u_ref32, u_reflp, y_k, y_ref32, y_reflp = run_all(
        x, y, lora_a, lora_b, seg_starts, seg_slots, ranks, scaling, offsets, 37
    )
    check_rule(u, u_ref32, u_reflp, "shrink")
    check_rule(y_k, y_ref32, y_reflp, "expand")
    assert torch.equal(y_k[39:], y[39:])


@pytest.mark.parametrize("split_k", [2, 3])
def test_shrink_split_k(split_k: int) -> None:
    gen = torch.Generator().manual_seed(3)
    lora_a, _, ranks, _, _ = make_lora(4, 128, 32, (16, 16, 16), torch.float32, gen)
    T, seg_starts, seg_slots, max_seg_len = engine_batch("uniform", 4, seed=7)
    x = torch.randn(T, 128, generator=gen).to(DEVICE)
    out = torch.full((T, 3 * 32), float("nan"), device=DEVICE)
    u = lora_shrink(x, lora_a, seg_starts, seg_slots, ranks, max_seg_len, out=out, split_k=split_k)
    assert u is out
    ref = lora_shrink_ref(x, lora_a, seg_starts, seg_slots, ranks)
    with_adapter = _rows_with_adapter(seg_starts, seg_slots, T)
    torch.testing.assert_close(u[with_adapter], ref[with_adapter], atol=1e-5, rtol=1e-5)
    assert u[~with_adapter].isnan().all()  # no zero-fill: base rows are never written


def _rows_with_adapter(seg_starts: torch.Tensor, seg_slots: torch.Tensor, T: int) -> torch.Tensor:
    slots = torch.repeat_interleave(seg_slots.cpu(), seg_starts.cpu().diff(), output_size=int(seg_starts[-1]))
    return torch.cat([slots >= 0, torch.zeros(T - len(slots), dtype=torch.bool)]).to(seg_starts.device)


def test_shrink_out_buffer_rows_without_adapter_untouched() -> None:
    gen = torch.Generator().manual_seed(4)
    lora_a, _, ranks, _, _ = make_lora(3, 64, 16, (16, 16), torch.float32, gen)
    seg_starts = torch.tensor([0, 3, 5, 5, 9], dtype=torch.int32, device=DEVICE)
    seg_slots = torch.tensor([1, -1, 0, 2], dtype=torch.int32, device=DEVICE)
    x = torch.randn(10, 64, generator=gen).to(DEVICE)
    out = torch.full((10, 32), 7.0, device=DEVICE)
    lora_shrink(x, lora_a, seg_starts, seg_slots, ranks, 4, out=out)
    assert (out[3:5] == 7).all() and (out[9:] == 7).all()
    ref = lora_shrink_ref(x, lora_a, seg_starts, seg_slots, ranks)
    torch.testing.assert_close(out[[0, 1, 2, 5, 6, 7, 8]], ref[[0, 1, 2, 5, 6, 7, 8]], atol=1e-5, rtol=1e-5)


def test_apply_into_strided_output_view() -> None:
    """y may be a column block of a wider projection output (e.g. the qkv output)."""
    gen = torch.Generator().manual_seed(5)
    lora_a, lora_b, ranks, scaling, offsets = make_lora(4, 64, 16, (24, 8, 8), torch.float32, gen)
    T, seg_starts, seg_slots, max_seg_len = engine_batch("zipf", 4, seed=11)
    x = torch.randn(T, 64, generator=gen).to(DEVICE)
    full = torch.randn(T, offsets[-1] + 10, generator=gen).to(DEVICE)
    expected = full.clone()
    lora_apply_ref(x, expected[:, 5 : 5 + offsets[-1]], lora_a, lora_b, seg_starts, seg_slots, ranks, scaling, offsets)
    view = full[:, 5 : 5 + offsets[-1]]
    assert lora_apply(x, view, lora_a, lora_b, seg_starts, seg_slots, ranks, scaling, offsets, max_seg_len) is view
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)


def test_no_segments_is_a_no_op() -> None:
    gen = torch.Generator().manual_seed(6)
    lora_a, lora_b, ranks, scaling, offsets = make_lora(2, 32, 16, (16,), torch.float32, gen)
    x = torch.randn(3, 32).to(DEVICE)
    y = torch.randn(3, 16).to(DEVICE)
    y0 = y.clone()
    empty = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    lora_apply(
        x, y, lora_a, lora_b, torch.zeros(1, dtype=torch.int32, device=DEVICE), empty, ranks, scaling, offsets, 0
    )
    assert torch.equal(y, y0)


def _valid_args():
    gen = torch.Generator().manual_seed(7)
    lora_a, lora_b, ranks, scaling, offsets = make_lora(2, 32, 16, (16, 8), torch.float32, gen)
    seg_starts = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE)
    seg_slots = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    x = torch.randn(4, 32).to(DEVICE)
    y = torch.zeros(4, 24).to(DEVICE)
    return dict(
        x=x,
        y=y,
        lora_a=lora_a,
        lora_b=lora_b,
        seg_starts=seg_starts,
        seg_slots=seg_slots,
        ranks=ranks,
        scaling=scaling,
        slice_offsets=offsets,
        max_seg_len=2,
    )


@pytest.mark.parametrize(
    "change,exc",
    [
        (lambda a: a.update(seg_starts=a["seg_starts"].long()), TypeError),
        (lambda a: a.update(seg_slots=a["seg_slots"][:1]), ValueError),
        (lambda a: a.update(x=a["x"].half()), TypeError),
        (lambda a: a.update(lora_a=a["lora_a"][:, :, :16]), ValueError),
        (lambda a: a.update(ranks=a["ranks"][:, :1]), ValueError),
        (lambda a: a.update(slice_offsets=(0, 16)), ValueError),
        (lambda a: a.update(slice_offsets=(0, 20, 16)), ValueError),
        (lambda a: a.update(slice_offsets=(0, 16, 30)), ValueError),
        (lambda a: a.update(max_seg_len=-1), ValueError),
        (lambda a: a.update(max_seg_len=2.0), ValueError),
        (lambda a: a.update(scaling=a["scaling"].half()), TypeError),
        (lambda a: a.update(y=a["y"].half()), TypeError),
        (lambda a: a.update(y=a["y"][:, :20]), ValueError),
    ],
    ids=[
        "seg_starts-int64",
        "nseg-mismatch",
        "x-dtype",
        "lora_a-H",
        "ranks-shape",
        "offsets-count",
        "offsets-order",
        "offsets-range",
        "max_seg_len-negative",
        "max_seg_len-float",
        "scaling-dtype",
        "y-dtype",
        "y-shape",
    ],
)
def test_bad_arguments_raise(change, exc) -> None:
    args = _valid_args()
    change(args)
    with pytest.raises(exc):
        lora_apply(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("num_tokens,num_adapters", [(1, 1), (32, 4), (512, 16), (2048, 4)])
def test_sgmv_qwen_shapes_cuda(num_tokens: int, num_adapters: int) -> None:
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(8)
    lora_a, lora_b, ranks, scaling, offsets = make_lora(16, 3584, 64, (3584, 512, 512), dtype, gen)
    rng = random.Random(num_tokens)
    slots = sorted(rng.randrange(num_adapters) for _ in range(num_tokens))
    T, seg_starts, seg_slots, max_seg_len = make_segments(slots, [1] * num_tokens, num_tokens, False)
    x = torch.randn(T, 3584, generator=gen).to(DEVICE, dtype)
    y = torch.randn(T, offsets[-1], generator=gen).to(DEVICE, dtype)
    u, u_ref32, u_reflp, y_k, y_ref32, y_reflp = run_all(
        x, y, lora_a, lora_b, seg_starts, seg_slots, ranks, scaling, offsets, max_seg_len
    )
    check_rule(u, u_ref32, u_reflp, "shrink")
    check_rule(y_k, y_ref32, y_reflp, "expand")


def _padded_segments(seg_starts: torch.Tensor, seg_slots: torch.Tensor, num_segments: int):
    """Segment tensors padded to a fixed count with empty segments, as a static (bucketed) step has."""
    pad = num_segments - seg_slots.shape[0]
    end = seg_starts[-1:].expand(pad)
    return torch.cat([seg_starts, end]), torch.cat([seg_slots, torch.zeros_like(seg_slots[:1]).expand(pad)])


@pytest.mark.parametrize("case", ["empty_segments", "zero_rank_slot", "all_base"])
def test_fixed_grid_early_exit(case: str) -> None:
    """One launch shape (segments padded to 8, max_seg_len = T) gives the reference for batches
    with empty segments, adapters of rank 0 on every slice, and no adapter at all."""
    gen = torch.Generator().manual_seed(21)
    lora_a, lora_b, ranks, scaling, offsets = make_lora(3, 64, 16, (16, 8), torch.float32, gen)
    seg_starts = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32, device=DEVICE)
    seg_slots = {"empty_segments": [0, 2, -1, 1], "zero_rank_slot": [1, 0, 1, 2], "all_base": [-1, -1, -1, -1]}[case]
    seg_slots = torch.tensor(seg_slots, dtype=torch.int32, device=DEVICE)
    if case == "zero_rank_slot":
        ranks[1] = 0
    x = torch.randn(6, 64, generator=gen).to(DEVICE)
    y = torch.randn(6, offsets[-1], generator=gen).to(DEVICE)
    expected = y.clone()
    lora_apply_ref(x, expected, lora_a, lora_b, seg_starts, seg_slots, ranks, scaling, offsets)
    starts8, slots8 = _padded_segments(seg_starts, seg_slots, 8)
    lora_apply(x, y, lora_a, lora_b, starts8, slots8, ranks, scaling, offsets, max_seg_len=6)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_split_k_rows_do_not_depend_on_the_batch() -> None:
    """Split-K partial sums are added in a fixed order: a row's result is bitwise the same alone
    and next to other rows."""
    gen = torch.Generator().manual_seed(22)
    lora_a, _, ranks, _, _ = make_lora(2, 256, 16, (16,), torch.float32, gen)
    x = torch.randn(5, 256, generator=gen).to(DEVICE)
    starts = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    slot = torch.tensor([1], dtype=torch.int32, device=DEVICE)
    batch = lora_shrink(x, lora_a, starts, slot, ranks, 5, split_k=4)
    alone = lora_shrink(
        x[2:3], lora_a, torch.tensor([0, 1], dtype=torch.int32, device=DEVICE), slot, ranks, 1, split_k=4
    )
    assert torch.equal(batch[2:3], alone)


def test_triton_backend_reuses_its_workspace() -> None:
    from mcl_runtime.model.backends import LoRAMeta
    from mcl_runtime.model.layers import LinearWithLoRA
    from mcl_runtime.model.triton_backend import TritonBackend

    gen = torch.Generator().manual_seed(23)
    mod = LinearWithLoRA(64, [32, 16], False, 2, 16, torch.float32, torch.device(DEVICE))
    lora_a, lora_b, ranks, scaling, _ = make_lora(2, 64, 16, (32, 16), torch.float32, gen)
    mod.lora_a.copy_(lora_a), mod.lora_b.copy_(lora_b), mod.ranks.copy_(ranks), mod.scaling.copy_(scaling)
    backend = TritonBackend()
    starts = torch.tensor([0, 3, 4], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    meta = LoRAMeta(starts, slots, 3, 16, starts.cpu().numpy(), slots.cpu().numpy())
    pointers = []
    for T in (4, 4, 3):
        x = torch.randn(4, 64, generator=gen).to(DEVICE)[:T]
        y = torch.zeros(T, 48, device=DEVICE)
        m = (
            meta
            if T == 4
            else LoRAMeta(starts[:2], slots[:1], 3, 16, starts[:2].cpu().numpy(), slots[:1].cpu().numpy())
        )
        backend.apply_lora(x, y, mod, m)
        expected = torch.zeros_like(y)
        lora_apply_ref(
            x, expected, mod.lora_a, mod.lora_b, m.seg_starts, m.seg_slots, mod.ranks, mod.scaling, mod.offsets
        )
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        pointers.append(backend._workspace["shrink"].data_ptr())
    assert len(set(pointers)) == 1  # allocated once, reused by later (and smaller) steps


# ---- the C++ CPU kernel (lora_apply_cpu): the same semantics, every segment in one call ----------
NO_CPU_KERNEL = pytest.mark.skipif(not HAS_CPU_LAYER_OPS, reason="needs the C++ extension mcl_runtime._C")
NO_BF16_DOT = pytest.mark.skipif(not HAS_CPU_BF16_DOT, reason="needs a CPU with AVX512-BF16 (and the extension)")


def cpu_case(
    pattern: str,
    dtype: torch.dtype,
    hidden: int,
    slice_ns: tuple[int, ...],
    seed: int,
    lanes: int = 0,
    bf16_dot: bool | None = None,
    rank_choices: tuple[int, ...] = RANK_CHOICES,
):
    gen = torch.Generator().manual_seed(seed)
    lora_a, lora_b, ranks, scaling, offsets = (
        t.cpu() if isinstance(t, torch.Tensor) else t
        for t in make_lora(8, hidden, 64, slice_ns, dtype, gen, rank_choices=rank_choices)
    )
    T, seg_starts, seg_slots, _ = engine_batch(pattern, 8, seed=seed)
    seg_starts, seg_slots = seg_starts.cpu(), seg_slots.cpu()
    x = torch.randn(T, hidden, generator=gen).to(dtype)
    y = torch.randn(T, offsets[-1], generator=gen).to(dtype)
    y_ref32 = lora_apply_ref(
        x.float(), y.float().clone(), lora_a.float(), lora_b.float(), seg_starts, seg_slots, ranks, scaling, offsets
    )
    y_reflp = lora_apply_ref(x, y.clone(), lora_a, lora_b, seg_starts, seg_slots, ranks, scaling, offsets)
    weights = LoRAWeightsCPU(lora_a, lora_b, scaling, ranks, offsets, bf16_dot=bf16_dot)
    y_k, y_k3 = (
        lora_apply_cpu(x, y.clone(), weights, seg_starts.numpy(), seg_slots.numpy(), num_threads=threads, lanes=lanes)
        for threads in (1, 3)
    )
    assert torch.equal(y_k, y_k3)  # the same bits on three threads
    return y, y_k, y_ref32, y_reflp, seg_starts, seg_slots


def check_cpu_case(y, y_k, y_ref32, y_reflp, seg_starts, seg_slots, what: str) -> None:
    """``cpu_case``'s kernel output within the rule, and its rows without adapter untouched."""
    check_rule(y_k, y_ref32, y_reflp, what)
    for i, w in enumerate(seg_slots.tolist()):
        if w < 0:
            a, b = seg_starts[i].item(), seg_starts[i + 1].item()
            assert torch.equal(y_k[a:b], y[a:b])


@NO_CPU_KERNEL
@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("hidden", [96, 100], ids=["in96", "in100"])
@pytest.mark.parametrize(
    "pattern,dtype",
    [(p, torch.bfloat16) for p in POPULARITY] + [("uniform", torch.float32), ("uniform", torch.float16)],
    ids=lambda v: v if isinstance(v, str) else str(v).split(".")[-1],
)
def test_cpu_kernel_popularity_multislice(pattern: str, dtype: torch.dtype, hidden: int, lanes: int) -> None:
    """The float32 arithmetic: mixed ranks (8-64, one untargeted slice), rows without adapter, an
    empty segment; input widths a multiple of 16 and not; blocks of 8 and 16 tokens (whichever the
    machine would pick); one thread and three give the same bits."""
    case = cpu_case(pattern, dtype, hidden, (48, 20, 20), seed=POPULARITY.index(pattern), lanes=lanes, bf16_dot=False)
    check_cpu_case(*case, f"cpu {pattern}")


@NO_BF16_DOT
@pytest.mark.parametrize("hidden", [96, 1056], ids=["in96", "in1056"])
@pytest.mark.parametrize("pattern", POPULARITY)
def test_cpu_kernel_pair_arithmetic(pattern: str, hidden: int) -> None:
    """The bfloat16 pair dot products: ranks even and odd (a slice's last pair half zero), one
    slice untargeted, rows without adapter, an empty segment; output slices of whole 64-column
    chunks and of a partial one; input widths of an even and an odd number of 32-element vectors
    (1056: work enough for three threads); the rule, and one thread and three give the same bits."""
    ranks = (3, 5, 8, 16, 33, 64)
    case = cpu_case(
        pattern, torch.bfloat16, hidden, (200, 64, 20), POPULARITY.index(pattern), bf16_dot=True, rank_choices=ranks
    )
    check_cpu_case(*case, f"cpu pairs {pattern}")


@NO_CPU_KERNEL
@pytest.mark.parametrize(
    "dtype,in_features,max_rank",
    [(torch.float32, 64, 16), (torch.float16, 64, 16), (torch.bfloat16, 48, 16), (torch.bfloat16, 64, 15)],
    ids=["float32", "float16", "in48", "odd-max-rank"],
)
def test_cpu_kernel_pairs_only_where_possible(dtype: torch.dtype, in_features: int, max_rank: int) -> None:
    """The pair arithmetic needs bfloat16, an input width that is a multiple of 32 and an even
    buffer rank (and AVX512-BF16): insisting elsewhere is a ValueError, the default takes the
    float32 arithmetic there, and the pairs for bfloat16 of such shapes where the CPU has them."""
    lora_a, lora_b = torch.zeros(2, max_rank, in_features, dtype=dtype), torch.zeros(2, 40, max_rank, dtype=dtype)
    args = (lora_a, lora_b, torch.ones(2), torch.ones(2, 1, dtype=torch.int32), (0, 40))
    with pytest.raises(ValueError):
        LoRAWeightsCPU(*args, bf16_dot=True)
    assert not LoRAWeightsCPU(*args).pairs
    even = (torch.zeros(2, 16, 64, dtype=torch.bfloat16), torch.zeros(2, 40, 16, dtype=torch.bfloat16))
    assert LoRAWeightsCPU(*even, *args[2:]).pairs == HAS_CPU_BF16_DOT
    assert not LoRAWeightsCPU(*even, *args[2:], bf16_dot=False).pairs


@NO_CPU_KERNEL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_kernel_on_threads(dtype: torch.dtype) -> None:
    """Work enough for three threads (1040 input features: the shrink's passes of 512 and a last
    short one; 512 output columns): the rule, and on three threads the bits of one (``cpu_case``
    compares them)."""
    y, y_k, y_ref32, y_reflp, _, _ = cpu_case("zipf", dtype, 1040, (256, 128, 128), seed=9)
    check_rule(y_k, y_ref32, y_reflp, "cpu threads")


@NO_CPU_KERNEL
@pytest.mark.parametrize(
    "dtype,bf16_dot",
    [(torch.float32, None), (torch.bfloat16, False), (torch.bfloat16, None)],
    ids=["float32", "bfloat16", "bfloat16-default"],
)
def test_cpu_kernel_long_segments_into_a_strided_view(dtype: torch.dtype, bf16_dot: bool | None) -> None:
    """Segments longer than the kernel's 8- or 16-token blocks and than its passes over y,
    one slice, y a column slice of a wider tensor; one thread and three (work enough for three)
    give the same bits. bfloat16 in the float32 arithmetic and in the default (pairs where the CPU
    has AVX512-BF16)."""
    gen = torch.Generator().manual_seed(5)
    lora_a, lora_b, ranks, scaling, offsets = (
        t.cpu() if isinstance(t, torch.Tensor) else t for t in make_lora(3, 512, 32, (200,), dtype, gen)
    )
    seg_starts, seg_slots = np.array([0, 70, 75, 140], np.int32), np.array([2, -1, 0], np.int32)
    x = torch.randn(140, 512, generator=gen).to(dtype)
    wide = torch.randn(140, 210, generator=gen).to(dtype)
    starts, slots = torch.from_numpy(seg_starts), torch.from_numpy(seg_slots)
    y_ref32 = lora_apply_ref(
        x.float(), wide[:, 5:205].float(), lora_a.float(), lora_b.float(), starts, slots, ranks, scaling, offsets
    )
    y_reflp = lora_apply_ref(x, wide[:, 5:205].clone(), lora_a, lora_b, starts, slots, ranks, scaling, offsets)
    weights = LoRAWeightsCPU(lora_a, lora_b, scaling, ranks, offsets, bf16_dot=bf16_dot)
    outs = []
    for threads in (1, 3):
        out = wide.clone()
        lora_apply_cpu(x, out[:, 5:205], weights, seg_starts, seg_slots, num_threads=threads)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    check_rule(outs[0][:, 5:205], y_ref32, y_reflp, "long segments")
    assert torch.equal(outs[0][:, :5], wide[:, :5]) and torch.equal(outs[0][:, 205:], wide[:, 205:])
    assert torch.equal(outs[0][70:75], wide[70:75])  # the rows without adapter


@NO_CPU_KERNEL
@pytest.mark.parametrize(
    "change,exc",
    [
        (lambda a: a.update(x=a["x"].double()), TypeError),
        (
            lambda a: a.update(
                x=a["x"].bfloat16(), y=a["y"].bfloat16(), lora_a=a["lora_a"].half(), lora_b=a["lora_b"].half()
            ),
            TypeError,
        ),
        (lambda a: a.update(offsets=(0, 10, 39)), ValueError),
        (lambda a: a.update(seg_slots=np.array([5], np.int32)), ValueError),
        (lambda a: a.update(seg_starts=np.array([0, 99], np.int32)), ValueError),
        (lambda a: a.update(lora_a=a["lora_a"][:, :, :10]), ValueError),
        (lambda a: a.update(ranks=a["ranks"] + 40), ValueError),
        (lambda a: a.update(lanes=12), ValueError),
    ],
    ids=["dtype", "x-vs-weights", "offsets", "slot", "rows", "in-features", "rank", "lanes"],
)
def test_cpu_kernel_bad_arguments(change, exc) -> None:
    gen = torch.Generator().manual_seed(0)
    lora_a, lora_b, ranks, scaling, offsets = (
        t.cpu() if isinstance(t, torch.Tensor) else t for t in make_lora(3, 16, 16, (40,), torch.float32, gen)
    )
    args = dict(
        x=torch.randn(4, 16),
        y=torch.zeros(4, 40),
        lora_a=lora_a,
        lora_b=lora_b,
        scaling=scaling,
        ranks=ranks,
        offsets=offsets,
        seg_starts=np.array([0, 4], np.int32),
        seg_slots=np.array([1], np.int32),
    )
    change(args)
    with pytest.raises(exc):
        lora_apply_cpu(
            args["x"],
            args["y"],
            LoRAWeightsCPU(args["lora_a"], args["lora_b"], args["scaling"], args["ranks"], args["offsets"]),
            args["seg_starts"],
            args["seg_slots"],
            lanes=args.get("lanes"),
        )
