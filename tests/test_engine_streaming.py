"""The engine's text path: delta outputs (the text and token ids new since a request's last output)
concatenate to the text of the whole output, for a byte-level tokenizer (GPT-2 style, streamed
through its byte table) and a SentencePiece-style one (Metaspace, byte fallback; streamed by
decoding a window of ids), with multi-byte characters split across tokens, stop strings, n > 1,
and with and without overlapped steps."""

import json
from pathlib import Path

import pytest
from tiny_models import make_model
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers

from mcl_runtime import Engine, SamplingParams

SP_PIECES = ["▁", "▁a", "b", "▁日本", "é"]  # ids 259-263: the tiny models have 264


def write_sentencepiece_tokenizer(folder: Path) -> None:
    """A Llama-style tokenizer: ``▁`` for spaces, byte-fallback tokens ``<0xNN>`` for every byte
    no piece covers (so a character outside the pieces is split into its UTF-8 bytes)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({piece: 259 + i for i, piece in enumerate(SP_PIECES)})
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "bos_token": "<s>", "tokenizer_class": "LlamaTokenizerFast"})
    )


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def model_dir(request, tmp_path_factory) -> Path:
    folder = make_model(tmp_path_factory.mktemp(request.param) / "model", std=0.5)
    if request.param == "sentencepiece":
        write_sentencepiece_tokenizer(folder)
    return folder


PROMPTS = ["a b 日本 é", "x", "日本 ab", "🙂 a"]


def _params(kind: str, stop: list[str] | None, n: int) -> SamplingParams:
    return SamplingParams(max_tokens=48, temperature=1.0, seed=11, n=n, ignore_eos=True, stop=stop, output_kind=kind)


def _run(engine: Engine, kind: str, stop: list[str] | None, n: int) -> dict[tuple[str, int], list]:
    """Every output of every completion, in order: (text, token ids, finish reason)."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, _params(kind, stop, n))
    seen: dict[tuple[str, int], list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for o in out.outputs:
                seen.setdefault((out.request_id, o.index), []).append((o.text, list(o.token_ids), o.finish_reason))
    return seen


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("stop,n", [(None, 1), (["b", "日"], 1), (None, 2)], ids=["plain", "stops", "n2"])
def test_deltas_concatenate_to_the_final_text(model_dir, overlap, stop, n):
    engine = Engine(str(model_dir), device="cpu", overlap=overlap)
    finals = {k: v[-1] for k, v in _run(engine, "final_only", stop, n).items()}
    deltas = _run(engine, "delta", stop, n)
    assert set(deltas) == set(finals) and len(finals) == len(PROMPTS) * n
    split = 0
    for key, events in deltas.items():
        text, tokens, reason = finals[key]
        assert "".join(e[0] for e in events) == text
        assert [t for e in events for t in e[1]] == tokens
        assert [e[2] for e in events if e[2] is not None] == [reason]
        if stop is None:  # the text the output adds to the prompt's
            prompt = engine.tokenizer.encode(PROMPTS[int(key[0])])
            if prompt[-1] not in engine.tokenizer.byte_fallback:  # else the output's text has no context
                assert text == _continuation(engine.tokenizer, prompt, tokens)
        split += sum(bool(e[1]) and not e[0] for e in events)  # a token that completed no character yet
    assert split > 0, "no multi-byte character was split across tokens: the test exercised nothing"


def _continuation(tokenizer, prompt: list[int], tokens: list[int]) -> str:
    context = prompt[-5:]
    before = tokenizer.decode(context)
    whole = tokenizer.decode(context + tokens)
    assert whole.startswith(before)
    return whole[len(before) :]


def test_cumulative_outputs_are_prefixes_of_the_final_text(model_dir):
    engine = Engine(str(model_dir), device="cpu")
    finals = {k: v[-1][0] for k, v in _run(engine, "final_only", ["b"], 1).items()}
    for key, events in _run(engine, "cumulative", ["b"], 1).items():
        texts = [e[0] for e in events]
        assert texts[-1] == finals[key]
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
