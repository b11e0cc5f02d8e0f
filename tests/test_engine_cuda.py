"""On a CUDA device: the Triton backend (compiled kernels) gives the reference backend's tokens and
both equal transformers + peft in fp32; bf16 runs mixed batches end to end."""

import pytest

from mcl_runtime import Engine, SamplingParams

pytestmark = pytest.mark.cuda


def _generate(base, adapters, backend, dtype, prompts, names, max_tokens=24, **knobs):
    engine = Engine(
        str(base),
        adapters={k: str(v) for k, v in adapters.items()},
        device="cuda",
        dtype=dtype,
        backend=backend,
        kv_cache_blocks=1024,
        block_size=16,
        max_num_batched_tokens=64,
        **knobs,
    )
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True), adapter=names)
    return [o.token_ids for o in outs], engine


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sync"])
def test_triton_backend_matches_hf_in_fp32(qwen_family, overlap):
    from tiny_models import hf_generate

    base, adapters = qwen_family
    prompts = [[(7 * i + j) % 250 for j in range(n)] for i, n in enumerate([3, 17, 40, 65, 9, 33])]
    names = ["a4", None, "a8", "a16", "a8", None]
    ref = hf_generate(base, adapters, prompts, names, 24)
    triton_tokens, _ = _generate(base, adapters, "triton", "float32", prompts, names, overlap=overlap)
    reference_tokens, _ = _generate(base, adapters, "reference", "float32", prompts, names, overlap=overlap)
    assert triton_tokens == ref and reference_tokens == ref


def test_bf16_mixed_batch_runs(qwen_family):
    base, adapters = qwen_family
    prompts = [[(3 * i + j) % 250 for j in range(20 + i)] for i in range(32)]
    names = [[None, "a4", "a8", "a16"][i % 4] for i in range(32)]
    tokens, engine = _generate(base, adapters, "triton", "bfloat16", prompts, names, max_tokens=16)
    assert all(len(t) == 16 for t in tokens)
    assert engine.stats()["kv_blocks_used"] == 0


def test_cuda_graphs_give_the_eager_tokens(qwen_family):
    """Decode steps replayed from one CUDA graph per bucket (5, 3, 1 running: buckets 8, 4, 1)."""
    base, adapters = qwen_family
    prompts = [[(5 * i + j) % 250 for j in range(n)] for i, n in enumerate([4, 19, 33, 7, 12])]
    names = ["a8", None, "a4", "a16", "a8"]
    eager, _ = _generate(base, adapters, "triton", "bfloat16", prompts, names, cuda_graphs=False)
    graphs, engine = _generate(base, adapters, "triton", "bfloat16", prompts, names, cuda_graphs=True)
    assert graphs == eager
    assert engine.runner.graphs.graphs  # decode steps did run from captured graphs


def test_tokens_do_not_depend_on_the_batch(qwen_family):
    """Split-K and split-KV partial sums are reduced in a fixed order: a request's bf16 tokens are
    the same alone and inside a batch of 24."""
    base, adapters = qwen_family
    prompts = [[(11 * i + j) % 250 for j in range(30 + i)] for i in range(24)]
    names = [[None, "a4", "a8", "a16"][i % 4] for i in range(24)]
    batch, _ = _generate(base, adapters, "triton", "bfloat16", prompts, names, max_tokens=12)
    alone, _ = _generate(base, adapters, "triton", "bfloat16", prompts[2:3], names[2:3], max_tokens=12)
    assert alone[0] == batch[2]
