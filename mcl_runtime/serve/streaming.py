"""Streaming plumbing of the server: server-sent events, merging the outputs of a request's
prompts, aborting when the client disconnects, and the chunk shapes of streamed responses."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mcl_runtime import RequestOutput
from mcl_runtime.serve.protocol import Usage

T = TypeVar("T")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


class SSEResponse(StreamingResponse):
    """Closes its event generator however the response ends, so engine requests are aborted at once."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Awaits ``awaitable``, cancelling it (and so aborting its engine requests) if the client leaves."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        gone = not work.done()
        if gone:
            work.cancel()
    if gone:
        raise ClientGone()
    return work.result()


def _settle(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


async def _pump(index: int, gen: AsyncIterator[T], queue: asyncio.Queue) -> None:
    async with aclosing(gen) as items:  # type: ignore[type-var]
        async for item in items:
            queue.put_nowait((index, item))


async def merge(gens: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleaves several async iterators as ``(index, item)``; closing it cancels them all."""
    if len(gens) == 1:
        async with aclosing(gens[0]) as items:  # type: ignore[type-var]
            async for item in items:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(i, gen, queue)) for i, gen in enumerate(gens)]
    for task in tasks:
        task.add_done_callback(_settle)
        task.add_done_callback(queue.put_nowait)
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if not isinstance(item, asyncio.Task):
                yield item
                continue
            remaining -= 1
            if not item.cancelled() and item.exception() is not None:
                raise item.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()


async def last_outputs(stream: AsyncIterator[tuple[int, RequestOutput]]) -> dict[int, RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    async with aclosing(stream) as items:  # type: ignore[type-var]
        async for index, out in items:
            finals[index] = out
    return finals


def usage(outs: Iterable[RequestOutput]) -> Usage:
    """Token counts of a request's final (whole) outputs."""
    outs = list(outs)
    prompt = sum(len(out.prompt_token_ids) for out in outs)
    completion = sum(len(o.token_ids) for out in outs for o in out.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ChunkWriter:
    """Server-sent event payloads of one streamed request, from the engine's delta outputs (each
    holds the text and token ids new since the last one); subclasses give the chunk shape."""

    object_name = ""

    def __init__(self, request_id: str, model: str, n: int) -> None:
        self.request_id, self.model, self.n = request_id, model, n
        self.created = int(time.time())
        self.done: set[int] = set()  # choices whose finish reason was sent
        self.prompt_tokens: dict[int, int] = {}  # per prompt
        self.completion_tokens = 0

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def _choice(self, index: int, piece: str, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def opening(self) -> list[dict[str, Any]]:
        return []

    def update(self, prompt_index: int, out: RequestOutput) -> list[dict[str, Any]]:
        self.prompt_tokens[prompt_index] = len(out.prompt_token_ids)
        chunks = []
        for o in out.outputs:
            index = prompt_index * self.n + o.index
            if index in self.done:
                continue
            self.completion_tokens += len(o.token_ids)
            if o.finish_reason is not None:
                self.done.add(index)
            if o.text or o.finish_reason is not None:
                chunks.append(self._chunk([self._choice(index, o.text, o.finish_reason)]))
        return chunks

    def usage_chunk(self) -> dict[str, Any]:
        prompt = sum(self.prompt_tokens.values())
        counts = Usage(
            prompt_tokens=prompt, completion_tokens=self.completion_tokens, total_tokens=prompt + self.completion_tokens
        )
        return self._chunk([], usage=counts.model_dump())


class CompletionChunks(ChunkWriter):
    object_name = "text_completion"

    def __init__(self, request_id: str, model: str, n: int, echoes: list[str]) -> None:
        super().__init__(request_id, model, n)
        self.echoes = echoes

    def _choice(self, index: int, piece: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": piece, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> list[dict[str, Any]]:
        return [
            self._chunk([self._choice(p * self.n + i, echo, None)])
            for p, echo in enumerate(self.echoes)
            if echo
            for i in range(self.n)
        ]


class ChatChunks(ChunkWriter):
    object_name = "chat.completion.chunk"

    def _choice(self, index: int, piece: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": piece} if piece else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> list[dict[str, Any]]:
        return [
            self._chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
            for i in range(self.n)
        ]


async def sse_events(
    first: tuple[int, RequestOutput] | None,
    outs: AsyncIterator[tuple[int, RequestOutput]],
    writer: ChunkWriter,
    include_usage: bool,
    error_event: Callable[[Exception], dict[str, Any]],
) -> AsyncIterator[str]:
    """The events of a streamed response; an error while streaming becomes one error event."""
    try:
        for chunk in writer.opening():
            yield sse(chunk)
        item = first
        while item is not None:
            for chunk in writer.update(*item):
                yield sse(chunk)
            item = await anext(outs, None)
        if include_usage:
            yield sse(writer.usage_chunk())
    except Exception as exc:
        yield sse(error_event(exc))
    finally:
        await outs.aclose()  # type: ignore[attr-defined]
    yield sse("[DONE]")
