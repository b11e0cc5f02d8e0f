"""Requests and their sequences (one per completion when ``n > 1``)."""

from __future__ import annotations

import enum
import itertools
import time

from mcl_runtime.engine.params import SamplingParams

PENDING = -1  # a sampled token not yet read back from the device (overlapped steps)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids (prompt + output) and how many of them have KV in the cache.

    A step computes ``token_ids[num_computed:num_computed + n]``; when that reaches the end of
    ``token_ids`` the step also samples the next token. Prefill and decode differ only in ``n``.
    A sampled token is appended as ``PENDING`` when its step is launched and gets its value when the
    step's tokens are processed (at once, or one step later with overlap).
    """

    __slots__ = (
        "seq_id",
        "request",
        "index",
        "token_ids",
        "num_computed",
        "row",
        "pending_row",
        "status",
        "finish_reason",
        "text",
        "slot",
        "matcher",
    )
    _ids = itertools.count()

    def __init__(self, request: Request, index: int, token_ids: list[int], row: int) -> None:
        self.seq_id = next(Sequence._ids)
        self.request = request
        self.index = index
        self.token_ids = token_ids
        self.num_computed = 0
        self.row = row  # in the scheduler's SequenceTable
        self.pending_row = -1  # where the PENDING token is in the last launched step's samples
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.text = None  # TextStream when the text is built every step, else None
        self.slot = -1  # adapter slot while running, -1 = base model
        self.matcher = None  # GrammarMatcher of a constrained request (survives preemption)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: str | None,
        adapter_uid: int,
        max_tokens: int,
        seeds: list[int],
        stream: bool = False,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.adapter = adapter
        self.adapter_uid = adapter_uid
        self.max_tokens = max_tokens
        self.seeds = seeds  # one per completion
        self.stream = stream  # a reader wants the text while it grows
        self.seqs: list[Sequence] = []
        self.num_finished = 0
        self.arrival_time = time.monotonic()

    @property
    def forked(self) -> bool:
        return len(self.seqs) == self.params.n

    @property
    def finished(self) -> bool:
        return self.num_finished == self.params.n
