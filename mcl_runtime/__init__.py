"""mcl_runtime: one base model serving several LoRA agents over a shared paged KV cache.

from mcl_runtime import Engine, SamplingParams
engine = Engine(model="Qwen/Qwen2.5-Coder-7B-Instruct", adapters={"coding": "path/to/peft_adapter"})
# or mcl_runtime.demo.demo_engine(): the embedded demo model and its four adapters
outs = engine.generate(["def add(a, b):"], SamplingParams(max_tokens=16), adapter=["coding"])
"""

from mcl_runtime.errors import AdapterLoadError, AdapterNotFoundError, InvalidRequestError, MCLError, ModelLoadError

__all__ = [
    "Engine",
    "AsyncEngine",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "MCLError",
    "ModelLoadError",
    "InvalidRequestError",
    "AdapterNotFoundError",
    "AdapterLoadError",
]

_LAZY = {
    "Engine": "mcl_runtime.engine.llm_engine",
    "AsyncEngine": "mcl_runtime.engine.async_engine",
    "SamplingParams": "mcl_runtime.engine.params",
    "RequestOutput": "mcl_runtime.engine.params",
    "CompletionOutput": "mcl_runtime.engine.params",
}


def __getattr__(name: str):
    # Lazy so that light users (the sandbox, the pipeline's endpoint client) do not import torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mcl_runtime' has no attribute {name!r}")
