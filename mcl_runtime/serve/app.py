"""OpenAI-compatible HTTP API over an ``AsyncEngine``: ``build_app(async_engine) -> FastAPI``.

Request semantics beyond OpenAI's:

- ``model`` is the base model's name or a loaded adapter's name (404 otherwise).
- ``max_tokens`` defaults to 16 for completions and to the rest of the context for chat; a value
  below 1 or above the model's context length is a 400 (the engine's check); a value that does not
  fit after the prompt is lowered to what fits. A prompt that fills the context is a 400.
- ``temperature`` defaults to 1.0 and ``top_p`` to 1.0, as in OpenAI's API.
- ``response_format`` (``json_object``, ``json_schema``) and vLLM's ``structured_outputs``
  (``json``, ``regex``, ``choice``, ``grammar``) constrain the output (the engine's xgrammar path).
- ``logprobs``, ``top_logprobs``, ``best_of`` (other than ``n``), ``suffix``, ``logit_bias`` and
  ``tools`` are not supported, and every field the protocol does not declare (``functions``,
  ``tool_choice``, ...) is refused: a 400 naming the field.
- Values are validated once, by the engine (``SamplingParams``, ``Engine.add_request``: prompt,
  context length, adapter); the server maps its typed errors to HTTP answers and checks nothing
  itself but the HTTP shape of a body.
- Streamed responses are written from the engine's delta outputs (``output_kind="delta"``: the
  text new since the last event); other responses ask for the final output only.
- Chat prompts are rendered with the tokenizer's chat template (the model folder's
  tokenizer_config.json, or ``mcl_runtime.tokenizer.DEFAULT_CHAT_TEMPLATE``, plain ChatML, when it
  has none). Text prompts are tokenized by ``engine.tokenize`` (off the event loop when long) and
  passed on as token ids.
- A client that disconnects has its requests aborted at once (their KV blocks are freed).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mcl_runtime import AsyncEngine, RequestOutput, SamplingParams
from mcl_runtime.engine.params import StructuredOutput
from mcl_runtime.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    ContextLengthError,
    InvalidRequestError,
    MCLError,
    ModelLoadError,
)
from mcl_runtime.serve.metrics import CONTENT_TYPE, ServerMetrics
from mcl_runtime.serve.openapi import documented, without_422
from mcl_runtime.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    LoadLoraRequest,
    ModelCard,
    ModelList,
    UnloadLoraRequest,
)
from mcl_runtime.serve.streaming import (
    SSE_HEADERS,
    ChatChunks,
    ChunkWriter,
    ClientGone,
    CompletionChunks,
    SSEResponse,
    last_outputs,
    merge,
    sse_events,
    until_disconnect,
    usage,
)

T = TypeVar("T")
logger = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_CHOICES = 256  # prompts x n in one request
_LONG_TEXT = 16384  # characters; longer prompts are tokenized off the event loop


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        info = ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


def _from_exception(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    param = getattr(exc, "param", None)
    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, str(exc), code="model_not_found", param=param)
    if isinstance(exc, AdapterLoadError):
        return APIError(400, str(exc), code="adapter_load_error", param=param)
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), code="context_length_exceeded", param=param)
    if isinstance(exc, (InvalidRequestError, ModelLoadError)):
        return APIError(400, str(exc), code="invalid_request", param=param)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


@dataclass
class _Job:
    """One prompt of a request, checked, tokenized and ready for the engine."""

    prompt: list[int]
    params: SamplingParams
    echo: str = ""


def _message_text(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    return "\n".join(part.text for part in message.content)


def _reject_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """400 for fields that would change the result but are not implemented."""
    unsupported = {
        "logit_bias": bool(req.logit_bias),
        "logprobs": req.logprobs is not None if isinstance(req, CompletionRequest) else bool(req.logprobs),
        "best_of": isinstance(req, CompletionRequest) and req.best_of not in (None, req.n),
        "suffix": isinstance(req, CompletionRequest) and bool(req.suffix),
        "top_logprobs": isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None,
        "tools": isinstance(req, ChatCompletionRequest) and bool(req.tools),
    }
    for name, present in unsupported.items():
        if present:
            raise APIError(400, f"`{name}` is not supported by this server", code="unsupported", param=name)
    if req.response_format is not None and req.structured_outputs is not None:
        raise APIError(
            400,
            "give either response_format or structured_outputs, not both",
            code="invalid_value",
            param="structured_outputs",
        )


def _structured(req: CompletionRequest | ChatCompletionRequest) -> StructuredOutput | dict | None:
    """The constraint of ``response_format`` or vLLM's ``structured_outputs`` (checked by the engine)."""
    fmt = req.response_format
    if fmt is None:
        return req.structured_outputs
    if fmt.type == "json_object":
        return StructuredOutput(json_object=True)
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(
                400,
                "response_format json_schema needs json_schema.schema",
                code="invalid_value",
                param="response_format",
            )
        return StructuredOutput(json=fmt.json_schema.schema_)
    return None


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


