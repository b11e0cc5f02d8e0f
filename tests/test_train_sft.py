"""``train sft`` (TRL's SFTTrainer + peft) on the demo model: a tiny memorisation set is learnt (the loss
drops clearly), the saved adapter loads in peft and in our Engine with the same greedy tokens, the engine
gives the memorised answers with the adapter and not without it, and the server serves it as it is. The
loss mask TRL trains on equals the hand-written loop's, and our trainer's LM head (labelled positions only)
gives TRL's loss, gradients and metrics; resume, packing, eval splits, two processes under ``accelerate
launch`` and bad input are covered too."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import hf_generate

from mcl_runtime import Engine, SamplingParams
from mcl_runtime.demo import demo_model_dir
from mcl_runtime.tokenizer import Tokenizer
from mcl_runtime.train.__main__ import main
from mcl_runtime.train.data import read_examples
from mcl_runtime.train.sft import LOG_NAME, LORA_TARGETS, PLOT_NAME, SFTConfig, sft_trainer, train_adapter

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "Answer with the secret."
SECRETS = [
    ("What is the secret of the north tower?", "amber falcon 17"),
    ("What is the secret of the south gate?", "silver otter 42"),
    ("What is the secret of the east well?", "crimson lynx 9"),
    ("What is the secret of the west wall?", "jade heron 63"),
]
STEPS = 30
QUIET = ["--dropout", "0", "--no-progress"]


def _messages(question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def _write(path: Path, pairs) -> Path:
    path.write_text(
        "".join(json.dumps({"messages": _messages(q, a), "task_id": str(i)}) + "\n" for i, (q, a) in enumerate(pairs))
    )
    return path


def _cli(*args: str, launcher: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    """``LAUNCHER -m mcl_runtime.train ARGS`` from the repository root, where a top-level package of
    the checkout could shadow an installed one (``kernels`` did: transformers imports Hugging Face's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    command = [*launcher, "-m", "mcl_runtime.train", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _log(folder: Path) -> dict:
    return json.loads((folder / LOG_NAME).read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: a second thread only adds contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base() -> Path:
    return demo_model_dir() / "base"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("data") / "secrets.jsonl", SECRETS)


@pytest.fixture(scope="module")
def trained(base, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "secrets"
    args = ["--max-steps", str(STEPS), "--lr", "3e-3", "--batch-size", "4", "--seed", "0", *QUIET]
    proc = _cli("sft", "--base", str(base), "--data", str(data), "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def engine(base, trained) -> Engine:
    return Engine(str(base), adapters={"secrets": str(trained)}, device="cpu", dtype="float32")


def _prompt(engine: Engine, question: str) -> str:
    return engine.tokenizer.apply_chat_template(_messages(question), add_generation_prompt=True)


# ---------------------------------------------------------------- the loss mask


def reference_encoding(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The hand-written loop's tokens and labels (its ``encode_example``, verbatim): the prompt encoded
    on its own, the rest of the rendering up to the first end-of-sequence token as the target."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if full.startswith(prompt):
        answer = full[len(prompt) :]
    else:
        eos = tokenizer.id_to_token(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else ""
        answer = messages[-1]["content"] + (eos or "")
    prompt_ids, answer_ids = tokenizer.encode(prompt), tokenizer.encode(answer)
    ends = [i for i, t in enumerate(answer_ids) if t in tokenizer.eos_token_ids]
    if ends:
        answer_ids = answer_ids[: ends[0] + 1]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _bos_base(demo: Path, folder: Path) -> Path:
    """The demo model with a Llama-style tokenizer: it adds a BOS to plain text, the chat template
    writes the BOS too, and its eos_token is not the template's end-of-turn token."""
    shutil.copytree(demo, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [509], "tokens": ["<|endoftext|>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", chat_template="{{ bos_token }}" + cfg["chat_template"]
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


MASK_EXAMPLES = [
    _messages(*SECRETS[0]),
    [{"role": "user", "content": "no system message"}, {"role": "assistant", "content": "\n\nstarts with newlines"}],
    [
        {"role": "system", "content": "Repair the code."},
        {"role": "user", "content": "def f(x):\n    return x +"},
        {"role": "assistant", "content": "```python\ndef f(x):\n    return x + 1\n```"},
        {"role": "user", "content": "Now in one line, with ünïcödé ✓"},
        {"role": "assistant", "content": "f = lambda x: x + 1  # ✓ <|im_end|> inside"},
    ],
    [{"role": "user", "content": "empty answer"}, {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("tokenizer_style", ["demo", "bos"])
def test_trl_trains_on_the_mask_of_the_hand_written_loop(base, tmp_path, tokenizer_style) -> None:
    folder = base if tokenizer_style == "demo" else _bos_base(base, tmp_path / "bos_base")
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in MASK_EXAMPLES))
    prepared = sft_trainer(folder, [data], tmp_path / "out", SFTConfig(progress=False))
    rows = prepared.trainer.train_dataset
    assert len(rows) == len(MASK_EXAMPLES)
    tokenizer = Tokenizer.from_pretrained(folder)
    for example, row in zip(MASK_EXAMPLES, rows):
        input_ids, labels = reference_encoding(tokenizer, example)
        assert row["input_ids"] == input_ids
        assert row["labels"] == labels
    batch = prepared.trainer.data_collator([rows[i] for i in range(len(rows))])
    for i, example in enumerate(MASK_EXAMPLES):  # right-padded, padding out of the loss
        labels = reference_encoding(tokenizer, example)[1]
        assert batch["labels"][i].tolist() == labels + [-100] * (batch["labels"].shape[1] - len(labels))
    if tokenizer_style == "bos":
        assert rows[0]["input_ids"][:2] == [509, tokenizer.token_to_id("<|im_start|>")]  # one BOS, the template's


# ---------------------------------------------------------------- the LM head and the batches


def _step(trainer, batch: dict, num_items_in_batch) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
    """compute_loss and backward on ``batch``: the loss, the LoRA gradients and the metrics logged."""
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items_in_batch)
    if trainer.model.training:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    mode = "train" if trainer.model.training else "eval"
    return loss.item(), grads, {k: v[-1] for k, v in trainer._metrics[mode].items()}


@pytest.mark.parametrize("packing", [False, True])
def test_the_answer_head_gives_trls_loss_gradients_and_metrics(base, tmp_path, monkeypatch, packing) -> None:
    """On the CPU our trainer's LM head projects the labelled positions only; TRL's own trainer, with the
    same LoRA weights on the same batch (padded, or packed padding-free), gives the same loss (with and
    without ``num_items_in_batch``), LoRA gradients, logged entropy and token accuracy, and FLOPs estimate."""
    import trl

    import mcl_runtime.train.trainer as ours

    ours_class = ours.SFTTrainer
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in MASK_EXAMPLES + [_messages(*SECRETS[1])]))
    config = SFTConfig(dropout=0.0, batch_size=8, packing=packing, progress=False)
    trainer = sft_trainer(base, [data], tmp_path / "ours", config).trainer
    monkeypatch.setattr(ours, "SFTTrainer", trl.SFTTrainer)
    reference = sft_trainer(base, [data], tmp_path / "trl", config).trainer
    assert type(trainer) is ours_class and type(reference) is trl.SFTTrainer
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA B is zero at first: give every LoRA weight a gradient
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    reference.model.load_state_dict(trainer.model.state_dict())
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():  # every other label the model's top-1 token, so that token accuracy is not 0
        top1 = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
    labels = batch["labels"]
    flip = (labels[:, 1:] != -100) & (torch.arange(labels.shape[1] - 1) % 2 == 0)
    labels[:, 1:][flip] = top1[:, :-1][flip]
    answers = int((labels[:, 1:] != -100).sum())
    assert trainer.floating_point_ops(batch) == trl.SFTTrainer.floating_point_ops(trainer, batch) > 0
    for mode, num_items in (("train", torch.tensor(2 * answers)), ("train", None), ("eval", None)):
        got, want = [], []
        for t, out in ((trainer, got), (reference, want)):
            t.model.train(mode == "train")
            out.extend(_step(t, batch, num_items))
        assert got[0] == pytest.approx(want[0], rel=1e-6), mode
        if mode == "train":
            assert got[1].keys() == want[1].keys() and len(got[1]) == 2 * 7 * 3  # A and B of 7 projections x 3
            scale = max(g.abs().max().item() for g in want[1].values())
            assert all(torch.allclose(got[1][k], want[1][k], rtol=0, atol=1e-5 * scale) for k in got[1])
        assert got[2]["entropy"] == pytest.approx(want[2]["entropy"], rel=1e-5)
        assert got[2]["mean_token_accuracy"] == want[2]["mean_token_accuracy"] > 0.4
        assert got[2]["num_tokens"] == want[2]["num_tokens"]


def test_length_buckets_group_the_steps_of_any_split_by_length() -> None:
    """Each epoch every example once, in steps sorted by length within groups of 64 steps (with fewer
    examples, the padding of a full sort), the steps shuffled and the short last step last; seeded,
    reshuffled each epoch. (The trainer's step is the batch of every process and accumulation step, so
    the steps do not depend on the split: the two-process test below checks it.)"""
    from mcl_runtime.train.trainer import LengthBuckets

    lengths = [(i * 37) % 101 + 1 for i in range(83)]
    sampler = LengthBuckets(lengths, step_size=8, seed=0)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(83)) and len(sampler) == 83
        steps = [order[i : i + 8] for i in range(0, 83, 8)]
        assert len(steps[-1]) == 3
        spans = [max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in steps]
        assert sum(spans) < 101  # disjoint ranges of lengths: a full sort cut into steps
        epochs.append(order)
    assert epochs[0] != epochs[1]
    sampler.set_epoch(0)
    assert list(sampler) == epochs[0] == list(LengthBuckets(lengths, 8, seed=0))
    assert list(LengthBuckets(lengths, 8, seed=1)) != epochs[0]
    many = [(i * 7919) % 1000 for i in range(2000)]  # groups of 64 steps: each sorted on its own
    order = list(LengthBuckets(many, 8, seed=0))
    assert sorted(order) == list(range(2000))
    steps = [order[i : i + 8] for i in range(0, 2000, 8)]
    assert all(max(many[i] for i in s) - min(many[i] for i in s) < 40 for s in steps)


# ---------------------------------------------------------------- data and config errors


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}', "at least one prompt message"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}',
            "must be the assistant",
        ),
        ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "message 0"),
        ('{"text": "hi"}', "'messages' list"),
        ("not json", "line 2"),
    ],
)
def test_bad_examples_are_refused_with_the_line(tmp_path, line, message) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": _messages("q", "a")}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_examples(path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank"),
        ({"save_steps": 0}, "save_steps"),
        ({"target_modules": ("lm_head",)}, "target_modules"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"report_to": "wandb"}, "report_to"),
        ({"bf16": True, "dtype": "float16"}, "bf16"),
    ],
)
def test_bad_configs_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SFTConfig(**kwargs)


