"""One forward pass per step over every scheduled token, then sampling.

The scheduler hands over the batch in the forward's order (decodes, then prefill chunks, by adapter
slot within each, so adapters form contiguous segments) with its input token ids; the runner reads
the block manager's metadata for it and the table's sampling parameters (a row's sequence only for
its grammar matcher, its token history under penalties, and its completions' seeds at an n > 1
first sample). All metadata is built once on the host (block tables and slot mapping in the C++
block manager), written into persistent buffers, moved to the device in one copy, and shared by
every layer; the only device-to-host transfer of a step is the sampled token ids, which ``run`` does
not wait for (so the engine can launch the next step first).

Decode-only steps can run *static*: padded to a batch-size bucket (1, 2, 4, 8, ..., max_num_seqs)
with every shape fixed by the bucket, so that one compiled graph (``compile=True``) or one captured
CUDA graph per bucket serves every such step. Padded rows are base-model rows of context 1 that
write their KV into a scratch block (the cache's last block, which the block manager never hands
out); their outputs are dropped.
Between ``compute_logits`` and sampling, the rows of constrained sequences are masked by their
grammar matchers in one batched call. A step that only takes argmaxes reads the head's output in the
model's dtype (no float32 copy).
"""

from __future__ import annotations

import numpy as np
import torch

