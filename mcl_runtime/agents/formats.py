"""Grammars that make every agent answer parse, whatever the model (``--structured-output``).

Each step's answer format (the XML of retrieval with k problems, a plan, the verification's
explanation and confidence, code in one fenced block) is an EBNF grammar (xgrammar's dialect, as
vLLM's ``structured_outputs={"grammar": ...}`` takes it). Free-text fields are printable ASCII
without ``<`` and backticks (so they cannot close a tag or a fence early), start with a visible
character (so they are never blank) and have length caps: every token is at least one byte, so
an answer of at most ``max_tokens - 1`` bytes closes inside the token budget, EOS included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_TEXT = r"[\n\x20-\x3b\x3d-\x5f\x61-\x7e]"  # printable ASCII and newline, no '<' or '`'
_TEXT_START = r"[\x21-\x3b\x3d-\x5f\x61-\x7e]"
_CODE = r"[\t\n\x20-\x5f\x61-\x7e]"  # code may hold '<', not a backtick
_CODE_START = r"[\x21-\x5f\x61-\x7e]"
_CONFIDENCE = '("100" | [1-9]? [0-9])'
_CONFIDENCE_BYTES = 3


@dataclass(frozen=True)
class Field:
    """A capped free-text field; ``weight`` is its share of the bytes left after the literals."""

    weight: int
    code: bool = False


CONFIDENCE = object()  # the verification's 0-100 number
STEPS = ("retrieval", "planning", "verification", "coding", "debugging")


def _shape(step: str, k: int) -> list:
    """The answer of ``step`` as literals, ``Field``s and ``CONFIDENCE``."""
    if step == "retrieval":
        problem = [
            "<problem>\n<description>",
            Field(1),
            "</description>\n<code>\n```python\n",
            Field(2),
            "\n```\n</code>\n<planning>",
            Field(1),
            "</planning>\n</problem>\n",
        ]
        return ["<root>\n", *problem * k, "<algorithm>", Field(1), "</algorithm>\n</root>"]
    if step == "planning":
        return ["1. ", Field(1)]
    if step == "verification":
        return ["<root>\n<explanation>", Field(1), "</explanation>\n<confidence>", CONFIDENCE, "</confidence>\n</root>"]
    if step == "coding":
        return ["```python\n", Field(1, code=True), "\n```"]
    if step == "debugging":
        return [Field(1), "\n```python\n", Field(4, code=True), "\n```"]
    raise ValueError(f"no answer format for step {step!r}")


def answer_grammar(step: str, max_tokens: int, k: int = 1) -> str:
    """The EBNF grammar of ``step``'s answer, closing within ``max_tokens`` tokens."""
    shape = _shape(step, k)
    fixed = sum(len(p.encode()) for p in shape if isinstance(p, str)) + _CONFIDENCE_BYTES * shape.count(CONFIDENCE)
    fields = [p for p in shape if isinstance(p, Field)]
    room = max_tokens - 1 - fixed
    if room < 2 * len(fields):
        raise ValueError(
            f"max_tokens {max_tokens} is too small for a structured {step} answer "
            f"(needs at least {fixed + 1 + 2 * len(fields)})"
        )
    total = sum(f.weight for f in fields)
    rules, body = [], []
    for part in shape:
        if isinstance(part, str):
            body.append(json.dumps(part))
        elif part is CONFIDENCE:
            body.append(_CONFIDENCE)
        else:
            cap = room * part.weight // total
            name = f"field{len(rules)}"
            start, char = (_CODE_START, _CODE) if part.code else (_TEXT_START, _TEXT)
            rules.append(f"{name} ::= {start} {char}{{0,{cap - 1}}}")
            body.append(name)
    return "\n".join([f"root ::= {' '.join(body)}", *rules])


def structured_output(step: str, max_tokens: int, k: int = 1) -> dict[str, str]:
    """The ``structured_outputs`` body (vLLM's and this server's) that constrains ``step``'s answer."""
    return {"grammar": answer_grammar(step, max_tokens, k)}
