"""How the agents reach a model: one ``chat`` call per agent step, addressed by agent name.

``ChatClient`` is the whole interface the pipeline needs. Two implementations:
``OpenAIChatClient`` (any OpenAI-compatible server; ``model`` is the agent's adapter name) and
``EngineChatClient`` (the in-process ``AsyncEngine``; the prompt is the tokenizer's chat template).
A request the backend refuses (prompt too long, bad parameters) raises ``ChatError``, which the
pipeline records as a failed call; anything else (server unreachable) propagates.

``session`` names the problem a call belongs to: ``OpenAIChatClient`` sends it as the ``X-Session-ID``
header, which keeps all of a problem's calls on one replica of a replicated server (and so in one
prefix cache). ``OpenAIChatClient`` retries a call that fails with a connection error, a timeout, a
408/409/429 or a 5xx up to ``max_retries`` times, with the openai client's exponential backoff (0.5 s
doubling to 8 s, jittered, or the server's ``Retry-After``): agent calls are idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class ChatError(RuntimeError):
    """The backend refused this one request."""


@dataclass(frozen=True)
class ChatReply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


class ChatClient(Protocol):
    async def chat(
        self,
        agent: str,
        messages: list[dict],
        max_tokens: int,
        temperature: float,
        structured: dict | None = None,
        session: str | None = None,
    ) -> ChatReply: ...

    # ``structured``: a constraint on the answer, as vLLM's ``structured_outputs`` (e.g. {"grammar": ...})


def _check_request(messages: list[dict], max_tokens: int, temperature: float) -> None:
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    if max_tokens < 1 or temperature < 0:
        raise ValueError(f"need max_tokens >= 1 and temperature >= 0, got {max_tokens}, {temperature}")


DEFAULT_RETRIES = 6  # about 24 s of backoff in all: time for a replicated server to route around a dead replica


class OpenAIChatClient:
    """Chat completions against ``base_url``; ``models`` maps an agent to the served model name
    (default: the agent's own name, i.e. its adapter)."""

    def __init__(
        self,
        base_url: str,
        models: dict[str, str] | None = None,
        api_key: str = "EMPTY",
        timeout_s: float = 600.0,
        max_retries: int = DEFAULT_RETRIES,
    ) -> None:
        import openai

        self._openai = openai
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)
        self.models = dict(models or {})

    def model_for(self, agent: str) -> str:
        return self.models.get(agent, agent)

    async def served_models(self) -> list[str]:
        page = await self.client.models.list()
        return [m.id for m in page.data]

    async def chat(
        self,
        agent: str,
        messages: list[dict],
        max_tokens: int,
        temperature: float,
        structured: dict | None = None,
        session: str | None = None,
    ) -> ChatReply:
        _check_request(messages, max_tokens, temperature)
        extra: dict = {"extra_body": {"structured_outputs": structured}} if structured else {}
        if session is not None:
            extra["extra_headers"] = {"X-Session-ID": session}
        try:
            resp = await self.client.chat.completions.create(
                model=self.model_for(agent), messages=messages, max_tokens=max_tokens, temperature=temperature, **extra
            )
        except (self._openai.BadRequestError, self._openai.UnprocessableEntityError) as exc:
            raise ChatError(f"{agent}: request refused: {exc}") from exc
        choice = resp.choices[0]
        usage = resp.usage
        return ChatReply(
            choice.message.content or "",
            getattr(usage, "prompt_tokens", 0) or 0,
            getattr(usage, "completion_tokens", 0) or 0,
            choice.finish_reason,
        )

    async def close(self) -> None:
        await self.client.close()


class EngineChatClient:
    """Chat through an in-process ``mcl_runtime.AsyncEngine``; ``adapters`` maps an agent to its
    adapter name (default: the agent's own name when the engine has it, else the base model)."""

    def __init__(self, aengine: Any, adapters: dict[str, str | None] | None = None) -> None:
        self.aengine = aengine
        self.adapters = dict(adapters or {})

    def adapter_for(self, agent: str) -> str | None:
        if agent in self.adapters:
            return self.adapters[agent]
        return agent if agent in self.aengine.engine.adapters else None

    async def chat(
        self,
        agent: str,
        messages: list[dict],
        max_tokens: int,
        temperature: float,
        structured: dict | None = None,
        session: str | None = None,  # one engine: nothing to route
    ) -> ChatReply:
        from mcl_runtime import SamplingParams

        _check_request(messages, max_tokens, temperature)
        prompt = self.aengine.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        extra = {"structured": structured} if structured else {}
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, **extra)
        last = None
        try:
            async for out in self.aengine.generate(prompt, params, adapter=self.adapter_for(agent)):
                last = out
        except ValueError as exc:  # InvalidRequestError is a ValueError
            raise ChatError(f"{agent}: request refused: {exc}") from exc
        if last is None:
            raise ChatError(f"{agent}: the engine returned no output")
        return ChatReply(last.text, len(last.prompt_token_ids), len(last.token_ids), last.finish_reason)

    async def close(self) -> None:
        return None
