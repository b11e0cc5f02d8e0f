"""``python -m mcl_runtime.serve``: the OpenAI-compatible server.

Without ``--model`` it serves the embedded demo model ``mcl-demo-tiny`` and its four adapters
(``--lora`` adds more). ``--model`` and ``--lora`` take folders or Hugging Face hub ids. Once listening it
prints one line naming what is served where.
SIGINT or SIGTERM: stop accepting connections, let in-flight requests finish for up to
``--shutdown-timeout`` seconds, abort the rest, exit 0.

``--replicas N`` (N > 1), ``--max-replicas M`` or ``--ray-address ADDR`` run the same server as a Ray
Serve application of several engine replicas behind this one endpoint (``ray_app.py``; Ray is the
``cluster`` extra): Ray is started here unless ``--ray-address`` names a running cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from mcl_runtime import AsyncEngine, Engine
from mcl_runtime.engine.cli_args import (
    add_execution_mode_args,
    add_kv_cache_args,
    execution_mode_options,
    kv_cache_options,
)
from mcl_runtime.errors import MCLError
from mcl_runtime.model.backends import BACKENDS
from mcl_runtime.serve.app import build_app

logger = logging.getLogger("mcl_runtime.serve")

# Seconds uvicorn waits, after in-flight requests were aborted, before it cancels what is left.
_ABORT_GRACE = 10.0

# Engine keyword arguments set from the command line when given (the engine's defaults otherwise).
_ENGINE_OPTIONS = (
    "device",
    "dtype",
    "backend",
    "max_loras",
    "max_lora_rank",
    "kv_cache_blocks",
    "block_size",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "seed",
)


CLUSTER_EXTRA = "pip install 'mcl_runtime[cluster]'"


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _lora(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {spec!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mcl_runtime.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        help="HF model folder or hub id, e.g. Qwen/Qwen2.5-Coder-7B-Instruct (default: the embedded demo model)",
    )
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    p.add_argument(
        "--lora",
        action="append",
        type=_lora,
        default=[],
        metavar="NAME=DIR",
        help="PEFT adapter folder or hub id served as model NAME (repeatable)",
    )
    p.add_argument("--served-model-name", help="name of the base model in the API (default: the engine's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at startup)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="default auto: the checkpoint's bfloat16 where the CPU computes it natively (else float32), "
        "bfloat16 on CUDA",
    )
    p.add_argument("--backend", choices=sorted(BACKENDS), help="default: triton on cuda, cpu on cpu")
    p.add_argument("--max-loras", type=int, help="adapter slots (0: no LoRA buffers, the base model only)")
    p.add_argument("--max-lora-rank", type=int)
    p.add_argument("--kv-cache-blocks", type=int)
    add_kv_cache_args(p)
    p.add_argument("--block-size", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument(
        "--max-num-batched-tokens", type=int, help="tokens per step (default: 2048 on a GPU, fewer on the CPU)"
    )
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--no-prefix-caching", action="store_true")
    add_execution_mode_args(p)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may take to finish after SIGINT/SIGTERM",
    )
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    cluster = p.add_argument_group("replicas on Ray Serve (the cluster extra)")
    cluster.add_argument(
        "--replicas", type=_positive(int), default=1, help="engine replicas behind the endpoint (more than 1: Ray)"
    )
    cluster.add_argument("--ray-address", help="a running Ray cluster to deploy on (default: start Ray here)")
    cluster.add_argument(
        "--max-replicas", type=_positive(int), help="autoscale between --replicas and this many (Ray Serve autoscaling)"
    )
    cluster.add_argument(
        "--target-ongoing-requests",
        type=_positive(int),
        default=32,
        help="requests per replica the autoscaler aims at (with --max-replicas)",
    )
    cluster.add_argument(
        "--max-ongoing-requests",
        type=_positive(int),
        default=256,
        help="requests one replica takes at once; more wait in Ray Serve's router",
    )
    cluster.add_argument("--cpus-per-replica", type=_positive(float), help="CPUs reserved per replica (default 1)")
    cluster.add_argument(
        "--gpus-per-replica", type=_positive(float), help="GPUs per replica (default 1 with --device cuda)"
    )
    return p


def uses_ray(args: argparse.Namespace) -> bool:
    return args.replicas > 1 or args.ray_address is not None or (args.max_replicas or 0) > args.replicas


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: the replica options need replicas, GPUs need ``--device cuda``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        parser.error(f"--max-replicas ({args.max_replicas}) is below --replicas ({args.replicas})")
    if not uses_ray(args):
        given = [f for f in ("cpus_per_replica", "gpus_per_replica") if getattr(args, f) is not None]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} needs --replicas above 1 or --ray-address")
    if args.gpus_per_replica is not None and args.device != "cuda":
        parser.error("--gpus-per-replica needs --device cuda")
    return args


def build_engine(args: argparse.Namespace) -> Engine:
    """The engine the command line asks for; without ``--model`` the demo model, whose four adapters
    ``--lora`` adds to."""
    options: dict[str, Any] = {k: getattr(args, k) for k in _ENGINE_OPTIONS if getattr(args, k) is not None}
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    options.update(execution_mode_options(args))
    options.update(kv_cache_options(args))
    if args.model is None:
        from mcl_runtime.demo import demo_adapter_dirs, demo_engine

        return demo_engine(adapters={**demo_adapter_dirs(), **dict(args.lora)}, **options)
    return Engine(model=args.model, adapters=dict(args.lora), revision=args.revision, **options)


class _Server(uvicorn.Server):
    """uvicorn's server, announcing itself once listening; on SIGINT/SIGTERM it lets in-flight
    requests run for ``drain_timeout`` seconds, then aborts the rest (``abort_all``, which ends them
    with an error response rather than a cut connection), and exits 0 (uvicorn would re-raise the
    signal after its graceful shutdown)."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_started: Callable[[str, int], None],
        abort_all: Callable[[], None],
        drain_timeout: float,
    ) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._abort_all = abort_all
        self._drain_timeout = drain_timeout

    async def shutdown(self, sockets: Any = None) -> None:
        aborter = asyncio.create_task(self._abort_after_timeout())
        try:
            await super().shutdown(sockets=sockets)
        finally:
            aborter.cancel()

    async def _abort_after_timeout(self) -> None:
        await asyncio.sleep(self._drain_timeout)
        logger.warning("requests still running %.0f s after the shutdown signal: aborting them", self._drain_timeout)
        await asyncio.to_thread(self._abort_all)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self._on_started(host, port)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _announce(engine: Engine, name: str, args: argparse.Namespace) -> Callable[[str, int], None]:
    adapters = ", ".join(engine.adapters) or "none"
    device = getattr(engine, "device", args.device or "auto")
    dtype = str(getattr(engine, "dtype", args.dtype or "auto")).removeprefix("torch.")

    def announce(host: str, port: int) -> None:
        print(
            f"mcl_runtime.serve: serving {name} with adapters [{adapters}] at http://{host}:{port}/v1 "
            f"(device {device}, dtype {dtype}, max_model_len {engine.max_model_len}, "
            f"KV cache {engine.kv_plan.num_tokens:,} tokens)",
            flush=True,
        )

    return announce


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if uses_ray(args):
        try:
            from mcl_runtime.serve import ray_app
        except ImportError as exc:
            print(f"mcl_runtime.serve: error: replicas run on Ray Serve ({exc}): {CLUSTER_EXTRA}", file=sys.stderr)
            return 2
        return ray_app.main(args)
    try:
        engine = build_engine(args)
    except (MCLError, ValueError, OSError) as exc:
        print(f"mcl_runtime.serve: error: {exc}", file=sys.stderr)
        return 1
    aeng = AsyncEngine(engine)
    name = args.served_model_name or engine.model_name
    app = build_app(aeng, name)
    # The startup heap (model, tokenizer, libraries) lives as long as the server: frozen, it is not
    # scanned by full collections (as vLLM does after its start-up), which would otherwise pause
    # streaming steps for tens of milliseconds.
    gc.collect()
    gc.freeze()

    def abort_all() -> None:
        app.state.server.shutting_down = True
        aeng.shutdown()

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=args.shutdown_timeout + _ABORT_GRACE,
    )
    try:
        _Server(config, _announce(engine, name, args), abort_all, args.shutdown_timeout).run()
    finally:
        aeng.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