class OpenAIServer:
    """The request handling behind the routes of ``build_app``."""

    def __init__(self, async_engine: AsyncEngine, base_name: str) -> None:
        self.aeng = async_engine
        self.base_name = base_name
        self.metrics = ServerMetrics(base_name)
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

    def adapter(self, model: str) -> str | None:
        """The adapter a ``model`` field names: ``None`` for the base model (the engine refuses an
        unknown one)."""
        return None if model == self.base_name else model

    def models(self) -> ModelList:
        base = ModelCard(id=self.base_name, root=self.base_name, max_model_len=self.max_model_len)
        adapters = [
            ModelCard(id=name, root=name, parent=self.base_name, max_model_len=self.max_model_len)
            for name in self.aeng.adapters
        ]
        return ModelList(data=[base, *adapters])

    async def _offload(self, fn: Callable[[], T], size: int) -> T:
        return await asyncio.to_thread(fn) if size > _LONG_TEXT else fn()

    def _params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None) -> SamplingParams:
        """The engine validates every value (``InvalidRequestError`` answers 400)."""
        return SamplingParams(
            max_tokens=max_tokens,
            output_kind="delta" if req.stream else "final_only",
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=req.min_p or 0.0,
            stop=req.stop or None,
            stop_token_ids=req.stop_token_ids or None,
            seed=req.seed,
            n=req.n,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens or 0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            structured=_structured(req),
        )

    async def _completion_job(self, req: CompletionRequest, prompt: str | list[int], params: SamplingParams) -> _Job:
        ids = (
            prompt
            if isinstance(prompt, list)
            else await self._offload(lambda: self.aeng.engine.tokenize(prompt), len(prompt))
        )
        echo = "" if not req.echo else prompt if isinstance(prompt, str) else self.aeng.engine.tokenizer.decode(prompt)
        return _Job(ids, params, echo)

    async def _completion_jobs(self, req: CompletionRequest) -> list[_Job]:
        _reject_unsupported(req)
        prompts = _prompt_list(req.prompt)
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", code="invalid_value")
        params = self._params(req, COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens)
        return [await self._completion_job(req, prompt, params) for prompt in prompts]

    def _render_chat(self, req: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": _message_text(m)} for m in req.messages]
        try:
            text = self.aeng.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as exc:  # a template may reject a conversation (roles, order) in its own way
            raise APIError(
                400, f"cannot apply the chat template: {exc}", code="invalid_value", param="messages"
            ) from exc
        return self.aeng.engine.tokenize(text)

    async def _chat_job(self, req: ChatCompletionRequest) -> _Job:
        _reject_unsupported(req)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self._params(req, requested)
        size = sum(len(_message_text(m)) for m in req.messages)
        return _Job(await self._offload(lambda: self._render_chat(req), size), params)

    async def _generate(
        self, job: _Job, adapter: str | None, model: str, request_id: str, arrival: float
    ) -> AsyncIterator[RequestOutput]:
        gen = self.aeng.generate(job.prompt, job.params, adapter=adapter, request_id=request_id)
        accepted = answered = False
        async with aclosing(gen) as outs:
            async for out in outs:
                if not accepted:
                    accepted = True
                    self.metrics.requests.labels(model).inc()
                if not answered and out.first_token_time is not None:
                    answered = True
                    self.metrics.ttft.labels(model).observe(out.first_token_time - arrival)
                if out.finished:
                    for o in out.outputs:
                        self.metrics.finished.labels(model, o.finish_reason or "none").inc()
                yield out

    def _run(
        self, jobs: list[_Job], adapter: str | None, model: str, request_id: str, arrival: float
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        ids = [request_id] if len(jobs) == 1 else [f"{request_id}-{i}" for i in range(len(jobs))]
        return merge([self._generate(job, adapter, model, rid, arrival) for job, rid in zip(jobs, ids)])

    async def _stream(
        self, request: Request, outs: AsyncIterator[tuple[int, RequestOutput]], writer: ChunkWriter, include_usage: bool
    ) -> Response:
        # The first output comes before the 200, so that requests the engine refuses get a proper error.
        first = await until_disconnect(request, anext(outs, None))
        return SSEResponse(sse_events(first, outs, writer, include_usage, self._error_event), headers=SSE_HEADERS)

    def _error_event(self, exc: Exception) -> dict[str, Any]:
        error = self.error_for(exc)
        if error.status == 500:
            logger.exception("request failed while streaming", exc_info=exc)
        self.metrics.errors.labels(str(error.status)).inc()
        return error.body()

    async def _collect(
        self, request: Request, outs: AsyncIterator[tuple[int, RequestOutput]]
    ) -> dict[int, RequestOutput]:
        try:
            return await until_disconnect(request, last_outputs(outs))
        except Exception as exc:
            if self.shutting_down:
                raise self.error_for(exc) from exc
            raise

    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        adapter = self.adapter(req.model)
        jobs = await self._completion_jobs(req)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outs = self._run(jobs, adapter, req.model, request_id, arrival)
        if req.stream:
            writer = CompletionChunks(request_id, req.model, req.n, [j.echo for j in jobs])
            return await self._stream(request, outs, writer, _includeusage(req))
        finals = await self._collect(request, outs)
        choices = [
            CompletionChoice(index=p * req.n + o.index, text=jobs[p].echo + o.text, finish_reason=o.finish_reason)
            for p, out in sorted(finals.items())
            for o in out.outputs
        ]
        body = CompletionResponse(id=request_id, model=req.model, choices=choices, usage=usage(finals.values()))
        return JSONResponse(body.model_dump())

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        adapter = self.adapter(req.model)
        job = await self._chat_job(req)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outs = self._run([job], adapter, req.model, request_id, arrival)
        if req.stream:
            writer = ChatChunks(request_id, req.model, req.n)
            return await self._stream(request, outs, writer, _includeusage(req))
        out = (await self._collect(request, outs))[0]
        choices = [
            ChatChoice(index=o.index, message=AssistantMessage(content=o.text), finish_reason=o.finish_reason)
            for o in out.outputs
        ]
        body = ChatCompletionResponse(id=request_id, model=req.model, choices=choices, usage=usage([out]))
        return JSONResponse(body.model_dump())

    async def load_adapter(self, req: LoadLoraRequest) -> dict[str, Any]:
        if req.lora_name == self.base_name:
            raise APIError(400, f"`{req.lora_name}` is the base model's name", code="invalid_value", param="lora_name")
        try:
            await self.aeng.load_adapter(req.lora_name, req.lora_path, replace=req.load_inplace)
        except OSError as exc:
            raise APIError(
                400, f"cannot load adapter from {req.lora_path}: {exc}", code="adapter_load_error", param="lora_path"
            ) from exc
        return {"object": "lora_adapter", "id": req.lora_name, "parent": self.base_name, "status": "loaded"}

    async def unload_adapter(self, req: UnloadLoraRequest) -> dict[str, Any]:
        await self.aeng.unload_adapter(req.lora_name)
        return {"object": "lora_adapter", "id": req.lora_name, "status": "unloaded"}


def _includeusage(req: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line per offending field (the first problem found in it), and the first field's name."""
    parts: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.setdefault("", f"invalid JSON body ({err.get('msg')} at position {'.'.join(loc) or 0})")
        elif err.get("type") == "extra_forbidden":
            parts.setdefault(loc[0] if loc else "", f"`{'.'.join(loc)}` is not supported by this server")
        else:
            field = loc[0] if loc else ""
            parts.setdefault(field, f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid value')}")
    param = next(iter(parts), None) or None
    return "; ".join(parts.values()) or "invalid request body", param


def _add_error_handlers(app: FastAPI, server: OpenAIServer) -> None:
    metrics = server.metrics

    def respond(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return respond(APIError(400, message, code="invalid_request_body", param=param))

    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return respond(APIError(exc.status_code, str(exc.detail), code=None), getattr(exc, "headers", None))

    async def on_client_gone(_: Request, __: ClientGone) -> Response:
        metrics.errors.labels("499").inc()
        return Response(status_code=499)

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        return respond(server.error_for(exc))

    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(APIError, on_error)
    app.add_exception_handler(MCLError, on_error)
    app.add_exception_handler(Exception, on_error)


def _add_routes(app: FastAPI, server: OpenAIServer) -> None:
    generation = dict(errors=(400, 404, 500, 503), stream=True)

    @app.get("/health", **documented(errors=()))
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", **documented(errors=(500,), media_type=CONTENT_TYPE.split(";")[0]))
    async def metrics() -> Response:
        return Response(server.metrics.render(await server.engine_stats()), media_type=CONTENT_TYPE)

    @app.get("/v1/models", **documented(ModelList, errors=()))
    async def list_models() -> dict[str, Any]:
        return server.models().model_dump()

    @app.get("/v1/models/{model:path}", **documented(ModelCard, errors=(404,)))
    async def get_model(model: str) -> dict[str, Any]:
        for card in server.models().data:
            if card.id == model:
                return card.model_dump()
        raise APIError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")

    @app.post("/v1/completions", **documented(CompletionResponse, **generation))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.completion(body, request)

    @app.post("/v1/chat/completions", **documented(ChatCompletionResponse, **generation))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(body, request)

    @app.post("/v1/load_lora_adapter", **documented(errors=(400, 500)))
    async def load_lora_adapter(body: LoadLoraRequest) -> dict[str, Any]:
        return await server.load_adapter(body)

    @app.post("/v1/unload_lora_adapter", **documented(errors=(400, 404, 500)))
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
    without_422(app)
    return app
