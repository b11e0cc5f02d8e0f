"""What the OpenAPI schema (``/openapi.json``) says each route answers: the real status codes
(bad requests are 400, never FastAPI's default 422), their error body, and the media types."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from mcl_runtime.serve.protocol import ErrorResponse

_ERRORS = {400: "Invalid request", 404: "Unknown model or adapter", 500: "Internal error", 503: "Shutting down"}


def documented(
    ok: type[BaseModel] | None = None,
    *,
    errors: tuple[int, ...] = (400, 500),
    stream: bool = False,
    media_type: str | None = None,
) -> dict[str, Any]:
    """``route(..., **documented(...))``: response model and ``responses`` of one route."""
    ok_response: dict[str, Any] = {"description": "Success"}
    if media_type:
        ok_response["content"] = {media_type: {"schema": {"type": "string"}}}
    elif stream:
        ok_response["content"] = {
            "application/json": {},
            "text/event-stream": {"schema": {"type": "string", "description": "server-sent events"}},
        }
    responses: dict[int | str, Any] = {200: ok_response}
    for status in errors:
        responses[status] = {"model": ErrorResponse, "description": _ERRORS[status]}
    kwargs: dict[str, Any] = {"responses": responses}
    if ok is not None:
        kwargs["response_model"] = ok
    return kwargs


def without_422(app: FastAPI) -> None:
    """Drop FastAPI's generated 422 answers: validation errors are answered with a 400."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
