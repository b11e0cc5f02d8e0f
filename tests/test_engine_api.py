"""Engine API behaviour on the demo model: sampling, n, stop conditions, streaming, errors."""

import asyncio
import json

import pytest
import torch

from mcl_runtime import (
    AdapterLoadError,
    AdapterNotFoundError,
    AsyncEngine,
    Engine,
    InvalidRequestError,
    ModelLoadError,
    SamplingParams,
)
from mcl_runtime.demo import demo_adapter_dirs, demo_engine, demo_model_dir
from mcl_runtime.engine.scheduler import CPU_HEAP_BLOCK_MAX, CPU_MIN_STEP_TOKENS, GPU_STEP_TOKENS, default_step_tokens


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def engine(request):
    return demo_engine(device="cpu", kv_cache_blocks=512, overlap=request.param)


PROMPT = "def fibonacci(n):\n"


def test_model_is_required():
    with pytest.raises(TypeError):
        Engine()


def test_demo_defaults(engine):
    assert engine.model_name == "mcl-demo-tiny"
    assert sorted(engine.adapters) == ["coding", "debugging", "planning", "retrieval"]
    outs = engine.generate(
        [PROMPT] * 5, SamplingParams(max_tokens=8), adapter=["retrieval", "planning", "coding", "debugging", None]
    )
    assert all(o.finish_reason in ("stop", "length") and o.token_ids for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) > 1
    assert engine.scheduler.max_num_batched_tokens == GPU_STEP_TOKENS  # the tiny model's rows are narrow


@pytest.mark.parametrize(
    "device, widest, max_num_seqs, tokens",
    [
        ("cpu", 9728 * 4, 256, 768),  # Qwen2.5-0.5B float32: gate/up's 9728 columns
        ("cpu", 9728 * 2, 256, 1664),  # ... in bfloat16
        ("cpu", 17920 * 4, 256, 384),  # Qwen2.5-1.5B float32
        ("cpu", 37888 * 4, 256, CPU_MIN_STEP_TOKENS),  # Qwen2.5-7B float32: 221 rows fit, the floor holds
        ("cpu", 64 * 4, 256, GPU_STEP_TOKENS),  # a tiny model: capped
        ("cpu", 9728 * 4, 1024, 1024),  # never fewer than max_num_seqs
        ("cuda", 9728 * 4, 256, GPU_STEP_TOKENS),
    ],
)
def test_default_step_tokens(device, widest, max_num_seqs, tokens):
    assert default_step_tokens(device, widest, max_num_seqs) == tokens
    if device == "cpu" and tokens < GPU_STEP_TOKENS and tokens > max(CPU_MIN_STEP_TOKENS, max_num_seqs):
        assert tokens * widest <= CPU_HEAP_BLOCK_MAX < (tokens + 128) * widest


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate([PROMPT], p, adapter=["coding"])[0]
    crowd = engine.generate(
        ["x = 1\n", PROMPT, "import os\n"],
        [SamplingParams(max_tokens=5, temperature=0.7), p, SamplingParams(max_tokens=20)],
        adapter=[None, "coding", "planning"],
    )[1]
    assert alone.token_ids == crowd.token_ids
    other_seed = engine.generate(
        [PROMPT], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True), adapter=["coding"]
    )[0]
    assert other_seed.token_ids != alone.token_ids


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=10), adapter=["debugging"])[0]
    k1 = engine.generate(
        [PROMPT], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=3), adapter=["debugging"]
    )[0]
    assert greedy.token_ids == k1.token_ids


