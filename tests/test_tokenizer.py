"""mcl_runtime.tokenizer against transformers' tokenizer on the demo model and on written templates."""

import json
import random
import shutil
from pathlib import Path

import pytest

from mcl_runtime.demo import demo_model_dir
from mcl_runtime.errors import InvalidRequestError, ModelLoadError
from mcl_runtime.tokenizer import DEFAULT_CHAT_TEMPLATE, REPLACEMENT_CHAR, IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Unicode: café, naïve, über, 日本語のテキスト, emoji 🙂🚀, math ≤ ≥ → ∑",
    "def two_sum(nums, target):\n    seen = {}\n    for i, v in enumerate(nums):\n        if target - v in seen:"
    "\n            return [seen[target - v], i]\n\t\r\n  trailing   spaces   ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|endoftext|> tail",
    "",
    "   ",
]

CHATS = [
    [{"role": "user", "content": "Write a function that adds two numbers."}],
    [
        {"role": "system", "content": "You are a coder."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "日本 🙂\n  indented"},
    ],
]

# Exercises bos/eos variables, loop controls, namespace, tojson and raise_exception.
RICH_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "{% if m['role'] == 'system' %}{% set ns.n = ns.n + 1 %}{% continue %}{% endif %}\n"
    "  [{{ m['role'] }}] {{ m['content'] | tojson }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {{ ns.n }}{% endif %}"
)


@pytest.fixture(scope="module")
def base_dir() -> Path:
    return demo_model_dir() / "base"


@pytest.fixture(scope="module")
def tok(base_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module", params=["bytes", "window"])
def stream_tok(request, base_dir) -> Tokenizer:
    """The demo tokenizer streamed both ways: through its byte table, and (as a tokenizer whose
    decoder is not byte-level would be) by decoding a sliding window of ids."""
    tok = Tokenizer.from_pretrained(base_dir)
    if request.param == "window":
        tok.__dict__["token_bytes"] = None
    return tok


@pytest.fixture(scope="module")
def hf_tok(base_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(base_dir))


def _folder_with_template(src: Path, dst: Path, template) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    if template is None:
        cfg.pop("chat_template")
    else:
        cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_like_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text, add_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_and_ids(tok, hf_tok):
    assert tok.encode("<|im_start|>") == [hf_tok.convert_tokens_to_ids("<|im_start|>")]
    assert tok.vocab_size == len(hf_tok) == 512
    assert tok.eos_token_ids == [511, 509]  # generation_config [im_end, endoftext] then config's im_end
    assert tok.bos_token_id is None and hf_tok.bos_token_id is None
    assert tok.pad_token_id == hf_tok.pad_token_id == 509
    assert tok.decode([510, 72, 511]) == "H"


def test_decode_drops_ids_beyond_the_tokenizer(tok, stream_tok, hf_tok):
    # Models may pad their embeddings beyond the tokenizer; such ids decode to nothing, as in transformers.
    assert tok.decode([72, 512, 105, 4000]) == hf_tok.decode([72, 512, 105, 4000]) == "Hi"
    detok = IncrementalDetokenizer(stream_tok, [600, 72])
    streamed = "".join(detok.add([i]) for i in [512, 105, 4000, 72]) + detok.flush()
    assert streamed == tok.decode([512, 105, 4000, 72]) == "iH"


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_like_transformers(tok, hf_tok, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n")


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, RICH_TEMPLATE])
def test_written_templates_like_transformers(base_dir, tmp_path, template):
    transformers = pytest.importorskip("transformers")
    folder = _folder_with_template(base_dir, tmp_path / "m", template)
    ours, theirs = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(str(folder))
    for messages in CHATS:
        assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def test_missing_template_gets_default_chatml(base_dir, tmp_path):
    tok = Tokenizer.from_pretrained(_folder_with_template(base_dir, tmp_path / "m", None))
    assert not tok.has_chat_template and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "hi", "name": None}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_errors(base_dir, tmp_path, tok):
    rich = Tokenizer.from_pretrained(_folder_with_template(base_dir, tmp_path / "m", RICH_TEMPLATE))
    with pytest.raises(InvalidRequestError, match="bad role tool"):
        rich.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template([])
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template(["not a dict"])


