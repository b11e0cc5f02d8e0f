"""The optional C++ extension ``mcl_runtime._C``: the paged KV block manager and the CPU
paged-attention kernel. ``EXT`` is the module, or None when it is not built or ``MCL_NO_EXT=1``;
then (with one warning) the pure-Python block manager and the torch attention take over."""

from __future__ import annotations

import os
import warnings
from types import ModuleType


def _load() -> ModuleType | None:
    try:
        if os.environ.get("MCL_NO_EXT") == "1":
            raise ImportError("MCL_NO_EXT=1")
        from mcl_runtime import _C

        return _C
    except ImportError as exc:
        warnings.warn(
            f"mcl_runtime C++ extension is not built or is disabled ({exc}); using the Python "
            "reference block manager and torch attention on the CPU",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


EXT = _load()
