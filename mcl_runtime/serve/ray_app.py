"""The OpenAI-compatible server as a Ray Serve application: ``python -m mcl_runtime.serve --replicas N``.

Three deployments, one HTTP endpoint (Ray Serve's proxy on ``--host``/``--port``):

- ``EngineReplica`` (``--replicas``, or autoscaled up to ``--max-replicas``; ``--cpus-per-replica`` /
  ``--gpus-per-replica`` each): one engine and the single-process server's app (``build_app``) per
  replica. A request reaches it as data (``forward.ForwardedRequest``) and is answered by that app in
  process, so endpoints, validation, error bodies and streams are those of the server without Ray.
  Every answer carries ``X-MCL-Replica: <replica id>``.
- ``Ingress``: the HTTP entry. It reads a request's session key (``X-Session-ID``) and its ``model``
  field and hands the request to one engine replica through a ``DeploymentHandle``, chosen by
  ``SessionRouter``. Adapter load/unload and ``/metrics`` go to every replica
  (``DeploymentHandle.broadcast``); ``/metrics`` merges them (``metrics.merge_replicas``).
- ``AdapterRegistry``: the adapters loaded and unloaded at run time (one owner of that fact), which a
  replica started later (a replacement for one that died, or autoscaling) applies at start, and every
  replica checks on Serve's periodic routing-stats call.

When a replica dies, requests it was running fail with a 503 (``x-should-retry: true``; an event stream
ends with an error event) and Ray Serve starts a replacement; requests sent afterwards go to the live
replicas, so a client that retries (the openai client does, and the pipeline) gets its answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, RunningReplica
from ray.serve.schema import LoggingConfig
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from mcl_runtime.serve.app import APIError
from mcl_runtime.serve.forward import ForwardedRequest, ForwardedResponse, Headers, answer
from mcl_runtime.serve.metrics import CONTENT_TYPE, merge_replicas
from mcl_runtime.serve.streaming import sse

logger = logging.getLogger("mcl_runtime.serve")

APP_NAME = "mcl_runtime"
SESSION_HEADER = "x-session-id"
REPLICA_HEADER = b"x-mcl-replica"
ADAPTER_ROUTES = {"/v1/load_lora_adapter": "load", "/v1/unload_lora_adapter": "unload"}
RESIDENT = "resident_adapters"  # routing-stats key: adapters in a replica's device slots
ROUTING_STATS_PERIOD_S = 2.0
METRICS_TIMEOUT_S = 30.0
_REPLICA_GONE = (RayActorError, ActorUnavailableError)


def _unavailable(exc: BaseException) -> Response:
    """503 for a request whose replica stopped before answering; clients may retry it at once."""
    message = f"no replica answered ({type(exc).__name__}: {exc}); retry the request"
    error = APIError(503, message, "replica_unavailable")
    return Response(
        json.dumps(error.body()),
        status_code=503,
        media_type="application/json",
        headers={"x-should-retry": "true", "retry-after": "1"},
    )


# ---------------------------------------------------------------- routing


class SessionRouter(ConsistentHashRouter):
    """Ray Serve request router of the engine replicas.

    - A request with a session key goes where Ray's ``ConsistentHashRouter`` maps it: a hash ring over
      the live replicas, so one key stays on one replica while the replicas stay the same, and a replica
      leaving or joining moves about 1/N of the keys. No fallback to another replica
      (``num_fallback_replicas=0``): a busy replica queues the request rather than lose its prefix cache.
    - A request without one: the replicas holding its adapter in a device slot (as each last reported
      in ``record_routing_stats``) first, then the others; within each group Ray's queue-length probe
      takes the replica with the shortest queue (ties broken at random).
    """

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None or pending_request.metadata.session_id:
            return await super().choose_replicas(candidate_replicas, pending_request)
        pending_request.routing_context.should_backoff = True
        adapter = pending_request.kwargs.get("adapter")
        holding, others = [], []
        for replica in random.sample(candidate_replicas, len(candidate_replicas)):
            (holding if adapter in replica.routing_stats.get(RESIDENT, ()) else others).append(replica)
        return [group for group in (holding, others) if group]


# ---------------------------------------------------------------- deployments


class AdapterRegistry:
    """Adapters loaded (name -> path) or unloaded (name -> None) at run time, in the order of the
    changes, with a version that grows with each change."""

    def __init__(self) -> None:
        self.version = 0
        self.changes: dict[str, str | None] = {}

    def record(self, name: str, path: str | None) -> int:
        self.changes.pop(name, None)
        self.changes[name] = path
        self.version += 1
        return self.version

    def since(self, version: int) -> tuple[int, dict[str, str | None]] | None:
        """The current version and changes, or None when ``version`` is current."""
        return None if version == self.version else (self.version, dict(self.changes))


class EngineReplica:
    """One engine and the single-process server's app over it (deployed by ``build_application``)."""

    async def __init__(self, args: argparse.Namespace, registry: DeploymentHandle) -> None:
        import torch

        from mcl_runtime import AsyncEngine
        from mcl_runtime.serve.__main__ import build_engine
        from mcl_runtime.serve.app import build_app

        if args.device != "cuda":
            torch.set_num_threads(max(1, int(args.cpus_per_replica or 1)))
        self.replica_id: str = serve.get_replica_context().replica_id.unique_id
        engine = await asyncio.to_thread(build_engine, args)
        self.aeng = AsyncEngine(engine)
        self.app = build_app(self.aeng, args.served_model_name or engine.model_name)
        self.registry = registry
        self.adapters_version = 0
        await self._sync_adapters()

    async def forward(self, request: ForwardedRequest, adapter: str | None = None) -> AsyncIterator[Any]:
        """``request`` answered by this replica's app (``adapter``, the request's model, is for the router)."""
        async for item in answer(self.app, request, ((REPLICA_HEADER, self.replica_id.encode()),)):
            yield item

    async def call(self, request: ForwardedRequest) -> ForwardedResponse:
        """A request whose answer is not a stream (adapter load/unload, ``/metrics``), broadcast to all."""
        async for item in answer(self.app, request, ((REPLICA_HEADER, self.replica_id.encode()),)):
            return item  # type: ignore[return-value]
        raise RuntimeError("no response")

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve calls this on every replica every ``ROUTING_STATS_PERIOD_S``: what the router reads, and
        the moment to catch up with adapters changed while this replica was starting."""
        await self._sync_adapters()
        stats = await self.aeng.fresh_stats()
        return {RESIDENT: stats.get("lora_resident", [])}

    async def _sync_adapters(self) -> None:
        update = await self.registry.since.remote(self.adapters_version)
        if update is None:
            return
        version, changes = update
        for name, path in changes.items():
            present = name in self.aeng.adapters
            try:
                if path is None and present:
                    await self.aeng.unload_adapter(name)
                elif path is not None and not present:
                    await self.aeng.load_adapter(name, path)
            except Exception as exc:  # logged; this replica goes on without that change
                logger.warning("replica %s: cannot apply adapter %s -> %s: %s", self.replica_id, name, path, exc)
        self.adapters_version = version

    def __del__(self) -> None:
        aeng = getattr(self, "aeng", None)
        if aeng is not None:
            aeng.shutdown()


class Ingress:
    """The HTTP entry (see the module docstring)."""

    def __init__(self, engines: DeploymentHandle, registry: DeploymentHandle) -> None:
        self.engines = engines
        self.registry = registry

    async def __call__(self, request: Request) -> Response:
        forwarded = ForwardedRequest(
            request.method,
            request.url.path,
            request.url.query.encode(),
            tuple(request.headers.raw),
            await request.body(),
        )
        if request.method == "GET" and forwarded.path == "/metrics":
            return await self._metrics()
        if request.method == "POST" and forwarded.path in ADAPTER_ROUTES:
            return await self._adapters(forwarded)
        return await self._forward(forwarded, request.headers.get(SESSION_HEADER))

    async def _forward(self, request: ForwardedRequest, session: str | None) -> Response:
        handle = self.engines.options(stream=True, **({"session_id": session} if session else {}))
        model = request.json_field("model")
        stream = handle.forward.remote(request, adapter=model if isinstance(model, str) else None)
        try:
            head: ForwardedResponse = await stream.__anext__()
        except _REPLICA_GONE as exc:
            return _unavailable(exc)
        except asyncio.CancelledError:  # the client left: so does the replica's request
            stream.cancel()
            raise
        if not head.streaming:
            return _response(head)
        response = StreamingResponse(_rest_of_stream(stream), status_code=head.status)
        response.raw_headers = [(k, v) for k, v in head.headers if k.lower() != b"content-length"]
        return response

    async def _broadcast(self, request: ForwardedRequest, timeout_s: float | None) -> list[ForwardedResponse]:
        """The answers of the replicas that answered (a replica that died meanwhile is left out)."""
        results = await self.engines.broadcast("call", request).results_async(
            timeout_s=timeout_s, return_exceptions=True
        )
        for result in results:
            if not isinstance(result, ForwardedResponse):
                logger.warning("a replica did not answer %s %s: %r", request.method, request.path, result)
        return [r for r in results if isinstance(r, ForwardedResponse)]

    async def _metrics(self) -> Response:
        answers = await self._broadcast(ForwardedRequest("GET", "/metrics"), METRICS_TIMEOUT_S)
        texts = {a.header(REPLICA_HEADER): a.body.decode() for a in answers if a.status == 200}
        body = merge_replicas({replica: text for replica, text in texts.items() if replica})
        return Response(body, media_type=CONTENT_TYPE, headers={REPLICA_HEADER.decode(): ",".join(sorted(texts))})

    async def _adapters(self, request: ForwardedRequest) -> Response:
        """Load or unload on every replica; the registry records a change that at least one replica made
        (replicas that failed, and later ones, retry it when they next sync)."""
        answers = await self._broadcast(request, None)
        if not answers:
            return _unavailable(RuntimeError("no replica is running"))
        ok = [a for a in answers if a.status == 200]
        if ok:
            name, path = request.json_field("lora_name"), request.json_field("lora_path")
            await self.registry.record.remote(name, path if ADAPTER_ROUTES[request.path] == "load" else None)
        chosen = next((a for a in answers if a.status != 200), ok[0] if ok else answers[0])
        replicas = ",".join(sorted(a.header(REPLICA_HEADER) or "" for a in answers))
        return _response(chosen, replicas)


def _response(head: ForwardedResponse, replicas: str | None = None) -> Response:
    response = Response(head.body, status_code=head.status)
    headers: Headers = head.headers
    if replicas is not None:
        headers = (*((k, v) for k, v in headers if k.lower() != REPLICA_HEADER), (REPLICA_HEADER, replicas.encode()))
    response.raw_headers = list(headers)
    return response


async def _rest_of_stream(stream: Any) -> AsyncIterator[bytes]:
    """The body chunks of a streamed answer; if its replica dies meanwhile, an error event and the end."""
    try:
        async for chunk in stream:
            yield chunk
    except _REPLICA_GONE as exc:
        error = APIError(503, f"the replica serving this stream stopped ({type(exc).__name__})", "replica_unavailable")
        yield sse(error.body()).encode()
        yield sse("[DONE]").encode()
    finally:
        stream.cancel()


# ---------------------------------------------------------------- the application


def deployment_options(args: argparse.Namespace) -> dict[str, Any]:
    """Ray Serve options of the engine deployment: resources, replica count or autoscaling, router."""
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (1 if args.device == "cuda" else 0)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": args.cpus_per_replica or 1, "num_gpus": gpus},
        "max_ongoing_requests": args.max_ongoing_requests,
        "graceful_shutdown_timeout_s": args.shutdown_timeout,
        "request_router_config": RequestRouterConfig(
            request_router_class=SessionRouter,
            request_router_kwargs={"num_fallback_replicas": 0},
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        ),
    }
    if args.max_replicas is not None and args.max_replicas > args.replicas:
        options["autoscaling_config"] = {
            "min_replicas": args.replicas,
            "initial_replicas": args.replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = args.replicas
    return options


def build_application(args: argparse.Namespace) -> serve.Application:
    """The Ray Serve application for parsed ``python -m mcl_runtime.serve`` arguments."""
    logging_config = _logging_config(args)
    registry = (
        serve.deployment(AdapterRegistry)
        .options(ray_actor_options={"num_cpus": 0}, logging_config=logging_config)
        .bind()
    )
    engines = (
        serve.deployment(EngineReplica)
        .options(logging_config=logging_config, **deployment_options(args))
        .bind(_absolute_paths(args), registry)
    )
    most = max(args.replicas, args.max_replicas or 0)
    return (
        serve.deployment(Ingress)
        .options(
            ray_actor_options={"num_cpus": 0},
            max_ongoing_requests=most * args.max_ongoing_requests,
            logging_config=logging_config,
        )
        .bind(engines, registry)
    )


def app_builder(config: dict[str, Any]) -> serve.Application:
    """``import_path: mcl_runtime.serve.ray_app:app_builder`` for ``serve run`` and KubeRay's RayService:
    ``args`` is the command line as a mapping, e.g. ``{"model": "...", "lora": ["coding=DIR"], "replicas": 2}``."""
    from mcl_runtime.serve.__main__ import parse_args

    return build_application(parse_args(config_argv(config)))


def config_argv(config: dict[str, Any]) -> list[str]:
    """A mapping of options (``max_loras: 8``, ``lora: [a, b]``, ``no_prefix_caching: true``) as a command line."""
    argv: list[str] = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            argv += [flag] if item is True else [] if item is False else [flag, str(item)]
    return argv


def _absolute_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Local model and adapter folders as absolute paths (replicas may run in another directory)."""

    def absolute(path: str) -> str:
        return str(Path(path).resolve()) if Path(path).exists() else path

    return argparse.Namespace(
        **{
            **vars(args),
            "model": absolute(args.model) if args.model else None,
            "lora": [(name, absolute(path)) for name, path in args.lora],
        }
    )


