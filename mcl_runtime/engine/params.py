"""Request parameters and outputs of the public API."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mcl_runtime.errors import InvalidRequestError

_STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
OUTPUT_KINDS = ("cumulative", "delta", "final_only")


@dataclass(frozen=True)
class StructuredOutput:
    """What a constrained completion must match; exactly one field is set.

    ``json``: a JSON schema (dict or JSON text); ``json_object``: any JSON object; ``regex``: a
    regular expression the whole output matches; ``choice``: one of these strings; ``grammar``: an
    EBNF grammar (xgrammar's dialect, rule ``root``). JSON is compact unless ``any_whitespace``.
    ``StructuredOutput.of({"regex": "[0-9]+"})`` builds one from a dict with one key.
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    any_whitespace: bool = False

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"invalid structured output: {msg}")

        given = [k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise bad(f"give exactly one of {', '.join(_STRUCTURED_KINDS)} (got {given or 'none'})")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise bad("json must be a JSON schema (an object or its JSON text)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise bad(f"{name} must be a non-empty string")
        if self.choice is not None:
            if (
                isinstance(self.choice, str)
                or not isinstance(self.choice, (list, tuple))
                or not self.choice
                or any(not isinstance(c, str) or not c for c in self.choice)
            ):
                raise bad("choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))

    @classmethod
    def of(cls, spec: StructuredOutput | dict[str, Any]) -> StructuredOutput:
        if isinstance(spec, cls):
            return spec
        if not isinstance(spec, dict):
            raise InvalidRequestError(
                f"structured must be a StructuredOutput or a dict with one of the keys {', '.join(_STRUCTURED_KINDS)}"
            )
        unknown = set(spec) - set(_STRUCTURED_KINDS) - {"any_whitespace"}
        if unknown:
            raise InvalidRequestError(f"invalid structured output: unknown keys {sorted(unknown)}")
        return cls(**spec)

    @property
    def key(self) -> tuple[str, str, bool]:
        """(kind, source text, any_whitespace): what identifies the compiled grammar."""
        kind = next(k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False))
        value = getattr(self, kind)
        text = (
            json.dumps(value, sort_keys=True)
            if kind in ("json", "choice") and not isinstance(value, str)
            else str(value)
        )
        return kind, text, self.any_whitespace


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature == 0`` is greedy; ``top_k`` of -1 or 0 and
    ``top_p == 1`` disable those filters; ``stop`` strings end the text before the match;
    ``n`` completions share the prompt's KV blocks (copy-on-write).

    As in vLLM: ``min_tokens`` blocks EOS and ``stop_token_ids`` until that many tokens are out;
    ``repetition_penalty`` divides positive (multiplies negative) logits of tokens seen in the prompt
    or output; ``presence_penalty``/``frequency_penalty`` subtract from the logits of output tokens
    once / per occurrence; ``min_p`` drops tokens below ``min_p`` times the top probability.
    ``structured`` constrains the output (a ``StructuredOutput`` or a dict with one key).
    ``max_tokens=None`` allows the rest of the context. ``output_kind``: what each output of a
    request holds while it runs (``engine/outputs.py``): ``"cumulative"``, ``"delta"`` or
    ``"final_only"``."""

    max_tokens: int | None = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    structured: StructuredOutput | dict | None = None
    output_kind: str = "cumulative"
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"invalid sampling parameters: {msg}")

        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1
        ):
            raise bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise bad(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad(f"top_k must be -1 (off) or >= 0, got {self.top_k!r}")
        if not isinstance(self.n, int) or not 1 <= self.n <= 128:
            raise bad(f"n must be in [1, 128], got {self.n!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad(f"seed must be an integer, got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise bad("stop must be a non-empty string or a list of them")
        self.stop_strings = tuple(stops)
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids or []):
            raise bad("stop_token_ids must be non-negative integers")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 100:
            raise bad(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.structured is not None:
            self.structured = StructuredOutput.of(self.structured)
        if self.output_kind not in OUTPUT_KINDS:
            raise bad(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # None while running, then "stop" | "length" | "abort"


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    adapter: str | None = None
    first_token_time: float | None = None  # time.monotonic() when its first token was recorded

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
