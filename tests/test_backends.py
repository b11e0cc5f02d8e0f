"""The cpu backend against the reference backend on random mixed batches: decodes, prompts without
cached context and chunks after cached context, adapters of different ranks and base rows in one
step. Flash-attention's rule, per op (attention, LoRA, RMSNorm, RoPE) and for a whole forward: the
error of the cpu backend against the reference backend in float64 is within twice the error of the
reference backend in the same dtype. Every route of the cpu backend is held to it: the C++
kernels, the padded torch groups (prompts split by length), and the torch layer paths."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mcl_runtime.kernels import HAS_CPU_LAYER_OPS, lora_apply_cpu
from mcl_runtime.kernels.cpu import lora_pairs_possible
from mcl_runtime.model.backends import AttentionMeta, ForwardContext, KeptRows, LoRAMeta, lora_segments, make_backend
from mcl_runtime.model.config import parse_config
from mcl_runtime.model.cpu_backend import NATIVE_BF16_GEMM, CPUBackend
from mcl_runtime.model.decoder import DecoderLM
from mcl_runtime.model.layers import LinearWithLoRA, rope_cos_sin, rope_inv_freq
from mcl_runtime.model.reference_backend import ReferenceBackend, silu_and_mul_torch

SEEDS = [0, 1, 2]
DTYPES = [torch.float32, torch.bfloat16]
BLOCK_SIZE = 4
RANKS = [4, 16, 8]  # adapter slots 0..2; slot 3 stays empty; -1: the base model
MAX_RANK = 16
CFG = parse_config(
    dict(
        model_type="qwen3",  # per-head q/k norms: the 3-D RMSNorm path too
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
)


def _cpu(**thresholds) -> CPUBackend:
    backend = CPUBackend(attention_kernel=True)
    for name, value in thresholds.items():
        setattr(backend, name, value)
    return backend


# The cpu backend's routes: everything through the C++ kernels and every linear layer through
# oneDNN (on its packed copies of the weights) or, in bfloat16, as float32 GEMMs on pieces of the
# weight; decodes through the attention kernel, every prefill group padded (prompts split by
# length) and LoRA as gather + bmm tiles; the same with LoRA over the step's slot range; every
# torch path.
INF = float("inf")
EVERY_LINEAR = dict(ONEDNN_MIN_ROWS=1, ONEDNN_MAX_ROWS=INF, ONEDNN_MIN_WEIGHT=0)
# A weight of more than 1000 elements in several pieces.
EVERY_UPCAST = dict(bf16_upcast=True, BF16_UPCAST_MIN_ROWS=1, BF16_UPCAST_MIN_WORK=0, BF16_UPCAST_CHUNK=1000)
CPU_ROUTES = {
    "kernels": lambda: _cpu(LORA_KERNEL_MAX_WORK=INF, **EVERY_LINEAR, **EVERY_UPCAST),
    "kernel+padded": lambda: _cpu(
        PADDED_SMALL=0, PADDED_SMALL_PROMPTS=0, SPLIT_GAIN=1.0, LORA_KERNEL_MAX_WORK=0, LORA_RANGE_MAX_SLOTS=0
    ),
    "kernel+slot-range": lambda: _cpu(
        PADDED_SMALL=0, PADDED_SMALL_PROMPTS=0, LORA_KERNEL_MAX_WORK=0, LORA_RANGE_MAX_SLOTS=INF
    ),
    "torch": lambda: CPUBackend(attention_kernel=False, layer_kernels=False, onednn_linear=False, bf16_upcast=False),
}


@dataclass
class Batch:
    """One step's sequences, ordered decodes | prompts | chunks after cached context, each kind by slot."""

    q_lens: np.ndarray
    ctx_lens: np.ndarray
    slots: np.ndarray
    kind_counts: list[int]
    block_tables: np.ndarray  # [B, M]
    num_blocks: int
    static: bool = False

    @property
    def positions(self) -> np.ndarray:
        return np.concatenate([np.arange(c - q, c) for q, c in zip(self.q_lens, self.ctx_lens)])

    @property
    def num_tokens(self) -> int:
        return int(self.q_lens.sum())


