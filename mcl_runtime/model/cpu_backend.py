"""The cpu backend: the C++ kernels of ``mcl_runtime._C`` (``kernels/cpu.py``) and the rules that send
each part of a step to them or to a torch path. No Python loop over requests or adapters.

Routing (each threshold is a class constant; ``benchmarks/bench_cpu_routing.py`` measures the
crossover behind it into ``benchmarks/results/cpu_routing.json``, under the constant's name):

* attention: with at most ``KERNEL_MAX_THREADS`` torch threads, the decodes and every prefill group
  of at most ``PADDED_SMALL_PROMPTS`` (prompts without cached context) or ``PADDED_SMALL`` (chunks
  after cached context) padded (query, key) pairs go to ``paged_attention_cpu`` (on torch's
  threads), which reads the paged cache in place; the other groups, and all of them past
  ``KERNEL_MAX_THREADS`` threads, attend as padded groups of torch ops. Static steps (the compiled
  decode) use the kernel as the custom op ``torch.ops.mcl.paged_attention_cpu``, which reads each
  sequence's context length from the tensor, so the bucket's shapes need no mask.
* padded groups: one kind of sequence each (decodes; prompts without cached context; chunks after
  cached context). Decodes, and prompts, of spread-out lengths are split into up to three groups
  of similar length when that leaves at most ``SPLIT_GAIN`` of the padded work. Keys come from the
  paged cache through ``index_select`` into reused buffers; prompts attend to their own new keys
  through SDPA's causal path. The query heads sharing a KV head are folded into the query axis
  (prompts: SDPA's ``enable_gqa``), so K/V are never repeated for GQA.
* LoRA: on eager steps, a projection whose LoRA work is at most ``LORA_KERNEL_MAX_WORK``
  multiply-adds makes one ``lora_apply_cpu`` call over every adapter segment (it does only the
  needed multiply-adds, in one call, in float32). In bfloat16 where oneDNN computes it natively,
  slices of at least ``LORA_RANGE_MIN_WORK_BF16`` multiply-adds (``LORA_RANGE_MIN_WORK_BF16_PAIRS``
  where the kernel takes its AVX512-BF16 pair arithmetic) go to the slot range below instead (its
  bfloat16 GEMMs), where the step's adapters fit one. Larger ones, and all with
  ``layer_kernels=False``:
  when the step's adapters lie in at most ``LORA_RANGE_MAX_SLOTS`` consecutive slots, every token
  goes through every slot of that range, masked to its own (two GEMMs per slice, the second
  accumulating into ``y`` in place: G times the LoRA's multiply-adds, at the GEMMs' speed, and no
  ``[T, out]`` temporary); otherwise the tokens of each adapter segment are cut into
  tiles of at most ``LORA_TILE`` tokens, and one gather + ``bmm`` per projection covers every tile
  of every adapter (punica's "gather + bmm"). Static steps make each token its own tile (base rows
  get gain 0), so nothing sized by a per-step host value enters the graph.
* linear layers (base projections, LM head): ``prepare_weights`` copies every float32 weight of at
  least ``ONEDNN_MIN_WEIGHT`` elements into oneDNN's blocked layout once, and eager inference calls
  read that copy through oneDNN's inner product at every row count (cpu_routing.json, against the
  faster of oneDNN and MKL on the plain weight: 0.98-1.85x from 2 to 128 rows, 0.97-1.08x on one
  row, 0.85-0.97x at 512-1024 rows). The engine then frees the plain weights (vLLM's CPU path
  prepacks and drops its weights the same way), unless a compiled graph reads them or steps reach
  ``MKL_MIN_ROWS`` rows: calls that large go to MKL's sgemm on the plain weight, so both copies are
  kept (by default only for small models, whose CPU step budget reaches it). Without packed copies
  (``pack_weights=False``), float32 eager steps of ``ONEDNN_MIN_ROWS`` to ``ONEDNN_MAX_ROWS`` rows
  on weights that large call oneDNN on the plain weight; all others ``F.linear`` (MKL). Where
  oneDNN has a bfloat16 kernel for the CPU (``NATIVE_BF16_GEMM``: AVX-512 BF16 or AMX), bfloat16
  weights get packed copies too, read at every row count, and their plain tensors are freed the
  same way (0.5B's projections and LM head on two cores of an AMX Xeon: 1.1-2.1x as fast as
  ``F.linear`` on the plain weight from 1 to 256 rows; 0.76-1.27x at 512-1024 rows, where the
  narrow projections lose and the wide ones gain; a whole engine run 1.12-1.16x as fast). Where
  it has none (no AVX-512), torch's bfloat16 GEMM is a generic loop, several times slower than its
  float32 one: bfloat16 calls of at least ``BF16_UPCAST_MIN_ROWS`` rows (and
  ``BF16_UPCAST_MIN_WORK`` multiply-adds) convert the weight piece by piece into a float32
  buffer and multiply in float32 (the same products and float32 sums, rounded once to bfloat16).
* RMSNorm (with the residual add fused), RoPE and, in 16-bit dtypes on AVX-512, the MLP's
  SiLU-and-multiply: ``rms_norm_cpu`` (rows of a 2-D tensor), ``rope_cpu`` (in place) and
  ``silu_and_mul_cpu`` (one pass over ``gate | up``, on torch's threads) on eager steps; compiled
  graphs keep torch's ops, which Inductor fuses.
  The layer kernels record no autograd history: with gradients on, LoRA, RMSNorm, RoPE and the
  SiLU-and-multiply take their torch paths.

Off the CPU, or where the extension is not built, every part takes its torch path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mcl_runtime.kernels import (
    HAS_CPU_ATTENTION,
    HAS_CPU_LAYER_OPS,
    LoRAWeightsCPU,
    PagedAttentionCPU,
    lora_apply_cpu,
    rms_norm_cpu,
    rope_cpu,
    silu_and_mul_cpu,
)
from mcl_runtime.kernels.cpu import CPU_VECTOR_LANES, paged_attention_cpu_op
from mcl_runtime.model.backends import AttentionMeta, LoRAMeta
from mcl_runtime.model.reference_backend import rms_norm_torch, rope_torch, silu_and_mul_torch, store_kv_torch

HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Whether torch's bfloat16 GEMMs on this CPU are oneDNN's (AVX-512 or newer), not a generic loop.
NATIVE_BF16_GEMM = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
)

Rows = slice | torch.Tensor  # a group's token rows: contiguous, or gathered (int64 indices)


def _take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


class Workspace:
    """Named buffers reused from step to step: on the CPU a fresh multi-MB tensor per layer costs
    more in page faults than the gather that fills it."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, ...], like: torch.Tensor | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Buffer ``name`` viewed as ``shape``, of ``like``'s dtype and device (or ``dtype``, on the CPU)."""
        numel = math.prod(shape)
        dtype, device = (like.dtype, like.device) if like is not None else (dtype, torch.device("cpu"))
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            grown = max(numel, int(buf.numel() * 1.5) if buf is not None else 0)  # contexts grow every step
            buf = self._buffers[name] = torch.empty(grown, dtype=dtype, device=device)
        return buf[:numel].view(shape)


