"""Helpers shared by the Triton kernels: device checks, launch heuristics inputs, the dot wrapper."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime, "interpret"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_same_device(name: str, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and one that Triton can run on; returns it."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{name}: all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            f"{name}: Triton kernels need CUDA tensors; on CPU use the cpu or reference backend, "
            "or set TRITON_INTERPRET=1 (slow, for tests)"
        )
    return device


def check_dtype(name: str, what: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: {what} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_dim(name: str, what: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name}: {what} must be {ndim}-D, got shape {tuple(t.shape)}")


@functools.cache
def _num_sms_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 4 for the interpreter)."""
    if device.type == "cuda":
        return _num_sms_cuda(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (torch's default: no TF32 for matmul); the value is
    # ignored for 16-bit inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulation. The interpreter's tl.dot on bf16 returns garbage, so
    there the operands are multiplied in fp32 (16-bit products are exact in fp32 anyway)."""
    if INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype), rounding to nearest even. The interpreter truncates fp32 -> bf16, so there the
    rounding is done on the bits first (GPUs round to nearest already)."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def compile_for_gpu(
    kernel, pointer_dtypes: dict[str, str], constexprs: dict, *, arch: int = 90, num_warps: int = 4, num_stages: int = 2
):
    """Compiles a ``@triton.jit`` kernel to a cubin for NVIDIA ``sm_<arch>`` without a GPU (a check
    for CPU-only CI, where the kernels otherwise only run in the interpreter; needs a process
    without ``TRITON_INTERPRET=1``). Argument types follow the kernel's parameter names: names in
    ``pointer_dtypes`` get that type (e.g. ``"*bf16"``), other ``*_ptr`` are ``*i32``, names
    containing ``scale`` are fp32 scalars, the rest i32 scalars. Returns the compiled kernel."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_dtypes:
            signature[name] = pointer_dtypes[name]
        elif name.endswith("_ptr"):
            signature[name] = "*i32"
        else:
            signature[name] = "fp32" if "scale" in name else "i32"
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