def random_batch(seed: int, static: bool = False) -> Batch:
    """Decodes (a 1-token prompt among them), prompts, chunks after cached context, mixed slots."""
    rng = np.random.default_rng(seed)
    kinds = []
    kinds.append([(1, int(c)) for c in rng.integers(1, 60, 5)] + [(1, 1)])
    if not static:
        kinds.append([(int(q), int(q)) for q in rng.integers(2, 40, 4)])
        kinds.append([(int(q), int(q + c)) for q, c in zip(rng.integers(2, 20, 3), rng.integers(1, 50, 3))])
    seqs, counts = [], []
    for kind in kinds:
        slots = rng.choice([-1, 0, 1, 2], len(kind))
        order = np.argsort(slots, kind="stable")
        seqs += [(*kind[i], int(slots[i])) for i in order]
        counts.append(len(kind))
    counts += [0] * (3 - len(counts))
    q_lens, ctx_lens, slots = (np.array(col) for col in zip(*seqs))
    blocks = -(-ctx_lens // BLOCK_SIZE)
    ids = rng.permutation(int(blocks.sum()) + 3) + 1  # blocks of all sequences, shuffled; 0 pads the tables
    tables = np.zeros((len(seqs), int(blocks.max())), np.int32)
    for b, start in enumerate(np.cumsum(blocks) - blocks):
        tables[b, : blocks[b]] = ids[start : start + blocks[b]]
    return Batch(q_lens, ctx_lens, slots, counts, tables, int(ids.max()) + 1, static)


def metadata(batch: Batch) -> tuple[AttentionMeta, LoRAMeta]:
    """What the model runner builds for the batch (fresh objects: a backend's plan is per step)."""
    cu = np.zeros(len(batch.q_lens) + 1, np.int32)
    cu[1:] = np.cumsum(batch.q_lens)
    pos = batch.positions
    seq_of_token = np.repeat(np.arange(len(batch.q_lens)), batch.q_lens)
    slot_mapping = batch.block_tables[seq_of_token, pos // BLOCK_SIZE].astype(np.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
    ctx = batch.ctx_lens.astype(np.int32)
    attn = AttentionMeta(
        slot_mapping=torch.from_numpy(slot_mapping),
        block_tables=torch.from_numpy(batch.block_tables),
        context_lens=torch.from_numpy(ctx),
        cu_seqlens_q=torch.from_numpy(cu),
        group_bounds=[0] + np.cumsum(batch.kind_counts).tolist(),
        max_q_len=int(batch.q_lens.max()),
        max_context_len=int(ctx.max()),
        block_size=BLOCK_SIZE,
        context_lens_host=ctx,
        cu_seqlens_q_host=cu,
        static=batch.static,
    )
    seg_starts, seg_slots, max_seg_len = lora_segments(batch.slots, batch.q_lens)
    token_slots = np.repeat(batch.slots, batch.q_lens).astype(np.int32)
    lora = LoRAMeta(
        torch.from_numpy(seg_starts),
        torch.from_numpy(seg_slots),
        max_seg_len,
        MAX_RANK if batch.static else max(RANKS[s] for s in batch.slots if s >= 0),
        seg_starts,
        seg_slots,
        token_slots=torch.from_numpy(token_slots) if batch.static else None,
    )
    return attn, lora


def check_rule(name: str, out: torch.Tensor, ref: torch.Tensor, gold: torch.Tensor) -> None:
    """Flash-attention's rule: ``max |out - gold| <= 2 max |ref - gold|``, with ``gold`` the reference
    backend in float64 and ``ref`` the reference backend in ``out``'s dtype."""
    err = (out.double() - gold).abs().max().item()
    ref_err = (ref.double() - gold).abs().max().item()
    assert err <= 2 * ref_err, f"{name}: error {err:.3g} > 2 x the reference's {ref_err:.3g}"


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy in ``dtype``; the LoRA scalings stay float32 as the engine keeps them (float64 for the gold)."""
    module = copy.deepcopy(module).to(dtype)
    for mod in module.modules():
        if isinstance(mod, LinearWithLoRA) and dtype != torch.float64:
            mod.scaling = mod.scaling.float()
    return module


def random(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=gen)


def each_batch(test):
    """Parametrized over the cpu backend's routes, the dtypes, the seeds, and mixed or static batches."""
    for name, values, ids in (
        ("static", [False, True], ["mixed", "static"]),
        ("seed", SEEDS, None),
        ("dtype", DTYPES, str),
        ("route", list(CPU_ROUTES), None),
    ):
        test = pytest.mark.parametrize(name, values, ids=ids)(test)
    return test


def each_backend(run, dtype: torch.dtype, route: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``run(backend, dtype)`` for the cpu backend and the reference in ``dtype``, and the reference in float64."""
    return (
        run(CPU_ROUTES[route](), dtype),
        run(ReferenceBackend(), dtype),
        run(ReferenceBackend(), torch.float64),
    )


@each_batch
def test_attention(seed: int, dtype: torch.dtype, route: str, static: bool) -> None:
    batch = random_batch(seed, static)
    gen = torch.Generator().manual_seed(seed)
    Hq, Hkv, D, T = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim, batch.num_tokens
    q, k, v = random(gen, T, Hq, D), random(gen, T, Hkv, D), random(gen, T, Hkv, D)
    cache = random(gen, 2, batch.num_blocks, BLOCK_SIZE, Hkv, D)  # the cached context (and stale slots)
    q, k, v, cache = (t.to(dtype) for t in (q, k, v, cache))  # the same values in every dtype

    def run(backend, dt: torch.dtype) -> torch.Tensor:
        attn, lora = metadata(batch)
        k_cache, v_cache = cache.to(dt).clone()
        backend.prepare(attn, lora)
        backend.store_kv(k.to(dt), v.to(dt), k_cache, v_cache, attn)
        return backend.attention(q.to(dt), k_cache, v_cache, D**-0.5, attn, k.to(dt), v.to(dt))

    check_rule("attention", *each_backend(run, dtype, route))


def set_adapters(gen: torch.Generator, mod: LinearWithLoRA, scale: float, untargeted: bool = False) -> None:
    """Slot s of ``mod``: a random adapter of rank RANKS[s] (``untargeted``: leaving slice s out)."""
    for slot, r in enumerate(RANKS):
        slices = [(random(gen, r, mod.in_features, scale=scale), random(gen, n, r, scale=scale)) for n in mod.out_sizes]
        if untargeted:
            slices[slot] = None
        mod.set_slot(slot, slices, 2.0 / r)


LORA_IN = 64  # a multiple of 32: in bfloat16 the LoRA kernel takes its pair arithmetic where it can


def lora_module(gen: torch.Generator, dtype: torch.dtype) -> LinearWithLoRA:
    """A fused projection of three slices; slot s holds an adapter of rank RANKS[s] that leaves one
    slice untargeted (a different one per slot)."""
    mod = LinearWithLoRA(LORA_IN, [32, 16, 16], False, 4, MAX_RANK, dtype, torch.device("cpu"))
    set_adapters(gen, mod, scale=0.3, untargeted=True)
    return mod


def lora_step(backend, batch, x: torch.Tensor, mod: LinearWithLoRA, dt: torch.dtype) -> torch.Tensor:
    """``backend``'s LoRA delta of ``mod`` (in ``dt``) for ``x`` over the step ``batch``."""
    attn, lora = metadata(batch)
    backend.prepare(attn, lora)
    y = torch.zeros(batch.num_tokens, 64, dtype=dt)
    backend.apply_lora(x.to(dt), y, mod, lora)
    return y


@each_batch
def test_lora(seed: int, dtype: torch.dtype, route: str, static: bool) -> None:
    batch = random_batch(seed, static)
    gen = torch.Generator().manual_seed(seed)
    mod = lora_module(gen, dtype)
    x = random(gen, batch.num_tokens, LORA_IN).to(dtype)
    out, ref, gold = each_backend(lambda be, dt: lora_step(be, batch, x, cast(mod, dt), dt), dtype, route)
    check_rule("lora", out, ref, gold)
    assert not out[np.repeat(batch.slots, batch.q_lens) < 0].any()  # base rows untouched


@pytest.mark.parametrize("route", list(CPU_ROUTES))
def test_lora_follows_adapter_loads(route: str) -> None:
    """Other adapters loaded into the slots between two steps: the second step uses them (the
    backend's copies of the buffers in its own layouts are remade)."""
    batch = random_batch(0)
    gen = torch.Generator().manual_seed(0)
    mod = lora_module(gen, torch.float32)
    x = random(gen, batch.num_tokens, LORA_IN)
    backend = CPU_ROUTES[route]()
    before = lora_step(backend, batch, x, mod, torch.float32)
    set_adapters(gen, mod, scale=0.3)
    out = lora_step(backend, batch, x, mod, torch.float32)
    ref = lora_step(ReferenceBackend(), batch, x, mod, torch.float32)
    check_rule("lora", out, ref, lora_step(ReferenceBackend(), batch, x, cast(mod, torch.float64), torch.float64))
    assert not torch.equal(out, before)


@pytest.mark.parametrize("route", list(CPU_ROUTES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_layer_ops(seed: int, dtype: torch.dtype, route: str) -> None:
    """RMSNorm of rows, with and without the fused residual add, and of heads (q/k norms); RoPE
    of the q/k heads inside a fused qkv output (a strided view); the MLP's SiLU-and-multiply of a
    fused gate_up output."""
    batch = random_batch(seed)
    gen = torch.Generator().manual_seed(seed)
    T, H, D, Hkv = batch.num_tokens, CFG.hidden_size, CFG.head_dim, CFG.num_kv_heads
    x, residual, weight = random(gen, T, H, scale=3), random(gen, T, H), 1 + random(gen, H, scale=0.1)
    heads = random(gen, T, CFG.num_heads, D, scale=3)
    qkv = random(gen, T, (CFG.num_heads + 2 * Hkv) * D)
    gate_up = random(gen, T, 2 * CFG.intermediate_size, scale=3)
    x, residual, weight, heads, qkv, gate_up = (t.to(dtype) for t in (x, residual, weight, heads, qkv, gate_up))
    inv_freq = rope_inv_freq(D, CFG.rope_theta, None)
    cos_sin = rope_cos_sin(torch.from_numpy(batch.positions), inv_freq, dtype)

    cases = {
        "rms_norm": lambda b, dt: b.rms_norm(x.to(dt), weight.to(dt), 1e-6),
        "rms_norm_heads": lambda b, dt: b.rms_norm(heads.to(dt), weight[:D].to(dt), 1e-6),
        "rms_norm_residual": lambda b, dt: torch.cat(
            b.rms_norm(x.to(dt), weight.to(dt), 1e-6, residual.to(dt).clone())
        ),
        "rope": lambda b, dt: b.rope(
            qkv.to(dt).clone()[:, : (CFG.num_heads + Hkv) * D].view(T, -1, D), *(t.to(dt) for t in cos_sin)
        ),
        "silu_and_mul": lambda b, dt: b.silu_and_mul(gate_up.to(dt)),
    }
    for name, case in cases.items():
        check_rule(name, *each_backend(case, dtype, route))


@pytest.mark.skipif(not HAS_CPU_LAYER_OPS, reason="needs the C++ extension mcl_runtime._C")
def test_silu_and_mul_takes_the_kernel_only_in_16_bit_on_avx512(monkeypatch) -> None:
    """The kernel where it is faster (16-bit, AVX-512); float32 and narrower vectors keep torch's ops."""
    import mcl_runtime.model.cpu_backend as cpu_backend

    calls = []

    def kernel(x: torch.Tensor, num_threads: int) -> torch.Tensor:
        calls.append((x.dtype, cpu_backend.CPU_VECTOR_LANES))
        return silu_and_mul_torch(x)

    monkeypatch.setattr(cpu_backend, "silu_and_mul_cpu", kernel)
    x = torch.randn(5, 64)
    for lanes in (8, 16):
        monkeypatch.setattr(cpu_backend, "CPU_VECTOR_LANES", lanes)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            with torch.inference_mode():
                out = CPUBackend().silu_and_mul(x.to(dtype))
            torch.testing.assert_close(out, silu_and_mul_torch(x.to(dtype)))
    assert calls == [(torch.bfloat16, 16), (torch.float16, 16)]


@pytest.mark.parametrize("mkl", [False, True], ids=["onednn", "mkl"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("route", list(CPU_ROUTES))
def test_linear_bf16(route: str, rows: int, bias: bool, mkl: bool) -> None:
    """A bfloat16 linear layer, with and without bias: as float32 GEMMs (oneDNN's, or MKL's past
    ``ONEDNN_MAX_ROWS``) on several pieces of the weight (``kernels``; the default routes past
    ``BF16_UPCAST_MIN_ROWS`` and ``BF16_UPCAST_MIN_WORK`` where oneDNN has no bfloat16 kernel), or
    torch's bfloat16 GEMM. (The float32 routes are held to the rule by ``test_forward``.)"""
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(rows)
    x, w, b = random(gen, rows, 200), random(gen, 300, 200, scale=0.2), random(gen, 300) if bias else None
    backend = CPU_ROUTES[route]()
    if mkl:
        backend.ONEDNN_MAX_ROWS = 0
    weight = w.to(dtype)

    def run(be, dt: torch.dtype) -> torch.Tensor:
        with torch.inference_mode():
            return be.linear(x.to(dt), weight if be is backend else w.to(dt), None if b is None else b.to(dt))

    out = run(backend, dtype)
    assert out.dtype == dtype and out.shape == (rows, 300)
    check_rule("linear", out, run(ReferenceBackend(), dtype), run(ReferenceBackend(), torch.float64))


@pytest.mark.skipif(not NATIVE_BF16_GEMM, reason="oneDNN has no bfloat16 kernel for this CPU")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("rows", [1, 5, 40, 600])
def test_linear_bf16_packed(rows: int, bias: bool) -> None:
    """Where oneDNN computes bfloat16 natively, a bfloat16 weight gets a packed copy that every call
    reads (from one row to past ``MKL_MIN_ROWS``), and its plain tensor is handed back for freeing."""
    gen = torch.Generator().manual_seed(rows)
    x, w, b = random(gen, rows, 200), random(gen, 300, 200, scale=0.2), random(gen, 300) if bias else None
    weight = w.to(torch.bfloat16)
    backend = _cpu(ONEDNN_MIN_WEIGHT=0)
    assert backend.prepare_weights([weight], keep_plain=False) == [weight]
    plain = weight.clone()
    weight.data = torch.empty(0, dtype=weight.dtype)  # freed, as the engine does: only the copy is read

    def run(be, dt: torch.dtype) -> torch.Tensor:
        with torch.inference_mode():
            return be.linear(x.to(dt), weight if be is backend else plain.to(dt), None if b is None else b.to(dt))

    out = run(backend, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 300)
    check_rule("linear", out, run(ReferenceBackend(), torch.bfloat16), run(ReferenceBackend(), torch.float64))


def test_bf16_not_packed_when_upcast() -> None:
    """bfloat16 weights run as float32 pieces (``bf16_upcast``) keep their plain tensors: no copy."""
    weight = torch.randn(300, 200).to(torch.bfloat16)
    assert _cpu(bf16_upcast=True, ONEDNN_MIN_WEIGHT=0).prepare_weights([weight], keep_plain=False) == []


@pytest.mark.skipif(not NATIVE_BF16_GEMM, reason="oneDNN has no bfloat16 kernel for this CPU")
@pytest.mark.parametrize("pairs", [False, None], ids=["float32-arithmetic", "default-arithmetic"])
@pytest.mark.parametrize(
    "dtype,min_work,kernel",
    [(torch.bfloat16, INF, True), (torch.bfloat16, 0, False), (torch.float32, 0, True)],
    ids=["bf16-small", "bf16-large", "fp32"],
)
def test_bf16_lora_of_large_slices_takes_the_slot_range(monkeypatch, dtype, min_work, kernel, pairs) -> None:
    """Where oneDNN computes bfloat16 natively, a bfloat16 projection's LoRA of at least
    ``LORA_RANGE_MIN_WORK_BF16`` multiply-adds per slice (``LORA_RANGE_MIN_WORK_BF16_PAIRS`` where
    the kernel takes its pair arithmetic: the other constant is set the other way) goes to the slot
    range's GEMMs instead of the kernel; smaller ones, and float32 at any size, to the kernel.
    Either way within the rule."""
    calls = []
    kernel_calls = lambda *a, **k: calls.append(1) or lora_apply_cpu(*a, **k)  # noqa: E731
    monkeypatch.setattr("mcl_runtime.model.cpu_backend.lora_apply_cpu", kernel_calls)
    batch = random_batch(0)
    gen = torch.Generator().manual_seed(0)
    mod = lora_module(gen, dtype)
    x = random(gen, batch.num_tokens, LORA_IN).to(dtype)
    names = ["LORA_RANGE_MIN_WORK_BF16", "LORA_RANGE_MIN_WORK_BF16_PAIRS"]
    if pairs is False or not lora_pairs_possible(torch.bfloat16, MAX_RANK, LORA_IN):
        names.reverse()
    backend = _cpu(**{names[1]: min_work, names[0]: 0 if min_work else INF}, lora_bf16_dot=pairs)
    with torch.inference_mode():
        out = lora_step(backend, batch, x, mod, dtype)
    assert bool(calls) == (kernel and backend.layer_kernels)
    ref = lora_step(ReferenceBackend(), batch, x, mod, dtype)
    check_rule("lora", out, ref, lora_step(ReferenceBackend(), batch, x, cast(mod, torch.float64), torch.float64))


@functools.cache
def random_model(seed: int, dtypes: tuple[torch.dtype, ...] = ()) -> DecoderLM:
    """Random float32 weights cast to each of ``dtypes`` in turn (forwards leave a model as it was)."""
    if dtypes:
        return cast(random_model(seed, dtypes[:-1]), dtypes[-1])
    gen = torch.Generator().manual_seed(seed)
    model = DecoderLM(CFG, 4, MAX_RANK, torch.float32, torch.device("cpu"))
    for name, p in model.named_parameters():
        p.copy_(1 + random(gen, *p.shape, scale=0.1) if "norm" in name else random(gen, *p.shape, scale=0.15))
    for i in range(CFG.num_layers):
        for mod in model.lora_modules(i).values():
            set_adapters(gen, mod, scale=0.2)
    return model


def forward_inputs(batch: Batch, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random token ids, the batch's positions and a random KV cache (its cached context) in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, CFG.vocab_size, (batch.num_tokens,), generator=gen)
    cache = random(gen, CFG.num_layers, 2, batch.num_blocks, BLOCK_SIZE, CFG.num_kv_heads, CFG.head_dim).to(dtype)
    return input_ids, torch.from_numpy(batch.positions), cache


def run_forward(
    backend, batch: Batch, seed: int, dtype: torch.dtype, dt: torch.dtype, keep: KeptRows | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``random_model(seed)`` (cast through ``dtype`` to ``dt``) over the batch in ``backend``, keeping
    the rows ``keep`` when given: (hidden states, the KV cache after the forward)."""
    input_ids, positions, cache = forward_inputs(batch, seed, dtype)
    attn, lora = metadata(batch)
    kv = cache.to(dt).clone()
    ctx = ForwardContext(backend, [(layer[0], layer[1]) for layer in kv], attn, lora)
    model = random_model(seed, (dtype,) if dt == dtype else (dtype, dt))
    backend.prepare_weights(model.linear_weights())
    backend.prepare(attn, lora)
    if keep is not None:
        ctx.keep = KeptRows(keep.index, copy.copy(keep.lora))  # a fresh plan per forward
        if keep.lora is not None:
            backend.prepare_lora(ctx.keep.lora)
    with torch.inference_mode():
        return model(input_ids, positions, ctx), kv


@each_batch
def test_forward(seed: int, dtype: torch.dtype, route: str, static: bool) -> None:
    """A whole forward (two decoder layers and the final norm) over the batch."""
    batch = random_batch(seed, static)
    run = lambda backend, dt: run_forward(backend, batch, seed, dtype, dt)[0]  # noqa: E731
    check_rule("forward", *each_backend(run, dtype, route))


def kept_rows(batch: Batch, seqs: np.ndarray) -> KeptRows:
    """What the model runner keeps for sampling sequences ``seqs``: each one's last token."""
    last = np.cumsum(batch.q_lens)[seqs] - 1
    starts, slots, max_len = lora_segments(batch.slots[seqs], np.ones(len(seqs), np.int64))
    lora = None
    if (slots >= 0).any():
        rank = max(RANKS[s] for s in slots if s >= 0)
        lora = LoRAMeta(torch.from_numpy(starts), torch.from_numpy(slots), max_len, rank, starts, slots)
    return KeptRows(torch.from_numpy(last.astype(np.int64)), lora)


KEPT = {  # which sequences sample: all of them, the base rows only, one with an adapter, every other one
    "all": lambda slots: np.arange(len(slots)),
    "base": lambda slots: np.flatnonzero(slots < 0),
    "one-adapter": lambda slots: np.flatnonzero(slots >= 0)[-1:],
    "every-other": lambda slots: np.arange(1, len(slots), 2),
}


@pytest.mark.parametrize("kept", list(KEPT))
@pytest.mark.parametrize("route", list(CPU_ROUTES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_forward_keeps_rows(seed: int, dtype: torch.dtype, route: str, kept: str) -> None:
    """A forward that keeps only the sampling sequences' last tokens past the last layer's attention:
    those rows of the whole forward (within the rule against the reference's whole forward in
    float64), and the same KV cache as the whole forward, bit for bit."""
    batch = random_batch(seed)
    seqs = KEPT[kept](batch.slots)
    if not len(seqs):
        pytest.skip("no such sequence in this batch")
    rows = kept_rows(batch, seqs)
    out, out_kv = run_forward(CPU_ROUTES[route](), batch, seed, dtype, dtype, rows)
    whole, whole_kv = run_forward(CPU_ROUTES[route](), batch, seed, dtype, dtype)
    ref = run_forward(ReferenceBackend(), batch, seed, dtype, dtype, rows)[0]
    gold = run_forward(ReferenceBackend(), batch, seed, dtype, torch.float64)[0][rows.index]
    assert out.shape == (len(seqs), CFG.hidden_size)
    check_rule("kept rows", out, ref, gold)
    check_rule("whole forward's rows", whole[rows.index], ref, gold)
    assert torch.equal(out_kv, whole_kv)


def test_registry() -> None:
    """The names, the ``torch`` alias of the cpu backend, and a backend object passed through."""
    assert make_backend("reference").name == "reference"
    assert make_backend("cpu").name == make_backend("torch").name == "cpu"
    backend = CPUBackend(layer_kernels=False)
    assert make_backend(backend) is backend
    with pytest.raises(ValueError, match="unknown backend 'tpu'.*cpu, reference, torch, triton"):
        make_backend("tpu")
    with pytest.raises(TypeError, match="backend must be a name or a Backend"):
        make_backend(SimpleNamespace(name="x"))
