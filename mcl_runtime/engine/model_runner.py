"""One forward pass per step over every scheduled token, then sampling.

The batch is ordered decodes first, then prefill chunks, each group sorted by adapter slot, so
adapters form contiguous segments. All metadata is built once on the host (block tables and slot
mapping in the C++ block manager), moved to the device once, and shared by every layer; the only
device-to-host transfer of a step is the sampled token ids, which ``run`` does not wait for (so the
engine can launch the next step first). Between ``compute_logits`` and sampling, the rows of
constrained sequences are masked by their grammar matchers in one batched call.
"""
from __future__ import annotations

import numpy as np
import torch

from mcl_runtime.engine.sampler import Penalties, SamplingBatch, sample
from mcl_runtime.engine.scheduler import ScheduledBatch
from mcl_runtime.engine.seq_table import SequenceTable
from mcl_runtime.engine.sequence import PENDING, Sequence
from mcl_runtime.model.backends import AttentionMeta, ForwardContext, LoRAMeta, lora_segments
from mcl_runtime.model.decoder import DecoderLM


class ModelRunner:
    def __init__(self, model: DecoderLM, backend, kv_cache: torch.Tensor, block_manager, slot_ranks: np.ndarray) -> None:
        self.model = model
        self.backend = backend
        self.kv_cache = kv_cache
        self.bm = block_manager
        self.slot_ranks = slot_ranks    # largest rank of the adapter in each slot (kept by the adapter manager)
        self.device = kv_cache.device
        self.vocab_size = model.config.vocab_size
        self.grammar = None     # a structured.GrammarMasker once a constrained request arrives

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _copy_blocks(self) -> None:
        copies = self.bm.pop_block_copies()
        if copies:
            src, dst = (torch.tensor(c, device=self.device) for c in zip(*copies))
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, prev: torch.Tensor | None = None) -> SampledTokens:
        """Launch the step: forward, then sampling for the sequences with ``batch.samples > 0``.
        ``PENDING`` input tokens are taken from ``prev`` (the last step's ``SampledTokens.tokens``)
        at each sequence's ``pending_row``. Nothing waits for the device."""
        # decodes | prefills without cached context | prefills with cached context; by slot within each
        kinds = [0 if n == 1 else 1 if s.num_computed == 0 else 2 for s, n in zip(batch.seqs, batch.num_new)]
        order = sorted(range(len(batch.seqs)), key=lambda i: (kinds[i], batch.seqs[i].slot))
        seqs = [batch.seqs[i] for i in order]
        num_new = [batch.num_new[i] for i in order]
        self._copy_blocks()
        positions, slot_mapping, tables, ctx_lens, cu = self.bm.build_metadata([s.seq_id for s in seqs], num_new)
        input_ids = np.fromiter((t for s, n in zip(seqs, num_new) for t in s.token_ids[s.num_computed:s.num_computed + n]),
                                dtype=np.int64, count=len(positions))
        attn = AttentionMeta(
            slot_mapping=self._to_device(slot_mapping), block_tables=self._to_device(tables),
            context_lens=self._to_device(ctx_lens), cu_seqlens_q=self._to_device(cu),
            group_bounds=[int(b) for b in np.searchsorted(sorted(kinds), [0, 1, 2, 3])], max_q_len=max(num_new),
            max_context_len=int(ctx_lens.max()), block_size=self.bm.block_size,
            context_lens_host=ctx_lens, cu_seqlens_q_host=cu)
        lora = self._lora_meta(np.array([s.slot for s in seqs], dtype=np.int64), np.array(num_new, dtype=np.int64))
        self.backend.prepare(attn, lora)
        ctx = ForwardContext(self.backend, self.kv_cache, attn, lora)
        hidden = self.model(self._input_ids(input_ids, cu, seqs, prev), self._to_device(positions), ctx)
        return self._sample(hidden, batch, order, seqs, cu, prev)

    def _input_ids(self, input_ids: np.ndarray, cu: np.ndarray, seqs: list[Sequence],
                   prev: torch.Tensor | None) -> torch.Tensor:
        """The step's input ids on the device, PENDING ones filled from the last step's samples."""
        pending = np.flatnonzero(input_ids == PENDING)
        ids = self._to_device(input_ids)
        if len(pending):
            owners = np.searchsorted(cu, pending, side="right") - 1
            src = np.fromiter((seqs[i].pending_row for i in owners), dtype=np.int64, count=len(owners))
            ids[self._to_device(pending)] = prev[self._to_device(src)]
        return ids

    # ---- after the forward pass --------------------------------------------------------------
    def _sample(self, hidden: torch.Tensor, batch: ScheduledBatch, order: list[int], seqs: list[Sequence],
                cu: np.ndarray, prev: torch.Tensor | None) -> SampledTokens:
        samples = np.array(batch.samples, dtype=np.int64)[order]
        which = np.flatnonzero(samples)
        counts = samples[which]
        samplers = [seqs[i] for i in which]
        if not samplers:
            return SampledTokens(samplers, counts, None)
        rows = np.repeat(cu[which + 1] - 1, counts).astype(np.int64)
        logits = self.model.compute_logits(hidden[self._to_device(rows)])
        table_rows = np.array(batch.rows, dtype=np.int64)[order][which]
        constrained = np.flatnonzero(np.repeat(batch.table.constrained[table_rows], counts))
        if len(constrained):
            owners = np.repeat(np.arange(len(samplers)), counts)[constrained]
            self.grammar(logits, constrained.tolist(), [samplers[i].matcher for i in owners])
        tokens = sample(logits, self._sampling_batch(batch.table, samplers, table_rows, counts, prev))
        return SampledTokens(samplers, counts, tokens, bool(len(constrained)))
    def _lora_meta(self, slots: np.ndarray, num_new: np.ndarray) -> LoRAMeta | None:
        if not (slots >= 0).any():
            return None
        seg_starts, seg_slots, max_len = lora_segments(slots, num_new)
        return LoRAMeta(self._to_device(seg_starts), self._to_device(seg_slots), max_len,
                        int(self.slot_ranks[slots[slots >= 0]].max()),
                        seg_starts, seg_slots)

    def _sampling_batch(self, table: SequenceTable, samplers: list[Sequence], rows: np.ndarray,
                        counts: np.ndarray, prev: torch.Tensor | None) -> SamplingBatch:
        """Per-sample parameters gathered from the table rows (repeated ``counts`` times); the n samples
        of a request's first step each get their completion's seed."""
        rep = np.repeat(rows, counts)
        seeds = table.seed[rep]
        if len(rep) > len(rows):
            starts = np.cumsum(counts) - counts
            for s, k, c in zip(samplers, starts, counts):
                if c > 1:
                    seeds[k:k + c] = np.array(s.request.seeds, dtype=np.uint64).view(np.int64)
        temps, top_ks, top_ps, min_ps = table.temperature[rep], table.top_k[rep], table.top_p[rep], table.min_p[rep]
        which, banned_ids = table.banned(rep)
        return SamplingBatch(
            temperatures=self._to_device(temps), top_ks=self._to_device(top_ks), top_ps=self._to_device(top_ps),
            seeds=self._to_device(seeds), steps=self._to_device(table.num_sampled[rep]),
            all_greedy=not temps.any(), any_top_k_or_p=bool((top_ps < 1).any() or (top_ks < self.vocab_size).any()),
            min_ps=self._to_device(min_ps) if min_ps.any() else None,
            penalties=self._penalties(table, samplers, rows, counts, prev) if table.penalized(rows) else None,
            banned=(self._to_device(which), self._to_device(banned_ids)) if len(which) else None)

    def _penalties(self, table: SequenceTable, samplers: list[Sequence], rows: np.ndarray, counts: np.ndarray,
                   prev: torch.Tensor | None) -> Penalties:
        """Each sampler's prompt + output ids; a PENDING last token (overlap) is taken from ``prev``."""
        width = max(s.num_tokens for s in samplers)
        ids = np.full((len(samplers), width), self.vocab_size, dtype=np.int64)
        is_output = np.zeros((len(samplers), width), dtype=bool)
        for i, s in enumerate(samplers):
            ids[i, :s.num_tokens] = s.token_ids
            is_output[i, s.request.num_prompt_tokens:s.num_tokens] = True
        r, c = np.nonzero(ids == PENDING)
        ids, is_output = self._to_device(ids), self._to_device(is_output)
        if len(r):
            src = np.fromiter((samplers[i].pending_row for i in r), dtype=np.int64, count=len(r))
            ids[self._to_device(r), self._to_device(c)] = prev[self._to_device(src)]
        rep = self._to_device(np.repeat(np.arange(len(samplers)), counts))
        per_sample = lambda column: self._to_device(np.repeat(column[rows], counts))
        return Penalties(ids[rep], is_output[rep], per_sample(table.repetition), per_sample(table.presence),
                         per_sample(table.frequency))


class SampledTokens:
    """The sampled tokens of a launched step: ``counts[i]`` tokens for ``seqs[i]``, in order. On CUDA
    they are copied to the host without blocking; ``host()`` waits for that copy."""

    def __init__(self, seqs: list[Sequence], counts: np.ndarray, tokens: torch.Tensor | None,
                 constrained: bool = False) -> None:
        self.seqs, self.counts, self.tokens = seqs, counts, tokens
        self.constrained = constrained   # a row was masked by a grammar: processed before the next launch
        self.positions: list[int] = []   # where each sequence's PENDING token is (set by the engine)
        self._host, self._ready = None, None
        if tokens is not None and tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def host(self) -> np.ndarray:
        if self.tokens is None:
            return np.zeros(0, dtype=np.int64)
        if self._ready is None:
            return self.tokens.numpy()
        self._ready.synchronize()
        return self._host.numpy()