def test_malformed_folders(base_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(base_dir, broken)
    (broken / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_pretrained(broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_pretrained(broken)
    shutil.copy(base_dir / "tokenizer.json", broken / "tokenizer.json")
    (broken / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="JSON object"):
        Tokenizer.from_pretrained(broken)
    (broken / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ModelLoadError, match="jinja2"):
        Tokenizer.from_pretrained(broken)


def _stream(tok, prompt_ids, output_ids, chunk_sizes):
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas, i = [], 0
    for size in chunk_sizes:
        deltas.append(detok.add(output_ids[i : i + size]))
        i += size
    return deltas, detok.flush()


def _random_ids(rng: random.Random, n: int) -> list[int]:
    """Byte tokens (often the pieces of multi-byte characters), merged tokens and special tokens."""
    pieces: list[int] = []
    while len(pieces) < n:
        kind = rng.random()
        if kind < 0.35:  # a whole multi-byte character, byte by byte
            pieces.extend(rng.choice(["é", "日", "🙂", "→", "ü"]).encode())
        elif kind < 0.5:
            pieces.append(rng.randrange(128, 256))  # stray continuation / lead bytes
        elif kind < 0.95:
            pieces.append(rng.randrange(0, 509))
        else:
            pieces.append(rng.randrange(509, 512))
    return pieces[:n]


@pytest.mark.parametrize("seed", range(40))
def test_incremental_detokenizer_random(stream_tok, seed):
    tok = stream_tok
    rng = random.Random(seed)
    prompt = _random_ids(rng, rng.randrange(0, 12))
    output = _random_ids(rng, rng.randrange(1, 80))
    chunks = []
    while sum(chunks) < len(output):
        chunks.append(rng.choice([1, 1, 1, 2, 3]))
    deltas, tail = _stream(tok, prompt, output, chunks)
    assert "".join(deltas) + tail == tok.decode(output)


def test_incremental_detokenizer_holds_split_characters(stream_tok):
    tok = stream_tok
    ids = tok.encode("a日b")  # 日 is three byte tokens
    assert len(ids) == 5
    deltas, tail = _stream(tok, tok.encode("prompt "), ids, [1] * 5)
    assert deltas == ["a", "", "", "日", "b"] and tail == ""
    deltas, tail = _stream(tok, [], ids[:3], [1, 1, 1])
    assert deltas == ["a", "", ""] and tail == "\ufffd"
    assert "\ufffd" not in "".join(_stream(tok, [], tok.encode("🙂x"), [1] * 5)[0])


def test_incremental_detokenizer_window_stays_small(stream_tok):
    tok = stream_tok
    if tok.token_bytes is not None:
        pytest.skip("no window: the byte table streams without one")
    detok = IncrementalDetokenizer(tok, tok.encode("some prompt"))
    text = "def f(x):\n    return x * 2  # 日本 🙂\n" * 50
    out = []
    for token_id in tok.encode(text):
        out.append(detok.add([token_id]))
        assert len(detok._ids) <= 16
    assert "".join(out) + detok.flush() == text


def _byte_level_with_added_tokens(tmp_path: Path) -> Tokenizer:
    """A byte-level tokenizer with merged tokens, special tokens and non-special added tokens
    whose characters are in the byte-level alphabet ("café": é stands for the byte 0xE9) or not
    ("日本": the token is its own UTF-8)."""
    import tokenizers

    folder = tmp_path / "tok"
    shutil.copytree(demo_model_dir() / "base", folder, ignore=shutil.ignore_patterns("*.safetensors"))
    backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.add_tokens([tokenizers.AddedToken(t, special=False) for t in ("café", "日本", "<x>", "a日")])
    backend.add_special_tokens(["<|special|>"])
    backend.save(str(folder / "tokenizer.json"))
    return Tokenizer.from_pretrained(folder)


def test_token_bytes_decode_like_the_tokenizer(tmp_path):
    tok = _byte_level_with_added_tokens(tmp_path)
    table = tok.token_bytes
    assert len(table) == tok.vocab_size
    for i in range(tok.vocab_size):
        assert table[i].decode("utf-8", "replace") == tok.decode([i]), i
    texts = tok.token_texts  # a token of whole characters has its text; one of a character's bytes has none
    for i, text in enumerate(texts):
        assert text == (None if REPLACEMENT_CHAR in tok.decode([i]) else tok.decode([i])), i
    assert texts.count(None) > 0
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size + 3) for _ in range(rng.randrange(1, 30))]
        assert b"".join(table[i] for i in ids if i < len(table)).decode("utf-8", "replace") == tok.decode(ids), ids
        detok = IncrementalDetokenizer(tok, [])
        assert "".join(detok.add_token(i) for i in ids) + detok.flush() == tok.decode(ids), ids


def test_token_bytes_only_for_byte_level_decoders(tmp_path, base_dir):
    import tokenizers

    folder = tmp_path / "metaspace"
    shutil.copytree(base_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.decoder = tokenizers.decoders.Metaspace()
    backend.save(str(folder / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(folder)
    assert tok.token_bytes is None
    ids = tok.encode("a b 日本 c")
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(detok.add_token(i) for i in ids) + detok.flush() == tok.decode(ids)
