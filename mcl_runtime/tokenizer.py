"""Tokenizer of a Hugging Face model folder, built on the ``tokenizers`` library (not transformers).

``Tokenizer.from_pretrained(dir)`` reads ``tokenizer.json``, ``tokenizer_config.json`` (special
tokens, added tokens, chat template), ``chat_template.jinja`` when present (it wins over the config's
template, as in transformers), ``generation_config.json`` and ``config.json`` (end-of-sequence ids).

Chat templates are rendered as transformers renders them: a sandboxed jinja2 environment with
``trim_blocks`` and ``lstrip_blocks``, the ``tojson`` filter, ``raise_exception`` and
``strftime_now``, and the variables ``messages``, ``add_generation_prompt``, ``tools=None``,
``documents=None`` and the named special tokens (``bos_token``, ``eos_token``, ...). A folder without
a template gets ``DEFAULT_CHAT_TEMPLATE`` (plain ChatML, no default system message)::

    <|im_start|>{role}\\n{content}<|im_end|>\\n      for each message
    <|im_start|>assistant\\n                         when add_generation_prompt

``IncrementalDetokenizer`` turns generated ids into text deltas for streaming.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mcl_runtime.errors import InvalidRequestError, ModelLoadError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """Encoding, decoding and chat templates of one model; see the module docstring."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        model_max_length: int | None = None,
    ) -> None:
        self.backend = backend
        self.special_tokens_map = dict(special_tokens or {})
        self.chat_template = chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE
        self.has_chat_template = chat_template is not None
        self._compiled_template = _compile_chat_template(self.chat_template)
        self.model_max_length = model_max_length
        eos = self.token_to_id(self.special_tokens_map.get("eos_token", ""))
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids)) or ([eos] if eos is not None else [])
        self.bos_token_id = self.token_to_id(self.special_tokens_map.get("bos_token", ""))
        pad = self.token_to_id(self.special_tokens_map.get("pad_token", ""))
        self.pad_token_id = pad if pad is not None else pad_token_id
        # transformers 5 ignores this flag for BPE models: the clean-up would eat real spaces.
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """Load the tokenizer of a model folder; a missing or malformed file raises ``ModelLoadError``."""
        folder = Path(model_dir)
        if not folder.is_dir():
            raise ModelLoadError(f"model folder {folder} does not exist")
        backend = _load_backend(folder / "tokenizer.json")
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        gen_cfg = _read_json(folder / "generation_config.json")
        model_cfg = _read_json(folder / "config.json")
        _add_config_tokens(backend, tok_cfg, folder)
        return cls(
            backend,
            chat_template=_load_chat_template(folder, tok_cfg),
            special_tokens=_special_tokens(tok_cfg),
            eos_token_ids=_as_ids(gen_cfg.get("eos_token_id")) + _as_ids(model_cfg.get("eos_token_id")),
            pad_token_id=_first_id(gen_cfg.get("pad_token_id"), model_cfg.get("pad_token_id")),
            clean_up_tokenization_spaces=bool(tok_cfg.get("clean_up_tokenization_spaces", False)),
            model_max_length=tok_cfg.get("model_max_length"),
        )

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included (``len(hf_tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token) if token else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it (``<|im_start|>``) become their ids."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"the text is not valid Unicode (a lone surrogate at position {exc.start})"
            ) from exc
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Ids the tokenizer does not know (models often pad their embedding
        beyond the tokenizer's vocabulary) decode to nothing, as in transformers."""
        vocab = self.vocab_size
        if not isinstance(ids, list) or (ids and not 0 <= min(ids) <= max(ids) < vocab):
            ids = _in_vocab(ids, vocab)
        return self.decode_known(ids, skip_special_tokens)

    def decode_known(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """``decode`` of a list of ids already known to be in the vocabulary (no range check)."""
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    @functools.cached_property
    def token_bytes(self) -> list[bytes] | None:
        """Each id's bytes in ``decode(ids, skip_special_tokens=True)`` when the decoder is byte-level
        (GPT-2 / Qwen2 / Llama 3 tokenizers): the text of any ids is then the UTF-8 decoding (invalid
        bytes replaced) of their bytes joined, so text can grow one token at a time without
        decoding again. A token's characters map to bytes through the byte-level alphabet, or, if one
        of them is not in it, the token is its own UTF-8 (the ``tokenizers`` decoder's rule);
        special tokens and unknown ids are empty. None for any other decoder, or with the
        clean-up of tokenization spaces (text-level)."""
        if not isinstance(self.backend.decoder, tokenizers.decoders.ByteLevel) or self._clean_up:
            return None
        alphabet = byte_level_alphabet()
        special = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        table = []
        for i in range(self.vocab_size):
            token = None if i in special else self.backend.id_to_token(i)
            try:
                table.append(bytes(alphabet[c] for c in token) if token else b"")
            except KeyError:
                table.append(token.encode())
        return table

    @functools.cached_property
    def byte_fallback(self) -> frozenset[int]:
        """Ids of SentencePiece byte-fallback tokens (``<0x00>`` ... ``<0xFF>``). A ``ByteFallback``
        decoder decodes each run of them as one UTF-8 string, or, when the run is not valid UTF-8,
        as one U+FFFD per byte: the text of a run is known only once it ends."""
        return frozenset(
            i for token, i in self.backend.get_vocab().items() if len(token) == 6 and _BYTE_TOKEN.fullmatch(token)
        )

    @functools.cached_property
    def token_texts(self) -> list[str | None] | None:
        """Each id's text when its ``token_bytes`` are whole UTF-8 characters on their own (most
        tokens), else None; None when there are no ``token_bytes``."""
        table = self.token_bytes
        if table is None:
            return None
        texts: list[str | None] = []
        for data in table:
            try:
                texts.append(data.decode())
            except UnicodeDecodeError:
                texts.append(None)
        return texts

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_vars: Any
    ) -> str:
        """Render ``messages`` with the chat template as transformers does (``tokenize=False``).

        Keys whose value is None are dropped from each message first, as transformers does. Extra
        keyword arguments become template variables. A template error (e.g. its ``raise_exception``)
        raises ``InvalidRequestError``.
        """
        variables = {
            "tools": None,
            "documents": None,
            **self.special_tokens_map,
            **template_vars,
            "messages": _normalize_messages(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._compiled_template.render(**variables)
        except (jinja2.TemplateError, TypeError) as exc:
            raise InvalidRequestError(f"the chat template cannot render these messages: {exc}") from exc


class IncrementalDetokenizer:
    """Streams the text of generated ids, vLLM-style.

    The window of ids kept (``_ids``) is decoded at each step; its first ``_read`` ids are context whose
    text was already emitted (a few ids, so decoders that depend on neighbours, like SentencePiece's
    leading space, see them). Text is held back while the window's text ends with U+FFFD (a UTF-8
    character split across tokens, possibly completed by the next token), and while it ends in a
    run of byte-fallback tokens (whose text changes as the run grows): everything before is emitted,
    and emitted text never changes, so the deltas always add up to the text of the whole. A prompt
    that ends in a byte-fallback run gives no context (the run ends where the output begins).
    When the text ends cleanly and ``SLIDE_EVERY`` ids were added since the last
    slide, the window slides forward (one more decode), so a step costs one decode of a short
    window, 1 + 1 / SLIDE_EVERY on average, except during a run of undecodable bytes.
    A byte-level tokenizer (``Tokenizer.token_bytes``) with ``skip_special_tokens`` needs none of
    this: each id's bytes go through an incremental UTF-8 decoder, which holds back only an
    unfinished character (no decode call, no window).
    ``"".join(add(...) deltas) + flush()`` is the text the output ids add to the prompt's
    (``decode(prompt + output)`` past ``decode(prompt)``; ``decode(output)`` for a byte-level
    tokenizer, or without context); call ``flush()`` when the sequence ends.
    """

    CONTEXT_TOKENS = 5
    SLIDE_EVERY = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._bytes = tokenizer.token_bytes if skip_special_tokens else None
        if self._bytes is not None:
            self._texts = tokenizer.token_texts
            self._held = b""  # the bytes of an unfinished character
            return
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._vocab = tokenizer.vocab_size  # ids past it decode to nothing: they are dropped on the way in
        self._byte_ids = tokenizer.byte_fallback
        self._ids = _in_vocab(prompt_ids, self._vocab)[-self.CONTEXT_TOKENS :]
        context = self._decode(self._ids)
        if context.endswith(REPLACEMENT_CHAR) or (self._ids and self._ids[-1] in self._byte_ids):
            self._ids, context = [], ""
        self._read = len(self._ids)
        self._sent = len(context)  # characters of the window's text already emitted

    def add(self, new_ids: Sequence[int]) -> str:
        """Append generated ids; return the text they complete (possibly empty)."""
        if self._bytes is not None:
            table = self._bytes
            return self._utf8(b"".join([table[i] for i in new_ids if 0 <= i < len(table)]))
        self._ids.extend(_in_vocab(new_ids, self._vocab))
        if self._ids and self._ids[-1] in self._byte_ids:  # a byte-fallback run may go on
            return ""
        text = self._decode(self._ids)
        stable = len(text.rstrip(REPLACEMENT_CHAR))
        delta = text[self._sent : stable]
        self._sent = max(self._sent, stable)
        if stable == len(text) and len(self._ids) - self._read >= self.SLIDE_EVERY:
            self._slide()
        return delta

    def flush(self) -> str:
        """Return the text still held back (undecodable trailing bytes become U+FFFD)."""
        if self._bytes is not None:
            text, self._held = codecs.utf_8_decode(self._held, "replace", True)[0], b""
            return text
        text = self._decode(self._ids)
        delta = text[self._sent :]
        self._sent = len(text)
        self._slide()
        return delta

    def add_token(self, token_id: int) -> str:
        """``add([token_id])``."""
        table = self._bytes
        if table is not None and 0 <= token_id < len(table):
            if not self._held:
                text = self._texts[token_id]
                if text is not None:
                    return text
            return self._utf8(table[token_id])
        return self.add([token_id])

    def _utf8(self, data: bytes) -> str:
        """The characters ``data`` completes (invalid bytes replaced); an unfinished one is held."""
        if self._held:
            data = self._held + data
        text, used = codecs.utf_8_decode(data, "replace", False)
        self._held = data[used:]
        return text

    def _slide(self) -> None:
        """The ids added since the last slide become the context of the next window."""
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._sent = len(self._decode(self._ids))

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode_known(ids, skip_special_tokens=self._skip) if ids else ""


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """The character the byte-level pre-tokenizer writes for each byte (GPT-2's map), inverted;
    in GPT-2's order (the printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


def _in_vocab(ids: Sequence[int], vocab: int) -> list[int]:
    """The ids a tokenizer of ``vocab`` tokens knows (the others decode to nothing)."""
    return [int(i) for i in ids if 0 <= i < vocab]


# ---------------------------------------------------------------- loading helpers


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise ModelLoadError(f"{path.parent} has no tokenizer.json (only fast-tokenizer folders are supported)")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception for every parse error
        raise ModelLoadError(f"{path} is not a valid tokenizers file: {exc}") from exc


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(tok_cfg: dict[str, Any]) -> dict[str, str]:
    tokens = {key: _token_content(tok_cfg.get(key)) for key in SPECIAL_TOKEN_KEYS}
    return {key: value for key, value in tokens.items() if value is not None}


def _add_config_tokens(backend: tokenizers.Tokenizer, tok_cfg: dict[str, Any], folder: Path) -> None:
    """Add the tokens that tokenizer_config.json declares but tokenizer.json lacks, at their ids."""
    declared = tok_cfg.get("added_tokens_decoder") or {}
    if not isinstance(declared, dict):
        raise ModelLoadError(f"{folder}/tokenizer_config.json: added_tokens_decoder must be an object")
    for key in sorted(declared, key=int):
        entry = declared[key]
        content = _token_content(entry)
        if content is None or backend.token_to_id(content) is not None:
            continue
        token = tokenizers.AddedToken(
            content,
            single_word=entry.get("single_word", False),
            lstrip=entry.get("lstrip", False),
            rstrip=entry.get("rstrip", False),
            normalized=entry.get("normalized", False),
            special=entry.get("special", False),
        )
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(content) != int(key):
            raise ModelLoadError(
                f"{folder}: added token {content!r} is declared with id {key} but would get id "
                f"{backend.token_to_id(content)}"
            )
    for content in _extra_special_tokens(tok_cfg):
        if backend.token_to_id(content) is None:
            backend.add_special_tokens([tokenizers.AddedToken(content, special=True, normalized=False)])


def _extra_special_tokens(tok_cfg: dict[str, Any]) -> list[str]:
    extra = tok_cfg.get("additional_special_tokens") or tok_cfg.get("extra_special_tokens") or []
    if isinstance(extra, dict):
        extra = list(extra.values())
    return [c for c in map(_token_content, extra) if c is not None]


def _load_chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(f"{folder}/tokenizer_config.json: chat_template must be a string")
    return template


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _first_id(*values: Any) -> int | None:
    return next((int(v) for v in values if isinstance(v, int)), None)


def _clean_up_tokenization(text: str) -> str:
    for old, new in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(old, new)
    return text


# ---------------------------------------------------------------- chat templates


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag) renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, as transformers' sandbox does."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_SafeNamespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelLoadError(f"the chat template is not valid jinja2: {exc}") from exc


def _normalize_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        out.append({key: value for key, value in message.items() if value is not None})
    return out
