"""One forward pass per step over every scheduled token, then sampling.

The batch is ordered decodes first, then prefill chunks, each group sorted by adapter slot, so
adapters form contiguous segments. All metadata is built once on the host (block tables and slot
mapping in the C++ block manager), moved to the device once, and shared by every layer; the only
device-to-host transfer of a step is the sampled token ids.
"""
from __future__ import annotations

import numpy as np
import torch

from mcl_runtime.engine.sampler import Penalties, SamplingBatch, sample
from mcl_runtime.engine.scheduler import ScheduledBatch
from mcl_runtime.engine.sequence import Sequence
from mcl_runtime.model.backends import AttentionMeta, ForwardContext, LoRAMeta, lora_segments
from mcl_runtime.model.decoder import DecoderLM


class ModelRunner:
    def __init__(self, model: DecoderLM, backend, kv_cache: torch.Tensor, block_manager, slot_ranks: np.ndarray,
                 eos_token_ids: list[int] | tuple[int, ...] = ()) -> None:
        self.model = model
        self.backend = backend
        self.kv_cache = kv_cache
        self.bm = block_manager
        self.slot_ranks = slot_ranks    # largest rank of the adapter in each slot (kept by the adapter manager)
        self.device = kv_cache.device
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids = list(eos_token_ids)   # banned while a request is below its min_tokens
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
    def run(self, batch: ScheduledBatch) -> list[tuple[Sequence, list[int]]]:
        """Run the step; returns (sequence, sampled tokens) for each sequence that samples
        (more than one token only for the first sample of an ``n > 1`` request)."""
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
        hidden = self.model(self._to_device(input_ids), self._to_device(positions), ctx)

        samplers = [(i, s) for i, (s, n) in enumerate(zip(seqs, num_new)) if s.num_computed + n == s.num_tokens]
        if not samplers:
            return []
        seeds_per_seq = [s.request.sample_seeds(s) for _, s in samplers]
        rows = np.repeat([cu[i + 1] - 1 for i, _ in samplers], [len(x) for x in seeds_per_seq])
        logits = self.model.compute_logits(hidden[self._to_device(rows.astype(np.int64))])
        if self.grammar is not None:
            self.grammar(logits, [s.matcher for (_, s), seeds in zip(samplers, seeds_per_seq) for _ in seeds])
        tokens = sample(logits, self._sampling_batch(samplers, seeds_per_seq)).tolist()
        out, k = [], 0
        for (_, s), seeds in zip(samplers, seeds_per_seq):
            out.append((s, tokens[k:k + len(seeds)]))
            k += len(seeds)
        return out

    def _lora_meta(self, slots: np.ndarray, num_new: np.ndarray) -> LoRAMeta | None:
        if not (slots >= 0).any():
            return None
        seg_starts, seg_slots, max_len = lora_segments(slots, num_new)
        return LoRAMeta(self._to_device(seg_starts), self._to_device(seg_slots), max_len,
                        int(self.slot_ranks[slots[slots >= 0]].max()),
                        seg_starts, seg_slots)

    def _sampling_batch(self, samplers, seeds_per_seq) -> SamplingBatch:
        params = [s.request.params for _, s in samplers]
        counts = [len(x) for x in seeds_per_seq]
        rep = lambda values, dtype: self._to_device(np.repeat(np.array(values, dtype=dtype), counts))
        top_ks = [p.top_k if p.top_k > 0 else self.vocab_size for p in params]
        return SamplingBatch(
            temperatures=rep([p.temperature for p in params], np.float32),
            top_ks=rep(top_ks, np.int64),
            top_ps=rep([p.top_p for p in params], np.float32),
            seeds=self._to_device(np.array([x for seeds in seeds_per_seq for x in seeds], dtype=np.uint64).view(np.int64)),
            steps=rep([s.num_output_tokens for _, s in samplers], np.int64),
            all_greedy=all(p.temperature == 0 for p in params),
            any_top_k_or_p=any(p.top_p < 1 or 0 < p.top_k < self.vocab_size for p in params),
            min_ps=rep([p.min_p for p in params], np.float32) if any(p.min_p > 0 for p in params) else None,
            penalties=self._penalties(samplers, counts) if any(p.penalized for p in params) else None,
            banned=self._banned(samplers, counts) if any(p.min_tokens for p in params) else None)

    def _penalties(self, samplers, counts: list[int]) -> Penalties:
        seqs = [s for _, s in samplers]
        width = max(s.num_tokens for s in seqs)
        ids = np.full((len(seqs), width), self.vocab_size, dtype=np.int64)
        is_output = np.zeros((len(seqs), width), dtype=bool)
        for row, s in enumerate(seqs):
            ids[row, :s.num_tokens] = s.token_ids
            is_output[row, s.request.num_prompt_tokens:s.num_tokens] = True
        rep = lambda values: self._to_device(np.repeat(np.array(values, dtype=np.float32), counts))
        params = [s.request.params for s in seqs]
        return Penalties(self._to_device(np.repeat(ids, counts, axis=0)), self._to_device(np.repeat(is_output, counts, axis=0)),
                         rep([p.repetition_penalty for p in params]), rep([p.presence_penalty for p in params]),
                         rep([p.frequency_penalty for p in params]))

    def _banned(self, samplers, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(row, token) pairs masked because the row has fewer than min_tokens outputs."""
        starts = np.cumsum([0] + counts[:-1])
        pairs = [(row, tok) for (_, s), start, count in zip(samplers, starts, counts)
                 if s.num_output_tokens < s.request.params.min_tokens
                 for tok in self.eos_token_ids + list(s.request.params.stop_token_ids or ())
                 for row in range(start, start + count)]
        if not pairs:
            return None
        rows, toks = np.array(pairs, dtype=np.int64).T
        return self._to_device(rows.copy()), self._to_device(toks.copy())
