"""The embedded demo model ``mcl-demo-tiny``: a tiny seeded Qwen2-shaped model and four LoRA adapters.

``demo_model_dir()`` builds it on first call into ``$MCL_CACHE/mcl-demo-tiny`` (default
``~/.cache/mcl_runtime``) and returns that folder::

    base/                      Hugging Face Qwen2 folder (config.json, generation_config.json,
                               model.safetensors, tokenizer.json, tokenizer_config.json)
    adapters/retrieval/        PEFT LoRA folders (adapter_config.json, adapter_model.safetensors)
    adapters/planning/
    adapters/coding/
    adapters/debugging/
    build.json                 which builder made the folder (rebuilt when the builder changes)

Everything is derived from fixed seeds and written with a fixed layout, so the folder is
byte-identical on every machine: weights come from ``numpy.random.default_rng`` uniform draws
(integer arithmetic only), safetensors and JSON are written here with sorted keys, and the byte-level
BPE merges are learned by a small deterministic trainer from the corpus embedded below.

Model: Qwen2 with vocab 512 (256 bytes, 253 merges, ``<|endoftext|>`` 509, ``<|im_start|>`` 510,
``<|im_end|>`` 511), hidden 128, 3 layers, 4 query heads and 2 KV heads of dim 32, intermediate 256,
qkv bias, rope_theta 1e6, 32768 positions, untied embeddings, float32. The weights are scaled so that
logits are spread out (std about 3), which gives greedy decoding clear margins. Adapters (``ADAPTER_SPECS``):
retrieval r=8 on q,v; planning r=16 on k,o,up,down; coding r=32 on all seven projections; debugging
r=16 with rsLoRA on all seven; every LoRA delta is about half its projection's output.

``demo_engine()`` is an ``Engine`` on it with the four adapters. ``python -m mcl_runtime.demo`` builds
the model, says what it is (random weights: its text is noise), serves all four adapters and the
base model in one batch (tokens/s, KV blocks, prefix-cache hits) and prints the commands to try next.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mcl_runtime.model.arch import BY_NAME, PROJECTION_NAMES
from mcl_runtime.model.config import ModelConfig, parse_config

if TYPE_CHECKING:
    from mcl_runtime.engine.llm_engine import Engine

DEMO_MODEL_NAME = "mcl-demo-tiny"
ADAPTER_NAMES = ("retrieval", "planning", "coding", "debugging")
SEED = 20250601

VOCAB_SIZE = 512
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 256
NUM_LAYERS = 3
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
MAX_POSITIONS = 32768
ROPE_THETA = 1000000.0
RMS_NORM_EPS = 1e-6
LOGIT_STD = 3.0

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = range(VOCAB_SIZE - len(SPECIAL_TOKENS), VOCAB_SIZE)


@dataclass(frozen=True)
class AdapterSpec:
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    use_rslora: bool = False


ADAPTER_SPECS: dict[str, AdapterSpec] = {
    "retrieval": AdapterSpec(8, 16, ("q_proj", "v_proj")),
    "planning": AdapterSpec(16, 32, ("k_proj", "o_proj", "up_proj", "down_proj")),
    "coding": AdapterSpec(32, 64, PROJECTION_NAMES),
    "debugging": AdapterSpec(16, 32, PROJECTION_NAMES, use_rslora=True),
}

# Qwen2.5's ChatML template without the tool-calling branches.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (loop.first and message['role'] == 'system') %}\n"
    "        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Qwen2's pre-tokenizer split pattern.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = '''
You are a programmer. Given a competitive programming problem, recall three relevant problems,
write a plan for each of them, and then generate the code that solves the original problem.
## Problem
Given an array of integers nums and an integer target, return the indices of the two numbers such
that they add up to target. You may assume that each input has exactly one solution.
## Plan
1. Create an empty dictionary that maps each value to its index.
2. Iterate over the array; for each number check whether target minus the number is in the dictionary.
3. If it is, return the two indices; otherwise store the number and its index and continue.
## Algorithm
The problem uses a hash table. The time complexity is linear and the space complexity is linear.
<root>
<problem>
<description>Find the longest increasing subsequence of the list.</description>
<code>def longest(nums): ...</code>
<planning>Use dynamic programming over the prefix of the list.</planning>
</problem>
<algorithm>Dynamic programming, greedy search, binary search, sorting, graphs and strings.</algorithm>
</root>
Confidence: 90. The plan is correct because it checks every input and returns the expected output.
The sample test failed: the output was wrong for the input below. Modify the code and explain the fix.

def two_sum(nums: list[int], target: int) -> list[int]:
    """Return the indices of the two numbers that add up to target."""
    seen = {}
    for index, value in enumerate(nums):
        if target - value in seen:
            return [seen[target - value], index]
        seen[value] = index
    return []


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for i in range(2, int(n ** 0.5) + 1):
        if n % i == 0:
            return False
    return True


class Solution:
    def __init__(self, values):
        self.values = sorted(values)

    def count(self, low, high):
        result = 0
        for value in self.values:
            if low <= value <= high:
                result += 1
        return result


def main():
    n = int(input())
    numbers = list(map(int, input().split()))
    print(sum(numbers) if n > 0 else 0)


if __name__ == "__main__":
    main()

assert two_sum([2, 7, 11, 15], 9) == [0, 1]
assert is_prime(7) and not is_prime(8)
The string is a palindrome if it reads the same forwards and backwards. Return True or False.
Write a function that returns the number of vowels in the given string, then test the function.
Sample input: 3 and the numbers 1 2 3. Sample output: 6. Explain the error, then write the fixed code.
Le café est très bon, naïve façade, über schön, déjà vu. 日本語のテキスト。 数据结构和算法。 → ≤ ≥ ✓
'''


def cache_root() -> Path:
    """``$MCL_CACHE``, or ``~/.cache/mcl_runtime`` when it is not set."""
    return Path(os.environ.get("MCL_CACHE") or Path.home() / ".cache" / "mcl_runtime").expanduser()


def demo_model_dir() -> Path:
    """The demo model folder (``base/`` and ``adapters/<name>/``), built on first call."""
    root = cache_root()
    final = root / DEMO_MODEL_NAME
    if _is_current(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root / f".{DEMO_MODEL_NAME}.lock"):
        if not _is_current(final):
            _build_and_swap(root, final)
    return final


def demo_adapter_dirs() -> dict[str, Path]:
    """Adapter name -> PEFT adapter folder of the demo model."""
    root = demo_model_dir()
    return {name: root / "adapters" / name for name in ADAPTER_NAMES}


def demo_engine(adapters: dict[str, str | os.PathLike] | None = None, **engine_kwargs: Any) -> Engine:
    """An ``Engine`` on the demo model, served as ``mcl-demo-tiny``, with its four adapters (or
    exactly ``adapters`` when given); other keyword arguments go to ``Engine``."""
    from mcl_runtime import Engine

    engine_kwargs.setdefault("served_model_name", DEMO_MODEL_NAME)
    return Engine(
        model=demo_model_dir() / "base", adapters=demo_adapter_dirs() if adapters is None else adapters, **engine_kwargs
    )


def build_demo_model(out_dir: str | os.PathLike) -> None:
    """Write the whole demo model (``base/``, ``adapters/``, ``build.json``) into ``out_dir``."""
    out = Path(out_dir)
    base = out / "base"
    base.mkdir(parents=True, exist_ok=True)
    _write_tokenizer_files(base)
    _write_json(base / "config.json", _model_config())
    _write_json(base / "generation_config.json", _generation_config())
    _write_safetensors(base / "model.safetensors", _base_weights())
    for name in ADAPTER_NAMES:
        adapter_dir = out / "adapters" / name
        adapter_dir.mkdir(parents=True, exist_ok=True)
        _write_json(adapter_dir / "adapter_config.json", _adapter_config(ADAPTER_SPECS[name]))
        _write_safetensors(adapter_dir / "adapter_model.safetensors", _adapter_weights(name, ADAPTER_SPECS[name]))
    _write_json(out / "build.json", _build_stamp())


# ---------------------------------------------------------------- cache folder management

# The stamp names the builder's source, so an edited builder rebuilds stale caches.
_BUILDER_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _build_stamp() -> dict[str, str]:
    return {"builder_sha256": _BUILDER_HASH, "name": DEMO_MODEL_NAME}


def _is_current(folder: Path) -> bool:
    try:
        return json.loads((folder / "build.json").read_text()) == _build_stamp()
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (``fcntl``); where that is missing the atomic rename suffices."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_and_swap(root: Path, final: Path) -> None:
    """Build into a temporary sibling folder, then rename it into place (moving a stale one aside)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_NAME}.build.", dir=root))
    try:
        build_demo_model(tmp)
        os.chmod(tmp, 0o755)
        if final.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_NAME}.stale.", dir=root))
            os.replace(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_current(final):  # a concurrent builder without fcntl may have won the rename
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- deterministic writers


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format written by hand: sorted names, float32 little-endian, fixed metadata."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        size = tensors[name].size * 4
        header[name] = {"data_offsets": [offset, offset + size], "dtype": "F32", "shape": list(tensors[name].shape)}
        offset += size
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name], dtype="<f4").tobytes())


