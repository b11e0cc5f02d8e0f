"""What the architecture registry derives from a config.json (golden equality per architecture is
in test_engine_golden.py)."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from mcl_runtime import Engine, ModelLoadError
from mcl_runtime.engine import llm_engine
from mcl_runtime.model.config import parse_config

BASE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (dict(model_type="qwen2"), dict(head_dim=16, qkv_bias=True, o_bias=False, qk_norm=False)),
        (dict(model_type="llama", attention_bias=True, mlp_bias=True), dict(qkv_bias=True, o_bias=True, mlp_bias=True)),
        (dict(model_type="qwen3"), dict(head_dim=128, qkv_bias=False, qk_norm=True)),
        (dict(model_type="qwen3", head_dim=32), dict(head_dim=32, q_size=128)),
        (dict(model_type="mistral", attention_bias=True), dict(qkv_bias=False, o_bias=False, sliding_window=None)),
        (dict(model_type="mistral", sliding_window=4096), dict(sliding_window=4096)),
        (dict(model_type="qwen2", sliding_window=4096, use_sliding_window=False), dict(sliding_window=None)),
        (dict(model_type="qwen3", sliding_window=64, use_sliding_window=True), dict(sliding_window=64)),
        (dict(model_type="qwen2", torch_dtype="bfloat16"), dict(checkpoint_dtype="bfloat16")),
        (dict(model_type="qwen2", dtype="float16"), dict(checkpoint_dtype="float16")),  # transformers 5's key
        (dict(model_type="qwen2", torch_dtype="auto"), dict(checkpoint_dtype=None)),
    ],
)
def test_config_flags(raw, expected):
    cfg = parse_config({**BASE, **raw})
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(ModelLoadError, match="qwen2, llama, qwen3, mistral"):
        parse_config({**BASE, "model_type": "gemma"})


def test_sliding_window_shorter_than_the_context_is_refused(tmp_path, model_family):
    base, _ = model_family("mistral")
    folder = shutil.copytree(base, tmp_path / "mistral")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "sliding_window": 64}))
    with pytest.raises(ModelLoadError, match="sliding-window attention over 64 tokens.*max_model_len=64"):
        Engine(str(folder), device="cpu")
    assert Engine(str(folder), device="cpu", max_model_len=64, kv_cache_blocks=16).max_model_len == 64


@pytest.mark.parametrize("native_bf16", [True, False])
def test_default_dtype_keeps_a_bfloat16_checkpoint_where_the_cpu_computes_it(monkeypatch, native_bf16):
    monkeypatch.setattr(llm_engine, "NATIVE_BF16_GEMM", native_bf16)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert llm_engine.default_dtype(cpu, "bfloat16") == ("bfloat16" if native_bf16 else "float32")
    assert [llm_engine.default_dtype(cpu, d) for d in ("float32", "float16", None)] == ["float32"] * 3
    assert {llm_engine.default_dtype(cuda, d) for d in ("bfloat16", "float32", None)} == {"bfloat16"}


def test_engine_dtype_auto_follows_the_checkpoint(tmp_path, model_family, monkeypatch):
    """None and "auto" take ``default_dtype``; an explicit dtype wins; an unknown one is a ValueError."""
    base, _ = model_family("qwen2")
    folder = shutil.copytree(base, tmp_path / "bf16")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    monkeypatch.setattr(llm_engine, "NATIVE_BF16_GEMM", True)

    def make(**dtype) -> Engine:
        return Engine(str(folder), device="cpu", kv_cache_blocks=16, max_loras=0, **dtype)

    assert make().dtype == make(dtype="auto").dtype == torch.bfloat16
    assert make(dtype="float32").dtype == torch.float32
    monkeypatch.setattr(llm_engine, "NATIVE_BF16_GEMM", False)
    assert make().dtype == torch.float32
    with pytest.raises(ValueError, match="auto"):
        make(dtype="float64")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_torch_path_is_bit_identical_to_the_transformers_formula(dtype):
    """The reference backend's RMSNorm (also the torch path of the cpu and triton backends: CUDA,
    compiled graphs, no extension); the CPU kernel is held to the kernel rule against the same
    formula in tests/test_kernels_layer_ops.py."""
    from mcl_runtime.model import layers
    from mcl_runtime.model.reference_backend import ReferenceBackend

    ctx = SimpleNamespace(backend=ReferenceBackend())
    torch.manual_seed(0)
    norm = layers.RMSNorm(96, 1e-6, dtype, torch.device("cpu"))
    norm.weight.copy_(torch.randn(96))
    x, residual = (3 * torch.randn(37, 96)).to(dtype), torch.randn(37, 96).to(dtype)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(norm(x, ctx), norm.weight * h.to(dtype))
    normed, new_residual = norm(x, ctx, residual)
    assert torch.equal(new_residual, x + residual) and torch.equal(normed, norm(x + residual, ctx))