# ---- attention groups: one step's plan is a list of them, together covering every token --------
class _Group:
    """A group writes the attention of its token rows ``rows``."""

    rows: Rows

    def attend(self, q, k, v, k_cache, v_cache, scale: float, ws: Workspace) -> torch.Tensor:
        """The output rows of the group's tokens."""
        raise NotImplementedError

    def attend_into(self, out: torch.Tensor, q, k, v, k_cache, v_cache, scale: float, ws: Workspace) -> None:
        o = self.attend(q, k, v, k_cache, v_cache, scale, ws)
        if isinstance(self.rows, slice):
            out[self.rows] = o
        else:
            out.index_copy_(0, self.rows, o)


@dataclass
class KernelGroup(_Group):
    """Consecutive sequences through ``paged_attention_cpu``: its plan (their metadata, checked once
    per step) and, for the compiled graph's custom op, the metadata tensors."""

    rows: slice
    plan: PagedAttentionCPU
    threads: int
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor

    def attend(self, q, k, v, k_cache, v_cache, scale: float, ws: Workspace) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a static step: the whole batch
            return paged_attention_cpu_op(
                q, k_cache, v_cache, self.block_tables, self.cu_seqlens_q, self.context_lens, scale
            )
        return self.plan(q, k_cache, v_cache, scale, num_threads=self.threads)

    def attend_into(self, out: torch.Tensor, q, k, v, k_cache, v_cache, scale: float, ws: Workspace) -> None:
        self.plan(q, k_cache, v_cache, scale, out=out, num_threads=self.threads)  # writes only its rows