def _uniform(name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Uniform draws with the given std, seeded by (SEED, name); ``random()`` is exact integer arithmetic."""
    name_seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([SEED, name_seed])
    return ((rng.random(shape) * 2.0 - 1.0) * (std * math.sqrt(3.0))).astype(np.float32)


# ---------------------------------------------------------------- base model


def _model_config() -> dict[str, Any]:
    return {
        "_name_or_path": DEMO_MODEL_NAME,
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
        "max_window_layers": NUM_LAYERS,
        "model_type": "qwen2",
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_scaling": None,
        "rope_theta": ROPE_THETA,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB_SIZE,
    }


def _generation_config() -> dict[str, Any]:
    return {
        "bos_token_id": ENDOFTEXT_ID,
        "do_sample": False,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "pad_token_id": ENDOFTEXT_ID,
    }


def _config() -> ModelConfig:
    return parse_config(_model_config(), DEMO_MODEL_NAME)


def _module_path(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{BY_NAME[module].parent}.{module}"


def _base_weights() -> dict[str, np.ndarray]:
    w = {
        "model.embed_tokens.weight": _uniform("embed", (VOCAB_SIZE, HIDDEN_SIZE), 1.0),
        "model.norm.weight": 1.0 + _uniform("norm", (HIDDEN_SIZE,), 0.1),
        "lm_head.weight": _uniform("lm_head", (VOCAB_SIZE, HIDDEN_SIZE), LOGIT_STD / math.sqrt(HIDDEN_SIZE)),
    }
    for layer in range(NUM_LAYERS):
        w.update(_layer_weights(layer))
    return w


def _layer_weights(layer: int) -> dict[str, np.ndarray]:
    prefix = f"model.layers.{layer}"
    w = {
        f"{prefix}.input_layernorm.weight": 1.0 + _uniform(f"{prefix}.ln1", (HIDDEN_SIZE,), 0.1),
        f"{prefix}.post_attention_layernorm.weight": 1.0 + _uniform(f"{prefix}.ln2", (HIDDEN_SIZE,), 0.1),
    }
    cfg = _config()
    for module, (in_f, out_f) in cfg.projection_shapes().items():
        path = _module_path(layer, module)
        gain = 2.0 if module == "q_proj" else 1.0  # sharper attention than uniform averaging
        w[f"{path}.weight"] = _uniform(path, (out_f, in_f), gain / math.sqrt(in_f))
        if getattr(cfg, BY_NAME[module].bias):
            w[f"{path}.bias"] = _uniform(f"{path}.bias", (out_f,), 0.2)
    return w


# ---------------------------------------------------------------- adapters


def _adapter_config(spec: AdapterSpec) -> dict[str, Any]:
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": DEMO_MODEL_NAME,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(spec.target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": spec.use_rslora,
    }


def _adapter_weights(name: str, spec: AdapterSpec) -> dict[str, np.ndarray]:
    """A and B both non-zero; B is scaled so each LoRA delta is about half the base projection's output."""
    scaling = spec.alpha / (math.sqrt(spec.rank) if spec.use_rslora else spec.rank)
    b_std = 0.5 / (scaling * math.sqrt(spec.rank))
    shapes = _config().projection_shapes()
    w = {}
    for layer in range(NUM_LAYERS):
        for module in spec.target_modules:
            in_f, out_f = shapes[module]
            key = f"base_model.model.{_module_path(layer, module)}"
            w[f"{key}.lora_A.weight"] = _uniform(f"{name}.{key}.A", (spec.rank, in_f), 1.0 / math.sqrt(in_f))
            w[f"{key}.lora_B.weight"] = _uniform(f"{name}.{key}.B", (out_f, spec.rank), b_std)
    return w


# ---------------------------------------------------------------- tokenizer


def _pre_tokenize(text: str) -> list[str]:
    """Qwen2's normalizer + pre-tokenizer, giving byte-level-mapped words."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return [piece for piece, _ in pre.pre_tokenize_str(normalizers.NFC().normalize_str(text))]


def _train_bpe(corpus: str, num_tokens: int) -> tuple[dict[str, int], list[str]]:
    """Byte tokens (id = byte value) plus merges learned greedily: most frequent pair, ties by the pair."""
    from mcl_runtime.tokenizer import byte_level_alphabet

    vocab = dict(sorted(byte_level_alphabet().items(), key=lambda item: item[1]))
    words = {tuple(word): count for word, count in Counter(_pre_tokenize(corpus)).items()}
    merges: list[str] = []
    while len(vocab) < num_tokens:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            raise RuntimeError("the demo corpus is too small for the requested vocabulary")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = {_merge_word(word, best): count for word, count in words.items()}
    return vocab, merges


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _byte_level(kind: str) -> dict[str, Any]:
    return {"add_prefix_space": False, "trim_offsets": False, "type": kind, "use_regex": False}


def _added_token(token_id: int, content: str) -> dict[str, Any]:
    return {
        "content": content,
        "id": token_id,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _tokenizer_json() -> dict[str, Any]:
    vocab, merges = _train_bpe(_CORPUS, VOCAB_SIZE - len(SPECIAL_TOKENS))
    return {
        "added_tokens": [_added_token(ENDOFTEXT_ID + i, tok) for i, tok in enumerate(SPECIAL_TOKENS)],
        "decoder": _byte_level("ByteLevel"),
        "model": {
            "byte_fallback": False,
            "continuing_subword_prefix": "",
            "dropout": None,
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "merges": merges,
            "type": "BPE",
            "unk_token": None,
            "vocab": vocab,
        },
        "normalizer": {"type": "NFC"},
        "padding": None,
        "post_processor": _byte_level("ByteLevel"),
        "pre_tokenizer": {
            "pretokenizers": [
                {"behavior": "Isolated", "invert": False, "pattern": {"Regex": PRETOKENIZE_REGEX}, "type": "Split"},
                _byte_level("ByteLevel"),
            ],
            "type": "Sequence",
        },
        "truncation": None,
        "version": "1.0",
    }


def _tokenizer_config() -> dict[str, Any]:
    decoder = {}
    for i, tok in enumerate(SPECIAL_TOKENS):
        entry = _added_token(ENDOFTEXT_ID + i, tok)
        del entry["id"]
        decoder[str(ENDOFTEXT_ID + i)] = entry
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MAX_POSITIONS,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_tokenizer_files(base: Path) -> None:
    _write_json(base / "tokenizer.json", _tokenizer_json())
    _write_json(base / "tokenizer_config.json", _tokenizer_config())


# ---------------------------------------------------------------- command line


def main() -> None:
    from mcl_runtime import SamplingParams

    root = demo_model_dir()
    print(
        f"{DEMO_MODEL_NAME}: a tiny Qwen2-shaped model ({NUM_LAYERS} layers, hidden {HIDDEN_SIZE}, vocab "
        f"{VOCAB_SIZE}) with four LoRA adapters, in {root}\n"
        "Its weights are RANDOM (seeded, byte-identical everywhere), so the text below is noise: the demo\n"
        "shows the runtime (one base model serving several LoRA adapters in one batch over a paged KV cache),\n"
        "not a language model.\n"
    )
    engine = demo_engine()
    messages = [{"role": "user", "content": "Write a function that returns the sum of a list."}]
    prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    names = [*ADAPTER_NAMES, None]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    engine.generate(["warm-up"], SamplingParams(max_tokens=2), adapter=[names[0]])  # first-call costs out of the timing
    texts = _serve_together(engine, prompt, names, params)
    for name, text in zip(names, texts):
        print(f"  {name or '(base model)':>14}: {text!r}")
    before = engine.stats()["prefix_cache_hit_tokens"]
    engine.generate([prompt] * len(names), params, adapter=names)
    hits = engine.stats()["prefix_cache_hit_tokens"] - before
    prompt_tokens = len(engine.tokenizer.encode(prompt)) * len(names)
    print(
        f"\nThe same five requests again: {hits} of their {prompt_tokens} prompt tokens came from the prefix cache "
        "(kept per adapter: a LoRA changes the KV).\n"
    )
    print(_NEXT_STEPS.format(base=root / "base"))


def _serve_together(engine: Engine, prompt: str, names: list[str | None], params: Any) -> list[str]:
    """Run one request per adapter (None: the base model) together, printing what each step did."""
    import time

    start = engine.stats()
    for i, name in enumerate(names):
        engine.add_request(f"demo-{i}", prompt, params, name)
    texts: dict[str, str] = {}
    peak_blocks, steps, t0 = 0, 0, time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                texts[out.request_id] = out.text
        steps += 1
        stats = engine.stats()
        peak_blocks = max(peak_blocks, stats["kv_blocks_used"])
        if steps == 1:
            seqs = stats["batched_seqs_total"] - start["batched_seqs_total"]
            served = ", ".join(n or "base model" for n in names)
            print(
                f"Step 1: one forward pass over {seqs} sequences ({served}), "
                f"{stats['batched_tokens_total'] - start['batched_tokens_total']} tokens."
            )
    seconds = time.perf_counter() - t0
    stats = engine.stats()
    tokens = stats["generation_tokens_total"] - start["generation_tokens_total"]
    print(
        f"{steps} steps, {tokens} tokens generated in {seconds:.2f} s: {tokens / seconds:.0f} tokens/s on "
        f"{engine.device} ({str(engine.dtype).removeprefix('torch.')}, {engine.backend.name} backend)\n"
        f"KV cache: {peak_blocks} of {stats['kv_blocks_total']} blocks of {engine.block_size} tokens used at "
        f"the peak; prefix-cache hits: {stats['prefix_cache_hit_tokens'] - start['prefix_cache_hit_tokens']} "
        "tokens."
    )
    return [texts[f"demo-{i}"] for i in range(len(names))]


_NEXT_STEPS = """Next:
  python -m mcl_runtime.serve                  # OpenAI-compatible server on this model and its adapters
  python -m mcl_runtime.pipeline --dataset humaneval --limit 2 --out results.jsonl
                                               # MapCoder's four agents, one adapter each, on HumanEval
  python -m mcl_runtime.train sft --base {base} --data FILE.jsonl --out coding_lora
                                               # fine-tune a LoRA (collect/correct make the data)
  python -m mcl_runtime.serve --model Qwen/Qwen2.5-Coder-7B-Instruct --lora coding=ORG/ADAPTER --device cuda
                                               # a real model and adapters by hub id (or local folders)"""


if __name__ == "__main__":
    main()
