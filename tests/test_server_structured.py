"""Server: response_format / structured_outputs constrain the output (streamed and not), every field
the server does not implement is a 400 naming it, hostile inputs get 4xx answers, and a bounded
schemathesis run against /openapi.json finds no 5xx and no undocumented answer."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

pytest.importorskip("xgrammar", reason="structured outputs need xgrammar (not on the GPU image)")
jsonschema = pytest.importorskip("jsonschema")

from test_server import ServerProcess, client, server  # noqa: F401  (module-scoped fixtures: a server of our own)

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 10}, "ok": {"type": "boolean"}},
    "required": ["answer", "ok"],
    "additionalProperties": False,
}
USER = [{"role": "user", "content": "Reply in JSON."}]


def post(server: ServerProcess, route: str, body: dict | bytes) -> httpx.Response:
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    return httpx.post(server.url + route, timeout=120, **kw)


JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("model", ["mcl-demo-tiny", "planning"])
def test_chat_json_schema(client, model, stream):
    kw = dict(
        model=model, messages=USER, max_tokens=120, temperature=0.8, seed=3, n=2, response_format=JSON_SCHEMA_FORMAT
    )
    if stream:
        texts = {0: "", 1: ""}
        for chunk in client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
    else:
        texts = {c.index: c.message.content for c in client.chat.completions.create(**kw).choices}
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_structured_outputs(client):
    out = client.chat.completions.create(
        model="coding", messages=USER, max_tokens=60, temperature=0, response_format={"type": "json_object"}
    )
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    cases = [
        ({"regex": "[a-z]{3}[0-9]{2}"}, lambda t: re.fullmatch("[a-z]{3}[0-9]{2}", t)),
        ({"choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"grammar": 'root ::= "x" [0-9] [0-9]?'}, lambda t: re.fullmatch("x[0-9]{1,2}", t)),
        ({"json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ]
    for spec, check in cases:
        out = client.completions.create(
            model="retrieval",
            prompt=["a", "b"],
            max_tokens=80,
            temperature=1.0,
            extra_body={"structured_outputs": spec},
        )
        assert all(check(c.text) for c in out.choices), (spec, [c.text for c in out.choices])
    plain = client.completions.create(
        model="coding",
        prompt="x",
        max_tokens=4,
        extra_body={"min_tokens": 4, "repetition_penalty": 1.2, "min_p": 0.05},
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    assert plain.usage.completion_tokens == 4


def test_agent_client_sends_structured_outputs(server):
    from mcl_runtime.agents.formats import structured_output
    from mcl_runtime.agents.llm import OpenAIChatClient
    from mcl_runtime.agents.parsers import parse_verification

    async def ask():
        client = OpenAIChatClient(server.url + "/v1")
        try:
            return await client.chat("planning", USER, 120, 1.0, structured=structured_output("verification", 120))
        finally:
            await client.close()

    reply = asyncio.run(ask())
    assert reply.finish_reason == "stop" and parse_verification(reply.text).ok, reply.text


BAD = {
    "bad_schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    },
    "schema_missing": {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    "bad_regex": {"structured_outputs": {"regex": "a("}},
    "bad_grammar": {"structured_outputs": {"grammar": "root ::= undefined_rule"}},
    "two_constraints": {"structured_outputs": {"regex": "a", "choice": ["a"]}},
    "both_fields": {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
    "unknown_constraint": {"structured_outputs": {"structural_tag": "x"}},
    "bad_format_type": {"response_format": {"type": "yaml"}},
}
UNSUPPORTED = {
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "tool_choice": "auto",
    "tools": [{"type": "function"}],
    "top_logprobs": 2,
    "logprobs": True,
    "logit_bias": {"1": 2.0},
    "parallel_tool_calls": True,
    "prediction": {"type": "content"},
    "guided_json": {},
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_constraints_are_400(server, case):
    r = post(server, "/v1/chat/completions", {"model": "coding", "messages": USER, **BAD[case]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_unsupported_fields_are_400_naming_them(server, field):
    r = post(server, "/v1/chat/completions", {"model": "coding", "messages": USER, field: UNSUPPORTED[field]})
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    r = post(server, "/v1/completions", {"model": "coding", "prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and "suffix" in r.json()["error"]["message"]


def test_hostile_inputs(server):
    surrogate = b'{"model": "coding", "prompt": "a\\ud800b", "max_tokens": 2}'
    assert post(server, "/v1/completions", surrogate).status_code == 400
    chat = b'{"model": "coding", "messages": [{"role": "user", "content": "\\udfff"}]}'
    assert post(server, "/v1/chat/completions", chat).status_code == 400
    for body in (
        {"prompt": [1, True]},
        {"prompt": [True]},
        {"prompt": "x", "stop_token_ids": [False]},
        {"prompt": "x", "max_tokens": True},
    ):
        assert post(server, "/v1/completions", {"model": "coding", **body}).status_code == 400, body
    r = post(server, "/v1/chat/completions", {"model": "coding", "messages": USER, "top_logprobs": True})
    assert r.status_code == 400
    codes = {
        post(server, "/v1/completions", {"model": "coding", "prompt": p}).json()["error"]["code"] for p in ("", [])
    }
    assert len(codes) == 1
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"]


def test_openapi_documents_real_answers(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "404"} <= set(chat) and "422" not in chat
    assert "text/event-stream" in chat["200"]["content"]
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def _bounded(case) -> None:
    """Keep generated requests cheap on a CPU: a few tokens, few choices."""
    if isinstance(case.body, dict):
        for key, cap in (("max_tokens", 2), ("max_completion_tokens", 2), ("n", 2)):
            if isinstance(case.body.get(key), int) and not isinstance(case.body.get(key), bool):
                case.body[key] = min(case.body[key], cap)
        if isinstance(case.body.get("prompt"), list) and len(case.body["prompt"]) > 2:
            case.body["prompt"] = case.body["prompt"][:2]


def test_schemathesis_finds_no_server_errors(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures: list[str] = []
    calls: list[str] = []
    for route in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models/{model}",
        "/v1/models",
        "/health",
        "/metrics",
        "/v1/unload_lora_adapter",
    ):
        operation = next(iter(schema[route].values()))

        @given(case=operation.as_strategy())
        @settings(
            max_examples=8, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        def check(case) -> None:
            _bounded(case)
            calls.append(route)  # noqa: B023 (the test runs inside this iteration)
            case.call_and_validate(checks=checks, timeout=60)

        try:
            check()
        except Exception as exc:  # every route runs, then all failures are reported
            failures.append(f"{route}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert len(set(calls)) == 7 and len(calls) >= 35