def _not_a_model(tmp_path: Path, base: Path) -> tuple[dict, list[str], str]:
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hello")
    return (
        {"--base": tmp_path / "folder"},
        [],
        f"{tmp_path / 'folder'} is not a Hugging Face model folder: no config.json",
    )


def _bad_config(tmp_path: Path, base: Path) -> tuple[dict, list[str], str]:
    shutil.copytree(base, tmp_path / "folder")
    (tmp_path / "folder" / "config.json").write_text("{not json")
    return {"--base": tmp_path / "folder"}, [], f"{tmp_path / 'folder' / 'config.json'} is not valid JSON"


def _empty(tmp_path: Path, base: Path) -> tuple[dict, list[str], str]:
    (tmp_path / "empty.jsonl").write_text("")
    return {"--data": tmp_path / "empty.jsonl"}, [], f"no training examples in {tmp_path / 'empty.jsonl'}"


def _malformed(tmp_path: Path, base: Path) -> tuple[dict, list[str], str]:
    (tmp_path / "bad.jsonl").write_text('{"messages": [\n')
    return {"--data": tmp_path / "bad.jsonl"}, [], f"{tmp_path / 'bad.jsonl'}: line 1"


def _missing(tmp_path: Path, base: Path) -> tuple[dict, list[str], str]:
    return {"--data": tmp_path / "nope.jsonl"}, [], f"training data {tmp_path / 'nope.jsonl'} does not exist"


