"""The embedded demo model: byte-identical builds, loadable by transformers + peft, adapters that matter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcl_runtime import demo
from mcl_runtime.demo import (
    ADAPTER_NAMES,
    ADAPTER_SPECS,
    DEMO_MODEL_NAME,
    build_demo_model,
    demo_adapter_dirs,
    demo_model_dir,
)
from mcl_runtime.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

PROMPT = "<|im_start|>user\nWrite a function that adds two numbers.<|im_end|>\n<|im_start|>assistant\n"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root() -> Path:
    return demo_model_dir()


@pytest.fixture(scope="module")
def base_model(root):
    return transformers.AutoModelForCausalLM.from_pretrained(str(root / "base")).eval()


@pytest.fixture(scope="module")
def input_ids(root):
    return torch.tensor([Tokenizer.from_pretrained(root / "base").encode(PROMPT)])


def test_layout(root):
    assert root == Path(os.environ["MCL_CACHE"]) / DEMO_MODEL_NAME
    assert {p.name for p in (root / "base").iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    dirs = demo_adapter_dirs()
    assert list(dirs) == list(ADAPTER_NAMES)
    for name, path in dirs.items():
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert (cfg["peft_type"], cfg["task_type"], cfg["r"]) == ("LORA", "CAUSAL_LM", ADAPTER_SPECS[name].rank)
        assert (path / "adapter_model.safetensors").is_file()
    cfg = json.loads((root / "base" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["max_position_embeddings"] >= 16384


def test_builds_are_byte_identical(root, tmp_path):
    build_demo_model(tmp_path / "a")
    build_demo_model(tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b == _files(root)
    assert len(a) == 5 + 2 * len(ADAPTER_NAMES) + 1


def test_concurrent_first_builds(tmp_path):
    code = "from mcl_runtime.demo import demo_model_dir; print(demo_model_dir())"
    env = {**os.environ, "MCL_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs == [str(tmp_path / DEMO_MODEL_NAME)] * 3
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [DEMO_MODEL_NAME]


def test_stale_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("MCL_CACHE", str(tmp_path))
    folder = demo_model_dir()
    (folder / "build.json").write_text('{"builder_sha256": "old"}')
    (folder / "base" / "config.json").write_text("{}")
    assert demo_model_dir() == folder
    assert json.loads((folder / "base" / "config.json").read_text())["model_type"] == "qwen2"


def test_hf_tokenizer_agrees(root):
    hf = transformers.AutoTokenizer.from_pretrained(str(root / "base"))
    ours = Tokenizer.from_pretrained(root / "base")
    assert hf.encode(PROMPT, add_special_tokens=False) == ours.encode(PROMPT)
    assert len(hf) == ours.vocab_size == demo.VOCAB_SIZE


def test_base_model_logits_have_margins(base_model, input_ids):
    assert base_model.config.num_key_value_heads < base_model.config.num_attention_heads
    with torch.no_grad():
        logits = base_model(input_ids).logits[0]
    top2 = logits.topk(2, dim=-1).values
    assert logits.std() > 2.0
    assert (top2[:, 0] - top2[:, 1]).median() > 0.2


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_adapter_loads_with_peft_and_changes_logits(root, base_model, input_ids, name):
    with torch.no_grad():
        base_logits = base_model(input_ids).logits
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(root / "base")), str(root / "adapters" / name)
    ).eval()
    saved = safetensors_torch.load_file(str(root / "adapters" / name / "adapter_model.safetensors"))
    loaded = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    spec = ADAPTER_SPECS[name]
    assert model.peft_config["default"].use_rslora == spec.use_rslora
    with torch.no_grad():
        lora_logits = model(input_ids).logits
    assert (lora_logits - base_logits).abs().mean() > 0.5
    assert (lora_logits.argmax(-1) != base_logits.argmax(-1)).any()


def test_main_explains_itself(root, capsys):
    demo.main()
    out = capsys.readouterr().out
    assert "RANDOM" in out and "noise" in out
    assert "one forward pass over 5 sequences" in out and "tokens/s" in out
    assert "blocks of 16 tokens used" in out and "from the prefix cache" in out
    for command in ("mcl_runtime.serve", "mcl_runtime.pipeline", "mcl_runtime.train sft", "--model Qwen/"):
        assert command in out