def init_ray(**options: Any) -> None:
    """``ray.init(**options)``, with Serve's HTTP proxy given 60 s to get ready (unless the environment
    sets ``RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S``): Serve kills a proxy not ready within 5 s three
    times, and on a busy machine of few cores importing FastAPI and uvicorn can take that long. The
    processes of a local cluster inherit the setting."""
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    ray.init(**options)


def _logging_config(args: argparse.Namespace) -> LoggingConfig:
    level = args.log_level.upper() if args.access_log or args.log_level == "debug" else "WARNING"
    return LoggingConfig(log_level=level, enable_access_log=args.access_log)


# ---------------------------------------------------------------- the command


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_resources(args: argparse.Namespace) -> None:
    """On a machine Ray was started on here: the replicas must fit (else Serve would wait forever)."""
    options = deployment_options(args)["ray_actor_options"]
    have = ray.cluster_resources()
    for resource, per_replica in (("CPU", options["num_cpus"]), ("GPU", options["num_gpus"])):
        need = args.replicas * per_replica
        if need > have.get(resource, 0):
            flag = "--cpus-per-replica" if resource == "CPU" else "--gpus-per-replica"
            raise ValueError(
                f"{args.replicas} replicas x {per_replica} {resource} ({flag}) need {need:g} {resource}s; "
                f"this machine has {have.get(resource, 0):g}"
            )


