"""The training-data format and how an example becomes tokens.

One example a JSONL line: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
...}``. The last message is the assistant's answer and the only part the loss is taken on; extra
keys carry provenance and are ignored by training.

An example becomes a prompt and a completion, each tokenized on its own, as the engine sees them at
inference: the prompt is ``messages[:-1]`` rendered with the tokenizer's chat template and a
generation prompt; the completion is the rest of the full conversation's rendering (the content and
the end-of-turn token), cut after the first end-of-sequence token. The trainer takes the loss on the
completion only.

The record files the collectors write (append-only JSONL, atomic rewrites) are the pipeline's:
``mcl_runtime.agents.records``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mcl_runtime.tokenizer import Tokenizer

IGNORE_INDEX = -100  # the label of a token out of the loss

ROLES = ("system", "user", "assistant")


def check_example(example: Any) -> dict:
    """``example`` itself when it is a valid training example, else ``ValueError`` saying why."""
    if not isinstance(example, dict) or not isinstance(example.get("messages"), list):
        raise ValueError("an example must be a JSON object with a 'messages' list")
    messages = example["messages"]
    if len(messages) < 2:
        raise ValueError("an example needs at least one prompt message and the assistant's answer")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.200}")
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"the last message is the target and must be the assistant's, got role {messages[-1]['role']!r}"
        )
    return example


def read_examples(path: str | Path) -> list[dict]:
    """Every example of a JSONL file, validated; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} does not exist")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                examples.append(check_example(json.loads(line)))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}: line {number}: {exc}") from exc
    return examples


def prompt_completion(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The prompt and completion tokens of one conversation (``check_example``'s ``messages``)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if full.startswith(prompt):
        answer = full[len(prompt) :]
    else:  # a template whose rendering is not prefix-stable: the answer plus the end-of-turn token
        eos = tokenizer.id_to_token(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else ""
        answer = messages[-1]["content"] + (eos or "")
    ends = [(answer.find(token), token) for token in map(tokenizer.id_to_token, tokenizer.eos_token_ids) if token]
    ends = [(at, token) for at, token in ends if at >= 0]
    if ends:
        at, token = min(ends)
        answer = answer[: at + len(token)]
    if not answer:
        raise ValueError("the assistant's answer renders to no tokens")
    return tokenizer.encode(prompt), tokenizer.encode(answer)
