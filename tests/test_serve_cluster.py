"""Replicas on Ray Serve (``python -m mcl_runtime.serve --replicas 2``) and what they rely on.

Without Ray: the in-process forwarding of a request to an app (``serve/forward.py``), the merge of the
replicas' metrics, the command line's checks. With Ray (marked ``ray``): one local Ray cluster with two
CPU replicas of the demo model serves the module's tests; the last one stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

openai = pytest.importorskip("openai")  # the server stack; the GPU image has none of it
pytestmark = pytest.mark.server_stack

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from test_server import (  # noqa: E402
    ADAPTERS,
    HOSTILE,
    MESSAGES,
    MODELS,
    PROMPTS,
    ServerProcess,
    expected,  # noqa: F401  (fixture)
    metrics,
    post_hostile,
    ref,  # noqa: F401  (fixture)
    stream_chat,
    stream_completion,
)

from mcl_runtime.serve.forward import ForwardedRequest, ForwardedResponse, answer  # noqa: E402
from mcl_runtime.serve.metrics import ServerMetrics, merge_replicas  # noqa: E402

# ---------------------------------------------------------------- without Ray


def _tiny_app():
    app, seen = FastAPI(), {"closed": False}

    @app.post("/json")
    async def as_json(request: Request):
        return JSONResponse({"got": (await request.json())["x"], "query": request.url.query}, status_code=201)

    @app.get("/stream")
    async def stream():
        async def events():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.001)
            finally:
                seen["closed"] = True

        return StreamingResponse(events(), media_type="text/event-stream")

    return app, seen


def test_forward_answers_as_the_app_and_an_early_close_ends_its_stream() -> None:
    app, seen = _tiny_app()
    tag = ((b"x-mcl-replica", b"r1"),)

    async def run() -> tuple[list, list]:
        request = ForwardedRequest("POST", "/json", b"a=1", ((b"content-type", b"application/json"),), b'{"x": 5}')
        whole = [item async for item in answer(app, request, tag)]
        items = []
        stream = answer(app, ForwardedRequest("GET", "/stream"), tag)
        async for item in stream:
            items.append(item)
            if len(items) == 3:
                break
        await stream.aclose()
        return whole, items

    whole, items = asyncio.run(run())
    assert len(whole) == 1 and isinstance(whole[0], ForwardedResponse) and not whole[0].streaming
    assert whole[0].status == 201 and json.loads(whole[0].body) == {"got": 5, "query": "a=1"}
    assert whole[0].header(b"x-mcl-replica") == "r1"
    head, *chunks = items
    assert head.streaming and head.header(b"content-type").startswith("text/event-stream")
    assert chunks == [b"data: 0\n\n", b"data: 1\n\n"] and seen["closed"]
    assert ForwardedRequest("POST", "/", body=b"[1").json_field("model") is None


def test_merged_metrics_sum_requests_pool_kv_and_label_replicas() -> None:
    def exposition(running: int, free: int, adapters: dict[str, int]) -> str:
        stats = {"num_running": running, "num_waiting": 1, "kv_blocks_total": 100, "kv_blocks_free": free}
        stats |= {"max_loras": 4, "lora_running": adapters, "lora_waiting": {}}
        return ServerMetrics("demo").render(stats).decode()

    text = merge_replicas({"a": exposition(2, 50, {"coding": 2}), "b": exposition(1, 100, {"planning": 1})})
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }
    assert samples[("vllm:num_requests_running", (("model_name", "demo"),))] == 3
    assert samples[("vllm:num_requests_waiting", (("model_name", "demo"),))] == 2
    assert samples[("vllm:kv_cache_usage_perc", (("model_name", "demo"),))] == 0.25
    assert samples[("mcl_num_requests_running", (("replica", "a"),))] == 2
    assert samples[("mcl_num_requests_running", (("replica", "b"),))] == 1
    (lora,) = [labels for name, labels in samples if name == "vllm:lora_requests_info"]
    assert dict(lora) == {"max_lora": "4", "running_lora_adapters": "coding,planning", "waiting_lora_adapters": ""}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--replicas", "0"], "--replicas: expected a positive int"),
        (["--replicas", "-2"], "--replicas: expected a positive int"),
        (["--replicas", "two"], "--replicas: expected a positive int"),
        (["--cpus-per-replica", "1"], "needs --replicas above 1"),
        (["--replicas", "2", "--gpus-per-replica", "1"], "--gpus-per-replica needs --device cuda"),
        (["--replicas", "3", "--max-replicas", "2"], "--max-replicas (2) is below --replicas (3)"),
    ],
)
def test_cli_refuses_bad_replica_options(argv: list[str], message: str, capsys) -> None:
    from mcl_runtime.serve.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_without_ray_names_the_extra(monkeypatch, capsys) -> None:
    from mcl_runtime.serve.__main__ import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    monkeypatch.delitem(sys.modules, "mcl_runtime.serve.ray_app", raising=False)
    assert main(["--replicas", "2"]) == 2
    assert "pip install 'mcl_runtime[cluster]'" in capsys.readouterr().err


def test_cli_refuses_a_missing_model_before_starting_ray(capsys) -> None:
    pytest.importorskip("ray.serve")
    from mcl_runtime.serve.__main__ import main

    assert main(["--replicas", "2", "--model", "/no/such/model"]) == 1
    assert main(["--replicas", "2", "--lora", "x=./no/such/adapter"]) == 1
    err = capsys.readouterr().err
    assert "model folder /no/such/model does not exist" in err and "adapter folder ./no/such/adapter" in err


def test_deployment_options_and_config_mapping() -> None:
    pytest.importorskip("ray.serve")
    from mcl_runtime.serve.__main__ import parse_args
    from mcl_runtime.serve.ray_app import SessionRouter, config_argv, deployment_options

    fixed = deployment_options(parse_args(["--replicas", "3", "--cpus-per-replica", "2"]))
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0}
    router = fixed["request_router_config"]
    assert router.request_router_kwargs == {"num_fallback_replicas": 0}
    assert router.get_request_router_class() is SessionRouter
    gpu = deployment_options(parse_args(["--replicas", "2", "--max-replicas", "8", "--device", "cuda"]))
    assert gpu["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1} and "num_replicas" not in gpu
    assert gpu["autoscaling_config"] == {
        "min_replicas": 2,
        "initial_replicas": 2,
        "max_replicas": 8,
        "target_ongoing_requests": 32,
    }
    argv = config_argv({"replicas": 2, "lora": ["x=/a", "y=/b"], "no_prefix_caching": True, "access_log": False})
    assert argv == ["--replicas", "2", "--lora", "x=/a", "--lora", "y=/b", "--no-prefix-caching"]
    args = parse_args(argv)
    assert (args.replicas, args.lora, args.no_prefix_caching) == (2, [("x", "/a"), ("y", "/b")], True)


# ---------------------------------------------------------------- with Ray: two replicas of the demo model


class RayServer(ServerProcess):
    """The CLI with ``--replicas 2``; ``stop`` ends Ray's processes too if the CLI did not."""

    startup_timeout = 300.0

    def descendants(self) -> list:
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def engine_replicas(self) -> list:
        return [p for p in self.descendants() if "EngineReplica" in " ".join(_cmdline(p))]

    def stop(self) -> None:
        left = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for p in left:
            if p.is_running():
                p.kill()


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except Exception:  # exited meanwhile
        return []


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray.serve", reason="Ray Serve is the cluster extra")
    server = RayServer("--replicas", "2", "--cpus-per-replica", "1", "--shutdown-timeout", "20")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(cluster: RayServer):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _replica_ids(url: str) -> set[str]:
    return set(httpx.get(url + "/metrics", timeout=60).headers["x-mcl-replica"].split(","))


