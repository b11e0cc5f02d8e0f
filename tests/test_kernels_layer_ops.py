"""The C++ CPU layer ops against transformers' formulas: ``rms_norm_cpu`` (with and without the
fused residual add: the residual sum bit for bit, the normalised rows by the kernel rule, error
against a float64 reference within 2x that of the same-dtype torch formula), ``rope_cpu`` (bit for
bit: it rounds where torch's ops round) and ``silu_and_mul_cpu`` (the kernel rule; its exp is not
torch's; in 16-bit dtypes silu correctly rounded for every value)."""

from types import SimpleNamespace

import pytest
import torch

from mcl_runtime.kernels import HAS_CPU_LAYER_OPS, rms_norm_cpu, rope_cpu, silu_and_mul_cpu

pytestmark = pytest.mark.skipif(not HAS_CPU_LAYER_OPS, reason="needs the C++ extension mcl_runtime._C")
EPS = 1e-6


def formula(h: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' RMSNorm in ``dtype`` (float64: the reference)."""
    x = h.to(torch.float64 if dtype == torch.float64 else torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return weight.to(dtype) * x.to(dtype)


@pytest.mark.parametrize("cols", [96, 100, 7])
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add+norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_cpu_matches_the_formula(dtype: torch.dtype, with_residual: bool, cols: int) -> None:
    gen = torch.Generator().manual_seed(cols)
    weight = torch.randn(cols, generator=gen).to(dtype)
    x = (3 * torch.randn(37, cols, generator=gen)).to(dtype)
    residual = torch.randn(37, cols, generator=gen).to(dtype) if with_residual else None
    h = x + residual if with_residual else x
    given = residual.clone() if with_residual else None
    out = rms_norm_cpu(x, weight, EPS, given)
    if with_residual:
        assert torch.equal(given, h)  # the new residual, in place
    ref64 = formula(h.double(), weight.double(), torch.float64)
    err = (out.double() - ref64).abs().max().item()
    base = (formula(h, weight, dtype).double() - ref64).abs().max().item()
    assert err <= 2 * base + 1e-6 * ref64.abs().max().item(), f"error {err:.3g} > 2 x torch error {base:.3g}"


def test_rms_norm_cpu_strided_rows_and_empty() -> None:
    """Rows of a wider tensor (a column slice: row stride > N) are read in place; zero rows is a no-op."""
    wide = torch.randn(5, 80)
    weight = torch.randn(64)
    x = wide[:, 8:72]
    torch.testing.assert_close(rms_norm_cpu(x, weight, EPS), formula(x.contiguous(), weight, torch.float32))
    assert rms_norm_cpu(torch.empty(0, 64), weight, EPS).shape == (0, 64)


@pytest.mark.parametrize(
    "args,exc",
    [
        (lambda: (torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)), TypeError),
        (lambda: (torch.randn(3, 8), torch.randn(8, dtype=torch.bfloat16)), TypeError),
        (lambda: (torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.float16)), TypeError),
        (lambda: (torch.randn(3, 8), torch.randn(9)), ValueError),
        (lambda: (torch.randn(3, 8).t(), torch.randn(3)), ValueError),
        (lambda: (torch.randn(2, 3, 8), torch.randn(8)), ValueError),
    ],
    ids=["float64", "mixed-dtypes", "bf16-vs-f16", "weight-size", "column-stride", "3d"],
)
def test_rms_norm_cpu_bad_arguments(args, exc) -> None:
    with pytest.raises(exc):
        rms_norm_cpu(*args(), EPS)


def test_rms_norm_cpu_residual_shape_must_match() -> None:
    with pytest.raises(ValueError):
        rms_norm_cpu(torch.randn(3, 8), torch.randn(8), EPS, torch.randn(2, 8))


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos[:, None, :] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None, :]


