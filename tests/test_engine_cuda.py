"""On a CUDA device: the Triton backend (compiled kernels) gives the torch backend's tokens and
both equal transformers + peft in fp32; bf16 runs mixed batches end to end."""
import pytest

from mcl_runtime import Engine, SamplingParams

pytestmark = pytest.mark.cuda


def _generate(base, adapters, backend, dtype, prompts, names, max_tokens=24, overlap=True):
    engine = Engine(str(base), adapters={k: str(v) for k, v in adapters.items()}, device="cuda", dtype=dtype,
                    backend=backend, kv_cache_blocks=1024, block_size=16, max_num_batched_tokens=64,
                    overlap=overlap)
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
    torch_tokens, _ = _generate(base, adapters, "torch", "float32", prompts, names, overlap=overlap)
    assert triton_tokens == ref and torch_tokens == ref


def test_bf16_mixed_batch_runs(qwen_family):
    base, adapters = qwen_family
    prompts = [[(3 * i + j) % 250 for j in range(20 + i)] for i in range(32)]
    names = [[None, "a4", "a8", "a16"][i % 4] for i in range(32)]
    tokens, engine = _generate(base, adapters, "triton", "bfloat16", prompts, names, max_tokens=16)
    assert all(len(t) == 16 for t in tokens)
    assert engine.stats()["kv_blocks_used"] == 0
