"""Engine(compile=True): the static decode path (bucket padding, one graph per bucket) against
transformers + peft in fp32 greedy, with no graph break and no recompilation on a second run.

Most tests trace with dynamo's ``aot_eager`` backend (the same capture, without Inductor's C++
code generation, which costs minutes on a 2-core CPU); one slow test runs Inductor itself.
"""

import pytest
import torch
from tiny_models import hf_generate
from torch._dynamo.utils import counters

from mcl_runtime import Engine, SamplingParams
from mcl_runtime.engine.model_runner import batch_buckets
from mcl_runtime.model.cpu_backend import CPUBackend

MAX_NEW = 10
LENGTHS = [5, 17, 9, 3, 12]  # 5 sequences: decode steps pad to the bucket of 8
NAMES = {"qwen2": ["a4", None, "a8", "a16", "a8"], "llama": ["l8", None, "l16", "l8", None]}


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 250, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(params=["qwen2", "llama"])
def family(request, qwen_family, llama_family):
    base, adapters = qwen_family if request.param == "qwen2" else llama_family
    return request.param, base, adapters


@pytest.fixture
def aot_eager():
    """Engines made with ``compile=True`` trace with aot_eager: the same graph, no generated code."""
    torch._dynamo.reset()
    counters.clear()
    return {"compile_backend": "aot_eager"}


def _generate(engine: Engine, prompts, names) -> list[list[int]]:
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True), adapter=names)
    return [o.token_ids for o in outs]


def _engine(base, adapters, **kwargs) -> Engine:
    return Engine(
        str(base),
        adapters={k: str(v) for k, v in adapters.items()},
        device="cpu",
        dtype="float32",
        max_model_len=64,
        **kwargs,
    )


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]


@pytest.mark.parametrize(
    "knobs",
    [dict(), dict(block_size=4, kv_cache_blocks=14), dict(overlap=True)],
    ids=["plain", "preemption", "overlap"],
)
def test_compiled_decode_matches_hf(family, aot_eager, knobs):
    name, base, adapters = family
    prompts = _prompts()
    ref = hf_generate(base, adapters, prompts, NAMES[name], MAX_NEW)
    engine = _engine(base, adapters, compile=True, max_num_seqs=8, **knobs, **aot_eager)
    assert _generate(engine, prompts, NAMES[name]) == [list(r) for r in ref]
    assert not counters["graph_break"]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert _generate(engine, prompts, NAMES[name]) == [list(r) for r in ref]
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation on the second run


def test_compile_on_the_cpu_warns(qwen_family, caplog):
    """On the CPU the compiled decode replaces the C++ kernels and is slower: the engine says so."""
    base, adapters = qwen_family
    with caplog.at_level("WARNING", logger="mcl_runtime.engine.llm_engine"):
        _engine(base, adapters, compile=True, max_num_seqs=2)
    assert "compile=True on the CPU" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mcl_runtime.engine.llm_engine"):
        _engine(base, adapters, max_num_seqs=2)
    assert "compile=True" not in caplog.text


def test_compiled_decode_keeps_the_plain_weights(qwen_family, aot_eager):
    """With every weight packed for oneDNN, eager prefills read the packed copies and the compiled
    decode graphs the plain weights, which the engine therefore keeps: the tokens of transformers +
    peft."""
    base, adapters = qwen_family
    prompts = _prompts()
    ref = hf_generate(base, adapters, prompts, NAMES["qwen2"], MAX_NEW)
    backend = CPUBackend()
    backend.ONEDNN_MIN_WEIGHT = 0
    engine = _engine(base, adapters, compile=True, max_num_seqs=8, backend=backend, **aot_eager)
    assert _generate(engine, prompts, NAMES["qwen2"]) == [list(r) for r in ref]
    assert all(w.numel() for w in engine.model.linear_weights())


def test_bucket_padding_never_changes_a_token(qwen_family, aot_eager):
    """5 sequences padded to 8 (and, as they finish, other buckets) give the eager tokens of 5 alone."""
    base, adapters = qwen_family
    prompts, names = _prompts(), NAMES["qwen2"]
    eager = _generate(_engine(base, adapters, max_num_seqs=8), prompts, names)
    engine = _engine(base, adapters, compile=True, max_num_seqs=8, **aot_eager)
    outs = engine.generate(
        prompts, [SamplingParams(max_tokens=MAX_NEW - i, ignore_eos=True) for i in range(5)], adapter=names
    )
    assert [o.token_ids for o in outs] == [t[: MAX_NEW - i] for i, t in enumerate(eager)]


@pytest.mark.slow
def test_inductor_decode_matches_hf(qwen_family):
    torch._dynamo.reset()
    counters.clear()
    base, adapters = qwen_family
    prompts, names = _prompts()[:2], ["a8", None]
    ref = hf_generate(base, adapters, prompts, names, 4)
    engine = _engine(base, adapters, compile=True, max_num_seqs=2)
    outs = engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), adapter=names)
    assert [o.token_ids for o in outs] == [list(r) for r in ref]
    assert not counters["graph_break"]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiled_backend_is_one_graph(qwen_family, aot_eager, backend):
    """The Triton kernels enter the compiled forward as custom ops (kernels/ops.py; they run in
    Triton's interpreter on the CPU); the reference backend's static steps pad keys to the block
    table's width and mask every slot's LoRA per token. Either way: no graph break, and the tokens
    of transformers + peft."""
    base, adapters = qwen_family
    prompts, names = _prompts()[:3], NAMES["qwen2"][:3]
    ref = hf_generate(base, adapters, prompts, names, 4)
    engine = _engine(base, adapters, compile=True, backend=backend, max_num_seqs=4, **aot_eager)
    outs = engine.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), adapter=names)
    assert [o.token_ids for o in outs] == [list(r) for r in ref]
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] >= 1


def test_a_compiled_engine_changes_no_process_wide_setting(qwen_family, aot_eager):
    """The recompile limit the buckets need is raised around the engine's own compiled calls only."""
    base, adapters = qwen_family
    before = torch._dynamo.config.recompile_limit
    engine = _engine(base, adapters, compile=True, max_num_seqs=8, **aot_eager)
    _generate(engine, _prompts(), NAMES["qwen2"])
    assert torch._dynamo.config.recompile_limit == before