def _check_local_paths(args: argparse.Namespace) -> None:
    """A model or adapter that is neither a folder here nor a hub id is refused before Ray starts."""
    from mcl_runtime.hub import is_repo_id

    for what, spec in [("model", args.model), *(("adapter", path) for _, path in args.lora)]:
        if spec and not Path(spec).expanduser().is_dir() and not is_repo_id(spec):
            raise ValueError(f"{what} folder {spec} does not exist")


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def main(args: argparse.Namespace) -> int:
    """Start (or join, with ``--ray-address``) Ray, deploy the application, announce it, serve until
    SIGINT/SIGTERM, then drain: replicas finish their requests for up to ``--shutdown-timeout`` s."""
    local = args.ray_address is None
    port = args.port or _free_port(args.host)
    if local:
        try:
            _check_local_paths(args)
        except ValueError as exc:
            print(f"mcl_runtime.serve: error: {exc}", file=sys.stderr)
            return 1
    if local and args.model is None:
        from mcl_runtime.demo import demo_model_dir

        demo_model_dir()  # built once here rather than by every replica at the same time
    init_ray(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        if local:
            _check_resources(args)
        serve.start(http_options={"host": args.host, "port": port}, logging_config=_logging_config(args))
        serve.run(build_application(args), name=APP_NAME, route_prefix="/")
        models = httpx.get(f"http://{args.host}:{port}/v1/models", timeout=60).json()["data"]
        base = next(m["id"] for m in models if not m.get("parent"))
        adapters = ", ".join(m["id"] for m in models if m.get("parent")) or "none"
        print(
            f"mcl_runtime.serve: serving {base} with adapters [{adapters}] at http://{args.host}:{port}/v1 "
            f"({args.replicas} replicas on Ray {'started here' if local else 'at ' + args.ray_address}, "
            f"device {args.device or 'cpu'})",
            flush=True,
        )
        _wait_for_signal()
        serve.delete(APP_NAME)
    except (ValueError, RuntimeError) as exc:
        print(f"mcl_runtime.serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if local:
            serve.shutdown()
        ray.shutdown()  # stops the Ray started here; leaves a cluster at --ray-address running
    return 0
