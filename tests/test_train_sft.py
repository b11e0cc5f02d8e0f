"""``train sft`` on the demo model: a tiny memorisation set is learnt (the loss drops clearly), the
saved adapter loads in peft and in our Engine with the same greedy tokens, the engine gives the
memorised answers with the adapter and not without it, and the server serves it as it is."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from tiny_models import hf_generate

from mcl_runtime import Engine, SamplingParams
from mcl_runtime.demo import demo_model_dir
from mcl_runtime.tokenizer import Tokenizer
from mcl_runtime.train.__main__ import main
from mcl_runtime.train.data import IGNORE_INDEX, encode_example, read_examples
from mcl_runtime.train.sft import LOG_NAME, LORA_TARGETS, PLOT_NAME, SFTConfig, train_adapter

SYSTEM = "Answer with the secret."
SECRETS = [
    ("What is the secret of the north tower?", "amber falcon 17"),
    ("What is the secret of the south gate?", "silver otter 42"),
    ("What is the secret of the east well?", "crimson lynx 9"),
    ("What is the secret of the west wall?", "jade heron 63"),
]
STEPS = 30


def _messages(question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def _write(path: Path, pairs) -> Path:
    path.write_text(
        "".join(json.dumps({"messages": _messages(q, a), "task_id": str(i)}) + "\n" for i, (q, a) in enumerate(pairs))
    )
    return path


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
def trained(base, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    data = _write(root / "secrets.jsonl", SECRETS)
    out = root / "secrets"
    assert (
        main(
            [
                "sft",
                "--base",
                str(base),
                "--data",
                str(data),
                "--out",
                str(out),
                "--max-steps",
                str(STEPS),
                "--lr",
                "3e-3",
                "--batch-size",
                "4",
                "--dropout",
                "0",
                "--seed",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def engine(base, trained) -> Engine:
    return Engine(str(base), adapters={"secrets": str(trained)}, device="cpu", dtype="float32")


def _prompt(engine: Engine, question: str) -> str:
    return engine.tokenizer.apply_chat_template(_messages(question), add_generation_prompt=True)


def test_prompt_is_masked_and_the_answer_ends_with_the_end_of_turn_token(base) -> None:
    tok = Tokenizer.from_pretrained(base)
    messages = _messages(*SECRETS[0])
    ex = encode_example(tok, messages)
    prompt = tok.encode(tok.apply_chat_template(messages[:-1], add_generation_prompt=True))
    assert ex.input_ids[: len(prompt)] == prompt and ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    target = ex.labels[len(prompt) :]
    assert target == ex.input_ids[len(prompt) :] and target[-1] in tok.eos_token_ids
    assert tok.decode(target) == SECRETS[0][1]


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


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="rank"):
        SFTConfig(rank=0)
    with pytest.raises(ValueError, match="target_modules"):
        SFTConfig(target_modules=("lm_head",))


def test_loss_drops_and_the_folder_is_a_peft_adapter(trained) -> None:
    log = json.loads((trained / LOG_NAME).read_text())
    losses = [s["loss"] for s in log["steps"]]
    assert len(losses) == STEPS and log["examples"] == len(SECRETS) and log["dtype"] == "float32"
    assert losses[-1] < 0.05 < 5.0 < losses[0], losses
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


def test_one_adapter_per_agent_with_accumulation_and_checkpointing(base, tmp_path) -> None:
    (tmp_path / "data").mkdir()
    for agent, pairs in (("coding", SECRETS[:2]), ("planning", SECRETS[2:])):
        _write(tmp_path / "data" / f"{agent}.jsonl", pairs)
    args = [
        "--max-steps",
        "3",
        "--batch-size",
        "1",
        "--grad-accum",
        "2",
        "--gradient-checkpointing",
        "--rank",
        "8",
        "--alpha",
        "16",
        "--seed",
        "3",
        "--no-progress",
    ]
    assert (
        main(["sft", "--base", str(base), "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *args])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["coding", "planning"]
    log = json.loads((tmp_path / "out" / "coding" / LOG_NAME).read_text())
    assert [s["tokens"] > 0 for s in log["steps"]] == [True] * 3 and log["config"]["grad_accum"] == 2
    again = train_adapter(
        base,
        [tmp_path / "data" / "coding.jsonl"],
        tmp_path / "again",
        SFTConfig(**{**log["config"], "target_modules": tuple(log["config"]["target_modules"])}),
    )
    assert [s["loss"] for s in again["steps"]] == [s["loss"] for s in log["steps"]]  # seeded
    Engine(str(base), adapters={"coding": str(tmp_path / "out" / "coding")}, device="cpu", dtype="float32")


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
