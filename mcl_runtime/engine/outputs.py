"""What a step hands back: cheap snapshots of each progressed request, text built when read.

A sequence's text is built every step only when it must be: its request has stop strings (the
engine has to find them) or streams (``add_request(stream=True)``, as ``AsyncEngine`` does). Such a
sequence has a ``TextStream``: incremental detokenization into an append-only list of pieces, so a
snapshot is a piece count and a character limit, and never copies the text. Other sequences build
their text from their token ids when ``CompletionOutput.text`` is first read (one decode).
"""

from __future__ import annotations

from collections.abc import Iterable

from mcl_runtime.engine.params import CompletionOutput, RequestOutput
from mcl_runtime.engine.sequence import PENDING, Request, Sequence
from mcl_runtime.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, Tokenizer


class TextStream:
    """Incremental text of one sequence, with stop-string search over the new characters.

    Appended to by the engine thread only; ``text(k, limit)`` may be read from any thread
    (pieces are never changed once appended, and the join cache is one tuple swapped atomically).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stops: tuple[str, ...]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = stops
        self._keep = max(map(len, stops), default=1) - 1  # tail chars a stop may start in
        self.pieces: list[str] = []
        self.num_chars = 0
        self._tail = ""
        self.final: str | None = None
        self._joined: tuple[int, str] = (0, "")

    def add(self, token: int) -> bool:
        """Append one token's text; True if a stop string now occurs (the final text is cut before it)."""
        return self._append(self._detok.add_token(token))

    def _append(self, delta: str) -> bool:
        if not delta:
            return False
        self.pieces.append(delta)
        if not self.stops:
            self.num_chars += len(delta)
            return False
        start = self.num_chars - len(self._tail)
        self.num_chars += len(delta)
        window = self._tail + delta
        for stop in self.stops:
            at = window.find(stop)
            if at >= 0:
                self.final = self.text(len(self.pieces), start + at)
                return True
        self._tail = window[-self._keep :] if self._keep else ""
        return False

    def finish(self) -> None:
        """The sequence ended without a stop string: flush the held-back bytes."""
        if self.final is None:
            self._append(self._detok.flush())
            if self.final is None:
                self.final = self.text(len(self.pieces), self.num_chars)

    def safe_len(self) -> int:
        """Characters that can be shown while running: a tail that may begin a stop string is held back."""
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self._tail)), hold, -1):
                if self._tail.endswith(stop[:k]):
                    hold = k
                    break
        return self.num_chars - hold

    def text(self, num_pieces: int, limit: int) -> str:
        k, joined = self._joined
        if k < num_pieces:
            joined += self.pieces[k] if k + 1 == num_pieces else "".join(self.pieces[k:num_pieces])
            self._joined = (num_pieces, joined)
        elif k > num_pieces:
            joined = "".join(self.pieces[:num_pieces])
        return joined[:limit]


class _Snapshot(CompletionOutput):
    """A ``CompletionOutput`` whose token ids and text are taken from its sequence when first read."""

    __slots__ = ("_seq", "_tokenizer", "_end", "_text", "_pieces", "_chars", "_token_ids")

    def __init__(self, seq: Sequence, tokenizer: Tokenizer) -> None:
        self.index = seq.index
        self.finish_reason = seq.finish_reason
        self._seq = seq
        self._tokenizer = tokenizer
        self._token_ids = None
        ids = seq.token_ids
        end = len(ids)
        while ids[end - 1] == PENDING:
            end -= 1
        self._end = end
        stream = seq.text
        if stream is None:
            self._text = None
            self._pieces = -1
        elif stream.final is not None:
            self._text = stream.final
        else:
            self._text = None
            self._pieces = len(stream.pieces)
            self._chars = stream.safe_len() if stream.stops else stream.num_chars

    @property
    def token_ids(self) -> list[int]:
        if self._token_ids is None:
            self._token_ids = self._seq.token_ids[self._seq.request.num_prompt_tokens : self._end]
        return self._token_ids

    @token_ids.setter
    def token_ids(self, value: list[int]) -> None:
        self._token_ids = value

    @property
    def text(self) -> str:
        if self._text is None:
            if self._pieces >= 0:
                self._text = self._seq.text.text(self._pieces, self._chars)
            else:
                text = self._tokenizer.decode(self.token_ids)
                self._text = text if self.finish_reason else text.rstrip(REPLACEMENT_CHAR)
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text = value


def _by_index(seq: Sequence) -> int:
    return seq.index


def request_outputs(reqs: Iterable[Request], tokenizer: Tokenizer) -> list[RequestOutput]:
    """Each request's outputs as of now (O(number of completions), nothing copied)."""
    outs = []
    for req in reqs:
        seqs = req.seqs
        snaps = (
            [_Snapshot(seqs[0], tokenizer)]
            if len(seqs) == 1
            else [_Snapshot(s, tokenizer) for s in sorted(seqs, key=_by_index)]
        )
        outs.append(
            RequestOutput(req.request_id, req.prompt_token_ids, snaps, req.num_finished == req.params.n, req.adapter)
        )
    return outs
