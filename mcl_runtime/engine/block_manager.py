"""The paged KV block manager: the C++ ``mcl_runtime._C.BlockManager`` when the extension is built,
otherwise (or with ``MCL_NO_EXT=1``) the pure-Python reference. Both have the interface and
semantics documented in ``block_manager_ref.py``."""

from __future__ import annotations

from mcl_runtime.engine.block_manager_ref import PyBlockManager
from mcl_runtime.extension import EXT

HAVE_EXT = EXT is not None
BlockManager = EXT.BlockManager if EXT is not None else PyBlockManager

__all__ = ["BlockManager", "PyBlockManager", "HAVE_EXT"]
