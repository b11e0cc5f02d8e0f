"""Structured outputs (xgrammar) and the extra sampling knobs on the demo model: every constrained
output parses and matches its constraint, for each adapter, greedy and sampled; unconstrained rows
of a mixed batch keep their tokens; penalties, min_tokens and min_p against per-row references."""

import json
import re

import pytest
import torch

pytest.importorskip("xgrammar", reason="structured outputs need xgrammar (not on the GPU image)")
jsonschema = pytest.importorskip("jsonschema")

from mcl_runtime import Engine, InvalidRequestError, SamplingParams
from mcl_runtime.demo import demo_adapter_dirs, demo_model_dir
from mcl_runtime.engine.params import StructuredOutput
from mcl_runtime.engine.sampler import Penalties, SamplingBatch, apply_penalties, sample
from mcl_runtime.engine.structured import tokenizer_info

ADAPTERS = [None, "retrieval", "planning", "coding", "debugging"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "score", "tags"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}-[0-9]{1,4}"
CHOICES = ["yes", "no", "it depends"]
GRAMMAR = 'root ::= "(" num ("+" num){0,3} ")"\nnum ::= [1-9] [0-9]?'
UNBOUNDED = {"json_object"}  # a random model may never close it: checked only when it stops


def valid(kind: str, text: str) -> bool:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    if kind == "json_object":
        return isinstance(json.loads(text), dict)
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "choice":
        return text in CHOICES
    return re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?){0,3}\)", text) is not None


SPECS = {
    "json": {"json": SCHEMA},
    "json_object": {"json_object": True},
    "regex": {"regex": REGEX},
    "choice": {"choice": CHOICES},
    "grammar": {"grammar": GRAMMAR},
}


@pytest.fixture(scope="module")
def engine():
    return Engine(model=demo_model_dir() / "base", adapters=demo_adapter_dirs(), device="cpu", kv_cache_blocks=512)


def params(kind: str, sampled: bool, **kw) -> SamplingParams:
    return SamplingParams(
        max_tokens=kw.pop("max_tokens", 400),
        structured=SPECS[kind],
        temperature=0.9 if sampled else 0.0,
        seed=11 if sampled else None,
        **kw,
    )


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind", list(SPECS))
def test_constrained_outputs_validate_for_every_adapter(engine, kind, sampled):
    outs = engine.generate(["Answer:"] * len(ADAPTERS), params(kind, sampled, max_tokens=200), adapter=ADAPTERS)
    for out in outs:
        assert out.finish_reason == "stop" or kind in UNBOUNDED, out.text
        assert out.finish_reason == "length" or valid(kind, out.text), out.text


def test_mixed_batch_keeps_unconstrained_tokens(engine):
    free = [
        SamplingParams(max_tokens=24, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True),
    ]
    alone = engine.generate(["def f(x):", "import os"], free, adapter=["coding", None])
    mixed = engine.generate(
        ["def f(x):", "Q:", "import os", "R:"],
        [free[0], params("json", True), free[1], params("regex", False)],
        adapter=["coding", "planning", None, "retrieval"],
    )
    assert [o.token_ids for o in alone] == [mixed[0].token_ids, mixed[2].token_ids]
    assert valid("json", mixed[1].text) and valid("regex", mixed[3].text)


def test_n_and_stop_strings(engine):
    out = engine.generate("Pick:", params("regex", True, n=4))[0]
    assert len(out.outputs) == 4 and all(valid("regex", o.text) for o in out.outputs)
    assert len({o.text for o in out.outputs}) > 1
    cut = engine.generate("Pick:", params("regex", False, stop="-"))[0]
    assert re.fullmatch(r"[a-z]{2,6}", cut.text)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_matcher_survives_preemption(overlap):
    small = Engine(
        model=demo_model_dir() / "base",
        adapters=demo_adapter_dirs(),
        device="cpu",
        kv_cache_blocks=24,
        block_size=4,
        overlap=overlap,
    )
    outs = small.generate(
        ["Answer with JSON please:"] * 6,
        params("json", True, max_tokens=60, ignore_eos=False),
        adapter=ADAPTERS + ["coding"],
    )
    assert small.stats()["num_preemptions"] > 0
    for out in outs:
        assert out.finish_reason == "length" or valid("json", out.text)


def test_streamed_text_is_the_final_text(engine):
    engine.add_request("s", "Stream:", params("json", True))
    pieces = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.text)
    assert valid("json", pieces[-1]) and all(pieces[-1].startswith(p) for p in pieces)


def test_grammars_compile_once_and_bad_ones_are_invalid_requests(engine):
    before = engine.grammars.num_compiled
    engine.generate(["a", "b"], params("choice", False, max_tokens=8))
    engine.generate(["c"], params("choice", True, max_tokens=8))
    assert engine.grammars.num_compiled - before <= 1
    for spec, needle in (
        ({"json": "{not json"}, "JSON"),
        ({"regex": "a("}, "parenthesis"),
        ({"grammar": "root ::= missing"}, "missing"),
    ):
        with pytest.raises(InvalidRequestError, match=needle):
            engine.add_request(None, "x", SamplingParams(structured=spec))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"regex": "a", "choice": ["a"]},
        {"choice": []},
        {"choice": "ab"},
        {"json": 3},
        {"regex": ""},
        {"nope": 1},
        "regex",
    ],
)
def test_malformed_specs(spec):
    with pytest.raises(InvalidRequestError):
        SamplingParams(structured=spec)


def test_json_is_compact_by_default(engine):
    text = engine.generate("J:", params("json", True))[0].text
    assert "\n" not in text and "  " not in text
    assert StructuredOutput(json_object=True).key != StructuredOutput(json_object=True, any_whitespace=True).key


