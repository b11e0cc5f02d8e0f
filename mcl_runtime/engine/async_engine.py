"""asyncio front of the engine: one background thread owns the ``Engine`` and runs its steps;
coroutines submit work to it and receive each request's outputs as they are produced.

Outputs are the engine's snapshots, handed over as they are (no copies): their text is built
incrementally on the engine thread (requests are added with ``stream=True``) and joined only
when a reader asks for it, on the reader's thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from mcl_runtime.engine.llm_engine import Engine
from mcl_runtime.engine.params import RequestOutput, SamplingParams
from mcl_runtime.errors import AdapterLoadError, InvalidRequestError
from mcl_runtime.hub import resolve_path


class AsyncEngine:
    """Streams tokens per request. All engine calls run on the engine thread, between steps."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = engine.stats()
        self._adapters = tuple(engine.adapters)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mcl-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(cls, **engine_kwargs: Any) -> AsyncEngine:
        return cls(Engine(**engine_kwargs))

    # ---- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.is_set():
            try:  # block only while idle
                busy = self.engine.has_unfinished_requests()
                command = self._commands.get_nowait() if busy else self._commands.get()
            except queue.Empty:
                command = None
            while command is not None:
                command()
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_unfinished_requests():
                self._step()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # an engine bug: fail the running requests, keep serving
            for rid in list(self._streams):
                self.engine.abort_request(rid)
            self._deliver([(rid, exc) for rid in list(self._streams)])
            return
        finally:
            self._stats = self.engine.stats()
            self._adapters = tuple(self.engine.adapters)
        self._deliver([(out.request_id, out) for out in outputs])

    def _deliver(self, items: list[tuple[str, RequestOutput | Exception]]) -> None:
        """Hand each item to its request's stream: one wake-up per event loop for the whole step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput | Exception]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if isinstance(item, Exception) or item.finished:
                del self._streams[request_id]
            loop, q = stream
            by_loop.setdefault(loop, []).append((q, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()

        def command() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._commands.put(command)
        return future

    # ---- coroutine API -------------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as ``params.output_kind`` asks (cumulative by default, text built
        incrementally); the first iteration raises if the request is invalid.
        Closing or cancelling the iterator aborts the request and frees its KV blocks."""
        if self._stopped.is_set():
            raise RuntimeError("the engine is shut down")
        rid = request_id or uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def add() -> None:
            stream = params is None or params.output_kind != "final_only"
            self.engine.add_request(rid, prompt, params, adapter, stream=stream)
            self._streams[rid] = (loop, q)

        finished = False
        try:
            await asyncio.wrap_future(self._call(add))
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        except InvalidRequestError:
            finished = True  # never admitted: nothing to abort
            raise
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        def abort() -> None:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

        self._call(abort)

    @property
    def adapters(self) -> tuple[str, ...]:
        """Adapter names as of the last step or load/unload (safe to read from any thread)."""
        return self._adapters

    async def load_adapter(self, name: str, path: str | Path, replace: bool = False) -> None:
        # Resolved off the engine thread, so that a hub download does not stall the running requests.
        path = await asyncio.to_thread(resolve_path, path, AdapterLoadError, "adapter")
        await asyncio.wrap_future(self._call(lambda: self._adapter_call(self.engine.load_adapter, name, path, replace)))

    async def unload_adapter(self, name: str) -> None:
        await asyncio.wrap_future(self._call(lambda: self._adapter_call(self.engine.unload_adapter, name)))

    def _adapter_call(self, fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        finally:
            self._adapters = tuple(self.engine.adapters)

    def stats(self) -> dict:
        """Counters as of the last step (no waiting on the engine thread)."""
        return dict(self._stats)

    async def fresh_stats(self) -> dict:
        """Counters now, asked of the engine thread, with the adapter state (``Engine.lora_stats``)."""
        return await asyncio.wrap_future(self._call(lambda: {**self.engine.stats(), **self.engine.lora_stats()}))

    def shutdown(self) -> None:
        """Abort everything in flight and stop the engine thread."""
        if self._stopped.is_set():
            return

        def stop() -> None:
            for rid in list(self._streams):
                self.engine.abort_request(rid)
            self._deliver([(rid, RuntimeError("the engine shut down")) for rid in list(self._streams)])
            self._stopped.set()

        self._call(stop).result(timeout=60)
        self._thread.join(timeout=60)


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in batch:
        q.put_nowait(item)
