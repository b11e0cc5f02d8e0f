"""Model clients for collection and correction, all speaking the pipeline's ``ChatClient`` protocol.

- ``Endpoint``: an OpenAI base URL and a served model name (``None``: the agent's own name, i.e.
  its adapter, as the pipeline addresses our server); ``label`` is the provenance string.
- ``RoutedClient``: one endpoint per agent (a teacher, optionally per agent), one HTTP client per URL;
  a call's ``structured`` constraint goes out as vLLM's ``structured_outputs`` extra body.
- ``TolerantClient``: turns a reply the client cannot read (no choices, not JSON, a 4xx refusal)
  into ``ChatError``, which the pipeline records as a failed call, so a malformed answer never
  stops a run. Transport and set-up failures (connection, timeout, 5xx, rate limits, bad key,
  unknown model) still propagate: the problem is left unfinished and a resumed run retries it.
- ``ReplayClient``: replays a recorded trajectory's answers up to one call, answers that call with
  a replacement, and asks the live client from then on; the protocol is deterministic given the
  answers, so the pipeline walks the recorded prefix again and continues from the replaced step.
"""

from __future__ import annotations

from dataclasses import dataclass

from mcl_runtime.agents.llm import ChatClient, ChatError, ChatReply, OpenAIChatClient


def _constraint(structured: dict | None) -> dict:
    """``structured`` as keyword arguments of a ``ChatClient.chat`` call: none without a constraint,
    so that clients that take none (as the pipeline allows) work unconstrained."""
    return {"structured": structured} if structured else {}


@dataclass(frozen=True)
class Endpoint:
    url: str
    model: str | None = None

    def model_for(self, agent: str) -> str:
        return self.model or agent

    def label(self, agent: str) -> str:
        return f"{self.model_for(agent)}@{self.url}"

    def to_dict(self) -> dict:
        return {"url": self.url, "model": self.model}


class RoutedClient:
    """Sends each agent's calls to its own endpoint."""

    def __init__(self, endpoints: dict[str, Endpoint], api_key: str = "EMPTY", timeout_s: float = 600.0) -> None:
        if not endpoints:
            raise ValueError("RoutedClient needs at least one agent endpoint")
        self.endpoints = dict(endpoints)
        self._clients = {}
        for url in sorted({e.url for e in endpoints.values()}):
            models = {a: e.model_for(a) for a, e in endpoints.items() if e.url == url}
            self._clients[url] = OpenAIChatClient(url, models, api_key=api_key, timeout_s=timeout_s)

    async def chat(
        self,
        agent: str,
        messages: list[dict],
        max_tokens: int,
        temperature: float,
        structured: dict | None = None,
        session: str | None = None,
    ) -> ChatReply:
        endpoint = self.endpoints.get(agent)
        if endpoint is None:
            raise ValueError(f"no endpoint for agent {agent!r} (known: {sorted(self.endpoints)})")
        return await self._clients[endpoint.url].chat(
            agent, messages, max_tokens, temperature, **_constraint(structured), session=session
        )

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()


def _transport_errors() -> tuple[type[BaseException], ...]:
    import openai

    return (
        openai.APIConnectionError,
        openai.InternalServerError,
        openai.RateLimitError,
        openai.AuthenticationError,
        openai.PermissionDeniedError,
        openai.NotFoundError,
    )


class TolerantClient:
    """``client`` with unreadable replies turned into ``ChatError`` (see the module docstring)."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client

    async def chat(
        self,
        agent: str,
        messages: list[dict],
        max_tokens: int,
        temperature: float,
        structured: dict | None = None,
        session: str | None = None,
    ) -> ChatReply:
        import openai

        try:
            reply = await self.client.chat(
                agent, messages, max_tokens, temperature, **_constraint(structured), session=session
            )
        except (ChatError, *_transport_errors()):
            raise
        except (openai.APIError, TypeError, AttributeError, IndexError, KeyError, ValueError) as exc:
            raise ChatError(f"{agent}: unreadable reply: {type(exc).__name__}: {exc}") from exc
        if not isinstance(reply.text, str):
            raise ChatError(f"{agent}: the reply has no text")
        return reply

    async def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            await close()


class ReplayDiverged(RuntimeError):
    """The re-run asked something the recorded trajectory did not at the same step."""


class ReplayClient:
    """Recorded answers for calls ``0 .. index-1``, ``replacement`` for call ``index``, then ``live``.
    ``recorded`` are the trajectory's call records (``agent``, ``messages``, ``text``, ``error``,
    token counts, ``finish_reason``)."""

    def __init__(self, live: ChatClient, recorded: list[dict], index: int, replacement: str) -> None:
        if not 0 <= index < len(recorded):
            raise ValueError(f"call index {index} is outside the recorded trajectory ({len(recorded)} calls)")
        self.live, self.recorded, self.index, self.replacement = live, recorded, index, replacement
        self.calls = 0

    async def chat(
        self,
        agent: str,
        messages: list[dict],
        max_tokens: int,
        temperature: float,
        structured: dict | None = None,
        session: str | None = None,
    ) -> ChatReply:
        i, self.calls = self.calls, self.calls + 1
        if i > self.index:
            return await self.live.chat(
                agent, messages, max_tokens, temperature, **_constraint(structured), session=session
            )
        rec = self.recorded[i]
        if rec["agent"] != agent or rec["messages"] != messages:
            raise ReplayDiverged(f"call {i} ({agent}) differs from the recorded {rec['agent']} call")
        if i == self.index:
            return ChatReply(self.replacement, 0, 0, "stop")
        if rec.get("error"):
            raise ChatError(rec["error"])
        return ChatReply(
            rec["text"], rec.get("prompt_tokens", 0), rec.get("completion_tokens", 0), rec.get("finish_reason")
        )
