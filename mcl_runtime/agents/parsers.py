"""Forgiving parsers for the four agents' answers; shared by the pipeline and the training module.

Each parser returns a result with ``ok`` (False is a format failure, counted per agent as the
MapCoder-Lite paper reports them) and ``error`` (why), plus whatever could be salvaged, so a bad
answer never stops the pipeline. Stray text around the answer, code fences around XML, missing
closing tags, CDATA sections, XML entities and unclosed code fences (truncated answers) are
tolerated. What counts as a failure:
  retrieval     no recalled problem with a description or a plan, or no algorithm section
  planning      an empty answer
  verification  no confidence number
  coding        no code: neither a fenced block nor an answer that is valid Python as a whole
  debugging     as coding
"""

from __future__ import annotations

import ast
import html
import re
from dataclasses import asdict, dataclass, field

SECTION_TAGS = ("root", "problem", "description", "code", "planning", "algorithm", "explanation", "confidence")
_NEXT_TAG = re.compile(rf"</?(?:{'|'.join(SECTION_TAGS)})\b[^<>]*>", re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n`]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("", "python", "python3", "py", "py3")


@dataclass
class Parsed:
    ok: bool
    error: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Exemplar:
    description: str
    code: str
    planning: str


@dataclass
class RetrievalParse(Parsed):
    exemplars: list[Exemplar] = field(default_factory=list)
    algorithm: str = ""


@dataclass
class PlanParse(Parsed):
    plan: str = ""


@dataclass
class VerificationParse(Parsed):
    confidence: int = 0
    explanation: str = ""


@dataclass
class CodeParse(Parsed):
    code: str = ""
    notes: str = ""  # the text before the code (the debugging agent's revised plan)


def _clean(text: str) -> str:
    text = re.sub(r"^\s*<!\[CDATA\[(.*?)(\]\]>\s*)?$", r"\1", text, flags=re.DOTALL)
    if text.count("```") % 2:  # a fence that wrapped the whole XML answer, cut in half
        text = re.sub(r"```\w*\s*$", "", text.rstrip())
    return html.unescape(text).strip()


def extract_tag(text: str, name: str) -> str | None:
    """Content of the first <name> element; without a closing tag, up to the next section tag."""
    m = re.search(rf"<{name}\b[^<>]*>", text, re.IGNORECASE)
    if not m:
        return None
    rest = text[m.end() :]
    close = re.search(rf"</{name}\s*>", rest, re.IGNORECASE)
    if close:
        return _clean(rest[: close.start()])
    nxt = _NEXT_TAG.search(rest)
    return _clean(rest[: nxt.start()] if nxt else rest)


def _strip_fence(text: str) -> str:
    blocks = _FENCE.findall(text)
    if blocks:
        return blocks[-1][1].strip("\n")
    return re.sub(r"^```[^\n]*\n?", "", text.strip()).strip()


def parse_retrieval(text: str, k: int | None = None) -> RetrievalParse:
    chunks = re.split(r"<problem\b[^<>]*>", text, flags=re.IGNORECASE)[1:]
    exemplars = []
    for chunk in chunks:
        chunk = re.split(r"</problem\s*>|<algorithm\b", chunk, flags=re.IGNORECASE)[0]
        ex = Exemplar(
            extract_tag(chunk, "description") or "",
            _strip_fence(extract_tag(chunk, "code") or ""),
            extract_tag(chunk, "planning") or "",
        )
        if ex.description or ex.planning:
            exemplars.append(ex)
    exemplars = exemplars[:k] if k else exemplars
    algorithm = extract_tag(text, "algorithm") or ""
    missing = [what for what, present in (("recalled problems", exemplars), ("algorithm", algorithm)) if not present]
    return RetrievalParse(not missing, f"missing {' and '.join(missing)}" if missing else "", exemplars, algorithm)


def parse_plan(text: str) -> PlanParse:
    plan = text.strip()
    plan = re.sub(r"^#*\s*(plan(ning)?)\s*:?\s*\n", "", plan, flags=re.IGNORECASE).strip()
    return PlanParse(bool(plan), "" if plan else "empty answer", plan)


def _confidence_number(text: str) -> float | None:
    raw = extract_tag(text, "confidence")
    m = re.search(r"-?\d+(?:\.\d+)?", raw) if raw is not None else None
    if m is not None:
        return float(m.group(0))
    m = re.search(r"confidence\W{0,20}?(-?\d+(?:\.\d+)?)", text, re.IGNORECASE)
    return float(m.group(1)) if m else None


def parse_verification(text: str) -> VerificationParse:
    explanation = extract_tag(text, "explanation") or ""
    value = _confidence_number(text)
    if value is None:
        return VerificationParse(False, "no confidence number", 0, explanation)
    return VerificationParse(True, "", int(min(100.0, max(0.0, value))), explanation)


def _last_python_block(text: str) -> re.Match | None:
    blocks = list(_FENCE.finditer(text))
    python = [b for b in blocks if b.group(1).lower() in _PYTHON_TAGS]
    return (python or blocks or [None])[-1]


def parse_code(text: str) -> CodeParse:
    """The last fenced (preferably Python) block; else an unclosed fence's tail; else bare code."""
    block = _last_python_block(text)
    if block is not None:
        code = block.group(2).strip("\n")
        ok = bool(code.strip())
        return CodeParse(ok, "" if ok else "empty code block", code, text[: block.start()].strip())
    if "```" in text:
        notes, _, tail = text.rpartition("```")
        code = tail.split("\n", 1)[1].strip("\n") if "\n" in tail else ""
        ok = bool(code.strip())
        return CodeParse(ok, "" if ok else "empty unclosed code block", code, notes.strip())
    return _bare_code(text)


def _bare_code(text: str) -> CodeParse:
    code = text.strip()
    if not code:
        return CodeParse(False, "empty answer")
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return CodeParse(False, "no code block and the answer is not Python", code)
    return CodeParse(True, "", code)


def parse_debugging(text: str) -> CodeParse:
    return parse_code(text)
