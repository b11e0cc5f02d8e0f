"""What a step hands back: cheap snapshots of each progressed request, text built when read.

A sequence's text is built every step only when it must be: its request has stop strings (the
scheduler has to find them) or is streamed (``add_request(stream=True)`` or ``output_kind="delta"``).
Such a sequence has a ``TextStream``: incremental detokenization into an append-only list of pieces.
A snapshot holds character offsets into it and joins only its own range when read, so a delta
output costs what its new text costs, whatever the length so far. Other sequences build their text
when ``CompletionOutput.text`` is first read, by the same incremental detokenization replayed over
their token ids: every output's text comes from one path, so a request's text does not depend on
whether it was streamed.

Per request, ``SamplingParams.output_kind`` says what a step's output holds (vLLM's kinds):
``"cumulative"`` everything so far, ``"delta"`` what is new since the request's last output (token
ids and text), ``"final_only"`` nothing until the request ends, then everything.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from mcl_runtime.engine.params import CompletionOutput, RequestOutput
from mcl_runtime.engine.sequence import Request, Sequence
from mcl_runtime.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    """Incremental text of one sequence, with stop-string search over the new characters.

    Appended to by the engine thread only; ``text(start, end)`` may be read from any thread for
    offsets up to a ``visible()`` taken earlier (pieces and their end offsets are append-only).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stops: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._prompt_ids = prompt_ids
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = stops
        self._keep = max(map(len, stops), default=1) - 1  # tail chars a stop may start in
        self._pieces: list[str] = []
        self._ends: list[int] = []  # offset after each piece
        self._tail = ""
        self.num_chars = 0
        self.final_len: int | None = None  # set when the sequence ends (cut before a stop string)

    def fork(self) -> TextStream:
        """An empty stream for another completion of the same prompt."""
        return TextStream(self._tokenizer, self._prompt_ids, self.stops)

    def add(self, token: int) -> bool:
        """Append one token's text; True if a stop string now occurs (the text ends before it)."""
        delta = self._detok.add_token(token)
        if not delta:
            return False
        start = self.num_chars - len(self._tail)
        self._append(delta)
        if not self.stops:
            return False
        window = self._tail + delta
        for stop in self.stops:
            at = window.find(stop)
            if at >= 0:
                self.final_len = start + at
                return True
        self._tail = window[-self._keep :] if self._keep else ""
        return False

    def _append(self, delta: str) -> None:
        self._pieces.append(delta)
        self.num_chars += len(delta)
        self._ends.append(self.num_chars)

    def finish(self) -> None:
        """The sequence ended: flush the held-back bytes unless a stop string ended it."""
        if self.final_len is None:
            delta = self._detok.flush()
            if delta:
                self._append(delta)
            self.final_len = self.num_chars

    def visible(self) -> int:
        """Characters that can be shown: all of them once ended; while running, a tail that may
        begin a stop string is held back."""
        if self.final_len is not None:
            return self.final_len
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self._tail)), hold, -1):
                if self._tail.endswith(stop[:k]):
                    hold = k
                    break
        return self.num_chars - hold

    def text(self, start: int, end: int) -> str:
        """Characters ``start:end`` of the text."""
        if start >= end:
            return ""
        first = bisect_right(self._ends, start)
        last = bisect_left(self._ends, end)
        base = self._ends[first] - len(self._pieces[first])
        if first == last:
            return self._pieces[first][start - base : end - base]
        return "".join(self._pieces[first : last + 1])[start - base : end - base]


class _Snapshot(CompletionOutput):
    """A ``CompletionOutput`` whose token ids and text are taken from its sequence when first read:
    tokens ``[first_token, end_token)`` and characters ``[first_char, end_char)`` of its text."""

    __slots__ = ("_seq", "_tokenizer", "_text", "_token_ids", "_range")

    def __init__(self, seq: Sequence, tokenizer: Tokenizer, delta: bool) -> None:
        self.index = seq.index
        self.finish_reason = seq.finish_reason
        self._seq = seq
        self._tokenizer = tokenizer
        self._text = self._token_ids = None
        end_token = len(seq.token_ids)
        first_token = seq.sent_tokens if delta else seq.request.num_prompt_tokens
        end_char = seq.text.visible() if seq.text is not None else -1
        first_char = seq.sent_chars if delta else 0
        self._range = (first_token, end_token, first_char, end_char)
        if delta:
            seq.sent_tokens, seq.sent_chars = end_token, end_char

    @property
    def token_ids(self) -> list[int]:
        if self._token_ids is None:
            self._token_ids = self._seq.token_ids[self._range[0] : self._range[1]]
        return self._token_ids

    @token_ids.setter
    def token_ids(self, value: list[int]) -> None:
        self._token_ids = value

    @property
    def text(self) -> str:
        if self._text is None:
            _, _, first_char, end_char = self._range
            if end_char >= 0:
                self._text = self._seq.text.text(first_char, end_char)
            else:  # the same detokenization, replayed over the tokens
                detok = IncrementalDetokenizer(self._tokenizer, self._seq.request.prompt_token_ids)
                text = "".join([detok.add_token(t) for t in self.token_ids])
                self._text = text + detok.flush() if self.finish_reason else text
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text = value


def _by_index(seq: Sequence) -> int:
    return seq.index


def request_outputs(reqs: Iterable[Request], tokenizer: Tokenizer) -> list[RequestOutput]:
    """Each request's output as of now, as its ``output_kind`` asks (O(completions), nothing copied)."""
    outs = []
    for req in reqs:
        kind = req.params.output_kind
        finished = req.finished
        if kind == "final_only" and not finished:
            continue
        seqs = req.seqs
        delta = kind == "delta"
        snaps = (
            [_Snapshot(seqs[0], tokenizer, delta)]
            if len(seqs) == 1
            else [_Snapshot(s, tokenizer, delta) for s in sorted(seqs, key=_by_index)]
        )
        outs.append(
            RequestOutput(req.request_id, req.prompt_token_ids, snaps, finished, req.adapter, req.first_token_time)
        )
    return outs
