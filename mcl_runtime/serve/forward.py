"""An HTTP request carried as data and answered by an ASGI app in the same process.

This is how the Ray Serve application (``ray_app.py``) hands a client's request to an engine replica:
the replica runs it through the single-process server's app (``build_app``), so every endpoint, error
body and stream is exactly what the server gives without Ray. Closing the answer's iterator early is a
client disconnect for the app (its engine requests are aborted).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query: bytes = b""
    headers: Headers = ()
    body: bytes = b""

    def json_field(self, name: str) -> Any:
        """``body[name]`` when the body is a JSON object, else None (the app judges malformed bodies)."""
        try:
            body = json.loads(self.body)
        except ValueError:
            return None
        return body.get(name) if isinstance(body, dict) else None

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": self.query,
            "headers": list(self.headers),
            "client": None,
            "server": None,
        }


@dataclass(frozen=True)
class ForwardedResponse:
    """Status and headers, and the whole body; for an event stream (``streaming``) the body comes
    after it, chunk by chunk."""

    status: int
    headers: Headers
    body: bytes = b""
    streaming: bool = False

    def header(self, name: bytes) -> str | None:
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == name), None)


def _is_event_stream(headers: Headers) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)


async def answer(
    app: ASGIApp, request: ForwardedRequest, extra_headers: Headers = ()
) -> AsyncIterator[ForwardedResponse | bytes]:
    """Runs ``request`` through ``app``: yields its ``ForwardedResponse`` (``extra_headers`` added), then,
    for an event stream, the body chunks as they are sent."""
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_read = False

    async def receive() -> Message:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.put_nowait(message)

    task = asyncio.ensure_future(app(request.scope(), receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    complete = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal complete
        while not complete and (message := await sent.get()) is not None:
            complete = not message.get("more_body", False)
            if message.get("body"):
                yield message["body"]

    try:
        start = await sent.get()
        if start is None:
            task.result()  # the app's own exception, if any
            raise RuntimeError(f"{request.method} {request.path}: the app sent no response")
        headers = (*start.get("headers", ()), *extra_headers)
        if _is_event_stream(headers):
            yield ForwardedResponse(start["status"], headers, streaming=True)
            async for chunk in body():
                yield chunk
        else:
            yield ForwardedResponse(start["status"], headers, b"".join([chunk async for chunk in body()]))
    finally:
        gone.set()
        if not complete:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
