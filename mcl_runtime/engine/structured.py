"""Grammar-constrained decoding with xgrammar (the library vLLM and SGLang use).

``Grammars`` compiles a ``StructuredOutput`` once per (tokenizer, grammar) and hands out one
``GrammarMatcher`` per sequence; ``GrammarMasker`` fills the token bitmask of every constrained
row of a step in one batched (multi-threaded) call and applies it to the logits in one call.
Rows without a matcher are neither filled nor masked, so their logits are untouched. The engine
accepts each sampled token into its sequence's matcher when it processes the step's tokens.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import OrderedDict

import torch
import xgrammar as xgr

from mcl_runtime.engine.params import StructuredOutput
from mcl_runtime.errors import InvalidRequestError
from mcl_runtime.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> xgr.TokenizerInfo:
    """xgrammar's view of ``tokenizer`` over the model's ``vocab_size`` logits.

    The vocabulary type (byte-level, byte-fallback, raw) and prefix-space handling are detected by
    xgrammar from the ``tokenizers`` backend; special added tokens (``<|im_start|>``...) get an empty
    encoding, so a grammar never emits them as text (they decode to nothing). Ids past the
    tokenizer's vocabulary (padded embeddings) are never allowed.
    """
    from transformers import PreTrainedTokenizerFast

    with warnings.catch_warnings():  # it warns when it has to guess stop ids, which are not used here
        warnings.simplefilter("ignore")
        detected = xgr.TokenizerInfo.from_huggingface(
            PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend), vocab_size=vocab_size
        )
    encoded = [""] * vocab_size
    for token, idx in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if idx < vocab_size:
            encoded[idx] = token
    for idx, added in tokenizer.backend.get_added_tokens_decoder().items():
        if added.special and idx < vocab_size:
            encoded[idx] = ""
    return xgr.TokenizerInfo(
        encoded,
        detected.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=tokenizer.eos_token_ids or None,
        add_prefix_space=detected.add_prefix_space,
    )


class Grammars:
    """Compiles structured-output specs for one tokenizer, caching the compiled grammars."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 256) -> None:
        self.compiler = xgr.GrammarCompiler(tokenizer_info(tokenizer, vocab_size), cache_enabled=False)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, xgr.CompiledGrammar] = OrderedDict()
        self.num_compiled = 0

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """The compiled grammar of ``spec``; one that cannot be compiled raises ``InvalidRequestError``
        with the compiler's message."""
        key = spec.key
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            compiled = self._compile(spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidRequestError(f"cannot compile the {key[0]} constraint: {_compiler_message(exc)}") from exc
        self.num_compiled += 1
        self._cache[key] = compiled
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        if spec.json is not None or spec.json_object:
            schema = spec.json if spec.json is not None else {"type": "object"}
            grammar = xgr.Grammar.from_json_schema(
                schema if isinstance(schema, str) else json.dumps(schema), any_whitespace=spec.any_whitespace
            )
            return self.compiler.compile_grammar(_strict_strings(str(grammar)))
        if spec.regex is not None:
            return self.compiler.compile_regex(spec.regex)
        if spec.choice is not None:
            return self.compiler.compile_grammar(
                "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
            )
        return self.compiler.compile_grammar(spec.grammar)

    def matcher(self, spec: StructuredOutput) -> Constraint:
        return Constraint(xgr.GrammarMatcher(self.compile(spec)))


class Constraint:
    """One constrained sequence's grammar state: the masker fills its next-token mask from
    ``matcher``; each sampled token advances it."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self.matcher = matcher

    def fork(self) -> Constraint:
        return Constraint(self.matcher.fork())

    def accept(self, token: int) -> bool:
        """Advance by the sampled ``token``; True when the constrained output is over (its stop
        token accepted, or a token it cannot accept)."""
        if not self.matcher.accept_token(token):
            logger.warning("grammar matcher rejected token %d; ending the constrained sequence", token)
            return True
        return self.matcher.is_terminated()


def _strict_strings(ebnf: str) -> str:
    """xgrammar 0.2.9 writes length-bounded JSON strings (minLength/maxLength) as ``[^"\\\r\n]{m,n}``,
    which lets raw control characters (invalid JSON) through; exclude them as its unbounded rule does."""
    return ebnf.replace(_LOOSE_STRING_CHAR, _STRICT_STRING_CHAR)


_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_STRICT_STRING_CHAR = r"[^\0-\x1f\"\\]"


def _compiler_message(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location prefix."""
    text = str(exc).strip()
    if text.startswith("[") and ": " in text:
        text = text.split(": ", 1)[1]
        if text.startswith("Check failed") and ": " in text:
            text = text.split(": ", 1)[1]
    return text


class GrammarMasker:
    """Applies the matchers of a step's rows to its logits, one batched fill and one apply."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._filler = xgr.BatchGrammarMatcher()
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def __call__(self, logits: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> None:
        """Mask ``logits [N, V]`` in place: row ``rows[i]`` follows ``constraints[i]``; other rows are untouched."""
        matchers = [c.matcher for c in constraints]
        first: dict[int, int] = {}  # an n > 1 request's first sample repeats its matcher: fill it once
        unique = [(r, m) for r, m in zip(rows, matchers) if first.setdefault(id(m), r) == r]
        if self._bitmask.shape[0] < len(logits):
            self._bitmask = xgr.allocate_token_bitmask(max(len(logits), 2 * self._bitmask.shape[0]), self.vocab_size)
        bitmask = self._bitmask[: len(logits)]
        self._filler.batch_fill_next_token_bitmask([m for _, m in unique], bitmask, indices=[r for r, _ in unique])
        if len(unique) < len(rows):
            copies = [(r, first[id(m)]) for r, m in zip(rows, matchers) if first[id(m)] != r]
            bitmask[[r for r, _ in copies]] = bitmask[[f for _, f in copies]]
        xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True), vocab_size=self.vocab_size, indices=rows
        )
