"""Per-sequence step state in preallocated numpy arrays, one row per unfinished sequence.

The scheduler gives each sequence a row when it is added and frees it when the sequence ends.
Per step, everything that is the same computation for every sequence is one vectorised operation
over the rows of the step's samplers: the sampling parameters of the batch (penalties, min_tokens,
min_p included), the count of sampled and recorded tokens, and the finish check (EOS / stop token
ids, max tokens). ``constrained`` marks the rows with a grammar matcher: only those pay for it.
"""

from __future__ import annotations

import numpy as np

from mcl_runtime.engine.params import SamplingParams

NOT_FINISHED, STOPPED, LENGTH = 0, 1, 2
FINISH_REASONS = {STOPPED: "stop", LENGTH: "length"}


class SequenceTable:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], capacity: int = 256) -> None:
        self.vocab_size = vocab_size
        self.eos = list(eos_token_ids)
        self._free: list[int] = []
        self._next = 0
        self._alloc(capacity, max(1, len(self.eos)))

    def _alloc(self, rows: int, stop_width: int) -> None:
        def grow(name: str, shape: tuple[int, ...], dtype, fill) -> None:
            new = np.full(shape, fill, dtype=dtype)
            old = getattr(self, name, None)
            if old is not None:
                new[tuple(slice(0, n) for n in old.shape)] = old
            setattr(self, name, new)

        grow("temperature", (rows,), np.float32, 0)
        grow("top_k", (rows,), np.int64, self.vocab_size)
        grow("top_p", (rows,), np.float32, 1)
        grow("seed", (rows,), np.int64, 0)
        grow("min_p", (rows,), np.float32, 0)
        grow("repetition", (rows,), np.float32, 1)
        grow("presence", (rows,), np.float32, 0)
        grow("frequency", (rows,), np.float32, 0)
        grow("min_out", (rows,), np.int64, 0)  # min_tokens: stop ids are banned below it
        grow("max_out", (rows,), np.int64, 0)  # output tokens allowed (max_tokens and the context)
        grow("num_sampled", (rows,), np.int64, 0)  # samples launched (the next sample's index)
        grow("num_out", (rows,), np.int64, 0)  # tokens recorded
        grow("detok", (rows,), bool, False)  # text is built every step (stop strings or streaming)
        grow("constrained", (rows,), bool, False)  # has a grammar matcher (structured output)
        grow("n", (rows,), np.int64, 1)  # completions of the request (it forks at its first sample)
        grow("seq_id", (rows,), np.int64, -1)  # the row's Sequence.seq_id (the block manager's key)
        grow("stop_ids", (rows, stop_width), np.int64, -1)  # EOS (unless ignored) and stop_token_ids

    def add(self, params: SamplingParams, max_out: int, seed: int, detok: bool, constrained: bool = False) -> int:
        row = self._free.pop() if self._free else self._take()
        self.n[row] = params.n
        stops = [] if params.ignore_eos else self.eos
        stops = list(dict.fromkeys(stops + list(params.stop_token_ids or ())))
        if len(stops) > self.stop_ids.shape[1]:
            self._alloc(len(self.temperature), len(stops))
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k if params.top_k > 0 else self.vocab_size
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p
        self.repetition[row] = params.repetition_penalty
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        self.min_out[row] = params.min_tokens
        self.seed[row] = np.uint64(seed).view(np.int64)
        self.max_out[row] = max_out
        self.num_sampled[row] = self.num_out[row] = 0
        self.detok[row] = detok
        self.constrained[row] = constrained
        self.stop_ids[row] = -1
        self.stop_ids[row, : len(stops)] = stops
        return row

    def _take(self) -> int:
        if self._next == len(self.temperature):
            self._alloc(2 * self._next, self.stop_ids.shape[1])
        self._next += 1
        return self._next - 1

    def copy(self, src: int, seed: int) -> int:
        """A new row with ``src``'s state (an ``n > 1`` child), its own seed."""
        row = self._free.pop() if self._free else self._take()
        for name in (
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repetition",
            "presence",
            "frequency",
            "min_out",
            "max_out",
            "num_sampled",
            "num_out",
            "detok",
            "constrained",
            "n",
            "stop_ids",
        ):
            getattr(self, name)[row] = getattr(self, name)[src]
        self.seed[row] = np.uint64(seed).view(np.int64)
        return row

    def completions(self, rows: np.ndarray | int) -> np.ndarray:
        """The running sequences each row stands for: its request's n until its first sample (where
        the request forks into n sequences), then 1."""
        return np.where(self.num_sampled[rows] == 0, self.n[rows], 1)

    def penalized(self, rows: np.ndarray) -> bool:
        return bool((self.repetition[rows] != 1).any() or self.presence[rows].any() or self.frequency[rows].any())

    def banned(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into ``rows``, token id) pairs to mask: the stop ids (EOS unless ignored, and
        stop_token_ids) of rows with fewer than min_tokens samples so far."""
        short = self.num_sampled[rows] < self.min_out[rows]
        if not short.any():
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ids = np.where(short[:, None], self.stop_ids[rows], -1)
        which, col = np.nonzero(ids >= 0)
        return which, ids[which, col]

    def free(self, row: int) -> None:
        self.seq_id[row] = -1
        self._free.append(row)

    def record(self, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Count one recorded token per row; returns each row's finish code (``NOT_FINISHED``,
        ``STOPPED`` on EOS or a stop id, ``LENGTH`` at max tokens)."""
        self.num_out[rows] += 1
        stopped = (self.stop_ids[rows] == tokens[:, None]).any(axis=1)
        full = self.num_out[rows] >= self.max_out[rows]
        return np.where(stopped, STOPPED, np.where(full, LENGTH, NOT_FINISHED))
