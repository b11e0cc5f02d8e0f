"""Requests and their sequences (one per completion when ``n > 1``)."""
from __future__ import annotations

import enum
import itertools
import time

from mcl_runtime.engine.params import CompletionOutput, RequestOutput, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids (prompt + output) and how many of them have KV in the cache.

    A step computes ``token_ids[num_computed:num_computed + n]``; when that reaches the end of
    ``token_ids`` the step also samples the next token. Prefill and decode differ only in ``n``.
    """

    _ids = itertools.count()

    def __init__(self, request: "Request", index: int, token_ids: list[int], seed: int) -> None:
        self.seq_id = next(Sequence._ids)
        self.request = request
        self.index = index
        self.token_ids = token_ids
        self.num_computed = 0
        self.seed = seed
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.text = ""
        self.detok = None       # IncrementalDetokenizer, set by the engine
        self.slot = -1          # adapter slot while running, -1 = base model
        self.matcher = None     # xgrammar GrammarMatcher of a constrained request (survives preemption)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.request.num_prompt_tokens:]

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 adapter: str | None, adapter_uid: int, max_tokens: int, seeds: list[int]) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.adapter = adapter
        self.adapter_uid = adapter_uid
        self.max_tokens = max_tokens
        self.seeds = seeds              # one per completion
        self.seqs: list[Sequence] = []
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.finished for s in self.seqs)

    def sample_seeds(self, seq: Sequence) -> list[int]:
        """Seeds of the samples ``seq`` draws now: all n completions' at the first sample."""
        if self.params.n > 1 and len(self.seqs) == 1 and seq.num_output_tokens == 0:
            return list(self.seeds)
        return [seq.seed]

    def output(self) -> RequestOutput:
        outs = [CompletionOutput(s.index, s.text, list(s.output_token_ids), s.finish_reason)
                for s in sorted(self.seqs, key=lambda s: s.index)]
        return RequestOutput(self.request_id, self.prompt_token_ids, outs, self.finished, self.adapter)
