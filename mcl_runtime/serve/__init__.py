"""OpenAI-compatible HTTP server over ``AsyncEngine`` (``python -m mcl_runtime.serve``)."""

from mcl_runtime.serve.app import build_app

__all__ = ["build_app"]