def _gather_heads_first(cache: torch.Tensor, kv_index: torch.Tensor, b: int, ws: Workspace, name: str):
    """The keys (or values) at flat cache slots ``kv_index [b * L]`` as ``[Hkv * b, L, D]``: one
    gather per KV head, straight into the heads-first layout of a reused buffer."""
    Hkv, D = cache.shape[2:]
    n = kv_index.shape[0]
    flat = cache.view(-1, Hkv, D)
    if torch.compiler.is_compiling():  # Inductor plans a compiled graph's memory itself
        return flat.index_select(0, kv_index).transpose(0, 1).reshape(Hkv * b, n // b, D)
    heads_first = ws.get(name, (Hkv, n, D), cache)
    for h in range(Hkv):
        torch.index_select(flat[:, h], 0, kv_index, out=heads_first[h])
    return heads_first.view(Hkv * b, n // b, D)


@dataclass
class DecodeGroup(_Group):
    """Decodes as a padded batch: one query row each, keys gathered up to the longest context
    (static steps: the block table's width), those past each one's context masked."""

    rows: Rows
    kv_index: torch.Tensor  # [b * L] flat cache slots of each sequence's first L positions
    masked: torch.Tensor  # [1, b, 1, L] True past the context

    def attend(self, q, k, v, k_cache, v_cache, scale: float, ws: Workspace) -> torch.Tensor:
        """Two small GEMMs per (KV head, sequence), which beat SDPA's CPU kernel on one query row."""
        Hkv, D = k_cache.shape[2:]
        q = _take(q, self.rows)
        B, G = q.shape[0], q.shape[1] // Hkv
        keys = _gather_heads_first(k_cache, self.kv_index, B, ws, "k")
        values = _gather_heads_first(v_cache, self.kv_index, B, ws, "v")
        q_heads = q.view(B, Hkv, G, D).transpose(0, 1).reshape(Hkv * B, G, D)
        scores = torch.bmm(q_heads, keys.transpose(1, 2)).float().mul_(scale)
        scores.view(Hkv, B, G, -1).masked_fill_(self.masked, float("-inf"))
        o = torch.bmm(scores.softmax(dim=-1).to(q.dtype), values)  # [Hkv * B, G, D]
        return o.view(Hkv, B, G, D).transpose(0, 1).reshape(B, Hkv * G, D)


@dataclass
class PromptGroup(_Group):
    """Prompts without cached context, right-padded to the longest: under the causal mask a real
    query never sees a padding key (each lies past every real query of its sequence), so SDPA needs
    no mask and skips the keys above the diagonal. Token ``t`` is query ``idx_in_seq[t]`` of the
    group's sequence ``seq_of_token[t]``."""

    rows: Rows
    num_seqs: int
    max_q: int
    seq_of_token: torch.Tensor
    idx_in_seq: torch.Tensor

    def attend(self, q, k, v, k_cache, v_cache, scale: float, ws: Workspace) -> torch.Tensor:
        where = (self.seq_of_token, self.idx_in_seq)

        def padded(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [b, H, max_q, D]
            x = _take(x, self.rows)
            return x.new_zeros(self.num_seqs, self.max_q, *x.shape[1:]).index_put_(where, x).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            padded(q), padded(k), padded(v), is_causal=True, scale=scale, enable_gqa=True
        )
        return o.transpose(1, 2)[where]


@dataclass
class ChunkGroup(_Group):
    """Prefill chunks after cached context: queries padded to the longest chunk, keys gathered up to
    the longest context; query ``i`` of a chunk of ``q_len`` tokens sits at ``ctx - q_len + i``."""

    rows: slice
    num_seqs: int
    max_q: int
    seq_of_token: torch.Tensor
    idx_in_seq: torch.Tensor
    kv_index: torch.Tensor  # [b * L]
    mask: torch.Tensor  # [b, max_q, L] True where a query sees a key (padding queries: key 0)

    def attend(self, q, k, v, k_cache, v_cache, scale: float, ws: Workspace) -> torch.Tensor:
        Hkv, D = k_cache.shape[2:]
        B, M = self.num_seqs, self.max_q
        G = q.shape[1] // Hkv
        keys = _gather_heads_first(k_cache, self.kv_index, B, ws, "k")
        values = _gather_heads_first(v_cache, self.kv_index, B, ws, "v")
        where = (self.seq_of_token, self.idx_in_seq)
        # Query heads of one KV head are folded into the query axis: [Hkv * B, G * M, D].
        q_pad = q.new_zeros(B, M, Hkv, G, D).index_put_(where, q[self.rows].view(-1, Hkv, G, D))
        q_pad = q_pad.permute(2, 0, 3, 1, 4).reshape(Hkv * B, G * M, D)
        mask = self.mask[:, None].expand(B, G, M, -1).reshape(1, B, G * M, -1)
        o = F.scaled_dot_product_attention(
            q_pad.view(Hkv, B, G * M, D),
            keys.view(Hkv, B, -1, D),
            values.view(Hkv, B, -1, D),
            attn_mask=mask,
            scale=scale,
        )
        o = o.view(Hkv, B, G, M, D).permute(1, 3, 0, 2, 4)  # [B, M, Hkv, G, D]
        return o[where].reshape(-1, Hkv * G, D)


@dataclass
class LoRATiles:
    """Tiles of at most ``LORA_TILE`` tokens of one adapter each: token indices padded with the
    tile's first token, a 0/1 weight per entry (0 on the padding, whose delta then adds nothing;
    None when no tile is padded), and each tile's slot: a slice when the tiles' slots are
    consecutive (one tile per adapter, in slot order: the weights are then a view, not a gather)."""

    index: torch.Tensor  # [tiles * width] int64
    weight: torch.Tensor | None  # [tiles, width, 1] float32
    slots: torch.Tensor | slice
    shape: tuple[int, int]  # (tiles, width)
    tokens: int  # tokens with an adapter


@dataclass
class LoRASlots:
    """The step's adapters as the slot range ``lo:hi`` and each token's share of each: ``mask[t, g]``
    is 1 where token ``t`` takes slot ``lo + g``, else 0 (every entry of a base-model row)."""

    lo: int
    hi: int
    mask: torch.Tensor  # [T, hi - lo] float32
    tokens: int  # tokens with an adapter


@dataclass
class SliceMajorLoRA:
    """A module's LoRA weights cut at rank ``r``, slice by slice, so that a slot range of each is one
    matrix view: ``a[j, s]`` = slice ``j``'s ``A [r, in]`` of slot ``s``; ``bt[s] = B[s, :, :r].T``
    ``[r, out]``. Made from ``source`` (the module's ``lora_a``, held so that the module's id is not
    reused while it is cached) at the module's ``lora_version`` ``version``."""

    source: torch.Tensor
    r: int
    version: int
    a: torch.Tensor  # [n, S, r, in]
    bt: torch.Tensor  # [S, r, out]


class CPUBackend:
    name = "cpu"
    # Past this many torch threads the padded path replaces the attention kernel.
    KERNEL_MAX_THREADS = 2  # cpu_routing.json: KERNEL_MAX_THREADS
    # Prefill groups of at most this many padded (query, key) pairs go to the attention kernel:
    # prompts without cached context, and chunks after it (which BLAS's GEMMs on the padded group
    # win sooner: the kernel reads the keys once per query row).
    PADDED_SMALL_PROMPTS = 1 << 20  # cpu_routing.json: PADDED_SMALL_PROMPTS, qwen0.5b
    PADDED_SMALL = 1 << 16  # cpu_routing.json: PADDED_SMALL, qwen0.5b
    # Decodes (prompts) are split by length when that leaves at most this share of the padded work.
    SPLIT_GAIN = 0.9  # cpu_routing.json: SPLIT_GAIN
    # Tokens per tile of the gather + bmm LoRA path.
    LORA_TILE = 128  # cpu_routing.json: LORA_TILE
    # A projection's LoRA goes to the C++ kernel up to this many multiply-adds (adapter tokens x
    # slices x rank x (in + out per slice)). cpu_routing.json: the kernel beat the torch route at
    # every work measured, up to 1024 tokens of four adapters at each shape; this is the largest
    # (qwen7b's; 0.5B's prefill steps of 768 tokens stay far below it).
    LORA_KERNEL_MAX_WORK = 480 << 20  # cpu_routing.json: LORA_KERNEL_MAX_WORK, qwen7b
    # Steps whose adapters span at most this many consecutive slots take the slot-range path.
    # cpu_routing.json: LORA_RANGE_MAX_SLOTS times the qkv projection, the range's worst case (its
    # output is narrow, so the G-fold shrink dominates): there the range wins decodes of 2-8 adapters
    # (1.04-7.5x) and loses prefills past 2 adapters (0.57-0.75x at 4). Gate/up's wide output gains
    # most: over a whole 0.5B engine run with four adapters, 4 here is 1.14-1.17x as fast as 2
    # (benchmarks/README.md, run history, "cpu backend routing").
    LORA_RANGE_MAX_SLOTS = 4
    # bfloat16 where oneDNN computes it natively (AMX / AVX-512 BF16): from this many multiply-adds
    # per slice (work / slices) the slot range's bfloat16 GEMMs, though G times the work, beat the
    # kernel's float32 multiply-adds. cpu_routing_xeon-amx.json (an AMX Xeon, four adapters): at
    # 0.5B's projections the range won every point from 28 Mi (1.07-1.61x); at 7B's every point from
    # 56 Mi (1.17-2.86x), and some below (qkv's 40 Mi, down's 44 Mi), not others (gate/up's 44 Mi:
    # 0.78x). Prefill steps reach it; decodes stay on the kernel.
    LORA_RANGE_MIN_WORK_BF16 = 28 << 20  # cpu_routing_xeon-amx.json: LORA_RANGE_MIN_WORK_BF16, qwen0.5b
    # The same where the kernel takes its bfloat16 pair dot products (AVX512-BF16), which it does
    # 1.03-1.82x as fast as its float32 multiply-adds at these sizes: cpu_routing_xeon-amx.json,
    # LORA_RANGE_MIN_WORK_BF16_PAIRS. At 0.5B the kernel won or tied every point up to 45 Mi and the
    # range every point from 90 Mi (1.17-1.21x); at 7B the kernel every point up to 44 Mi, the range
    # every point from 80 Mi (1.09-1.17x) and o's at 56 Mi by 3%. 64 Mi lies between.
    LORA_RANGE_MIN_WORK_BF16_PAIRS = 64 << 20
    # Float32 weights of at least ONEDNN_MIN_WEIGHT elements are packed for oneDNN (on small weights
    # its fixed cost per call loses to MKL). Unpacked, linear layers of ONEDNN_MIN_ROWS to
    # ONEDNN_MAX_ROWS rows on such weights go to oneDNN's inner product (on AVX2 CPUs MKL's sgemm is
    # up to twice as slow for a few rows).
    ONEDNN_MIN_ROWS = 1  # cpu_routing.json: ONEDNN_MIN_ROWS
    ONEDNN_MAX_ROWS = 128  # cpu_routing.json: ONEDNN_MAX_ROWS
    ONEDNN_MIN_WEIGHT = 1 << 18  # cpu_routing.json: ONEDNN_MIN_WEIGHT
    # The row count oneDNN is told to pack the weights for (the decode batch sizes it serves).
    PACK_ROWS = 32
    # From this many rows MKL's sgemm on the plain weight beats oneDNN on the packed copy
    # (cpu_routing.json, ONEDNN_MAX_ROWS' points: packed 0.87x / 0.85x at 512 / 1024 rows at 0.5B's
    # qkv, 0.97x / 0.93x at 7B's; 0.89x / 1.03x at 256). Backends told that steps reach it keep both copies.
    MKL_MIN_ROWS = 512
    # Where oneDNN has no bfloat16 kernel for the CPU (no AVX-512), torch's bfloat16 GEMM is a
    # generic loop at a few GFLOP/s; bfloat16 linear layers of at least BF16_UPCAST_MIN_ROWS rows
    # and BF16_UPCAST_MIN_WORK multiply-adds then run as float32 GEMMs on pieces of the weight of
    # BF16_UPCAST_CHUNK elements, converted into a reused buffer (on fewer rows the conversion, on
    # less work the calls' fixed cost, outweighs the faster GEMM).
    BF16_UPCAST_MIN_ROWS = 8  # cpu_routing.json: BF16_UPCAST_MIN_ROWS
    BF16_UPCAST_MIN_WORK = 1 << 20  # cpu_routing.json: BF16_UPCAST_MIN_WORK, demo
    BF16_UPCAST_CHUNK = 1 << 21  # cpu_routing.json: BF16_UPCAST_CHUNK, qwen0.5b and qwen7b

    def __init__(
        self,
        attention_kernel: bool | None = None,
        layer_kernels: bool = True,
        onednn_linear: bool = True,
        pack_weights: bool = True,
        bf16_upcast: bool | None = None,
        lora_bf16_dot: bool | None = None,
    ) -> None:
        """``attention_kernel``: None for the ``KERNEL_MAX_THREADS`` rule, True for the kernel at any
        thread count, False for the padded path only. ``layer_kernels=False`` keeps LoRA, RMSNorm and
        RoPE on their torch paths. Both are off where the extension is not built.
        ``onednn_linear=False`` keeps every linear layer on ``F.linear``; ``pack_weights=False`` makes
        no packed copies (the plain weights throughout). ``bf16_upcast``: whether bfloat16 linear
        layers may run as float32 GEMMs (``BF16_UPCAST_MIN_ROWS``); None for where oneDNN has no
        bfloat16 kernel for this CPU. ``lora_bf16_dot``: the LoRA kernel's arithmetic in bfloat16
        (``LoRAWeightsCPU``'s ``bf16_dot``: None for its pair dot products where it can, False for
        float32 multiply-adds)."""
        self.attention_kernel = attention_kernel if HAS_CPU_ATTENTION else False
        self.layer_kernels = layer_kernels and HAS_CPU_LAYER_OPS
        self.onednn_linear = onednn_linear and HAS_ONEDNN_LINEAR
        self.pack_weights = pack_weights and self.onednn_linear
        self.bf16_upcast = not NATIVE_BF16_GEMM if bf16_upcast is None else bf16_upcast
        self.lora_bf16_dot = lora_bf16_dot
        # id(weight) -> (weight, its packed copy, whether calls may still read the plain weight);
        # holding the weight keeps its id from being reused.
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        self._workspace = Workspace()
        # The last step's LoRA plan, by its segments (decode steps over the same sequences keep it).
        self._lora_plan: tuple[tuple[bytes, bytes], LoRATiles | LoRASlots] | None = None
        self._slice_major: dict[int, SliceMajorLoRA] = {}  # per LinearWithLoRA (by id)
        self._lora_weights: dict[int, LoRAWeightsCPU] = {}  # per LinearWithLoRA (by id; it holds the tensors)

    def _layer_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``x``'s layer op goes to the C++ kernel: a CPU tensor, inference (the kernels record
        no autograd history), outside a compiled graph."""
        return self.layer_kernels and x.is_cpu and not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def prepare_weights(
        self, weights: list[torch.Tensor], keep_plain: bool = True, max_rows: int | None = None
    ) -> list[torch.Tensor]:
        """oneDNN-blocked copies of the CPU weights of at least ``ONEDNN_MIN_WEIGHT`` elements, float32
        ones and, where oneDNN has a bfloat16 kernel for this CPU (``NATIVE_BF16_GEMM``, and not
        ``bf16_upcast``), bfloat16 ones; eager inference calls of ``linear`` read them from now on,
        except float32 calls of ``MKL_MIN_ROWS`` rows or more while the plain weight is kept. The
        plain weights are kept when ``keep_plain``, or for float32 when ``max_rows`` (the most rows of
        a call, if known) reaches ``MKL_MIN_ROWS``; the weights copied whose plain tensors nothing
        reads any more are returned."""
        released = []
        for w in weights if self.pack_weights else ():
            if self._packs(w.dtype) and w.is_cpu and w.dim() == 2 and w.numel() >= self.ONEDNN_MIN_WEIGHT:
                mkl = w.dtype == torch.float32 and max_rows is not None and max_rows >= self.MKL_MIN_ROWS
                plain = keep_plain or mkl
                self._packed[id(w)] = (w, torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.PACK_ROWS), plain)
                if not plain:
                    released.append(w)
        return released

    def _packs(self, dtype: torch.dtype) -> bool:
        """Whether weights of ``dtype`` get packed copies (bfloat16 where oneDNN computes it natively)."""
        return dtype == torch.float32 or (dtype == torch.bfloat16 and NATIVE_BF16_GEMM and not self.bf16_upcast)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Eager inference: oneDNN's inner product on the packed copy of ``weight`` when there is one
        (float32: below ``MKL_MIN_ROWS`` rows, or always if the plain weight was freed); else, for
        float32 rows ``ONEDNN_MIN_ROWS`` to ``ONEDNN_MAX_ROWS`` of a weight of ``ONEDNN_MIN_WEIGHT``
        elements or more, on the plain weight; bfloat16 rows as float32 GEMMs (``_linear_upcast``)
        where ``bf16_upcast``, from ``BF16_UPCAST_MIN_ROWS`` rows and ``BF16_UPCAST_MIN_WORK``
        multiply-adds. ``F.linear`` otherwise (and always under autograd or in a compiled graph)."""
        if not x.is_cpu or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return F.linear(x, weight, bias)
        packed = self._packed.get(id(weight))
        if packed is not None:
            _, blocked, plain = packed
            if not plain or x.dtype != torch.float32 or len(x) < self.MKL_MIN_ROWS:
                return torch.ops.mkldnn._linear_pointwise(x, blocked, bias, "none", [], "")
        elif (
            self.onednn_linear
            and x.dtype == torch.float32
            and self.ONEDNN_MIN_ROWS <= len(x) <= self.ONEDNN_MAX_ROWS
            and weight.numel() >= self.ONEDNN_MIN_WEIGHT
        ):
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        elif (
            self.bf16_upcast
            and x.dtype == weight.dtype == torch.bfloat16
            and x.dim() == 2
            and len(x) >= self.BF16_UPCAST_MIN_ROWS
            and len(x) * weight.numel() >= self.BF16_UPCAST_MIN_WORK
        ):
            return self._linear_upcast(x, weight, bias)
        return F.linear(x, weight, bias)

    def _linear_upcast(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x [T, in] @ weight[out, in].T + bias`` of bfloat16 tensors as float32 GEMMs, one per
        ``BF16_UPCAST_CHUNK`` elements of ``weight`` converted into a reused buffer. The products of
        bfloat16 values are exact in float32 and the sums accumulate in float32, rounded once to
        bfloat16: what a bfloat16 GEMM computes, in another order of summation. The GEMMs are
        oneDNN's up to ``ONEDNN_MAX_ROWS`` rows (MKL's sgemm is slow on a few rows), MKL's beyond."""
        ws, (T, K), N = self._workspace, x.shape, weight.shape[0]
        onednn = self.onednn_linear and T <= self.ONEDNN_MAX_ROWS
        x32 = ws.get("upcast_x", (T, K), dtype=torch.float32)
        x32.copy_(x)
        y = x.new_empty(T, N)
        rows = min(N, max(1, self.BF16_UPCAST_CHUNK // K))
        w_buf = ws.get("upcast_w", (rows * K,), dtype=torch.float32)
        y_buf = None if onednn else ws.get("upcast_y", (T * rows,), dtype=torch.float32)
        for n0 in range(0, N, rows):  # pieces of the weight: a fixed count per shape
            n = min(rows, N - n0)
            w32 = w_buf[: n * K].view(n, K)
            w32.copy_(weight[n0 : n0 + n])
            if onednn:
                part = torch.ops.mkldnn._linear_pointwise(x32, w32, None, "none", [], "")
            else:
                part = torch.mm(x32, w32.t(), out=y_buf[: T * n].view(T, n))
            if bias is not None:
                part += bias[n0 : n0 + n]
            y[:, n0 : n0 + n] = part
        return y

    # ---- per step -----------------------------------------------------------------------------
    def prepare(self, attn: AttentionMeta, lora: LoRAMeta | None) -> None:
        kernel = (
            self.attention_kernel is not False
            and attn.context_lens.is_cpu
            and (attn.static or self.attention_kernel or torch.get_num_threads() <= self.KERNEL_MAX_THREADS)
        )
        attn.plan = self._kernel_groups(attn) if kernel else self._padded_groups(attn)
        if lora is not None:
            self.prepare_lora(lora)

    def prepare_lora(self, lora: LoRAMeta) -> None:
        """The slot-range plan when the adapters span at most ``LORA_RANGE_MAX_SLOTS`` slots, else the
        tiles (the last plan is kept while the segments repeat); static steps need none."""
        if lora.token_slots is not None:
            return
        key = (lora.seg_starts_host.tobytes(), lora.seg_slots_host.tobytes())
        if self._lora_plan is None or self._lora_plan[0] != key:
            used = lora.seg_slots_host[lora.seg_slots_host >= 0]
            lo, hi = int(used.min()), int(used.max()) + 1
            in_range = hi - lo <= self.LORA_RANGE_MAX_SLOTS
            plan = self._lora_slots(lora, lo, hi) if in_range else self._lora_tiles(lora)
            self._lora_plan = (key, plan)
        lora.plan = self._lora_plan[1]

    def _kernel_groups(self, attn: AttentionMeta) -> list[_Group]:
        """The decodes and each small prefill kind through the kernel (one group per run of
        consecutive such sequences); the other prefill kinds padded."""
        bounds, groups, lo = attn.group_bounds, [], 0
        for i, (b0, b1) in enumerate(zip(bounds, bounds[1:])):
            if i == 0 or self._small(attn, b0, b1):
                continue
            if lo < b0:
                groups.append(self._kernel_group(attn, lo, b0))
            groups += self._prefill_groups(attn, b0, b1)
            lo = b1
        if lo < bounds[-1]:
            groups.append(self._kernel_group(attn, lo, bounds[-1]))
        return groups

    def _small(self, attn: AttentionMeta, b0: int, b1: int) -> bool:
        if b0 == b1:
            return True
        q = np.diff(attn.cu_seqlens_q_host[b0 : b1 + 1])
        ctx = attn.context_lens_host[b0:b1]
        max_q = int(q.max())
        if (q == ctx).all():
            return (b1 - b0) * max_q * max_q <= self.PADDED_SMALL_PROMPTS
        return (b1 - b0) * max_q * int(ctx.max()) <= self.PADDED_SMALL

    @staticmethod
    def _kernel_group(attn: AttentionMeta, b0: int, b1: int) -> KernelGroup:
        tables, ctx, cu = attn.block_tables[b0:b1], attn.context_lens[b0:b1], attn.cu_seqlens_q[b0 : b1 + 1]
        rows = slice(int(attn.cu_seqlens_q_host[b0]), int(attn.cu_seqlens_q_host[b1]))
        plan = PagedAttentionCPU(tables, cu, ctx, attn.block_size)
        return KernelGroup(rows, plan, torch.get_num_threads(), tables, cu, ctx)

    def _padded_groups(self, attn: AttentionMeta) -> list[_Group]:
        d = attn.num_decodes
        parts = None if attn.static else self._split(attn.context_lens_host[:d], power=1)
        if parts:
            groups = [self._decode_group(attn, part) for part in parts]
        else:
            groups = [self._decode_group(attn, np.arange(d))] if d else []
        bounds = attn.group_bounds
        return groups + [g for b0, b1 in zip(bounds[1:], bounds[2:]) for g in self._prefill_groups(attn, b0, b1)]

    def _prefill_groups(self, attn: AttentionMeta, b0: int, b1: int) -> list[_Group]:
        """Prefill sequences ``b0:b1`` of one kind as padded groups: prompts without cached context
        split by length when worth it, chunks after cached context as one group."""
        if b0 == b1:
            return []
        q_lens = np.diff(attn.cu_seqlens_q_host[b0 : b1 + 1])
        if not (q_lens == attn.context_lens_host[b0:b1]).all():
            return [self._chunk_group(attn, b0, b1)]
        parts = self._split(q_lens, power=2) or [np.arange(b1 - b0)]
        return [self._prompt_group(attn, b0 + part) for part in parts]

    def _split(self, lengths: np.ndarray, power: int) -> list[np.ndarray] | None:
        """Indices of ``lengths`` as two or three sets of similar length, or None when one padded
        group costs little more. A set's cost: its size times its longest length to ``power``
        (decodes: 1, the keys gathered and multiplied; prompts under the causal mask: 2)."""
        if len(lengths) < 2 or lengths.max() <= 1:
            return None
        order = np.argsort(lengths, kind="stable")
        cost = lambda parts: sum(len(p) * int(lengths[p[-1]]) ** power for p in parts)  # noqa: E731
        parts = min((np.array_split(order, k) for k in range(2, min(3, len(lengths)) + 1)), key=cost)
        if cost(parts) > self.SPLIT_GAIN * len(lengths) * int(lengths.max()) ** power:
            return None
        return [np.sort(p) for p in parts]

    @staticmethod
    def _decode_group(attn: AttentionMeta, seqs: np.ndarray) -> DecodeGroup:
        """The decodes ``seqs`` (sorted; decode ``i``'s token is row ``i``)."""
        dev = attn.context_lens.device
        if len(seqs) == attn.num_decodes:  # all of them: rows 0:d, no gather
            rows: Rows = slice(0, len(seqs))
            ctx, tables = attn.context_lens[rows], attn.block_tables[rows]
        else:
            rows = torch.from_numpy(seqs.astype(np.int64)).to(dev)
            ctx, tables = attn.context_lens.index_select(0, rows), attn.block_tables.index_select(0, rows)
        L = tables.shape[1] * attn.block_size if attn.static else int(attn.context_lens_host[seqs].max())
        return DecodeGroup(rows, _kv_index(tables, L, attn.block_size), _decode_mask(ctx, L))

    @staticmethod
    def _token_layout(attn: AttentionMeta, seqs: np.ndarray) -> tuple[Rows, int, torch.Tensor, torch.Tensor]:
        """The tokens of the prefill sequences ``seqs`` (sorted): their rows (a slice when ``seqs``
        are consecutive), the longest, and each token's sequence in the group and index in it."""
        cu = attn.cu_seqlens_q_host
        q_lens = cu[seqs + 1] - cu[seqs]
        seq_of_token = np.repeat(np.arange(len(seqs)), q_lens)
        idx_in_seq = np.arange(len(seq_of_token)) - np.repeat(np.cumsum(q_lens) - q_lens, q_lens)
        dev = attn.context_lens.device
        index = lambda a: torch.from_numpy(a.astype(np.int64)).to(dev)  # noqa: E731
        if seqs[-1] - seqs[0] == len(seqs) - 1:
            rows: Rows = slice(int(cu[seqs[0]]), int(cu[seqs[-1] + 1]))
        else:
            rows = index(cu[seqs][seq_of_token] + idx_in_seq)
        return rows, int(q_lens.max()), index(seq_of_token), index(idx_in_seq)

    @classmethod
    def _prompt_group(cls, attn: AttentionMeta, seqs: np.ndarray) -> PromptGroup:
        rows, max_q, seq_of_token, idx_in_seq = cls._token_layout(attn, seqs)
        return PromptGroup(rows, len(seqs), max_q, seq_of_token, idx_in_seq)

    @classmethod
    def _chunk_group(cls, attn: AttentionMeta, b0: int, b1: int) -> ChunkGroup:
        rows, max_q, seq_of_token, idx_in_seq = cls._token_layout(attn, np.arange(b0, b1))
        dev = attn.context_lens.device
        L = int(attn.context_lens_host[b0:b1].max())
        cu = attn.cu_seqlens_q[b0 : b1 + 1].long()
        q_lens, ctx = cu[1:] - cu[:-1], attn.context_lens[b0:b1].long()
        key_pos, arange_q = torch.arange(L, device=dev), torch.arange(max_q, device=dev)
        allowed = key_pos[None, None, :] <= (ctx[:, None] - q_lens[:, None] + arange_q)[:, :, None]
        q_valid = arange_q[None, :] < q_lens[:, None]
        mask = torch.where(q_valid[:, :, None], allowed, key_pos[None, None, :] == 0)
        kv_index = _kv_index(attn.block_tables[b0:b1], L, attn.block_size)
        return ChunkGroup(rows, b1 - b0, max_q, seq_of_token, idx_in_seq, kv_index, mask)

    # ---- per layer ----------------------------------------------------------------------------
    store_kv = staticmethod(store_kv_torch)

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
        """``q [T, Hq, D]`` over the cache; ``k``/``v`` are this step's new keys and values
        (already stored), which prompts without cached context attend to directly."""
        groups = attn.plan  # at most five: decodes (up to three), two kinds of prefill
        if len(groups) == 1:  # it covers every token
            return groups[0].attend(q, k, v, k_cache, v_cache, scale, self._workspace)
        out = torch.empty_like(q)
        for g in groups:
            g.attend_into(out, q, k, v, k_cache, v_cache, scale, self._workspace)
        return out

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The kernel writes the new residual into ``residual`` in place."""
        if x.dim() != 2 or not self._layer_kernel(x):
            return rms_norm_torch(x, weight, eps, residual)
        if residual is None:
            return rms_norm_cpu(x, weight, eps)
        return rms_norm_cpu(x, weight, eps, residual), residual

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The kernel rotates ``x`` in place, rounding where torch's ops do (the same bits)."""
        return rope_cpu(x, cos, sin) if self._layer_kernel(x) else rope_torch(x, cos, sin)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """16-bit ``gate | up`` through one pass of the kernel instead of torch's two ops (SiLU into a
        new tensor, then the product: a prefill step's [T, I] tensors leave the cache between them),
        on torch's threads, where the kernel runs on AVX-512 (its AVX2 clone ran at a third to half
        of torch's speed when it computed the exp and division it now looks up; not measured since).
        float32 keeps torch's ops: the same bits as transformers (the kernel's exp is not torch's)."""
        if x.dtype == torch.float32 or CPU_VECTOR_LANES < 16 or x.dim() != 2 or not self._layer_kernel(x):
            return silu_and_mul_torch(x)
        return silu_and_mul_cpu(x, torch.get_num_threads())

    # ---- LoRA ---------------------------------------------------------------------------------
    def _lora_tiles(self, lora: LoRAMeta) -> LoRATiles:
        keep = lora.seg_slots_host >= 0
        a, b = lora.seg_starts_host[:-1][keep], lora.seg_starts_host[1:][keep]
        n_tiles = -(-(b - a) // self.LORA_TILE)
        seg = np.repeat(np.arange(len(a)), n_tiles)
        k = np.arange(len(seg)) - np.repeat(np.cumsum(n_tiles) - n_tiles, n_tiles)
        first = a[seg] + k * self.LORA_TILE
        length = np.minimum(first + self.LORA_TILE, b[seg]) - first
        offs = np.arange(int(length.max()))
        valid = offs[None, :] < length[:, None]
        index = np.where(valid, first[:, None] + offs[None, :], first[:, None])
        dev = lora.seg_starts.device
        slots = lora.seg_slots_host[keep][seg].astype(np.int64)
        consecutive = bool((np.diff(slots) == 1).all())
        return LoRATiles(
            index=torch.from_numpy(index.reshape(-1).astype(np.int64)).to(dev),
            weight=None if valid.all() else torch.from_numpy(valid[:, :, None].astype(np.float32)).to(dev),
            slots=slice(int(slots[0]), int(slots[-1]) + 1) if consecutive else torch.from_numpy(slots).to(dev),
            shape=(len(seg), len(offs)),
            tokens=int((b - a).sum()),
        )

    @staticmethod
    def _lora_slots(lora: LoRAMeta, lo: int, hi: int) -> LoRASlots:
        starts, slots = lora.seg_starts_host, lora.seg_slots_host
        token_slots = np.repeat(slots, np.diff(starts))
        mask = (token_slots[:, None] == np.arange(lo, hi)[None, :]).astype(np.float32)
        tokens = int(np.diff(starts)[slots >= 0].sum())
        return LoRASlots(lo, hi, torch.from_numpy(mask).to(lora.seg_starts.device), tokens)

    def _slice_major_weights(self, mod, r: int) -> SliceMajorLoRA:
        """``mod``'s ``SliceMajorLoRA`` at rank ``r``, remade when its buffers change (adapter loads)."""
        w = self._slice_major.get(id(mod))
        if w is None or w.source is not mod.lora_a or w.r != r or w.version != mod.lora_version:
            S, n, R = mod.lora_a.shape[0], mod.n_slices, mod.max_rank
            a = mod.lora_a.view(S, n, R, -1)[:, :, :r].transpose(0, 1).contiguous()
            bt = mod.lora_b[:, :, :r].transpose(1, 2).contiguous()
            w = self._slice_major[id(mod)] = SliceMajorLoRA(mod.lora_a, r, mod.lora_version, a, bt)
        return w

    def _apply_lora_slots(self, x: torch.Tensor, y: torch.Tensor, mod, plan: LoRASlots, r: int) -> None:
        """``y[:, slice j] += (mask * scaling[lo:hi] * x @ A_j[lo:hi].T) @ B_j[lo:hi].T``, each
        ``A_j[lo:hi]`` stacked ``[G * r, in]`` and ``B_j[lo:hi].T`` stacked ``[G * r, out_j]``: per
        slice one GEMM that shrinks for every slot of the range and one that accumulates into ``y`` in
        place (MKL's ``beta = 1``), never a ``[T, out]`` temporary. A token's terms of the other slots
        are multiplied by 0, so they add nothing."""
        w = self._slice_major_weights(mod, r)
        lo, hi, n = plan.lo, plan.hi, mod.n_slices
        T, G = x.shape[0], hi - lo
        bt = w.bt[lo:hi].view(G * r, -1)
        gain = (plan.mask * mod.scaling[lo:hi]).to(x.dtype)[:, :, None]  # [T, G, 1]
        for j in range(n):
            cols = slice(mod.offsets[j], mod.offsets[j + 1])
            u = F.linear(x, w.a[j, lo:hi].view(G * r, -1)).view(T, G, r).mul_(gain)
            y[:, cols].addmm_(u.view(T, G * r), bt[:, cols])

    def _kernel_weights(self, mod) -> LoRAWeightsCPU:
        """``mod``'s LoRA buffers as the kernel reads them, remade when its buffers change (adapter loads)."""
        weights = self._lora_weights.get(id(mod))
        if weights is None or not weights.matches(mod.lora_a, mod.lora_b, mod.scaling, mod.ranks, mod.lora_version):
            weights = self._lora_weights[id(mod)] = LoRAWeightsCPU(
                mod.lora_a, mod.lora_b, mod.scaling, mod.ranks, mod.offsets, mod.lora_version, self.lora_bf16_dot
            )
        return weights

    def apply_lora(self, x: torch.Tensor, y: torch.Tensor, mod, lora: LoRAMeta) -> None:
        """``y[t] += scaling[s] * x[t] @ A[s].T @ B[s].T`` with ``s`` the slot of token ``t``: one
        kernel call over the segments, the slot-range GEMMs (``_apply_lora_slots``), or one gather +
        ``bmm`` over tiles: ``y[tile_index] += w * x[tile_index] @ A[slot].T @ B[slot].T``."""
        if lora.token_slots is not None:  # static step: one tile per token, base rows with gain 0
            slots = lora.token_slots.clamp(min=0).long()
            weight = (lora.token_slots >= 0).to(torch.float32)[:, None, None]
            y += self._lora_delta(x[:, None], slots, weight, mod.max_rank, mod).view(y.shape)
            return
        plan: LoRATiles | LoRASlots = lora.plan
        n = mod.n_slices
        work = plan.tokens * n * lora.max_rank * (x.shape[1] + y.shape[1] // n)
        if work <= self.LORA_KERNEL_MAX_WORK and self._layer_kernel(x):
            weights = self._kernel_weights(mod)
            range_min_work = self.LORA_RANGE_MIN_WORK_BF16_PAIRS if weights.pairs else self.LORA_RANGE_MIN_WORK_BF16
            bf16_range = (
                isinstance(plan, LoRASlots)
                and x.dtype == torch.bfloat16
                and self._packs(x.dtype)
                and work >= n * range_min_work
            )
            if not bf16_range:
                threads = torch.get_num_threads()
                lora_apply_cpu(x, y, weights, lora.seg_starts_host, lora.seg_slots_host, threads)
                return
        if isinstance(plan, LoRASlots):
            self._apply_lora_slots(x, y, mod, plan, min(lora.max_rank, mod.max_rank))
            return
        tiles = plan
        n_tiles, width = tiles.shape
        xt = x.index_select(0, tiles.index).view(n_tiles, width, -1)
        delta = self._lora_delta(xt, tiles.slots, tiles.weight, lora.max_rank, mod)
        y.index_add_(0, tiles.index, delta.view(n_tiles * width, -1))

    @staticmethod
    def _lora_delta(
        xt: torch.Tensor, slots: torch.Tensor | slice, weight: torch.Tensor | None, r: int, mod
    ) -> torch.Tensor:
        """``scaling[slot] * weight * xt @ A[slot].T @ B[slot].T`` as ``[tiles, width, out]`` for tiles
        ``xt [tiles, width, in]`` of adapter ``slots [tiles]`` (or a slice of consecutive slots), each
        slice's rank cut at ``r``."""
        n, R = mod.n_slices, mod.max_rank
        pick = (lambda t: t[slots]) if isinstance(slots, slice) else (lambda t: t.index_select(0, slots))
        a, b = pick(mod.lora_a), pick(mod.lora_b)
        if r < R:
            a, b = a.view(len(a), n, R, -1)[:, :, :r].reshape(len(a), n * r, -1), b[:, :, :r]
        u = torch.bmm(xt, a.transpose(1, 2))
        scale = pick(mod.scaling).view(-1, 1, 1)  # float32, as the weights
        u.mul_((scale if weight is None else scale * weight).to(xt.dtype))
        b = b.transpose(1, 2)  # [tiles, rank, out]
        if n == 1:
            return torch.bmm(u, b)
        return torch.cat(
            [torch.bmm(u[:, :, j * r : (j + 1) * r], b[:, :, mod.offsets[j] : mod.offsets[j + 1]]) for j in range(n)],
            dim=-1,
        )


def _kv_index(block_tables: torch.Tensor, L: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of the first ``L`` positions of each row's block table, ``[B * L]``."""
    blocks = -(-L // block_size)
    slots = block_tables[:, :blocks].long().mul_(block_size)[:, :, None] + torch.arange(
        block_size, device=block_tables.device
    )
    return slots.view(len(block_tables), blocks * block_size)[:, :L].reshape(-1)


def _decode_mask(ctx: torch.Tensor, L: int) -> torch.Tensor:
    """``[1, B, 1, L]`` True at the key positions past each decode's context ``ctx [B]``."""
    return (torch.arange(L, device=ctx.device)[None, :] >= ctx[:, None])[None, :, None]