@pytest.mark.parametrize("head_dim", [16, 128, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rope_cpu_is_bit_identical_to_torch(dtype: torch.dtype, head_dim: int) -> None:
    """On q and k heads that are a strided view of a fused qkv output, as the decoder passes them."""
    from mcl_runtime.model.layers import rope_cos_sin, rope_inv_freq

    gen = torch.Generator().manual_seed(head_dim)
    T, Hq, Hkv = 9, 4, 2
    qkv = (4 * torch.randn(T, (Hq + 2 * Hkv) * head_dim, generator=gen)).to(dtype)
    qk = qkv[:, : (Hq + Hkv) * head_dim].view(T, Hq + Hkv, head_dim)
    positions = torch.tensor([0, 1, 2, 7, 100, 4095, 3, 3, 50000])
    cos, sin = rope_cos_sin(positions, rope_inv_freq(head_dim, 1e6, None), dtype)
    expected, v = rope_torch(qk, cos, sin), qkv[:, (Hq + Hkv) * head_dim :].clone()
    assert rope_cpu(qk, cos, sin) is qk
    assert torch.equal(qk, expected)
    assert torch.equal(qkv[:, (Hq + Hkv) * head_dim :], v)  # the rest of the row untouched


@pytest.mark.parametrize(
    "args,exc",
    [
        (lambda: (torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(3, 8), torch.randn(3, 8)), TypeError),
        (lambda: (torch.randn(3, 2, 8), torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 8)), TypeError),
        (
            lambda: (
                torch.randn(3, 2, 8, dtype=torch.bfloat16),
                torch.randn(3, 8, dtype=torch.float16),
                torch.randn(3, 8, dtype=torch.float16),
            ),
            TypeError,
        ),
        (lambda: (torch.randn(3, 2, 7), torch.randn(3, 7), torch.randn(3, 7)), ValueError),
        (lambda: (torch.randn(3, 2, 8), torch.randn(2, 8), torch.randn(2, 8)), ValueError),
        (lambda: (torch.randn(3, 8, 2).transpose(1, 2), torch.randn(3, 8), torch.randn(3, 8)), ValueError),
        (lambda: (torch.randn(3, 2, 8), torch.randn(8, 3).t(), torch.randn(3, 8)), ValueError),
    ],
    ids=["float64", "mixed-dtypes", "bf16-vs-f16", "odd-dim", "tokens", "dim-stride", "strided-cos"],
)
def test_rope_cpu_bad_arguments(args, exc) -> None:
    with pytest.raises(exc):
        rope_cpu(*args())


def test_layers_keep_torch_ops_under_autograd() -> None:
    """The kernels record no autograd history: with gradients on, the cpu backend uses torch's ops."""
    from mcl_runtime.model.cpu_backend import CPUBackend
    from mcl_runtime.model.layers import RMSNorm, rope_cos_sin, rope_inv_freq

    ctx = SimpleNamespace(backend=CPUBackend())
    norm = RMSNorm(32, EPS, torch.float32, torch.device("cpu"))
    x = torch.randn(3, 32, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(3), rope_inv_freq(16, 1e4, None), torch.float32)
    h, residual = norm(x, ctx, torch.zeros(3, 32))
    (h.sum() + ctx.backend.rope(residual.view(3, 2, 16), cos, sin).sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_table_rows_equal_the_per_step_tables(dtype: torch.dtype) -> None:
    """The decoder's cos/sin of every position, indexed by a step's positions, are bit for bit the
    tables computed for those positions alone (any count: torch's vectorised tails included)."""
    from mcl_runtime.model.layers import rope_cos_sin, rope_inv_freq

    inv_freq = rope_inv_freq(128, 1e6, None)
    cos, sin = rope_cos_sin(torch.arange(8192), inv_freq, dtype)
    gen = torch.Generator().manual_seed(1)
    for count in (1, 7, 33, 256, 255):
        positions = torch.randint(0, 8192, (count,), generator=gen)
        step_cos, step_sin = rope_cos_sin(positions, inv_freq, dtype)
        assert torch.equal(cos[positions], step_cos) and torch.equal(sin[positions], step_sin)


def silu_mul_formula(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``act_fn(gate) * up`` in x's dtype (float64: the reference)."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("cols", [100, 2048 + 16, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_silu_and_mul_cpu_matches_the_formula(dtype: torch.dtype, cols: int) -> None:
    """Columns past the 16-lane vectors (7, 100) and rows cut into several pieces (2064); rows of a
    wider tensor read in place; gates far into both tails of the exp (|g| up to 100): error against
    float64 within 2x that of torch's ops in the same dtype; 1 and 2 threads give the same bits."""
    gen = torch.Generator().manual_seed(cols)
    wide = (4 * torch.randn(37, 2 * cols + 5, generator=gen)).to(dtype)
    wide[0, :cols] = torch.linspace(-100, 100, cols).to(dtype)
    x = wide[:, : 2 * cols]
    out = silu_and_mul_cpu(x)
    assert out.shape == (37, cols) and out.dtype == dtype
    ref64 = silu_mul_formula(x.double())
    err = (out.double() - ref64).abs().max().item()
    base = (silu_mul_formula(x).double() - ref64).abs().max().item()
    assert err <= 2 * base + 1e-6 * ref64.abs().max().item(), f"error {err:.3g} > 2 x torch error {base:.3g}"
    assert torch.equal(silu_and_mul_cpu(x, num_threads=2), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_silu_and_mul_cpu_16_bit_silu_is_correctly_rounded(dtype: torch.dtype) -> None:
    """In 16-bit dtypes silu(g) is the float64 formula rounded to the dtype for every finite g (its
    table), and the product with up = 1 leaves it as it is; -inf gives NaN, as torch's formula."""
    g = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    g = torch.cat([g[torch.isfinite(g)], torch.tensor([float("-inf")] * 16, dtype=dtype)])
    g = g[: len(g) // 16 * 16].view(-1, 16)
    out = silu_and_mul_cpu(torch.cat([g, torch.ones_like(g)], dim=1))
    exact = (g.double() / (1 + torch.exp(-g.double()))).to(dtype)
    torch.testing.assert_close(out, exact, rtol=0, atol=0, equal_nan=True)


def test_silu_and_mul_cpu_empty() -> None:
    assert silu_and_mul_cpu(torch.empty(0, 16)).shape == (0, 8)


@pytest.mark.parametrize(
    "x,exc",
    [
        (lambda: torch.randn(3, 8, dtype=torch.float64), TypeError),
        (lambda: torch.randn(3, 7), ValueError),
        (lambda: torch.randn(8, 3).t(), ValueError),
        (lambda: torch.randn(2, 3, 8), ValueError),
    ],
    ids=["float64", "odd-cols", "column-stride", "3d"],
)
def test_silu_and_mul_cpu_bad_arguments(x, exc) -> None:
    with pytest.raises(exc):
        silu_and_mul_cpu(x())
