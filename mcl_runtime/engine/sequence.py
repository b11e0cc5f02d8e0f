"""Requests and their sequences (one per completion when ``n > 1``).

Every field of a ``Sequence`` and every per-sequence column of the ``SequenceTable`` is written by
the scheduler, except the output marks (``sent_*``), written by the output builder (``outputs.py``).
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import TYPE_CHECKING

from mcl_runtime.engine.params import SamplingParams

if TYPE_CHECKING:
    from mcl_runtime.engine.outputs import TextStream


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A completion's token ids (prompt, then the recorded outputs) and its table row.

    ``token_ids`` holds only recorded tokens: a sample in flight (launched, not yet read back) is
    counted in its row's ``num_sampled`` and appended when its step is processed.
    """

    __slots__ = (
        "seq_id",
        "request",
        "index",
        "token_ids",
        "row",
        "status",
        "finish_reason",
        "text",
        "matcher",
        "sent_tokens",
        "sent_chars",
    )
    _ids = itertools.count()

    def __init__(self, request: Request, index: int, token_ids: list[int], text: TextStream | None, matcher) -> None:
        self.seq_id = next(Sequence._ids)
        self.request = request
        self.index = index
        self.token_ids = token_ids
        self.row = -1  # in the scheduler's SequenceTable
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.text = text  # TextStream when the text is built every step, else None
        self.matcher = matcher  # GrammarMatcher of a constrained request (survives preemption)
        self.sent_tokens = request.num_prompt_tokens  # output marks of delta outputs (outputs.py)
        self.sent_chars = 0

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


class Request:
    """What was asked (validated by the engine) and the sequences answering it."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: str | None,
        adapter_uid: int,
        max_tokens: int,
        seeds: list[int],
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.adapter = adapter
        self.adapter_uid = adapter_uid
        self.max_tokens = max_tokens
        self.seeds = seeds  # one per completion
        self.seqs: list[Sequence] = []
        self.num_finished = 0
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.num_finished == self.params.n
