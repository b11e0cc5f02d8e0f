"""Continuous batching with chunked prefill and preemption by recompute; the one owner of the
state of every request and sequence.

A step is ``schedule`` -> the model runner -> ``postprocess``:

- ``schedule`` picks the step's work: (1) running sequences that decode get one token each,
  preempting the most recently admitted running sequences when the KV cache is full; (2) running
  sequences still in prefill get their next chunk; (3) waiting sequences are admitted first-come
  first-served while the token budget, the sequence limit, KV blocks and adapter slots allow. A
  preempted sequence frees its blocks and goes back to the front of the queue; it is recomputed
  later (the prefix cache usually makes that cheap), never lost. The launch is recorded in the
  table at once: the step's tokens count as computed and its samples as launched (in flight).
- ``postprocess`` records a launched step's sampled tokens: appends them, checks the finish
  conditions (vectorised), advances grammar matchers and text only for the rows that have them,
  forks a request into its ``n`` completions at its first sample, and frees what ended.

With overlap the engine schedules and launches step N + 1 before it postprocesses step N: a
decode's input token may then still be in flight, and the runner takes it from step N's samples.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from mcl_runtime.engine.adapter_manager import AdapterManager
from mcl_runtime.engine.seq_table import FINISH_REASONS, NOT_FINISHED, PENDING, STOPPED, SequenceTable
from mcl_runtime.engine.sequence import Request, Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work in the order of the forward pass: decodes (one new token each), prompts
    without cached context, then chunks after cached context (``kind_counts`` of each), by adapter
    slot within each kind, so that adapters form contiguous segments."""

    rows: np.ndarray  # [B] SequenceTable rows
    seq_ids: np.ndarray  # [B] block-manager keys
    num_new: np.ndarray  # [B] tokens computed this step
    slots: np.ndarray  # [B] adapter slot, -1 = base model
    kind_counts: np.ndarray  # [3]
    input_ids: np.ndarray  # [T] PENDING where the token is still in flight
    pending_dst: np.ndarray  # positions in input_ids of in-flight tokens ...
    pending_src: np.ndarray  # ... and their indices in the last launched step's samples
    samples: np.ndarray  # [B] tokens sampled: 0 mid-prefill, 1, or n at an n > 1 request's first sample
    steps: np.ndarray  # [B] index of each sequence's (first) sample among its samples
    finished: list[Sequence] = field(default_factory=list)  # ended while scheduling

    @property
    def num_seqs(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def forks(self) -> bool:
        """A request forks into its n completions after this step (it is processed at once)."""
        return bool((self.samples > 1).any())


# A step's token budget (``max_num_batched_tokens``) when none is given: GPU_STEP_TOKENS on a GPU. On
# the CPU, the most rows (a multiple of STEP_TOKENS_ALIGN, from CPU_MIN_STEP_TOKENS to GPU_STEP_TOKENS)
# whose widest activation, the fused gate/up projection's output, fits within CPU_HEAP_BLOCK_MAX:
# glibc's malloc serves larger blocks as fresh mmaps, zero-filled page by page in every layer of
# every prefill chunk. Qwen2.5-0.5B in float32, 16 prompts of 64-256 tokens and 32 new tokens each:
# 6-7% faster at 768 tokens a step than at 2048, with 1/60 of the page faults (benchmarks/README.md,
# run history, "Step token budget").
GPU_STEP_TOKENS = 2048
CPU_MIN_STEP_TOKENS = 256
CPU_HEAP_BLOCK_MAX = 32 << 20  # glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX) on 64-bit
STEP_TOKENS_ALIGN = 128


def default_step_tokens(device_type: str, widest_row_bytes: int, max_num_seqs: int) -> int:
    """The default ``max_num_batched_tokens`` (see above); never below ``max_num_seqs`` (a step
    decodes every running sequence)."""
    if device_type != "cpu":
        return max(GPU_STEP_TOKENS, max_num_seqs)
    rows = CPU_HEAP_BLOCK_MAX // widest_row_bytes // STEP_TOKENS_ALIGN * STEP_TOKENS_ALIGN
    return max(min(max(rows, CPU_MIN_STEP_TOKENS), GPU_STEP_TOKENS), max_num_seqs)


def _empty(finished: list[Sequence]) -> ScheduledBatch:
    z = np.zeros(0, np.int64)
    return ScheduledBatch(z, z, z, z, np.zeros(3, np.int64), z, z, z, z, z, finished)


class Scheduler:
    def __init__(
        self,
        block_manager,
        adapters: AdapterManager,
        table: SequenceTable,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.bm = block_manager
        self.adapters = adapters
        self.table = table
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.waiting: deque[Sequence] = deque()
        self.running: list[int] = []  # table rows, in admission order (the last is preempted first)
        self.num_preemptions = 0
        self.num_cached_tokens = 0

    # ---- requests ------------------------------------------------------------------------------
    def add(self, req: Request, text, matcher) -> None:
        """Queue a request's first sequence (it forks into ``n`` at its first sample). ``text``: its
        TextStream or None; ``matcher``: its grammar constraint or None."""
        seq = Sequence(req, 0, list(req.prompt_token_ids), text, matcher)
        seq.row = self.table.add(req.params, req.max_tokens, req.seeds[0], text is not None, matcher is not None)
        self.table.attach(seq.row, seq)
        req.seqs.append(seq)
        self.requests[req.request_id] = req
        self.adapters.hold(req.adapter_uid)
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Request | None:
        """End every sequence of a request (finish reason "abort"); None if there is no such request."""
        req = self.requests.get(request_id)
        if req is not None:
            for seq in req.seqs:
                self.finish(seq, "abort")
        return req

    # ---- schedule ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        decodes, chunks, budget = self._schedule_running(budget)
        finished = self._admit_waiting(chunks, budget)
        if not len(decodes) and not chunks:
            return _empty(finished)
        return self._launch(decodes, chunks, finished)

    def _schedule_running(self, budget: int) -> tuple[np.ndarray, list[tuple[int, int]], int]:
        """The running sequences' work: one token for each decode (rows), then the next chunk of
        each in prefill ((row, tokens) pairs), within ``budget`` tokens; returns what is left of it."""
        t = self.table
        running = np.array(self.running, dtype=np.int64)
        pending = t.num_tokens(running) - t.num_computed[running]
        # A decode whose samples are all launched waits for its last one to be processed.
        decodes = running[(pending == 1) & (t.num_sampled[running] < t.max_out[running])][:budget]
        decodes = self._reserve_decodes(decodes)
        budget -= len(decodes)
        chunks: list[tuple[int, int]] = []
        prefills = pending > 1
        if not prefills.any():
            return decodes, chunks, budget
        scheduled = set(t.seq_id[decodes].tolist())
        for row, left in zip(running[prefills].tolist(), pending[prefills].tolist()):
            if budget <= 0:
                break
            if t.seqs[row].status is not Status.RUNNING:  # preempted by a reservation above
                continue
            n = min(left, budget)
            if self._reserve(row, n, scheduled):
                chunks.append((row, n))
                scheduled.add(int(t.seq_id[row]))
                budget -= n
        return decodes, chunks, budget

    def _admit_waiting(self, chunks: list[tuple[int, int]], budget: int) -> list[Sequence]:
        """Admit waiting sequences, first come first served, with their first chunks (appended to
        ``chunks``) while the token budget, the sequence limit, KV blocks and adapter slots allow.
        Returns the sequences ended instead: one that needs more KV blocks than the whole cache."""
        t = self.table
        finished: list[Sequence] = []
        no_slot: list[Sequence] = []
        running = np.array(self.running, dtype=np.int64)
        # A sequence that forks at its first sample needs room for all n completions.
        seats = len(running) + int((t.n[running] - 1)[t.num_sampled[running] == 0].sum())
        while self.waiting and budget > 0 and seats + t.completions(self.waiting[0].row) <= self.max_num_seqs:
            seq = self.waiting[0]
            n = self._admit(seq, budget)
            if n is None:  # every adapter slot is pinned: requests for resident adapters go first
                no_slot.append(self.waiting.popleft())
                continue
            if n == 0:
                if self.running:  # the KV cache is full: wait for blocks to be freed
                    break
                self.finish(seq, "length")  # nothing runs, and it still does not fit
                finished.append(seq)
                continue
            self.waiting.popleft()
            chunks.append((seq.row, n))
            budget -= n
            seats += int(t.completions(seq.row))
        self.waiting.extendleft(reversed(no_slot))
        return finished

    def _launch(self, decodes: np.ndarray, chunks: list[tuple[int, int]], finished: list[Sequence]) -> ScheduledBatch:
        """The batch of ``decodes`` and prefill ``chunks`` in forward order, recorded as launched."""
        t = self.table
        rows = np.concatenate([decodes, np.array([r for r, _ in chunks], dtype=np.int64)])
        num_new = np.concatenate([np.ones(len(decodes), np.int64), np.array([n for _, n in chunks], dtype=np.int64)])
        computed = t.num_computed[rows]
        # decodes | prompts without cached context | chunks after cached context (a one-token chunk is a decode)
        kinds = np.where(num_new == 1, 0, np.where(computed == 0, 1, 2))
        slots = t.slot[rows]
        order = np.lexsort((slots, kinds))
        if not np.array_equal(order, np.arange(len(order))):
            rows, num_new, computed, kinds, slots = (
                rows[order],
                num_new[order],
                computed[order],
                kinds[order],
                slots[order],
            )
        num_tokens = t.num_tokens(rows)
        if len(chunks):
            input_ids = np.concatenate([self._tokens(r, c, n) for r, c, n in zip(rows, computed, num_new)])
        else:
            input_ids = t.last_token[rows]
        pending_dst = np.flatnonzero(input_ids == PENDING)
        pending_src = t.pending[np.repeat(rows, num_new)[pending_dst]] if len(pending_dst) else pending_dst
        samples = np.where(computed + num_new < num_tokens, 0, t.completions(rows))
        steps = t.num_sampled[rows]
        # the launch: this step's tokens are computed and its samples in flight
        t.num_computed[rows] += num_new
        sampling = samples > 0
        samplers = rows[sampling]
        t.num_sampled[samplers] += 1
        t.last_token[samplers] = PENDING
        t.pending[samplers] = (np.cumsum(samples) - samples)[sampling]
        return ScheduledBatch(
            rows=rows,
            seq_ids=t.seq_id[rows],
            num_new=num_new,
            slots=slots,
            kind_counts=np.bincount(kinds, minlength=3),
            input_ids=input_ids,
            pending_dst=pending_dst,
            pending_src=pending_src,
            samples=samples,
            steps=steps,
            finished=finished,
        )

    def _tokens(self, row: int, start: int, n: int) -> list[int]:
        """Tokens ``start:start + n`` of a row's sequence; PENDING for one still in flight."""
        ids = self.table.seqs[row].token_ids[start : start + n]
        return ids + [PENDING] * (n - len(ids))

    def _reserve_decodes(self, rows: np.ndarray) -> np.ndarray:
        """One KV slot for each decode, in order (one block-manager call while they fit); a decode
        that does not fit preempts as ``_reserve`` does. Returns the rows still running, in order."""
        t = self.table
        kept: list[np.ndarray] = []
        todo = rows
        while len(todo):
            k = self.bm.append_one_each(t.seq_id[todo].tolist(), t.last_token[todo].tolist())
            kept.append(todo[:k])
            if k == len(todo):
                break
            if self._reserve(int(todo[k]), 1, set(t.seq_id[np.concatenate(kept)].tolist())):
                kept.append(todo[k : k + 1])
            todo = np.array([r for r in todo[k + 1 :].tolist() if t.seqs[r].status is Status.RUNNING], dtype=np.int64)
        return np.concatenate(kept) if len(kept) > 1 else kept[0] if kept else rows

    def _reserve(self, row: int, n: int, scheduled: set[int]) -> bool:
        """Reserve KV slots for the next ``n`` tokens of a running sequence, preempting the most
        recently admitted sequences not yet scheduled this step. False if it was preempted itself."""
        t = self.table
        tokens = self._tokens(row, int(t.num_computed[row]), n)
        while not self.bm.append_tokens(int(t.seq_id[row]), tokens):
            victim = next((r for r in reversed(self.running) if t.seq_id[r] not in scheduled), None)
            if victim is None:
                return False
            self.preempt(t.seqs[victim])
            if victim == row:
                return False
        return True

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Admit a waiting sequence with its first chunk; returns the chunk size, 0 if the KV cache
        is full, None if no adapter slot is free."""
        t, row = self.table, seq.row
        slot = self.adapters.acquire(seq.request.adapter_uid)
        if slot is None:
            return None
        tokens = self._tokens(row, 0, int(t.num_tokens(row)))
        cached = self.bm.add_sequence(seq.seq_id, tokens, seq.request.adapter_uid)
        n = min(len(tokens) - cached, budget)
        if not self.bm.append_tokens(seq.seq_id, tokens[cached : cached + n]):
            self.bm.free(seq.seq_id)
            self.adapters.release(slot)
            return 0
        t.slot[row], t.num_computed[row] = slot, cached
        seq.status = Status.RUNNING
        self.running.append(row)
        self.num_cached_tokens += cached
        return n

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq.row)
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- postprocess ---------------------------------------------------------------------------
    def postprocess(
        self, rows: np.ndarray, seq_ids: np.ndarray, counts: np.ndarray, tokens: np.ndarray
    ) -> list[Sequence]:
        """Record a launched step's samples: ``counts[i]`` tokens for table row ``rows[i]`` (which
        held sequence ``seq_ids[i]`` at the launch), in order. Returns the sequences that got one
        (those that ended included, finished)."""
        t = self.table
        if len(tokens) > len(rows):  # a request's first sample forks it into its n completions
            rows, seq_ids = self._fork_all(rows, seq_ids, counts)
        live = t.seq_id[rows] == seq_ids  # a sequence that ended after the launch freed its row
        if not live.all():
            rows, tokens = rows[live], tokens[live]
        if not len(rows):
            return []
        seqs = [t.seqs[r] for r in rows.tolist()]
        values = tokens.tolist()
        for seq, token in zip(seqs, values):
            seq.token_ids.append(token)
        codes = t.record(rows, tokens)
        for i in np.flatnonzero(t.num_out[rows] == 1).tolist():
            req = seqs[i].request
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
        for i in np.flatnonzero(t.constrained[rows]).tolist():
            if seqs[i].matcher.accept(values[i]):  # the grammar is complete (or rejected the token)
                codes[i] = STOPPED
        for i in np.flatnonzero(t.detok[rows]).tolist():
            if seqs[i].text.add(values[i]):  # a stop string
                codes[i] = STOPPED
        for i in np.flatnonzero(codes != NOT_FINISHED).tolist():
            self.finish(seqs[i], FINISH_REASONS[int(codes[i])])
        return seqs

    def _fork_all(self, rows: np.ndarray, seq_ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows and sequence ids of each sample, forking the rows that sampled ``n > 1``."""
        out_rows: list[int] = []
        out_ids: list[int] = []
        for row, seq_id, count in zip(rows.tolist(), seq_ids.tolist(), counts.tolist()):
            if count > 1 and self.table.seq_id[row] == seq_id:
                forked = self._fork(row)
                out_rows += forked
                out_ids += self.table.seq_id[forked].tolist()
            else:  # one sample, or a request that ended since (its samples are dropped)
                out_rows += [row] * count
                out_ids += [seq_id] * count
        return np.array(out_rows, dtype=np.int64), np.array(out_ids, dtype=np.int64)

    def _fork(self, row: int) -> list[int]:
        """The row of a request's first sequence and of its other ``n - 1`` completions, made right
        after its first sample (a forking step is processed before the next is scheduled): they
        share its KV blocks (copy-on-write) and pin its adapter slot too. A constrained parent's
        matcher is forked before any sample is accepted, so each completion accepts its own."""
        t = self.table
        parent = t.seqs[row]
        req = parent.request
        rows = [row]
        for i in range(1, req.params.n):
            text = parent.text.fork() if parent.text is not None else None
            matcher = parent.matcher.fork() if parent.matcher is not None else None
            child = Sequence(req, i, list(parent.token_ids), text, matcher)
            child.row = t.copy(row, child, req.seeds[i])
            self.adapters.hold(req.adapter_uid)
            t.slot[child.row] = self.adapters.acquire(req.adapter_uid)
            child.status = Status.RUNNING
            self.bm.fork(parent.seq_id, child.seq_id)
            self.running.append(child.row)
            req.seqs.append(child)
            rows.append(child.row)
        return rows

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a running or waiting sequence (finished or aborted) and free its resources."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq.row)
            self._release(seq)
        else:
            self.waiting.remove(seq)
        if seq.text is not None:
            seq.text.finish()
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.adapters.unhold(seq.request.adapter_uid)
        self.table.free(seq.row)
        req = seq.request
        # A request that ends before its first sample ends all n of its completions.
        req.num_finished = req.num_finished + 1 if len(req.seqs) == req.params.n else req.params.n
        if req.finished:
            self.requests.pop(req.request_id, None)

    def _release(self, seq: Sequence) -> None:
        t = self.table
        if self.bm.has_sequence(seq.seq_id):
            self.bm.free(seq.seq_id)
        self.adapters.release(int(t.slot[seq.row]))
        t.slot[seq.row] = -1
        t.num_computed[seq.row] = 0
