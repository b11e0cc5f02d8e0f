"""Per-sequence state as numpy columns, one row per unfinished sequence, owned by the scheduler.

A row holds everything about a sequence that a step reads or writes for all sequences at once:
its sampling parameters, its adapter slot, its token counts, where its in-flight token is, and its
finish conditions. Per step, each of these is one vectorised operation over the step's rows; the
``Sequence`` object of a row (``seqs[row]``) keeps only what varies in length (token ids, text).

Token counts of a row: ``num_prompt`` prompt tokens, then ``num_sampled`` samples launched, of which
``num_out`` are recorded (their values read back); the sequence has ``num_prompt + num_sampled``
tokens, ``num_computed`` of them with KV in the cache. A launched but unrecorded sample is *in
flight*: its value is on the device, at index ``pending`` of the last launched step's samples, and
``last_token`` is ``PENDING``; recording it sets ``last_token`` to its value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mcl_runtime.engine.params import SamplingParams

if TYPE_CHECKING:
    from mcl_runtime.engine.sequence import Sequence

NOT_FINISHED, STOPPED, LENGTH = 0, 1, 2
FINISH_REASONS = {STOPPED: "stop", LENGTH: "length"}
PENDING = -1  # the token id of a sample not yet read back from the device

# name: (dtype, fill of a free row)
_COLUMNS: dict[str, tuple[type, object]] = {
    # sampling parameters
    "temperature": (np.float32, 0),
    "top_k": (np.int64, 0),  # vocabulary size when off (set per row)
    "top_p": (np.float32, 1),
    "min_p": (np.float32, 0),
    "seed": (np.int64, 0),
    "repetition": (np.float32, 1),
    "presence": (np.float32, 0),
    "frequency": (np.float32, 0),
    "min_out": (np.int64, 0),  # min_tokens: stop ids are banned below it
    "max_out": (np.int64, 0),  # output tokens allowed (max_tokens within the context)
    "n": (np.int64, 1),  # completions of the request (it forks at its first sample)
    "detok": (bool, False),  # text is built every step (stop strings or a streamed request)
    "constrained": (bool, False),  # has a grammar matcher (structured output)
    # state
    "seq_id": (np.int64, -1),  # the row's Sequence.seq_id (the block manager's key); -1 when free
    "slot": (np.int64, -1),  # adapter slot while running, -1 = base model or not running
    "num_prompt": (np.int64, 0),
    "num_sampled": (np.int64, 0),
    "num_out": (np.int64, 0),
    "num_computed": (np.int64, 0),
    "last_token": (np.int64, PENDING),
    "pending": (np.int64, -1),
}
_COPIED = [name for name in _COLUMNS if name not in ("seq_id", "seed")]


class SequenceTable:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], capacity: int = 256) -> None:
        self.vocab_size = vocab_size
        self.eos = list(eos_token_ids)
        self.seqs: list[Sequence | None] = []
        self._free: list[int] = []
        self._grow(capacity, max(1, len(self.eos)))

    def _grow(self, rows: int, stop_width: int) -> None:
        """Columns of ``rows`` rows (existing values kept) and ``stop_ids`` ``stop_width`` wide."""
        old = len(self.seqs)
        for name, (dtype, fill) in _COLUMNS.items():
            column = np.full(rows, fill, dtype=dtype)
            if old:
                column[:old] = getattr(self, name)
            setattr(self, name, column)
        stop_ids = np.full((rows, stop_width), -1, dtype=np.int64)  # EOS (unless ignored) and stop_token_ids
        if old:
            prev = self.stop_ids
            stop_ids[:old, : prev.shape[1]] = prev
        self.stop_ids = stop_ids
        self.seqs += [None] * (rows - old)
        self._free += range(rows - 1, old - 1, -1)

    def _take(self) -> int:
        if not self._free:
            self._grow(2 * len(self.seqs), self.stop_ids.shape[1])
        return self._free.pop()

    def add(self, params: SamplingParams, max_out: int, seed: int, detok: bool, constrained: bool = False) -> int:
        """A row with a request's sampling parameters; ``attach`` gives it its sequence."""
        stops = [] if params.ignore_eos else self.eos
        stops = list(dict.fromkeys(stops + list(params.stop_token_ids or ())))
        if len(stops) > self.stop_ids.shape[1]:
            self._grow(len(self.seqs), len(stops))
        row = self._take()
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k if params.top_k > 0 else self.vocab_size
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p
        self.seed[row] = np.uint64(seed).view(np.int64)
        self.repetition[row] = params.repetition_penalty
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        self.min_out[row] = params.min_tokens
        self.max_out[row] = max_out
        self.n[row] = params.n
        self.detok[row] = detok
        self.constrained[row] = constrained
        self.stop_ids[row, : len(stops)] = stops
        return row

    def attach(self, row: int, seq: Sequence) -> None:
        """``seq`` (not yet started: its token ids are its prompt) is the sequence of ``row``."""
        self.seqs[row] = seq
        self.seq_id[row] = seq.seq_id
        self.num_prompt[row] = len(seq.token_ids)
        self.last_token[row] = seq.token_ids[-1]

    def copy(self, src: int, seq: Sequence, seed: int) -> int:
        """A row for ``seq`` with ``src``'s state (an ``n > 1`` completion), its own seed."""
        row = self._take()
        self.seqs[row] = seq
        for name in _COPIED:
            column = getattr(self, name)
            column[row] = column[src]
        self.stop_ids[row] = self.stop_ids[src]
        self.seq_id[row] = seq.seq_id
        self.seed[row] = np.uint64(seed).view(np.int64)
        return row

    def free(self, row: int) -> None:
        self.seqs[row] = None
        for name, (_, fill) in _COLUMNS.items():
            getattr(self, name)[row] = fill
        self.stop_ids[row] = -1
        self._free.append(row)

    def num_tokens(self, rows: np.ndarray | int) -> np.ndarray:
        return self.num_prompt[rows] + self.num_sampled[rows]

    def completions(self, rows: np.ndarray | int) -> np.ndarray:
        """The running sequences each row stands for: its request's n until its first sample (where
        the request forks into n sequences), then 1."""
        return np.where(self.num_sampled[rows] == 0, self.n[rows], 1)

    def penalized(self, rows: np.ndarray) -> bool:
        return bool((self.repetition[rows] != 1).any() or self.presence[rows].any() or self.frequency[rows].any())

    def banned(self, rows: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into ``rows``, token id) pairs to mask: the stop ids (EOS unless ignored, and
        stop_token_ids) of rows whose sample index ``steps`` is below min_tokens."""
        short = steps < self.min_out[rows]
        if not short.any():
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ids = np.where(short[:, None], self.stop_ids[rows], -1)
        which, col = np.nonzero(ids >= 0)
        return which, ids[which, col]

    def record(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Record one sampled token per row; returns each row's finish code (``NOT_FINISHED``,
        ``STOPPED`` on EOS or a stop id, ``LENGTH`` at max tokens). A row whose newest sample this
        is gets it as its last token."""
        self.num_out[rows] += 1
        newest = self.num_out[rows] == self.num_sampled[rows]
        self.last_token[rows[newest]] = tokens[newest]
        self.pending[rows[newest]] = -1
        stopped = (self.stop_ids[rows] == tokens[:, None]).any(axis=1)
        full = self.num_out[rows] >= self.max_out[rows]
        return np.where(stopped, STOPPED, np.where(full, LENGTH, NOT_FINISHED))
