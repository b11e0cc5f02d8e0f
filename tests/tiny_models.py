"""Tiny random-weight Qwen2 / Llama / Qwen3 / Mistral models and PEFT adapters, saved the way transformers and peft
save them, plus the HF reference generation the engine is compared against."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mcl_runtime.model.arch import ARCHITECTURES
from mcl_runtime.tokenizer import byte_level_alphabet

# What each tiny model sets beyond the common shapes: Qwen3 with a head_dim that is not hidden // heads,
# Mistral with a sliding window no shorter than its context (so full attention is exact).
ARCH_KWARGS = {
    "qwen2": dict(rope_theta=1e6),
    "llama": dict(rope_theta=5e5),
    "qwen3": dict(rope_theta=1e6, head_dim=32),
    "mistral": dict(rope_theta=1e6, sliding_window=512),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_byte_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer with no merges (256 byte tokens + 3 specials); returns its size."""
    vocab = {ch: i for i, ch in enumerate(byte_level_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 4096,
            }
        )
    )
    return tok.get_vocab_size()


def make_model(folder: Path, arch: str = "qwen2", seed: int = 0, tie: bool = False, std: float = 0.25) -> Path:
    """Save a tiny random model (HF layout + tokenizer) into ``folder``."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_byte_tokenizer(folder)
    common = dict(
        vocab_size=vocab + 5,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        initializer_range=std,
        eos_token_id=vocab - 1,
        bos_token_id=None,
        pad_token_id=vocab - 3,
    )
    torch.manual_seed(seed)
    hf_class = ARCHITECTURES[arch].hf_class
    config = getattr(transformers, hf_class.replace("ForCausalLM", "Config"))(**common, **ARCH_KWARGS[arch])
    model = getattr(transformers, hf_class)(config)
    with torch.no_grad():  # biases and q/k norms are initialised to zeros / ones: make them matter
        for name, p in model.named_parameters():
            if name.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight")):
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, std)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_adapter(
    base: Path, folder: Path, r: int, alpha: int, targets: list[str], seed: int, rslora: bool = False
) -> Path:
    """A PEFT LoRA with random A and B (not the zero-B init, so it changes the outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5 / r**0.5)
    peft_model.save_pretrained(folder)
    return folder


def hf_generate(
    base: Path, adapters: dict[str, Path], prompts: list[list[int]], names: list[str | None], max_new_tokens: int
) -> list[list[int]]:
    """Greedy fp32 tokens from transformers (+ peft), one prompt at a time, EOS ignored."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapters:
        items = list(adapters.items())
        model = PeftModel.from_pretrained(model, items[0][1], adapter_name=items[0][0])
        for name, path in items[1:]:
            model.load_adapter(path, adapter_name=name)
    outs = []
    for ids, name in zip(prompts, names):
        kwargs = dict(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        with torch.no_grad():
            if name is None:
                if adapters:
                    with model.disable_adapter():
                        out = model.generate(**kwargs)
                else:
                    out = model.generate(**kwargs)
            else:
                model.set_adapter(name)
                out = model.generate(**kwargs)
        outs.append(out[0, len(ids) :].tolist())
    return outs
