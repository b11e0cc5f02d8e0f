"""The OpenAI-compatible server (``python -m mcl_runtime.serve``) on the demo model, driven by the
official ``openai`` client and raw HTTP, checked against ``Engine.generate`` run alone.

One server subprocess serves the whole module (bound to 127.0.0.1, port picked by the OS); the last
test stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import load_file, save_file

from mcl_runtime import Engine, SamplingParams
from mcl_runtime.demo import DEMO_MODEL_NAME, demo_adapter_dirs, demo_engine

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.server_stack

ADAPTERS = ["retrieval", "planning", "coding", "debugging"]
MODELS = [DEMO_MODEL_NAME, *ADAPTERS]
MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
PROMPTS = {m: f"def solve_{i}(nums: list[int]) -> int:\n    " for i, m in enumerate(MODELS)}
MESSAGES = {
    m: [
        {"role": "system", "content": "You are a careful programmer."},
        {"role": "user", "content": f"Task {i}: reverse a linked list."},
    ]
    for i, m in enumerate(MODELS)
}


class ServerProcess:
    """``python -m mcl_runtime.serve`` in a subprocess; ``url`` waits for its startup line."""

    startup_timeout = 120.0

    def __init__(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "mcl_runtime.serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._base: str | None = None
        self._url: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)
            if line.startswith("mcl_runtime.serve: serving"):
                self._url.put(line.split(" at ")[1].split()[0].removesuffix("/v1"))

    @property
    def url(self) -> str:
        if self._base is None:
            try:
                self._base = self._url.get(timeout=self.startup_timeout)
            except queue.Empty:
                pytest.fail("server did not start:\n" + "".join(self.lines))
        return self._base

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--shutdown-timeout", "20", "--log-level", "warning")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ref() -> Engine:
    return demo_engine()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected(ref: Engine) -> dict[tuple[str, str], object]:
    """Greedy reference outputs per (model, "completion" | "chat"), in one engine run."""
    keys = [(m, kind) for m in MODELS for kind in ("completion", "chat")]
    prompts = [
        PROMPTS[m] if kind == "completion" else ref.tokenizer.apply_chat_template(MESSAGES[m]) for m, kind in keys
    ]
    adapters = [None if m == DEMO_MODEL_NAME else m for m, _ in keys]
    return dict(zip(keys, ref.generate(prompts, GREEDY, adapter=adapters)))


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def stream_completion(client: openai.OpenAI, **kw) -> tuple[dict[int, str], dict[int, str], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    return texts, reasons, usage


def stream_chat(client: openai.OpenAI, **kw) -> tuple[str, str | None, object]:
    text, reason, usage, roles = "", None, None, []
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    assert roles == ["assistant"]
    return text, reason, usage


def well_formed_request_works(client: openai.OpenAI) -> None:
    out = client.completions.create(model="coding", prompt="x = ", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2


def test_health_and_models(server: ServerProcess, client: openai.OpenAI) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == set(MODELS)
    assert all(models[a].parent == DEMO_MODEL_NAME for a in ADAPTERS)
    assert getattr(models[DEMO_MODEL_NAME], "parent", None) is None


@pytest.mark.parametrize("model", MODELS)
def test_completion_streamed_and_not_equal_engine(client: openai.OpenAI, expected, model: str) -> None:
    want = expected[(model, "completion")]
    out = client.completions.create(model=model, prompt=PROMPTS[model], max_tokens=MAX_TOKENS, temperature=0)
    assert out.model == model and out.object == "text_completion"
    assert out.choices[0].text == want.text
    assert out.choices[0].finish_reason == want.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(want.prompt_token_ids), len(want.token_ids))
    texts, reasons, usage = stream_completion(
        client, model=model, prompt=PROMPTS[model], max_tokens=MAX_TOKENS, temperature=0
    )
    assert texts == {0: want.text} and reasons == {0: want.finish_reason}
    assert usage.model_dump() == out.usage.model_dump()


@pytest.mark.parametrize("model", MODELS)
def test_chat_streamed_and_not_equal_engine(client: openai.OpenAI, expected, model: str) -> None:
    want = expected[(model, "chat")]
    out = client.chat.completions.create(model=model, messages=MESSAGES[model], max_tokens=MAX_TOKENS, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want.text
    assert out.choices[0].finish_reason == want.finish_reason
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(want.prompt_token_ids), len(want.token_ids))
    text, reason, usage = stream_chat(
        client, model=model, messages=MESSAGES[model], max_tokens=MAX_TOKENS, temperature=0
    )
    assert (text, reason) == (want.text, want.finish_reason)
    assert usage.model_dump() == out.usage.model_dump()


def test_prompt_forms_echo_and_stop(client: openai.OpenAI, ref: Engine, expected) -> None:
    want = expected[("coding", "completion")]
    ids = ref.tokenizer.encode(PROMPTS["coding"])
    by_ids = client.completions.create(model="coding", prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert by_ids.choices[0].text == want.text
    pair = client.completions.create(
        model="coding", prompt=[PROMPTS["coding"], PROMPTS["planning"]], max_tokens=MAX_TOKENS, temperature=0, echo=True
    )
    assert [c.index for c in pair.choices] == [0, 1]
    assert pair.choices[0].text == PROMPTS["coding"] + want.text
    stop = next((ch for ch in want.text[1:] if ch.isalnum()), None)
    if stop is None:
        pytest.skip("no stop character in the reference text")
    stopped = ref.generate([PROMPTS["coding"]], SamplingParams(max_tokens=MAX_TOKENS, stop=[stop]), adapter="coding")[0]
    out = client.completions.create(
        model="coding", prompt=PROMPTS["coding"], max_tokens=MAX_TOKENS, temperature=0, stop=stop
    )
    assert (out.choices[0].text, out.choices[0].finish_reason) == (stopped.text, "stop")
    texts, reasons, _ = stream_completion(
        client, model="coding", prompt=PROMPTS["coding"], max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert (texts[0], reasons[0]) == (stopped.text, "stop")


def test_sampling_n_seed_top_p_match_engine(client: openai.OpenAI, ref: Engine) -> None:
    params = dict(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.95, seed=7, n=2)
    want = ref.generate([PROMPTS["planning"]], SamplingParams(**params), adapter="planning")[0]
    out = client.completions.create(model="planning", prompt=PROMPTS["planning"], **params)
    assert [c.text for c in out.choices] == [o.text for o in want.outputs]
    assert out.usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs)
    texts, _, _ = stream_completion(client, model="planning", prompt=PROMPTS["planning"], **params)
    assert texts == {o.index: o.text for o in want.outputs}
    chat = client.chat.completions.create(model="planning", messages=MESSAGES["planning"], **params)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_32_concurrent_requests_over_4_adapters_are_batched(server: ServerProcess, ref: Engine) -> None:
    prompts = [f"# request {i}\ndef f{i}(x):\n    return" for i in range(32)]
    adapters = [ADAPTERS[i % 4] for i in range(32)]
    want = ref.generate(prompts, SamplingParams(max_tokens=12), adapter=adapters)
    before = metrics(server.url)

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        async with aclient:
            outs = await asyncio.gather(
                *(
                    aclient.completions.create(model=a, prompt=p, max_tokens=12, temperature=0)
                    for p, a in zip(prompts, adapters)
                )
            )
        return [o.choices[0].text for o in outs]

    assert asyncio.run(run()) == [w.text for w in want]
    after = metrics(server.url)
    steps = after["mcl_engine_steps_total"] - before["mcl_engine_steps_total"]
    tokens = after["mcl_generation_tokens_total"] - before["mcl_generation_tokens_total"]
    assert tokens == sum(len(w.token_ids) for w in want)
    assert tokens / steps > 1 and after["mcl_batch_size_max"] > 1
    for a in ADAPTERS:
        assert after[f"mcl_requests_total{{model={a}}}"] - before.get(f"mcl_requests_total{{model={a}}}", 0) == 8
    assert after["mcl_time_to_first_token_seconds_count{model=coding}"] >= 8


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER_X = [{"role": "user", "content": "x"}]
HOSTILE: dict[str, tuple[str, bytes | dict, int]] = {  # case: (path, body, expected status)
    "invalid_json": (COMPLETIONS, b'{"model": "coding", "prompt": ', 400),
    "not_an_object": (COMPLETIONS, b"[1, 2]", 400),
    "wrong_types": (COMPLETIONS, {"model": "coding", "prompt": 5, "max_tokens": "x"}, 400),
    "messages_not_a_list": (CHAT, {"model": "coding", "messages": "hi"}, 400),
    "missing_model": (COMPLETIONS, {"prompt": "hi"}, 400),
    "unknown_adapter": (COMPLETIONS, {"model": "nope", "prompt": "hi"}, 404),
    "unknown_adapter_chat": (CHAT, {"model": "nope", "messages": USER_X}, 404),
    "one_megabyte_prompt": (COMPLETIONS, {"model": "coding", "prompt": "hello world " * 87382}, 400),
    "negative_max_tokens": (COMPLETIONS, {"model": "coding", "prompt": "hi", "max_tokens": -1}, 400),
    "huge_max_tokens": (CHAT, {"model": "coding", "messages": USER_X, "max_tokens": 10**12}, 400),
    "logprobs": (COMPLETIONS, {"model": "coding", "prompt": "hi", "logprobs": 2}, 400),
    "bad_temperature": (COMPLETIONS, {"model": "coding", "prompt": "hi", "temperature": -1}, 400),
    "bad_token_ids": (COMPLETIONS, {"model": "coding", "prompt": [1, 10**9]}, 400),
    "empty_prompt_list": (COMPLETIONS, {"model": "coding", "prompt": []}, 400),
    "unknown_route": ("/v1/nothing", {}, 404),
}


def post_hostile(url: str, case: str) -> httpx.Response:
    """The ``HOSTILE`` request ``case`` sent to the server at ``url``; its expected status is checked."""
    path, body, status = HOSTILE[case]
    if isinstance(body, bytes):
        response = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        response = httpx.post(url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    return response


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_gets_error_and_server_lives(server: ServerProcess, client: openai.OpenAI, case: str) -> None:
    response = post_hostile(server.url, case)
    error = response.json()["error"]
    assert error["message"] and error["type"] and "code" in error
    well_formed_request_works(client)


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="coding", prompt="word " * 40000)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="coding", prompt="hi", max_tokens=-1)


def wait_idle(url: str, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["mcl_num_requests_running"] == m["mcl_num_requests_waiting"] == m["mcl_kv_blocks_used"] == 0:
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"requests still hold KV blocks: {m}")
        time.sleep(0.05)


def test_disconnect_aborts_and_frees_kv(server: ServerProcess, client: openai.OpenAI) -> None:
    long = {"model": "debugging", "prompt": "while True:", "max_tokens": 5000, "ignore_eos": True, "temperature": 0}
    before = metrics(server.url)
    with httpx.stream("POST", server.url + "/v1/completions", json={**long, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept open: closing this iterator would close the connection
        assert [next(lines).startswith("data: ") for _ in range(5)].count(True) >= 2
        assert metrics(server.url)["mcl_kv_blocks_used"] > 0
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(server.url + "/v1/completions", json=long, timeout=1.0)
    after = wait_idle(server.url)
    assert after["mcl_generation_tokens_total"] - before["mcl_generation_tokens_total"] < 2000
    well_formed_request_works(client)


def _mismatched_copy(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "adapter_model.safetensors"))
    save_file(
        {k: np.concatenate([v, v[:, :1]], axis=1) for k, v in weights.items()}, str(dst / "adapter_model.safetensors")
    )


def test_load_and_unload_adapters(server: ServerProcess, client: openai.OpenAI, expected, tmp_path: Path) -> None:
    post = lambda path, body: httpx.post(server.url + path, json=body, timeout=60)  # noqa: E731
    coding = demo_adapter_dirs()["coding"]
    assert post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "missing")}).status_code == 400
    _mismatched_copy(coding, tmp_path / "mismatched")
    bad = post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "mismatched")})
    assert bad.status_code == 400 and bad.json()["error"]["message"]
    assert post("/v1/load_lora_adapter", {"lora_name": "coding", "lora_path": str(coding)}).status_code == 400
    assert post("/v1/load_lora_adapter", {"name": "x"}).status_code == 400
    well_formed_request_works(client)

    assert post("/v1/load_lora_adapter", {"lora_name": "coding2", "lora_path": str(coding)}).status_code == 200
    assert {m.id: m.parent for m in client.models.list().data}["coding2"] == DEMO_MODEL_NAME
    out = client.completions.create(model="coding2", prompt=PROMPTS["coding"], max_tokens=MAX_TOKENS, temperature=0)
    assert out.choices[0].text == expected[("coding", "completion")].text
    # In place, under vLLM's field name: coding2 now answers as planning does; "replace" is not ours.
    planning = demo_adapter_dirs()["planning"]
    refused = post("/v1/load_lora_adapter", {"lora_name": "coding2", "lora_path": str(planning), "replace": True})
    assert refused.status_code == 400 and "replace" in refused.json()["error"]["message"]
    swap = {"lora_name": "coding2", "lora_path": str(planning), "load_inplace": True}
    assert post("/v1/load_lora_adapter", swap).status_code == 200
    out = client.completions.create(model="coding2", prompt=PROMPTS["planning"], max_tokens=MAX_TOKENS, temperature=0)
    assert out.choices[0].text == expected[("planning", "completion")].text
    assert post("/v1/unload_lora_adapter", {"lora_name": "coding2"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="coding2", prompt="x", max_tokens=1)
    assert post("/v1/unload_lora_adapter", {"lora_name": "coding2"}).status_code == 404
    well_formed_request_works(client)


def test_metrics_exposition(server: ServerProcess) -> None:
    m = wait_idle(server.url)
    for name in (
        "mcl_num_requests_running",
        "mcl_num_requests_waiting",
        "mcl_kv_blocks_free",
        "mcl_kv_blocks_used",
        "mcl_prompt_tokens_total",
        "mcl_generation_tokens_total",
        "mcl_batch_size_max",
        "mcl_batch_size_mean",
        "mcl_time_to_first_token_seconds_count{model=coding}",
        "mcl_requests_total{model=" + DEMO_MODEL_NAME + "}",
        "vllm:num_requests_running{model_name=" + DEMO_MODEL_NAME + "}",
        "vllm:num_requests_waiting{model_name=" + DEMO_MODEL_NAME + "}",
        "vllm:kv_cache_usage_perc{model_name=" + DEMO_MODEL_NAME + "}",
    ):
        assert name in m, name
    (lora,) = [k for k in m if k.startswith("vllm:lora_requests_info{")]
    assert "max_lora=8" in lora
    assert m["mcl_kv_blocks_free"] == m["mcl_kv_blocks_total"] > 0


def test_sigterm_finishes_in_flight_and_exits_0(server: ServerProcess) -> None:
    """Stops the module's server: keep it after every test that uses it."""
    body = {
        "model": "retrieval",
        "prompt": "for i in range(10):",
        "max_tokens": 150,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    lines: list[str] = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        lines += [next(it)]
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url + "/health", timeout=2)
        lines += list(it)
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and '"finish_reason": "length"' in data[-2]
    assert server.proc.wait(timeout=60) == 0, "".join(server.lines)


def test_bench_serve_smoke(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_serve.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / f"serve_cpu_{DEMO_MODEL_NAME}.json").read_text())
    assert [row["concurrency"] for row in report["levels"]] == [1, 8, 32]
    assert all(row["errors"] == 0 and row["ttft"]["p50_ms"] > 0 for row in report["levels"])
    assert report["machine"]["cpu"] and (tmp_path / f"serve_cpu_{DEMO_MODEL_NAME}.png").stat().st_size > 0
