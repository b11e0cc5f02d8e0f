"""Command-line flags for the engine's execution mode, shared by the server and pipeline CLIs."""

from __future__ import annotations

import argparse


def add_execution_mode_args(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (one graph per batch-size bucket)"
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
