"""The paged KV block manager: the C++ ``mcl_runtime._C.BlockManager`` when the extension is built,
otherwise (or with ``MCL_NO_EXT=1``) the pure-Python reference, with a warning. Both have the
interface and semantics documented in ``block_manager_ref.py``."""
from __future__ import annotations

import os
import warnings

from mcl_runtime.engine.block_manager_ref import PyBlockManager

HAVE_EXT: bool
try:
    if os.environ.get("MCL_NO_EXT") == "1":
        raise ImportError("MCL_NO_EXT=1")
    from mcl_runtime._C import BlockManager
    HAVE_EXT = True
except ImportError as exc:
    warnings.warn(f"mcl_runtime C++ extension is not built or is disabled ({exc}); "
                  "using the Python reference block manager", RuntimeWarning, stacklevel=2)
    BlockManager = PyBlockManager
    HAVE_EXT = False

__all__ = ["BlockManager", "PyBlockManager", "HAVE_EXT"]
