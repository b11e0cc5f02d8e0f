"""Continuous batching with chunked prefill and preemption by recompute.

Each step: (1) running sequences that decode get one token each, preempting the most recently
admitted running sequences when the KV cache is full; (2) running sequences still in prefill get
their next chunk; (3) waiting sequences are admitted first-come first-served while the token
budget, the sequence limit, KV blocks and adapter slots allow. A preempted sequence frees its
blocks and goes back to the front of the queue; it is recomputed later (the prefix cache usually
makes that cheap), never lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from mcl_runtime.engine.adapter_manager import AdapterManager
from mcl_runtime.engine.seq_table import SequenceTable
from mcl_runtime.engine.sequence import Request, Sequence, Status


@dataclass
class ScheduledBatch:
    table: SequenceTable
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # each sequence's SequenceTable row
    slots: list[int] = field(default_factory=list)  # each sequence's adapter slot (-1: base model)
    first_tokens: list[int] = field(default_factory=list)  # each sequence's first token computed now
    # tokens each sequence samples: 0 (mid-prefill), 1, or n at the first sample of an n > 1 request
    samples: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new.append(n)
        self.rows.append(seq.row)
        self.slots.append(seq.slot)
        self.first_tokens.append(seq.token_ids[seq.num_computed])
        self.samples.append(0 if seq.num_computed + n < len(seq.token_ids) else int(self.table.completions(seq.row)))

    def add_decodes(self, seqs: list[Sequence], rows: np.ndarray, slots: np.ndarray, tokens: list[int]) -> None:
        """``add(seq, 1)`` for each of ``seqs`` (table rows ``rows``, adapter slots ``slots``),
        sequences with one pending token ``tokens`` (each samples)."""
        self.seqs += seqs
        self.num_new += [1] * len(seqs)
        self.rows += rows.tolist()
        self.slots += slots.tolist()
        self.first_tokens += tokens
        self.samples += self.table.completions(rows).tolist()

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    @property
    def forks(self) -> bool:
        """True if a sequence forks into n completions after this step (so it must be processed at once)."""
        return any(k > 1 for k in self.samples)


class Scheduler:
    """Owns the sequences from admission to the end: batching, preemption, forking, finishing."""

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
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._state: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # see _running_state
        self.num_preemptions = 0
        self.num_cached_tokens = 0

    def add(self, req: Request, detok: bool, matcher=None) -> Sequence:
        """Queue a request's first sequence (it forks into ``n`` at its first sample); ``matcher``
        is its grammar matcher (structured output) or None."""
        row = self.table.add(req.params, req.max_tokens, req.seeds[0], detok, matcher is not None)
        seq = Sequence(req, 0, list(req.prompt_token_ids), row)
        self.table.seq_id[row] = seq.seq_id
        seq.matcher = matcher
        req.seqs.append(seq)
        self.adapters.hold(req.adapter_uid)
        self.waiting.append(seq)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch(self.table)
        budget = self.max_num_batched_tokens
        running, table = list(self.running), self.table
        rows, slots, pending = self._running_state()
        # A decode whose request has all its tokens launched waits for its last one to be processed.
        decoding = np.flatnonzero((pending == 1) & (table.num_sampled[rows] < table.max_out[rows]))[:budget]
        decodes = running if len(decoding) == len(running) else [running[i] for i in decoding]
        prefills = [running[i] for i in np.flatnonzero(pending != 1)]
        unsampled = [running[i] for i in np.flatnonzero(table.num_sampled[rows] == 0)]
        kept, tokens = self._reserve_decodes(decodes, rows[decoding])
        if len(kept) < len(decodes):
            decodes = [decodes[i] for i in kept.tolist()]
        decode_rows = rows[decoding][kept]
        batch.add_decodes(decodes, decode_rows, slots[decoding][kept], tokens)
        budget -= len(decodes)
        scheduled = set(table.seq_id[decode_rows].tolist()) if prefills else set()
        for seq in prefills:
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING:
                continue
            n = min(seq.num_pending, budget)
            if self._reserve(seq, n, scheduled):
                batch.add(seq, n)
                scheduled.add(seq.seq_id)
                budget -= n
        no_slot: list[Sequence] = []
        # A sequence that forks at its first sample needs room for all n completions.
        seats = len(self.running) + sum(
            int(table.completions(s.row)) - 1 for s in unsampled if s.status is Status.RUNNING
        )
        while self.waiting and budget > 0 and seats + table.completions(self.waiting[0].row) <= self.max_num_seqs:
            n = self._admit(self.waiting[0], budget)
            if n is None:  # every adapter slot is pinned: requests for resident adapters go first
                no_slot.append(self.waiting.popleft())
                continue
            if n == 0:
                break
            seq = self.waiting.popleft()
            self._run(seq)
            batch.add(seq, n)
            budget -= n
            seats += int(table.completions(seq.row))
        self.waiting.extendleft(reversed(no_slot))
        return batch

    def _running_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Table rows, adapter slots and pending token counts of the running sequences, rebuilt from
        them after the running set changes (``_run``, ``_stop``) or while one is mid-prefill. Once
        each has one pending token, every step keeps it so (a launched decode's next token is
        pending): decode steps reuse the arrays."""
        if self._state is None or not (self._state[2] == 1).all():
            running = self.running
            self._state = (
                np.fromiter((s.row for s in running), dtype=np.int64, count=len(running)),
                np.fromiter((s.slot for s in running), dtype=np.int64, count=len(running)),
                np.fromiter((len(s.token_ids) - s.num_computed for s in running), dtype=np.int64, count=len(running)),
            )
        return self._state

    def _run(self, seq: Sequence) -> None:
        self.running.append(seq)
        self._state = None

    def _stop(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._state = None

    def _reserve_decodes(self, decodes: list[Sequence], rows: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """One KV slot for each decode (table rows ``rows``), in order (one block-manager call while
        they fit); a decode that does not fit preempts as ``_reserve`` does. Returns the indices
        into ``decodes`` of those still running, in order (all of them unless the cache was full),
        and their pending tokens."""
        kept: list[np.ndarray] = []
        tokens: list[int] = []
        todo = np.arange(len(decodes))
        while len(todo):
            last = [
                s.token_ids[-1] for s in (decodes if len(todo) == len(decodes) else [decodes[i] for i in todo.tolist()])
            ]
            k = self.bm.append_one_each(self.table.seq_id[rows[todo]].tolist(), last)
            kept.append(todo[:k])
            tokens += last[:k]
            if k == len(todo):
                break
            scheduled = set(self.table.seq_id[rows[np.concatenate(kept)]].tolist())
            if self._reserve(decodes[todo[k]], 1, scheduled):
                kept.append(todo[k : k + 1])
                tokens.append(last[k])
            todo = np.array([i for i in todo[k + 1 :].tolist() if decodes[i].status is Status.RUNNING], dtype=np.int64)
        return (np.concatenate(kept) if kept else todo), tokens

    def _reserve(self, seq: Sequence, n: int, scheduled: set[int]) -> bool:
        """Reserve KV slots for ``n`` tokens of a running sequence, preempting the most recently
        admitted sequences not yet scheduled this step. False if ``seq`` itself was preempted."""
        tokens = seq.token_ids[seq.num_computed : seq.num_computed + n]
        while not self.bm.append_tokens(seq.seq_id, tokens):
            victim = next((s for s in reversed(self.running) if s.seq_id not in scheduled), None)
            if victim is None:
                return False
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Admit a waiting sequence with its first chunk; returns the chunk size, 0 if the KV cache
        is full, None if no adapter slot is free."""
        slot = self.adapters.acquire(seq.request.adapter_uid)
        if slot is None:
            return None
        cached = self.bm.add_sequence(seq.seq_id, seq.token_ids, seq.request.adapter_uid)
        n = min(seq.num_tokens - cached, budget)
        if not self.bm.append_tokens(seq.seq_id, seq.token_ids[cached : cached + n]):
            self.bm.free(seq.seq_id)
            self.adapters.release(slot)
            return 0
        seq.slot, seq.num_computed, seq.status = slot, cached, Status.RUNNING
        self.num_cached_tokens += cached
        return n

    def preempt(self, seq: Sequence) -> None:
        self._stop(seq)
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def fork(self, parent: Sequence) -> list[Sequence]:
        """The other ``n - 1`` completions of a running ``parent``'s request, right after its first
        sample (the step that forks is processed before the next one is scheduled): they share its
        KV blocks (copy-on-write) and hold its adapter slot too. A constrained parent's matcher is
        forked before any sample is accepted, so each completion accepts its own first token."""
        req = parent.request
        children = []
        for i in range(1, req.params.n):
            child = Sequence(req, i, list(parent.token_ids), self.table.copy(parent.row, req.seeds[i]))
            self.table.seq_id[child.row] = child.seq_id
            child.num_computed = parent.num_computed
            child.matcher = parent.matcher.fork() if parent.matcher is not None else None
            self.adapters.hold(req.adapter_uid)
            child.slot = self.adapters.acquire(req.adapter_uid)
            child.status = Status.RUNNING
            self.bm.fork(parent.seq_id, child.seq_id)
            self._run(child)
            req.seqs.append(child)
            children.append(child)
        return children

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a running or waiting sequence (finished or aborted) and free its resources."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self._stop(seq)
            self._release(seq)
        else:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.adapters.unhold(seq.request.adapter_uid)
        self.table.free(seq.row)
        req = seq.request
        req.num_finished = req.num_finished + 1 if req.forked else req.params.n

    def _release(self, seq: Sequence) -> None:
        if self.bm.has_sequence(seq.seq_id):
            self.bm.free(seq.seq_id)
        self.adapters.release(seq.slot)
        seq.slot = -1
        seq.num_computed = 0
