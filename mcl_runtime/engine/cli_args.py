"""Command-line flags for the engine's execution mode and KV cache size, shared by the server and pipeline CLIs."""

from __future__ import annotations

import argparse
from typing import Any

from mcl_runtime.engine.kv_cache import DEFAULT_MEMORY_FRACTION, parse_bytes


def add_execution_mode_args(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (one graph per batch-size bucket; on the CPU slower than eager)",
    )
    mode.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no torch.compile and no CUDA graphs (CUDA graphs are on by default on CUDA)",
    )


def execution_mode_options(args: argparse.Namespace) -> dict[str, bool]:
    """``Engine`` keyword arguments for the flags (empty: the engine's defaults)."""
    if args.compile:
        return {"compile": True}
    if args.enforce_eager:
        return {"compile": False, "cuda_graphs": False}
    return {}


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_kv_cache_args(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--kv-cache-memory",
        type=_size,
        metavar="SIZE",
        help="bytes of KV cache, e.g. 4GiB or 512MiB (default: a fraction of the memory available after the weights)",
    )
    size.add_argument(
        "--kv-cache-memory-fraction",
        type=float,
        metavar="F",
        help=f"fraction of the memory available after loading the weights, less a reserve, that the KV cache "
        f"takes (default {DEFAULT_MEMORY_FRACTION})",
    )


def kv_cache_options(args: argparse.Namespace) -> dict[str, Any]:
    """``Engine`` keyword arguments for the KV cache flags that were given."""
    names = ("kv_cache_memory", "kv_cache_memory_fraction")
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}