def test_tokenizer_info_matches_the_tokenizers(engine, qwen_family):
    from mcl_runtime.tokenizer import Tokenizer

    for tok, vocab in (
        (engine.tokenizer, engine.model.config.vocab_size),
        (Tokenizer.from_pretrained(qwen_family[0]), Tokenizer.from_pretrained(qwen_family[0]).vocab_size + 5),
    ):
        info = tokenizer_info(tok, vocab)
        assert info.vocab_type.name == "BYTE_LEVEL" and info.vocab_size == vocab
        specials = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
        for i in range(tok.vocab_size):
            expected = b"" if i in specials else tok.decode([i]).encode("utf-8", "surrogatepass")
            if "\ufffd" not in tok.decode([i]):
                assert info.decoded_vocab[i] == expected, i
        assert all(info.decoded_vocab[i] == b"" for i in range(tok.vocab_size, vocab))


# ---------------------------------------------------------------- sampler knobs


def _batch(n: int, v: int, **kw) -> SamplingBatch:
    return SamplingBatch(
        temperatures=torch.full((n,), kw.pop("temperature", 0.0)),
        top_ks=torch.full((n,), v),
        top_ps=torch.ones(n),
        seeds=torch.arange(n),
        steps=torch.zeros(n, dtype=torch.int64),
        all_greedy=kw.pop("all_greedy", True),
        any_top_k_or_p=False,
        **kw,
    )


def test_penalties_match_a_per_row_reference():
    torch.manual_seed(0)
    n, v = 4, 50
    logits = torch.randn(n, v) * 3
    prompts = [[1, 2, 3], [4], [5, 5], [7, 8, 9, 10]]
    outputs = [[3, 3, 6], [], [5, 11, 11, 11], [0]]
    rep, pres, freq = [1.5, 1.0, 0.7, 1.2], [0.5, 0.0, -0.3, 0.0], [0.2, 0.0, 0.4, 1.0]
    width = max(len(p) + len(o) for p, o in zip(prompts, outputs))
    ids = torch.full((n, width), v)
    is_out = torch.zeros(n, width, dtype=torch.bool)
    for r, (p, o) in enumerate(zip(prompts, outputs)):
        ids[r, : len(p) + len(o)] = torch.tensor(p + o)
        is_out[r, len(p) : len(p) + len(o)] = True
    got = apply_penalties(
        logits.clone(), Penalties(ids, is_out, torch.tensor(rep), torch.tensor(pres), torch.tensor(freq))
    )
    want = logits.clone()
    for r in range(n):
        for t in set(prompts[r] + outputs[r]):
            want[r, t] = want[r, t] / rep[r] if want[r, t] > 0 else want[r, t] * rep[r]
        for t in set(outputs[r]):
            want[r, t] -= freq[r] * outputs[r].count(t) + pres[r]
    torch.testing.assert_close(got, want)
    assert torch.equal(got[1], logits[1])  # neutral row unchanged bit for bit


def test_min_tokens_and_min_p():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    banned = (torch.tensor([0]), torch.tensor([1]))
    assert sample(logits.clone(), _batch(2, 3, banned=banned)).tolist() == [2, 1]
    hot = torch.tensor([[0.0, 3.0, 2.9, -9.0]] * 64)
    kept = sample(hot.clone(), _batch(64, 4, temperature=5.0, all_greedy=False, min_ps=torch.full((64,), 0.9)))
    assert set(kept.tolist()) <= {1, 2}


def test_engine_knobs(engine):
    out = engine.generate("x", SamplingParams(max_tokens=12, min_tokens=12, stop_token_ids=[0]))[0]
    assert len(out.token_ids) == 12
    base = engine.generate("def f(x):", SamplingParams(max_tokens=30, ignore_eos=True))[0].token_ids
    pen = engine.generate("def f(x):", SamplingParams(max_tokens=30, ignore_eos=True, frequency_penalty=2.0))[
        0
    ].token_ids
    assert len(set(pen)) >= len(set(base))
    for bad in (
        {"min_tokens": -1},
        {"repetition_penalty": 0},
        {"presence_penalty": 3},
        {"min_p": 1.5},
        {"min_tokens": 20, "max_tokens": 10},
        {"stop_token_ids": [True]},
    ):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)


def test_overlap_gives_the_same_tokens(engine):
    """Constrained rows make their steps synchronous; unconstrained and penalized rows overlap. Either
    way an overlapped engine gives the synchronous engine's tokens, mixed batches and n > 1 included."""
    overlapped = Engine(
        model=demo_model_dir() / "base", adapters=demo_adapter_dirs(), device="cpu", kv_cache_blocks=512, overlap=True
    )
    prompts = ["def f(x):", "Q:", "import os", "R:", "Pick:"]
    batch = [
        SamplingParams(max_tokens=24, ignore_eos=True, frequency_penalty=1.5, repetition_penalty=1.3),
        params("json", True, max_tokens=60),
        SamplingParams(max_tokens=24, temperature=1.0, seed=5, min_tokens=20),
        params("regex", False),
        params("choice", True, n=3),
    ]
    adapters = ["coding", "planning", None, "retrieval", "debugging"]
    sync, over = (e.generate(prompts, batch, adapter=adapters) for e in (engine, overlapped))
    assert [[o.token_ids for o in r.outputs] for r in over] == [[o.token_ids for o in r.outputs] for r in sync]
    assert [r.outputs[0].finish_reason for r in over] == [r.outputs[0].finish_reason for r in sync]
    free = engine.generate(prompts[:1], batch[:1])
    assert overlapped.generate(prompts[:1], batch[:1])[0].token_ids == free[0].token_ids