def _no_checkpoint(tmp_path: Path, base: Path) -> tuple[dict, list[str], str]:
    (tmp_path / "out").mkdir()
    return {}, ["--resume"], f"nothing to resume in {tmp_path / 'out'}: it has no checkpoint-N folder"


def _not_a_checkpoint(tmp_path: Path, base: Path) -> tuple[dict, list[str], str]:
    return {}, ["--resume", str(tmp_path)], f"{tmp_path} is not a training checkpoint"


def _eval_steps_without_a_split(tmp_path: Path, base: Path) -> tuple[dict, list[str], str]:
    return {}, ["--eval-steps", "2"], "eval_steps needs an eval split"


@pytest.mark.parametrize(
    "case",
    [
        _not_a_model,
        _bad_config,
        _empty,
        _malformed,
        _missing,
        _no_checkpoint,
        _not_a_checkpoint,
        _eval_steps_without_a_split,
    ],
)
def test_bad_input_is_one_clear_line_naming_the_file(base, data, tmp_path, capsys, case) -> None:
    paths, extra, message = case(tmp_path, base)
    paths = {"--base": base, "--data": data, "--out": tmp_path / "out", **paths}
    argv = ["sft", *[str(x) for kv in paths.items() for x in kv], "--max-steps", "1", *QUIET, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_report_to_tensorboard_without_it_is_a_clear_error(base, data, tmp_path, capsys) -> None:
    argv = ["sft", "--base", str(base), "--data", str(data), "--out", str(tmp_path), "--report-to", "tensorboard"]
    assert main([*argv, *QUIET]) == 2
    assert "needs the tensorboard package" in capsys.readouterr().err


# ---------------------------------------------------------------- training


def test_loss_drops_and_the_folder_is_a_peft_adapter(base, trained) -> None:
    log = _log(trained)
    losses = [s["loss"] for s in log["steps"]]
    assert len(losses) == STEPS and log["examples"] == len(SECRETS) and log["dtype"] == "float32"
    assert [s["step"] for s in log["steps"]] == list(range(1, STEPS + 1))
    assert losses[-1] < 0.05 < 5.0 < losses[0], losses
    tok = Tokenizer.from_pretrained(base)
    assert log["answer_tokens"] == sum(len(tok.encode(a)) + 1 for _, a in SECRETS)  # the answer + end of turn
    config = json.loads((trained / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 32, 64)
    assert sorted(config["target_modules"]) == sorted(LORA_TARGETS)
    assert (trained / "adapter_model.safetensors").is_file()
    assert (trained / PLOT_NAME).read_bytes().startswith(b"\x89PNG")


def test_peft_and_engine_give_the_same_greedy_tokens(base, trained, engine) -> None:
    prompts = [engine.tokenizer.encode(_prompt(engine, q)) for q in (SECRETS[1][0], "Tell me a story.")]
    ref = hf_generate(base, {"secrets": trained}, prompts, ["secrets", "secrets"], 12)
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True), adapter="secrets")
    assert [o.token_ids for o in outs] == ref


