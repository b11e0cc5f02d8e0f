"""OpenAI-compatible HTTP API over an ``AsyncEngine``: ``build_app(async_engine) -> FastAPI``.

Request semantics beyond OpenAI's:

- ``model`` is the base model's name or a loaded adapter's name (404 otherwise).
- ``max_tokens`` defaults to 16 for completions and to the rest of the context for chat; a value
  below 1 or above the model's context length is a 400; a value that does not fit after the
  prompt is lowered to what fits. A prompt that fills the context is a 400.
- ``temperature`` defaults to 1.0 and ``top_p`` to 1.0, as in OpenAI's API.
- ``logprobs``, ``best_of`` (other than ``n``), ``suffix``, non-zero penalties, ``logit_bias`` and
  ``tools`` are not supported and answered with a 400.
- Chat prompts are rendered with the tokenizer's chat template (the model folder's
  tokenizer_config.json, or ``mcl_runtime.tokenizer.DEFAULT_CHAT_TEMPLATE``, plain ChatML, when it
  has none). Prompts are tokenized here with ``engine.tokenizer`` and passed on as token ids.
- A client that disconnects has its requests aborted at once (their KV blocks are freed).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from mcl_runtime import AsyncEngine, RequestOutput, SamplingParams
from mcl_runtime.errors import AdapterLoadError, AdapterNotFoundError, InvalidRequestError, MCLError, ModelLoadError
from mcl_runtime.serve.metrics import CONTENT_TYPE, ServerMetrics
from mcl_runtime.serve.protocol import (
    AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatMessage,
    CompletionChoice, CompletionRequest, CompletionResponse, ErrorInfo, ErrorResponse,
    LoadLoraRequest, ModelCard, ModelList, UnloadLoraRequest, Usage,
)

T = TypeVar("T")
logger = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_CHOICES = 256  # prompts x n in one request
_LONG_TEXT = 16384  # characters; longer prompts are tokenized off the event loop
# A text prompt longer than this many characters per context token is first measured by a prefix
# of that length, so a huge prompt is refused without tokenizing all of it.
_PREFIX_CHARS_PER_TOKEN = 8
_PREFIX_SLACK = 64  # tokens a cut in mid-word may add
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        info = ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


class _ClientGone(Exception):
    """The client disconnected before its response was ready."""


def _from_exception(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, AdapterLoadError):
        return APIError(400, str(exc), code="adapter_load_error")
    if isinstance(exc, (InvalidRequestError, ModelLoadError)):
        return APIError(400, str(exc), code="invalid_request")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


@dataclass
class _Job:
    """One prompt of a request, checked, tokenized and ready for the engine."""

    prompt: list[int]
    params: SamplingParams
    echo: str = ""


class _SSEResponse(StreamingResponse):
    """Closes its event generator however the response ends, so engine requests are aborted at once."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
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
        raise _ClientGone()
    return work.result()