@pytest.mark.ray
def test_every_endpoint_through_the_ray_app(cluster: RayServer, client, expected) -> None:  # noqa: F811
    assert httpx.get(cluster.url + "/health").headers["x-mcl-replica"]
    assert {m.id for m in client.models.list().data} == set(MODELS)
    for model in (MODELS[0], "coding"):
        want = expected[(model, "completion")]
        raw = client.completions.with_raw_response.create(
            model=model, prompt=PROMPTS[model], max_tokens=8, temperature=0
        )
        assert raw.headers["x-mcl-replica"] and raw.parse().choices[0].text == want.text
        texts, _, _ = stream_completion(client, model=model, prompt=PROMPTS[model], max_tokens=8, temperature=0)
        assert texts == {0: want.text}
        chat = expected[(model, "chat")]
        out = client.chat.completions.create(model=model, messages=MESSAGES[model], max_tokens=8, temperature=0)
        assert out.choices[0].message.content == chat.text
        assert stream_chat(client, model=model, messages=MESSAGES[model], max_tokens=8, temperature=0)[0] == chat.text
    with httpx.stream(
        "POST",
        cluster.url + "/v1/completions",
        json={"model": "coding", "prompt": "x", "max_tokens": 4, "stream": True},
        timeout=60,
    ) as r:
        assert r.headers["x-mcl-replica"] and r.headers["content-type"].startswith("text/event-stream")
        assert list(r.iter_lines())[-2] == "data: [DONE]"
    choice = client.chat.completions.create(
        model="planning",
        messages=MESSAGES["planning"],
        max_tokens=8,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert choice.choices[0].message.content in ("yes", "no")


@pytest.mark.ray
def test_a_session_stays_on_one_replica_and_both_replicas_work(cluster: RayServer) -> None:
    def replica(session: str | None, model: str = "coding") -> str:
        headers = {"X-Session-ID": session} if session else {}
        body = {"model": model, "prompt": "def f(x):", "max_tokens": 2}
        r = httpx.post(cluster.url + "/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        return r.headers["x-mcl-replica"]

    by_session = {f"problem-{i}": {replica(f"problem-{i}", m) for m in ADAPTERS[:3]} for i in range(16)}
    assert all(len(ids) == 1 for ids in by_session.values()), by_session
    assert set().union(*by_session.values()) == _replica_ids(cluster.url)

    async def concurrent() -> set[str]:
        async with openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
            raws = await asyncio.gather(
                *(
                    c.completions.with_raw_response.create(
                        model="debugging", prompt=f"# {i}", max_tokens=48, extra_body={"ignore_eos": True}
                    )
                    for i in range(8)
                )
            )
        return {raw.headers["x-mcl-replica"] for raw in raws}

    assert len(asyncio.run(concurrent())) == 2


@pytest.mark.ray
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_requests_get_4xx_through_the_ray_app(cluster: RayServer, case: str) -> None:
    r = post_hostile(cluster.url, case)
    assert 400 <= r.status_code < 500 and r.json()["error"]["message"] and r.headers["x-mcl-replica"]


@pytest.mark.ray
def test_adapter_load_and_unload_reach_every_replica(cluster: RayServer, tmp_path: Path) -> None:
    from mcl_runtime.demo import demo_adapter_dirs

    post = lambda path, body: httpx.post(cluster.url + path, json=body, timeout=120)  # noqa: E731
    replicas = _replica_ids(cluster.url)

    def served_by(model: str) -> dict[str, int]:
        """replica -> status of a request for ``model``, over sessions that reach every replica."""
        seen: dict[str, int] = {}
        for i in range(16):
            r = httpx.post(
                cluster.url + "/v1/completions",
                json={"model": model, "prompt": "x", "max_tokens": 2},
                headers={"X-Session-ID": f"s{i}"},
                timeout=60,
            )
            seen[r.headers["x-mcl-replica"]] = r.status_code
        assert set(seen) == replicas
        return seen

    bad = post("/v1/load_lora_adapter", {"lora_name": "c2", "lora_path": str(tmp_path / "missing")})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "adapter_load_error"
    loaded = post("/v1/load_lora_adapter", {"lora_name": "c2", "lora_path": str(demo_adapter_dirs()["coding"])})
    assert loaded.status_code == 200 and set(loaded.headers["x-mcl-replica"].split(",")) == replicas
    assert set(served_by("c2").values()) == {200}
    assert post("/v1/unload_lora_adapter", {"lora_name": "c2"}).status_code == 200
    assert set(served_by("c2").values()) == {404}
    assert post("/v1/unload_lora_adapter", {"lora_name": "c2"}).status_code == 404


@pytest.mark.ray
def test_router_standard_metrics_parse(cluster: RayServer) -> None:
    r = httpx.get(cluster.url + "/metrics", timeout=60)
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        (sample,) = families[name].samples
        assert sample.labels == {"model_name": "mcl-demo-tiny"} and sample.value >= 0
    (info,) = families["vllm:lora_requests_info"].samples
    assert info.labels["max_lora"] == "8" and abs(info.value - time.time()) < 600
    replicas = {s.labels["replica"] for s in families["mcl_kv_blocks_total"].samples}
    assert replicas == set(r.headers["x-mcl-replica"].split(",")) and len(replicas) == 2


OWN = [
    {
        "task_id": f"own/add{i}",
        "entry_point": "add",
        "prompt": f"def add(a, b):\n    # variant {i}\n    pass\n",
        "test": "def check(candidate):\n    assert candidate(1, 1) == 2\n",
        "sample_io": ["assert add(1, 2) == 3"],
    }
    for i in range(8)
]


@pytest.mark.ray
def test_a_killed_replica_is_replaced_and_nothing_is_lost(cluster: RayServer, tmp_path: Path) -> None:
    """One replica's process is killed while raw requests and a pipeline run: the requests it held are
    retried by their clients and answered by the other replica, the pipeline writes every problem once
    and without error, and Ray Serve starts a replacement."""
    before = _replica_ids(cluster.url)
    data, out = tmp_path / "own.jsonl", tmp_path / "results.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in OWN))
    pipeline = subprocess.Popen(
        [sys.executable, "-m", "mcl_runtime.pipeline", "--dataset", str(data), "--endpoint", cluster.url + "/v1"]
        + ["--k", "1", "--t", "1", "--max-tokens", "48", "--workers", "4", "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    statuses: list[int] = []

    async def record(response: httpx.Response) -> None:
        statuses.append(response.status_code)

    async def requests() -> list:
        http = httpx.AsyncClient(event_hooks={"response": [record]})
        async with openai.AsyncOpenAI(
            base_url=cluster.url + "/v1", api_key="x", max_retries=8, timeout=300, http_client=http
        ) as c:
            calls = [
                c.completions.with_raw_response.create(
                    model=ADAPTERS[i % 4], prompt=f"# {i}", max_tokens=160, extra_body={"ignore_eos": True}
                )
                for i in range(8)
            ]
            return await asyncio.gather(*(asyncio.wait_for(call, 300) for call in calls))

    async def kill_when_both_are_busy() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            running = await asyncio.to_thread(metrics, cluster.url)
            busy = [k for k, v in running.items() if k.startswith("mcl_num_requests_running{") and v > 0]
            if len(busy) == 2:
                break
            await asyncio.sleep(0.2)
        victim = cluster.engine_replicas()[0]
        os.kill(victim.pid, signal.SIGKILL)

    async def run() -> list:
        answers, _ = await asyncio.gather(requests(), kill_when_both_are_busy())
        return answers

    answers = asyncio.run(run())
    assert all(a.parse().usage.completion_tokens == 160 for a in answers)
    assert statuses.count(503) >= 1 and statuses.count(200) == 8, statuses  # some were retried, all answered
    log, _ = pipeline.communicate(timeout=600)
    assert pipeline.returncode == 0, log
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["task_id"] for r in rows) == sorted(r["task_id"] for r in OWN), log
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows]

    deadline = time.monotonic() + 240
    while (now := _replica_ids(cluster.url)) and (len(now) < 2 or now == before):
        assert time.monotonic() < deadline, f"no replacement replica: {now}"
        time.sleep(1)
    assert len(now & before) == 1 and len(now) == 2


@pytest.mark.ray
def test_sigterm_drains_and_exits_0(cluster: RayServer) -> None:
    """Stops the module's cluster: keep it after every test that uses it."""
    assert httpx.get(cluster.url + "/health", timeout=30).status_code == 200
    ray_processes = cluster.descendants()
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(timeout=120) == 0, "".join(cluster.lines[-50:])
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != "zombie" for p in ray_processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in ray_processes if p.is_running() and p.status() != "zombie"]