from mcl_runtime.engine.cuda_graphs import DecodeGraphs
from mcl_runtime.engine.sampler import Penalties, SamplingBatch, sample
from mcl_runtime.engine.scheduler import ScheduledBatch
from mcl_runtime.engine.seq_table import SequenceTable
from mcl_runtime.engine.step_buffers import StepBuffers, metadata_fields, sampling_fields
from mcl_runtime.model.backends import AttentionMeta, Backend, ForwardContext, KeptRows, LoRAMeta, lora_segments
from mcl_runtime.model.decoder import DecoderLM


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, ... and ``max_num_seqs`` itself as the last bucket."""
    buckets = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs]
    return buckets + [max_num_seqs]


class ModelRunner:
    def __init__(
        self,
        model: DecoderLM,
        backend: Backend,
        kv_cache: torch.Tensor,
        block_manager,
        table: SequenceTable,
        slot_ranks: np.ndarray,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        compile: bool = False,
        compile_backend: str = "inductor",
        cuda_graphs: bool = False,
    ) -> None:
        """``kv_cache`` has one block more than the block manager: the scratch block of padded rows.
        ``table`` (the scheduler's) is read for the sampling parameters of the step's rows."""
        self.model = model
        self.backend = backend
        self.kv_cache = kv_cache
        self.kv_caches = [(layer[0], layer[1]) for layer in kv_cache]  # views, made once: not per layer and step
        self.bm = block_manager
        self.table = table
        self.slot_ranks = slot_ranks  # largest rank of the adapter in each slot (kept by the adapter manager)
        self.device = kv_cache.device
        self.vocab_size = model.config.vocab_size
        self.max_rank = model.lora_modules(0)["qkv_proj"].max_rank
        max_blocks = -(-max_model_len // block_manager.block_size)
        self.buffers = StepBuffers(
            metadata_fields(max(max_num_batched_tokens, max_num_seqs), max_num_seqs, max_blocks), self.device
        )
        # A step samples at most max_num_seqs tokens: the scheduler admits a request only when all
        # n of its completions fit in max_num_seqs.
        self.sampling_buffers = StepBuffers(sampling_fields(max_num_seqs), self.device)
        # A 16-bit model's float32 logits on the CPU go into one buffer, grown to the most rows a step
        # has sampled: a fresh [rows, vocab] tensor would be faulted in page by page at every step
        # (at 62 rows of a 152k vocabulary, 17 ms against 2 ms for the copy into a used buffer).
        self._logits: torch.Tensor | None = None
        self.buckets = batch_buckets(max_num_seqs) if compile or cuda_graphs else []
        self.scratch_block = kv_cache.shape[2] - 1
        self.forward = self.model
        if compile:
            compiled = torch.compile(self.model, backend=compile_backend, fullgraph=True, dynamic=False)
            # One specialisation per bucket of the same forward: dynamo's recompile limit is raised
            # for these calls only (its config is process-wide).
            limit = max(torch._dynamo.config.recompile_limit, 2 * len(self.buckets))

            def forward(*args):
                with torch._dynamo.config.patch(recompile_limit=limit):
                    return compiled(*args)

            self.forward = forward
        self.graphs = DecodeGraphs(self._static_forward) if cuda_graphs else None
        self.grammar = None  # a structured.GrammarMasker once a constrained request arrives
        self._segments: tuple[tuple[bytes, bytes], tuple] | None = None  # the last step's LoRA segments, by key

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

    def _bucket(self, num_new: np.ndarray) -> int | None:
        """The bucket of a decode-only step, None for steps that run eagerly."""
        if not self.buckets or num_new.max() != 1 or len(num_new) > self.buckets[-1]:
            return None
        return next(b for b in self.buckets if b >= len(num_new))

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, prev: torch.Tensor | None = None) -> SampledTokens:
        """Launch the step: forward, then sampling for the sequences with ``batch.samples > 0``.
        In-flight input tokens are taken from ``prev`` (the last step's ``SampledTokens.tokens``).
        Nothing waits for the device."""
        self._copy_blocks()
        bucket = self._bucket(batch.num_new)
        which = np.flatnonzero(batch.samples)  # the sequences that sample
        cu, ctx, input_ids, positions = self._prepare(batch, bucket, which)
        if len(batch.pending_dst):
            buf = self.buffers
            n = len(batch.pending_dst)
            input_ids.index_copy_(0, buf.view("pending_dst", n), prev.index_select(0, buf.view("pending_src", n)))
        if bucket is None:
            self.backend.prepare(ctx.attn, ctx.lora)
            if ctx.keep is not None and ctx.keep.lora is not None:
                self.backend.prepare_lora(ctx.keep.lora)
            hidden = self.model(input_ids, positions, ctx)
        elif self.graphs is not None:
            hidden = self.graphs.run(bucket, input_ids, positions, ctx)
        else:
            hidden = self._static_forward(input_ids, positions, ctx)
        return self._sample(hidden, batch, cu, input_ids, which, kept=ctx.keep is not None)

    # ---- after the forward pass --------------------------------------------------------------
    def _sample(
        self,
        hidden: torch.Tensor,
        batch: ScheduledBatch,
        cu: np.ndarray,
        input_ids: torch.Tensor,
        which: np.ndarray,
        kept: bool,
    ) -> SampledTokens:
        """Logits of each sampling sequence's (``which``) last token, grammar masks, then one sample
        each (``n`` at an n > 1 request's first sample). ``kept``: ``hidden`` has only those tokens' rows."""
        counts = batch.samples[which]
        rows, seq_ids = batch.rows[which], batch.seq_ids[which]
        if not len(which):
            return SampledTokens(rows, seq_ids, counts, None)
        last_tokens = cu[which + 1] - 1
        picks = np.repeat(np.arange(len(which)) if kept else last_tokens, counts)
        logits_in = (
            hidden[: len(picks)] if np.array_equal(picks, np.arange(len(picks))) else hidden[self._to_device(picks)]
        )
        table = self.table
        constrained = np.flatnonzero(np.repeat(table.constrained[rows], counts))
        sampling = self._sampling_batch(rows, counts, batch.steps[which], last_tokens, input_ids)
        # A step that only takes each row's argmax (greedy, no penalties, banned ids or grammar) reads
        # the head's output in its own dtype: a 16-bit value's maximum is its float32 value's.
        argmax_only = sampling.argmax_only and not len(constrained)
        out = None if argmax_only else self._logits_buffer(len(picks))
        logits = self.model.compute_logits(logits_in, self.backend, out, float32=not argmax_only)
        if len(constrained):
            owners = np.repeat(rows, counts)[constrained]
            self.grammar(logits, constrained.tolist(), [table.seqs[r].matcher for r in owners.tolist()])
        tokens = sample(logits, sampling)
        return SampledTokens(rows, seq_ids, counts, tokens, bool(len(constrained)))

    def _logits_buffer(self, rows: int) -> torch.Tensor | None:
        """``rows`` rows of the reused float32 logits buffer (CPU, 16-bit model), else None."""
        if self.device.type != "cpu" or self.model.lm_head_weight.dtype == torch.float32:
            return None
        if self._logits is None or len(self._logits) < rows:
            self._logits = torch.empty(rows, self.vocab_size, dtype=torch.float32)
        return self._logits[:rows]

    def _static_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        self.backend.prepare(ctx.attn, ctx.lora)
        return self.forward(input_ids, positions, ctx)

    def _prepare(self, batch: ScheduledBatch, bucket: int | None, which: np.ndarray):
        """The step's inputs and metadata into the persistent buffers, one copy to the device;
        returns (host cu_seqlens_q, ForwardContext, input ids, positions)."""
        seq_ids, num_new, slots = batch.seq_ids, batch.num_new, batch.slots
        positions, slot_mapping, tables, ctx_lens, cu = self.bm.build_metadata(seq_ids.tolist(), num_new.tolist())
        input_ids, kind_counts = batch.input_ids, batch.kind_counts
        B = batch.num_seqs
        token_slots = np.repeat(slots, num_new)
        key = (slots.tobytes(), num_new.tobytes())
        if self._segments is None or self._segments[0] != key:  # decode steps over the same sequences keep them
            self._segments = (key, lora_segments(slots, num_new))
        seg_starts, seg_slots, max_seg_len = self._segments[1]
        if bucket is not None:  # pad: base rows of context 1 writing into the scratch block
            pad = bucket - B
            bs = self.bm.block_size
            input_ids, positions = np.r_[input_ids, np.zeros(pad, np.int64)], np.r_[positions, np.zeros(pad, np.int64)]
            slot_mapping = np.r_[slot_mapping, np.full(pad, self.scratch_block * bs, np.int64)]
            token_slots = np.r_[token_slots, np.full(pad, -1)]
            ctx_lens, cu = np.r_[ctx_lens, np.ones(pad, np.int32)], np.arange(bucket + 1, dtype=np.int32)
            tables = np.vstack([tables, np.full((pad, tables.shape[1]), self.scratch_block, np.int32)])
            seg_starts = np.r_[seg_starts, np.full(bucket - len(seg_slots), B, np.int32)]
            seg_slots = np.r_[seg_slots, np.full(bucket - len(seg_slots), -1, np.int32)]
            kind_counts = np.array([bucket, 0, 0])
        buf = self.buffers
        columns = {
            "input_ids": input_ids,
            "positions": positions,
            "slot_mapping": slot_mapping,
            "token_slots": token_slots,
            "context_lens": ctx_lens,
            "cu_seqlens_q": cu,
            "seg_starts": seg_starts,
            "seg_slots": seg_slots,
            "block_tables": tables,
        }
        if len(batch.pending_dst):
            columns.update(pending_dst=batch.pending_dst, pending_src=batch.pending_src)
        keep_seqs = None if bucket is not None else self._kept_seqs(which, len(input_ids))
        if keep_seqs is not None:
            keep_segments = lora_segments(slots[keep_seqs], np.ones(len(keep_seqs), np.int64))
            columns.update(
                keep_rows=cu[keep_seqs + 1] - 1, keep_seg_starts=keep_segments[0], keep_seg_slots=keep_segments[1]
            )
        for name, values in columns.items():
            buf.write(name, values)
        buf.commit()
        T, nb, nseg = len(input_ids), len(ctx_lens), len(seg_slots)
        static = bucket is not None
        attn = AttentionMeta(
            slot_mapping=buf.view("slot_mapping", T),
            block_tables=buf.view("block_tables", nb),
            context_lens=buf.view("context_lens", nb),
            cu_seqlens_q=buf.view("cu_seqlens_q", nb + 1),
            group_bounds=[0] + np.cumsum(kind_counts).tolist(),
            max_q_len=int(num_new.max()),
            max_context_len=int(ctx_lens.max()),
            block_size=self.bm.block_size,
            context_lens_host=ctx_lens,
            cu_seqlens_q_host=cu,
            static=static,
        )
        if not static:
            lora = self._lora_meta("", (seg_starts, seg_slots, max_seg_len))
        elif len(self.slot_ranks):  # every shape the bucket's, every slot up to the largest rank
            lora = LoRAMeta(
                buf.view("seg_starts", nseg + 1),
                buf.view("seg_slots", nseg),
                bucket,
                self.max_rank,
                seg_starts,
                seg_slots,
                token_slots=buf.view("token_slots", T),
            )
        else:
            lora = None
        ctx = ForwardContext(self.backend, self.kv_caches, attn, lora)
        if keep_seqs is not None:
            ctx.keep = KeptRows(buf.view("keep_rows", len(keep_seqs)), self._lora_meta("keep_", keep_segments))
        return cu[: B + 1], ctx, buf.view("input_ids", T), buf.view("positions", T)

    def _lora_meta(self, prefix: str, segments: tuple[np.ndarray, np.ndarray, int]) -> LoRAMeta | None:
        """An eager step's LoRA metadata over ``segments`` (``lora_segments``), written to the fields
        ``{prefix}seg_starts`` / ``{prefix}seg_slots``; None when no segment has an adapter."""
        starts, slots, max_len = segments
        used = slots[slots >= 0]
        if not len(used):
            return None
        n = len(slots)
        buf = self.buffers
        rank = int(self.slot_ranks[used].max())
        return LoRAMeta(
            buf.view(prefix + "seg_starts", n + 1), buf.view(prefix + "seg_slots", n), max_len, rank, starts, slots
        )

    @staticmethod
    def _kept_seqs(which: np.ndarray, num_tokens: int) -> np.ndarray | None:
        """The sequences whose last token's hidden state the step reads: those that sample,
        ``which`` (a step that samples nothing keeps its first, so that no layer gets zero rows).
        None when every one of the ``num_tokens`` rows samples: the forward then keeps them all."""
        if len(which) == num_tokens:
            return None
        return which if len(which) else np.zeros(1, np.int64)

    def _sampling_batch(
        self, rows: np.ndarray, counts: np.ndarray, steps: np.ndarray, last_tokens: np.ndarray, input_ids: torch.Tensor
    ) -> SamplingBatch:
        """Per-sample parameters gathered from the table rows (repeated ``counts`` times); ``steps``:
        each row's sample index. An all-greedy step needs only its penalties and banned ids."""
        table = self.table
        rep = np.repeat(rows, counts)
        rep_steps = np.repeat(steps, counts)
        which, banned_ids = table.banned(rep, rep_steps)
        all_greedy = not table.temperature[rep].any()
        return SamplingBatch(
            all_greedy=all_greedy,
            **({} if all_greedy else self._sampling_tensors(rows, rep, counts, rep_steps)),
            penalties=self._penalties(rows, counts, last_tokens, input_ids) if table.penalized(rows) else None,
            banned=(self._to_device(which), self._to_device(banned_ids)) if len(which) else None,
        )

    def _sampling_tensors(self, rows: np.ndarray, rep: np.ndarray, counts: np.ndarray, steps: np.ndarray) -> dict:
        """Temperatures, top-k/p, min-p, seeds and sample indices through the sampling buffers (one
        copy); the n samples of a request's first step each get their completion's seed."""
        table = self.table
        seeds = table.seed[rep]
        if len(rep) > len(rows):
            for row, k, c in zip(rows.tolist(), (np.cumsum(counts) - counts).tolist(), counts.tolist()):
                if c > 1:
                    seeds[k : k + c] = np.array(table.seqs[row].request.seeds, dtype=np.uint64).view(np.int64)
        columns = dict(
            temperatures=table.temperature[rep],
            top_ps=table.top_p[rep],
            min_ps=table.min_p[rep],
            top_ks=table.top_k[rep],
            seeds=seeds,
            steps=steps,
        )
        buf = self.sampling_buffers
        for name, column in columns.items():
            buf.write(name, column)
        buf.commit()
        tensors = {name: buf.view(name, len(rep)) for name in columns}
        if not columns["min_ps"].any():
            tensors["min_ps"] = None
        top_ps, top_ks = columns["top_ps"], columns["top_ks"]
        tensors["any_top_k_or_p"] = bool((top_ps < 1).any() or (top_ks < self.vocab_size).any())
        return tensors

    def _penalties(
        self, rows: np.ndarray, counts: np.ndarray, last_tokens: np.ndarray, input_ids: torch.Tensor
    ) -> Penalties:
        """Each sampler's prompt + output ids so far. A token still in flight is its sequence's last
        input token of this step (``input_ids[last_tokens[i]]``, already read from the last step)."""
        table = self.table
        seqs = [table.seqs[r] for r in rows.tolist()]
        lengths = table.num_tokens(rows) - 1  # this step's own sample excluded
        ids = np.full((len(seqs), int(lengths.max())), self.vocab_size, dtype=np.int64)
        is_output = np.zeros(ids.shape, dtype=bool)
        for i, (seq, n) in enumerate(zip(seqs, lengths.tolist())):
            recorded = seq.token_ids[:n]
            ids[i, : len(recorded)] = recorded
            is_output[i, seq.request.num_prompt_tokens : n] = True
        in_flight = np.flatnonzero(np.array([len(s.token_ids) for s in seqs]) < lengths)
        ids, is_output = self._to_device(ids), self._to_device(is_output)
        if len(in_flight):
            src = self._to_device(last_tokens[in_flight])
            ids[self._to_device(in_flight), self._to_device(lengths[in_flight] - 1)] = input_ids[src]
        rep = self._to_device(np.repeat(np.arange(len(seqs)), counts))
        per_sample = lambda column: self._to_device(np.repeat(column[rows], counts))
        return Penalties(
            ids[rep],
            is_output[rep],
            per_sample(table.repetition),
            per_sample(table.presence),
            per_sample(table.frequency),
        )


class SampledTokens:
    """The sampled tokens of a launched step: ``counts[i]`` tokens for ``SequenceTable`` row
    ``rows[i]`` (holding sequence ``seq_ids[i]`` at the launch), in order. On CUDA they are copied to
    the host without blocking; ``host()`` waits for that copy."""

    def __init__(
        self,
        rows: np.ndarray,
        seq_ids: np.ndarray,
        counts: np.ndarray,
        tokens: torch.Tensor | None,
        constrained: bool = False,
    ) -> None:
        self.rows, self.seq_ids, self.counts = rows, seq_ids, counts
        self.tokens = tokens
        self.constrained = constrained  # a row was masked by a grammar: processed before the next launch
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