def _settle(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


async def _pump(index: int, gen: AsyncIterator[T], queue: asyncio.Queue) -> None:
    async with aclosing(gen) as items:  # type: ignore[type-var]
        async for item in items:
            queue.put_nowait((index, item))


async def _merge(gens: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
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


async def _last_outputs(stream: AsyncIterator[tuple[int, RequestOutput]]) -> dict[int, RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    async with aclosing(stream) as items:  # type: ignore[type-var]
        async for index, out in items:
            finals[index] = out
    return finals


def _usage(outs: Iterable[RequestOutput]) -> Usage:
    outs = list(outs)
    prompt = sum(len(out.prompt_token_ids) for out in outs)
    completion = sum(len(o.token_ids) for out in outs for o in out.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _Choice:
    """Turns one choice's cumulative text into the increments a stream sends. The engine's text of
    a running request only grows: it holds back split UTF-8 characters and stop-string prefixes."""

    def __init__(self) -> None:
        self.sent, self.done = 0, False

    def delta(self, text: str, finished: bool) -> str:
        piece = text[self.sent:]
        self.sent = max(self.sent, len(text))
        self.done = finished
        return piece


class _ChunkWriter:
    """Server-sent event payloads of one streamed request; subclasses give the chunk shape."""

    object_name = ""

    def __init__(self, request_id: str, model: str, n: int) -> None:
        self.request_id, self.model, self.n = request_id, model, n
        self.created = int(time.time())
        self.choices: dict[int, _Choice] = {}
        self.latest: dict[int, RequestOutput] = {}

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.request_id, "object": self.object_name, "created": self.created,
                "model": self.model, "choices": choices, **extra}

    def _choice(self, index: int, piece: str, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def opening(self) -> list[dict[str, Any]]:
        return []

    def update(self, prompt_index: int, out: RequestOutput) -> list[dict[str, Any]]:
        self.latest[prompt_index] = out
        chunks = []
        for o in out.outputs:
            index = prompt_index * self.n + o.index
            choice = self.choices.setdefault(index, _Choice())
            if choice.done:
                continue
            piece = choice.delta(o.text, o.finish_reason is not None)
            if piece or o.finish_reason is not None:
                chunks.append(self._chunk([self._choice(index, piece, o.finish_reason)]))
        return chunks

    def usage(self) -> dict[str, Any]:
        return self._chunk([], usage=_usage(self.latest.values()).model_dump())


class _CompletionChunks(_ChunkWriter):
    object_name = "text_completion"

    def __init__(self, request_id: str, model: str, n: int, echoes: list[str]) -> None:
        super().__init__(request_id, model, n)
        self.echoes = echoes

    def _choice(self, index: int, piece: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": piece, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk([self._choice(p * self.n + i, echo, None)])
                for p, echo in enumerate(self.echoes) if echo for i in range(self.n)]


class _ChatChunks(_ChunkWriter):
    object_name = "chat.completion.chunk"

    def _choice(self, index: int, piece: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": piece} if piece else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(self.n)]


def _stop_list(stop: str | list[str] | None) -> list[str] | None:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return stops or None


def _message_text(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    return "\n".join(part.text for part in message.content)


def _reject_common(req: CompletionRequest | ChatCompletionRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported by this server", code="unsupported", param=name)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", code="unsupported", param="logit_bias")


def _reject_unsupported_completion(req: CompletionRequest) -> None:
    _reject_common(req)
    if req.logprobs is not None:
        raise APIError(400, "logprobs are not supported by this server", code="unsupported", param="logprobs")
    if req.best_of not in (None, req.n):
        raise APIError(400, "best_of other than n is not supported", code="unsupported", param="best_of")
    if req.suffix:
        raise APIError(400, "suffix is not supported by this server", code="unsupported", param="suffix")


def _reject_unsupported_chat(req: ChatCompletionRequest) -> None:
    _reject_common(req)
    if req.logprobs or req.top_logprobs:
        raise APIError(400, "logprobs are not supported by this server", code="unsupported", param="logprobs")
    if req.tools:
        raise APIError(400, "tools are not supported by this server", code="unsupported", param="tools")


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", code="invalid_value", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def _check_token_ids(ids: list[int]) -> None:
    if not ids:
        raise APIError(400, "a token-id prompt must not be empty", code="invalid_value", param="prompt")
    if min(ids) < 0:
        raise APIError(400, "token ids must not be negative", code="invalid_value", param="prompt")


class OpenAIServer:
    """The request handling behind the routes of ``build_app``."""

    def __init__(self, async_engine: AsyncEngine, base_name: str) -> None:
        self.aeng = async_engine
        self.base_name = base_name
        self.metrics = ServerMetrics()
        self.shutting_down = False  # set when in-flight requests are being aborted for a shutdown

    def error_for(self, exc: BaseException) -> APIError:
        if self.shutting_down and not isinstance(exc, (APIError, MCLError)):
            return APIError(503, "the server is shutting down; the request was aborted", code="shutting_down")
        return _from_exception(exc)

    async def engine_stats(self) -> dict[str, Any]:
        """The engine's counters now (``AsyncEngine.stats()`` is as of the last step, which misses aborts
        made while idle; ``fresh_stats()`` asks the engine thread when the engine has it)."""
        fresh = getattr(self.aeng, "fresh_stats", None)
        return await fresh() if fresh is not None else self.aeng.stats()

    @property
    def max_model_len(self) -> int:
        return self.aeng.engine.max_model_len

    def resolve(self, model: str) -> str | None:
        """The adapter a ``model`` field names (``None`` for the base model)."""
        if model == self.base_name:
            return None
        if model in self.aeng.adapters:
            return model
        raise APIError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")

    def models(self) -> ModelList:
        base = ModelCard(id=self.base_name, root=self.base_name, max_model_len=self.max_model_len)
        adapters = [ModelCard(id=name, root=name, parent=self.base_name, max_model_len=self.max_model_len)
                    for name in self.aeng.adapters]
        return ModelList(data=[base, *adapters])

    async def _offload(self, fn: Callable[[], T], size: int) -> T:
        return await asyncio.to_thread(fn) if size > _LONG_TEXT else fn()

    def _check_max_tokens(self, requested: int | None) -> None:
        if requested is None:
            return
        if requested < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {requested}", code="invalid_value",
                           param="max_tokens")
        if requested > self.max_model_len:
            raise APIError(400, f"max_tokens ({requested}) exceeds the model's context length "
                           f"({self.max_model_len} tokens)", code="invalid_value", param="max_tokens")

    def _too_long(self, prompt_len: int | str, param: str) -> APIError:
        return APIError(400, f"This model's maximum context length is {self.max_model_len} tokens, but the "
                        f"prompt has {prompt_len} tokens.", code="context_length_exceeded", param=param)

    def _encode(self, text: str, param: str) -> list[int]:
        tokenizer = self.aeng.engine.tokenizer
        cut = _PREFIX_CHARS_PER_TOKEN * self.max_model_len
        if len(text) > cut and len(tokenizer.encode(text[:cut])) > self.max_model_len + _PREFIX_SLACK:
            raise self._too_long(f"more than {self.max_model_len}", param)
        return tokenizer.encode(text)

    def _budget(self, requested: int | None, prompt_len: int, default: int | None, param: str) -> int:
        """``max_tokens`` for a prompt of ``prompt_len`` tokens, lowered to what fits in the context."""
        room = self.max_model_len - prompt_len
        if room < 1:
            raise self._too_long(prompt_len, param)
        wanted = requested if requested is not None else default
        return room if wanted is None else min(wanted, room)

    def _params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=-1 if req.top_k is None else req.top_k,
                stop=_stop_list(req.stop), stop_token_ids=req.stop_token_ids or None, seed=req.seed, n=req.n,
                ignore_eos=req.ignore_eos)
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_value") from exc

    async def _completion_job(self, req: CompletionRequest, prompt: str | list[int]) -> _Job:
        if isinstance(prompt, list):
            _check_token_ids(prompt)
            ids = prompt
        else:
            ids = await self._offload(lambda: self._encode(prompt, "prompt"), len(prompt))
        max_tokens = self._budget(req.max_tokens, len(ids), COMPLETION_DEFAULT_MAX_TOKENS, "prompt")
        echo = "" if not req.echo else prompt if isinstance(prompt, str) else self.aeng.engine.tokenizer.decode(prompt)
        return _Job(ids, self._params(req, max_tokens), echo)

    async def _completion_jobs(self, req: CompletionRequest) -> list[_Job]:
        _reject_unsupported_completion(req)
        self._check_max_tokens(req.max_tokens)
        prompts = _prompt_list(req.prompt)
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", code="invalid_value")
        return [await self._completion_job(req, prompt) for prompt in prompts]

    def _render_chat(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": _message_text(m)} for m in req.messages]
        try:
            text = self.aeng.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as exc:  # a template may reject a conversation (roles, order) in its own way
            raise APIError(400, f"cannot apply the chat template: {exc}", code="invalid_value",
                           param="messages") from exc
        return self._encode(text, "messages")

    async def _chat_job(self, req: ChatCompletionRequest) -> _Job:
        _reject_unsupported_chat(req)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        self._check_max_tokens(requested)
        size = sum(len(_message_text(m)) for m in req.messages)
        ids = await self._offload(lambda: self._render_chat(req), size)
        return _Job(ids, self._params(req, self._budget(requested, len(ids), None, "messages")))

    async def _generate(self, job: _Job, adapter: str | None, model: str, request_id: str,
                        arrival: float) -> AsyncIterator[RequestOutput]:
        gen = self.aeng.generate(job.prompt, job.params, adapter=adapter, request_id=request_id)
        accepted = answered = False
        async with aclosing(gen) as outs:
            async for out in outs:
                if not accepted:
                    accepted = True
                    self.metrics.requests.labels(model).inc()
                if not answered and any(o.token_ids for o in out.outputs):
                    answered = True
                    self.metrics.ttft.labels(model).observe(time.monotonic() - arrival)
                if out.finished:
                    for o in out.outputs:
                        self.metrics.finished.labels(model, o.finish_reason or "none").inc()
                yield out

    def _run(self, jobs: list[_Job], adapter: str | None, model: str, request_id: str,
             arrival: float) -> AsyncIterator[tuple[int, RequestOutput]]:
        ids = [request_id] if len(jobs) == 1 else [f"{request_id}-{i}" for i in range(len(jobs))]
        return _merge([self._generate(job, adapter, model, rid, arrival) for job, rid in zip(jobs, ids)])

    async def _stream(self, request: Request, outs: AsyncIterator[tuple[int, RequestOutput]],
                      writer: _ChunkWriter, include_usage: bool) -> Response:
        # The first output comes before the 200, so that requests the engine refuses get a proper error.
        first = await _until_disconnect(request, anext(outs, None))
        return _SSEResponse(self._events(first, outs, writer, include_usage), headers=_SSE_HEADERS)

    async def _events(self, first: tuple[int, RequestOutput] | None,
                      outs: AsyncIterator[tuple[int, RequestOutput]], writer: _ChunkWriter,
                      include_usage: bool) -> AsyncIterator[str]:
        try:
            for chunk in writer.opening():
                yield _sse(chunk)
            item = first
            while item is not None:
                for chunk in writer.update(*item):
                    yield _sse(chunk)
                item = await anext(outs, None)
            if include_usage:
                yield _sse(writer.usage())
        except Exception as exc:
            error = self.error_for(exc)
            if error.status == 500:
                logger.exception("request failed while streaming")
            self.metrics.errors.labels(str(error.status)).inc()
            yield _sse(error.body())
        finally:
            await outs.aclose()  # type: ignore[attr-defined]
        yield _sse("[DONE]")

    async def _collect(self, request: Request,
                       outs: AsyncIterator[tuple[int, RequestOutput]]) -> dict[int, RequestOutput]:
        try:
            return await _until_disconnect(request, _last_outputs(outs))
        except Exception as exc:
            if self.shutting_down:
                raise self.error_for(exc) from exc
            raise

    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        adapter = self.resolve(req.model)
        jobs = await self._completion_jobs(req)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outs = self._run(jobs, adapter, req.model, request_id, arrival)
        if req.stream:
            writer = _CompletionChunks(request_id, req.model, req.n, [j.echo for j in jobs])
            return await self._stream(request, outs, writer, _include_usage(req))
        finals = await self._collect(request, outs)
        choices = [CompletionChoice(index=p * req.n + o.index, text=jobs[p].echo + o.text,
                                    finish_reason=o.finish_reason)
                   for p, out in sorted(finals.items()) for o in out.outputs]
        body = CompletionResponse(id=request_id, model=req.model, choices=choices, usage=_usage(finals.values()))
        return JSONResponse(body.model_dump())

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        adapter = self.resolve(req.model)
        job = await self._chat_job(req)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outs = self._run([job], adapter, req.model, request_id, arrival)
        if req.stream:
            writer = _ChatChunks(request_id, req.model, req.n)
            return await self._stream(request, outs, writer, _include_usage(req))
        out = (await self._collect(request, outs))[0]
        choices = [ChatChoice(index=o.index, message=AssistantMessage(content=o.text), finish_reason=o.finish_reason)
                   for o in out.outputs]
        body = ChatCompletionResponse(id=request_id, model=req.model, choices=choices, usage=_usage([out]))
        return JSONResponse(body.model_dump())

    async def load_adapter(self, req: LoadLoraRequest) -> dict[str, Any]:
        if req.lora_name == self.base_name:
            raise APIError(400, f"`{req.lora_name}` is the base model's name", code="invalid_value",
                           param="lora_name")
        try:
            await self.aeng.load_adapter(req.lora_name, req.lora_path)
        except OSError as exc:
            raise APIError(400, f"cannot load adapter from {req.lora_path}: {exc}", code="adapter_load_error",
                           param="lora_path") from exc
        return {"object": "lora_adapter", "id": req.lora_name, "parent": self.base_name, "status": "loaded"}

    async def unload_adapter(self, req: UnloadLoraRequest) -> dict[str, Any]:
        await self.aeng.unload_adapter(req.lora_name)
        return {"object": "lora_adapter", "id": req.lora_name, "status": "unloaded"}


def _include_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line per offending field (the first problem found in it), and the first field's name."""
    parts: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.setdefault("", f"invalid JSON body ({err.get('msg')} at position {'.'.join(loc) or 0})")
        else:
            field = loc[0] if loc else ""
            parts.setdefault(field, f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid value')}")
    param = next(iter(parts), None) or None
    return "; ".join(parts.values()) or "invalid request body", param


def _add_error_handlers(app: FastAPI, server: OpenAIServer) -> None:
    metrics = server.metrics

    def respond(error: APIError) -> JSONResponse:
        metrics.errors.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return respond(APIError(400, message, code="invalid_request_body", param=param))

    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return respond(APIError(exc.status_code, str(exc.detail), code=None))

    async def on_client_gone(_: Request, __: _ClientGone) -> Response:
        metrics.errors.labels("499").inc()
        return Response(status_code=499)

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        return respond(server.error_for(exc))

    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(_ClientGone, on_client_gone)
    app.add_exception_handler(APIError, on_error)
    app.add_exception_handler(MCLError, on_error)
    app.add_exception_handler(Exception, on_error)


def _add_routes(app: FastAPI, server: OpenAIServer) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(await server.engine_stats()), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return server.models().model_dump()

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        for card in server.models().data:
            if card.id == model:
                return card.model_dump()
        raise APIError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.completion(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(body, request)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest) -> dict[str, Any]:
        return await server.load_adapter(body)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest) -> dict[str, Any]:
        return await server.unload_adapter(body)


def build_app(async_engine: AsyncEngine, served_model_name: str | None = None) -> FastAPI:
    """The OpenAI-compatible app serving ``async_engine``'s base model (as ``served_model_name``,
    by default ``engine.model_name``) and its adapters."""
    server = OpenAIServer(async_engine, served_model_name or async_engine.engine.model_name)
    app = FastAPI(title="mcl_runtime", summary="OpenAI-compatible multi-LoRA server")
    app.state.server = server
    _add_error_handlers(app, server)
    _add_routes(app, server)
    return app