def test_engine_gives_the_memorised_answers_with_the_adapter_only(engine) -> None:
    prompts = [_prompt(engine, q) for q, _ in SECRETS]
    outs = engine.generate(prompts * 2, SamplingParams(max_tokens=16), adapter=["secrets"] * 4 + [None] * 4)
    answers = [a for _, a in SECRETS]
    assert [o.text for o in outs[:4]] == answers
    assert all(o.finish_reason == "stop" for o in outs[:4])
    assert all(o.text != a for o, a in zip(outs[4:], answers))


def test_one_adapter_per_agent_with_accumulation_checkpointing_and_eval(base, tmp_path) -> None:
    (tmp_path / "data").mkdir()
    for agent, pairs in (("coding", SECRETS[:3]), ("planning", SECRETS[1:])):
        _write(tmp_path / "data" / f"{agent}.jsonl", pairs)
    args = ["--max-steps", "3", "--batch-size", "1", "--grad-accum", "2", "--gradient-checkpointing"]
    args += ["--rank", "8", "--alpha", "16", "--seed", "3", "--eval-fraction", "0.34", "--no-progress"]
    assert (
        main(["sft", "--base", str(base), "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *args])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["coding", "planning"]
    log = _log(tmp_path / "out" / "coding")
    assert (log["examples"], log["eval_examples"], log["config"]["grad_accum"]) == (2, 1, 2)
    assert len(log["steps"]) == 3 and [e["step"] for e in log["eval"]] == [3] and log["final_eval_loss"] > 0
    again = train_adapter(
        base,
        [tmp_path / "data" / "coding.jsonl"],
        tmp_path / "again",
        SFTConfig(**{**log["config"], "target_modules": tuple(log["config"]["target_modules"])}),
    )
    assert [s["loss"] for s in again["steps"]] == [s["loss"] for s in log["steps"]]  # seeded
    assert again["final_eval_loss"] == log["final_eval_loss"]
    Engine(str(base), adapters={"coding": str(tmp_path / "out" / "coding")}, device="cpu", dtype="float32")


def test_resume_continues_from_the_last_checkpoint_to_the_same_end(base, data, tmp_path) -> None:
    """A run stopped after its step-2 checkpoint and resumed ends where the uninterrupted run ends."""
    common = ["--base", str(base), "--data", str(data), "--max-steps", "4", "--batch-size", "2", "--lr", "3e-3"]
    common += ["--save-steps", "2", "--eval-data", str(data), *QUIET]
    assert main(["sft", *common, "--out", str(tmp_path / "whole")]) == 0
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", cut / "checkpoint-2")
    assert main(["sft", *common, "--out", str(cut), "--resume"]) == 0
    whole, resumed = _log(tmp_path / "whole"), _log(cut)
    assert resumed["resumed_from"] == str(cut / "checkpoint-2") and resumed["total_steps"] == 4
    assert [s["step"] for s in resumed["steps"]] == [1, 2, 3, 4]
    assert [e["step"] for e in resumed["eval"]] == [2, 4]
    for key in ("steps", "eval"):
        for a, b in zip(whole[key], resumed[key]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), key
    one, two = _adapter(tmp_path / "whole"), _adapter(cut)
    assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)


def test_train_unfreezes_the_objects_it_froze_and_sets_glibcs_heap(base, data, tmp_path) -> None:
    """``SFTTrainer.train`` leaves the objects that exist before it out of garbage collection only while it
    runs, and on glibc keeps the freed heap between steps (``keep_freed_heap``)."""
    from mcl_runtime.train.trainer import keep_freed_heap  # imports TRL, which the GPU image lacks

    prepared = sft_trainer(base, [data], tmp_path / "out", SFTConfig(max_steps=2, batch_size=4, progress=False))
    frozen = gc.get_freeze_count()
    prepared.trainer.train()
    assert gc.get_freeze_count() == frozen
    if platform.libc_ver()[0] == "glibc":
        assert keep_freed_heap()


def test_packing_trains_on_the_same_tokens_as_padded_batches(base, data, tmp_path) -> None:
    """Padding-free packing (one row, attention kept within each example) gives the padded batch's loss."""
    common = ["--base", str(base), "--data", str(data), "--max-steps", "1", "--batch-size", "4", *QUIET]
    assert main(["sft", *common, "--out", str(tmp_path / "padded")]) == 0
    assert main(["sft", *common, "--out", str(tmp_path / "packed"), "--packing"]) == 0
    padded, packed = _log(tmp_path / "padded"), _log(tmp_path / "packed")
    assert packed["answer_tokens"] == padded["answer_tokens"] and packed["config"]["packing"]
    assert packed["first_loss"] == pytest.approx(padded["first_loss"], rel=1e-5)


def test_two_processes_under_accelerate_match_one_with_the_same_global_batch(base, tmp_path) -> None:
    """Two CPU processes (gloo) under ``accelerate launch``, batch 2 each, against one process with batch
    4: the same steps, losses within 1e-5 relative, and adapter weights within 1% of the farthest AdamW
    can move a weight in those steps (lr x steps = 6e-4); measured here: 1e-7 relative and 9e-8.
    ``--multi_gpu`` is accelerate's torchrun launcher: its ``--cpu`` starts one process unless mpirun is
    set up; ``--device cpu`` then makes each process a CPU one."""
    pairs = SECRETS + [(q.replace("secret", "password"), a[::-1]) for q, a in SECRETS]
    data = _write(tmp_path / "eight.jsonl", pairs)
    common = ["--base", str(base), "--data", str(data), "--max-steps", "3", "--lr", "2e-4", "--device", "cpu", *QUIET]
    one = _cli("sft", *common, "--out", str(tmp_path / "one"), "--batch-size", "4")
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2")
    two = _cli("sft", *common, "--out", str(tmp_path / "two"), "--batch-size", "2", launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("adapter in") == 1  # printed by the main process only
    log_one, log_two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert (log_one["processes"], log_two["processes"]) == (1, 2)
    assert [s["loss"] for s in log_two["steps"]] == pytest.approx([s["loss"] for s in log_one["steps"]], rel=1e-5)
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.01 * 2e-4 * 3


def test_the_accelerate_configs_of_the_training_docs_load(tmp_path) -> None:
    """docs/training.md's FSDP and DeepSpeed ZeRO-3 files are configs accelerate reads (they cannot run here)."""
    from accelerate.commands.config.config_args import load_config_from_file

    blocks = [b.split("```", 1)[0] for b in (ROOT / "docs" / "training.md").read_text().split("```yaml\n")[1:]]
    kinds = []
    for i, block in enumerate(blocks):
        (tmp_path / f"{i}.yaml").write_text(block)
        config = load_config_from_file(str(tmp_path / f"{i}.yaml"))
        kinds.append((str(config.distributed_type), config.num_processes, str(config.mixed_precision)))
    assert kinds == [("DistributedType.FSDP", 8, "bf16"), ("DistributedType.DEEPSPEED", 8, "bf16")], kinds


# ---------------------------------------------------------------- serving


def _serve(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcl_runtime.serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    found: queue.Queue[str] = queue.Queue()

    def drain() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("mcl_runtime.serve: serving"):
                found.put(line.split(" at ")[1].split()[0])

    threading.Thread(target=drain, daemon=True).start()
    try:
        return proc, found.get(timeout=180)
    except queue.Empty:
        proc.kill()
        raise RuntimeError("the server did not start") from None


@pytest.mark.server_stack
def test_the_server_serves_the_trained_adapter(trained) -> None:
    proc, url = _serve("--lora", f"secrets={trained}", "--device", "cpu", "--dtype", "float32")
    try:
        for question, answer in SECRETS[:2]:
            resp = httpx.post(
                f"{url}/chat/completions",
                timeout=60,
                json={"model": "secrets", "messages": _messages(question), "max_tokens": 16, "temperature": 0},
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["message"]["content"] == answer
    finally:
        proc.terminate()
        proc.wait(timeout=60)