def test_n_completions_share_the_prompt(engine):
    out = engine.generate(
        [PROMPT], SamplingParams(max_tokens=10, n=3, temperature=1.0, seed=7, ignore_eos=True), adapter=["coding"]
    )[0]
    assert len(out.outputs) == 3 and [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=10, n=2, ignore_eos=True), adapter=["coding"])[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert engine.stats()["kv_blocks_used"] == 0


def test_step_finished_only_returns_the_ended_requests(engine):
    params = [SamplingParams(max_tokens=k, ignore_eos=True) for k in (3, 7)] + [SamplingParams(max_tokens=5, n=2)]
    expected = engine.generate([PROMPT, "x = 1\n", PROMPT], params, adapter=["coding", None, "planning"])
    ids = [
        engine.add_request(None, p, sp, a)
        for p, sp, a in zip([PROMPT, "x = 1\n", PROMPT], params, ["coding", None, "planning"])
    ]
    ended = {}
    while engine.has_unfinished_requests():
        for out in engine.step(finished_only=True):
            assert out.finished and out.request_id not in ended
            ended[out.request_id] = out
    assert [[o.token_ids for o in ended[i].outputs] for i in ids] == [
        [o.token_ids for o in e.outputs] for e in expected
    ]


def test_n_is_bounded_by_max_num_seqs(engine):
    """All n completions of a request run in one step: n > max_num_seqs is refused, and a request
    is admitted only when its n completions fit beside the running ones."""
    small = demo_engine(device="cpu", kv_cache_blocks=64, max_num_seqs=3)
    with pytest.raises(InvalidRequestError, match="max_num_seqs=3"):
        small.add_request(None, PROMPT, SamplingParams(n=4))
    p = SamplingParams(max_tokens=6, n=3, temperature=1.0, seed=3, ignore_eos=True)
    outs = small.generate([PROMPT, "x = 1\n"], [p, SamplingParams(max_tokens=4)])
    assert small.stats()["max_batch_size_seen"] <= 3
    assert [o.token_ids for o in outs[0].outputs] == [o.token_ids for o in engine.generate([PROMPT], p)[0].outputs]


def test_stop_strings_tokens_and_length(engine):
    base = engine.generate([PROMPT], SamplingParams(max_tokens=24, ignore_eos=True), adapter=["coding"])[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 24
    assert base.text == engine.tokenizer.decode(base.token_ids)
    stop = base.text[5:8]
    cut = engine.generate([PROMPT], SamplingParams(max_tokens=24, stop=[stop], ignore_eos=True), adapter=["coding"])[0]
    assert cut.finish_reason == "stop" and cut.text == base.text[: base.text.find(stop)]
    tok = base.token_ids[3]
    by_id = engine.generate(
        [PROMPT], SamplingParams(max_tokens=24, stop_token_ids=[tok], ignore_eos=True), adapter=["coding"]
    )[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == base.token_ids[: base.token_ids.index(tok) + 1]


def test_streamed_text_is_monotone_and_equals_final(engine):
    async def collect():
        aeng = AsyncEngine(engine)
        try:
            texts = []
            async for out in aeng.generate(PROMPT, SamplingParams(max_tokens=20, stop=["\n\n"]), adapter="planning"):
                texts.append(out.text)
            return texts
        finally:
            aeng.shutdown()

    texts = asyncio.run(collect())
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    final = engine.generate([PROMPT], SamplingParams(max_tokens=20, stop=["\n\n"]), adapter=["planning"])[0]
    assert texts[-1] == final.text


def test_async_abort_frees_blocks(engine):
    async def run():
        aeng = AsyncEngine(engine)
        try:
            gen = aeng.generate(PROMPT * 20, SamplingParams(max_tokens=200, ignore_eos=True), adapter="coding")
            async for _ in gen:
                break
            await gen.aclose()
            with pytest.raises(AdapterNotFoundError):
                async for _ in aeng.generate(PROMPT, SamplingParams(), adapter="nope"):
                    pass
            return await aeng.fresh_stats()
        finally:
            aeng.shutdown()

    stats = asyncio.run(run())
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0
    assert stats["lora_running"] == stats["lora_waiting"] == {} and "coding" in stats["lora_resident"]


def test_lora_stats_count_requests_per_adapter(engine):
    """What a router reads: device slots, resident adapters, running and waiting requests per adapter."""
    for i, adapter in enumerate(["coding", "planning", None]):
        engine.add_request(f"lora-stats-{i}", PROMPT, SamplingParams(max_tokens=4, n=2), adapter)
    try:
        waiting = engine.lora_stats()
        assert waiting["lora_waiting"] == {"coding": 1, "planning": 1} and waiting["lora_running"] == {}
        engine.step()
        running = engine.lora_stats()
        assert running["lora_running"] == {"coding": 1, "planning": 1} and running["lora_waiting"] == {}
        assert {"coding", "planning"} <= set(running["lora_resident"]) and running["max_loras"] >= 2
    finally:
        for i in range(3):
            engine.abort_request(f"lora-stats-{i}")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(n=0), "n must"),
        (dict(stop=[""]), "stop"),
        (dict(top_k=-5), "top_k"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**kwargs)


def test_bad_requests(engine):
    with pytest.raises(AdapterNotFoundError, match="unknown adapter 'nope'"):
        engine.add_request(None, PROMPT, SamplingParams(), "nope")
    with pytest.raises(InvalidRequestError, match="context"):
        engine.add_request(None, [1] * (engine.max_model_len + 1), SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request(None, "", SamplingParams())
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request(None, [10**9], SamplingParams())
    assert not engine.has_unfinished_requests()


def test_bad_model_and_adapter_folders(tmp_path, engine, qwen_family):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine(str(tmp_path / "missing"), device="cpu")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        Engine(str(bad), device="cpu")
    cfg = json.loads((demo_model_dir() / "base" / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="not supported"):
        Engine(str(bad), device="cpu")
    with pytest.raises(AdapterLoadError, match="does not exist"):
        engine.load_adapter("x", str(tmp_path / "none"))
    _, adapters = qwen_family  # trained for another base: shapes do not fit
    with pytest.raises(AdapterLoadError, match="another base model"):
        engine.load_adapter("foreign", str(adapters["a8"]))
    with pytest.raises(AdapterLoadError, match="max_lora_rank"):
        demo_engine(device="cpu", kv_cache_blocks=64, max_lora_rank=8)
    with pytest.raises(AdapterLoadError, match="already loaded"):
        engine.load_adapter("coding", str(demo_adapter_dirs()["coding"]))
    assert "x" not in engine.adapters and "foreign" not in engine.adapters


def test_sequence_longer_than_the_cache_ends_with_length():
    small = demo_engine(device="cpu", kv_cache_blocks=4, block_size=4, adapters={})
    out = small.generate([[5] * 10], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) >= 1
    assert small.stats()["kv_blocks_used"] == 0


def test_engine_without_lora(engine):
    """``max_loras=0`` allocates no LoRA buffers and serves the base model with the same tokens; an
    adapter cannot be loaded into it."""
    base = demo_engine(device="cpu", kv_cache_blocks=64, adapters={}, max_loras=0)
    assert not any(b.numel() for n, b in base.model.named_buffers() if ".lora_" in n)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert base.generate([PROMPT], params)[0].token_ids == engine.generate([PROMPT], params)[0].token_ids
    with pytest.raises(AdapterLoadError, match="max_loras=0"):
        base.load_adapter("coding", str(demo_adapter_dirs()["coding"]))
    with pytest.raises(ValueError, match="max_loras"):
        demo_engine(device="cpu", kv_cache_blocks=64, adapters={}, max_loras=-1)


def bf16_outputs(params: list[SamplingParams], overlap: bool):
    """A bfloat16 demo engine's tokens for eight requests over several adapters (four at a time, so
    requests join as others finish), and its model runner."""
    engine = demo_engine(device="cpu", dtype="bfloat16", kv_cache_blocks=128, max_num_seqs=4, overlap=overlap)
    prompts = [PROMPT, "import os\n", "x = 1\n", "class A:\n"] * 2
    adapters = ["coding", None, "planning", "debugging"] * 2
    return [list(o.token_ids) for o in engine.generate(prompts, params, adapter=adapters)], engine.runner


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_bf16_greedy_steps_take_the_argmax_of_the_heads_own_output(monkeypatch, overlap):
    """A step that only takes argmaxes (greedy, no penalties or grammar) reads a 16-bit head's
    output as it is, with no float32 copy: the same tokens as through the float32 logits."""
    from mcl_runtime.engine.sampler import SamplingBatch

    params = [SamplingParams(max_tokens=10 + i, temperature=0, ignore_eos=True) for i in range(8)]
    direct, runner = bf16_outputs(params, overlap)
    assert runner._logits is None  # no step needed the float32 copy
    monkeypatch.setattr(SamplingBatch, "argmax_only", property(lambda self: False))
    through_float32, runner = bf16_outputs(params, overlap)
    assert runner._logits is not None and direct == through_float32


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_bf16_logits_buffer_gives_the_same_outputs(monkeypatch, overlap):
    """A 16-bit model's float32 logits on the CPU go into one reused buffer: the outputs (greedy,
    sampled, several adapters, requests joining as others finish) equal those of fresh tensors."""
    from mcl_runtime.engine.model_runner import ModelRunner

    params = [SamplingParams(max_tokens=12 + i, temperature=0.8 * (i % 2), seed=i, ignore_eos=True) for i in range(8)]
    reused, runner = bf16_outputs(params, overlap)
    assert runner._logits is not None and runner._logits.dtype == torch.float32
    monkeypatch.setattr(ModelRunner, "_logits_buffer", lambda self, rows: None)
    fresh, runner = bf16_outputs(params, overlap)
    assert runner._logits is None and reused == fresh
