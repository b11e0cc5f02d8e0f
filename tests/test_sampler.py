"""The sampler's distribution: over a small vocabulary, the frequencies of many seeded samples match
softmax(logits / T) restricted by min-p, then top-k and top-p (renormalised), by a chi-square test
at a fixed seed, so that a biased hash of (seed, step, token) cannot hide. Seeds and steps are
varied separately: each is an input of the counter-based noise."""

import math

import numpy as np
import pytest
import torch

from mcl_runtime.engine.sampler import SamplingBatch, sample
from mcl_runtime.kernels import HAS_CPU_ARGMAX, argmax_cpu

LOGITS = np.array([2.0, 1.6, 1.1, 0.7, 0.2, 0.0, -0.6, -1.5, -2.5, -4.0])
V = len(LOGITS)
N = 60_000


def expected(temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The sampler's semantics in numpy: min-p on softmax(logits / T), then top-k and top-p over
    what is left (renormalised), each token's kept probability renormalised."""
    scaled = LOGITS / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    keep = probs >= min_p * probs.max()
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]  # mass of the tokens ranked above
    kept = order[(np.arange(V) < top_k) & (before <= top_p) & (probs[order] > 0)]
    out = np.zeros(V)
    out[kept] = probs[kept]
    return out / out.sum()


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """Upper critical value of chi-square(df) at the normal quantile ``z`` (3.719: p = 1e-4),
    by the Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [
        (1.0, V, 1.0, 0.0),
        (0.7, V, 1.0, 0.0),
        (1.3, 3, 1.0, 0.0),
        (1.0, V, 0.8, 0.0),
        (1.0, V, 1.0, 0.15),
        (0.9, 5, 0.9, 0.05),
    ],
)
@pytest.mark.parametrize("vary", ["seeds", "steps", "both"])
def test_sampled_frequencies_match_the_distribution(temperature, top_k, top_p, min_p, vary):
    rng = np.random.default_rng(1234)
    seeds = rng.integers(-(2**63), 2**63 - 1, size=N) if vary != "steps" else np.full(N, 987654321987)
    steps = rng.integers(0, 1 << 20, size=N) if vary != "seeds" else np.zeros(N, np.int64)
    batch = SamplingBatch(
        all_greedy=False,
        temperatures=torch.full((N,), temperature),
        top_ks=torch.full((N,), top_k, dtype=torch.int64),
        top_ps=torch.full((N,), top_p),
        seeds=torch.from_numpy(seeds),
        steps=torch.from_numpy(steps),
        any_top_k_or_p=top_k < V or top_p < 1,
        min_ps=torch.full((N,), min_p) if min_p > 0 else None,
    )
    logits = torch.from_numpy(np.tile(LOGITS, (N, 1))).float()
    counts = np.bincount(sample(logits, batch).numpy(), minlength=V)
    p = expected(temperature, top_k, top_p, min_p)
    assert counts[p == 0].sum() == 0, f"sampled tokens outside the kept set: {counts}, expected {p}"
    live = p > 0
    want = N * p[live]
    stat = float(((counts[live] - want) ** 2 / want).sum())
    df = int(live.sum()) - 1
    if df == 0:
        return
    assert stat < chi_square_critical(df), f"chi2={stat:.1f} (df={df}): counts {counts.tolist()}, want {want.round()}"


def test_the_test_rejects_a_biased_sampler():
    """The statistic catches a bias of a few percent on one token (the test has power)."""
    p = expected(1.0, V, 1.0, 0.0)
    biased = p.copy()
    biased[0] *= 1.05
    biased /= biased.sum()
    counts = np.random.default_rng(0).multinomial(N, biased)
    want = N * p
    assert float(((counts - want) ** 2 / want).sum()) > chi_square_critical(V - 1)


@pytest.mark.skipif(not HAS_CPU_ARGMAX, reason="needs the C++ extension mcl_runtime._C")
@pytest.mark.parametrize("vocab", [1, 7, 16, 33, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_argmax_cpu_is_numpys_argmax(dtype: torch.dtype, vocab: int) -> None:
    """The first maximum of each row (ties, a maximum in the tail past the last full vector), NaN
    counting as the maximum (its first), rows of -inf, +inf; rows of a wider tensor read in place."""
    gen = torch.Generator().manual_seed(vocab)
    wide = torch.randn(8, vocab + 5, generator=gen).to(dtype)
    x = wide[:, 2 : 2 + vocab]
    if vocab > 5:
        x[1, 1] = x[1, vocab - 2] = x[1].max() + 1  # a tie: the first
        x[2] = float("-inf")
        x[3, 4] = x[3, 2] = float("nan")
        x[4, vocab - 1] = float("inf")
        x[5, vocab - 1] = x[5].max() + 1  # in the tail
    want = torch.from_numpy(x.float().numpy().argmax(axis=-1))
    for threads in (1, 2):
        assert torch.equal(argmax_cpu(x, threads), want)
    assert argmax_cpu(torch.empty(0, vocab, dtype=dtype)).shape == (0,)


@pytest.mark.skipif(not HAS_CPU_ARGMAX, reason="needs the C++ extension mcl_runtime._C")
@pytest.mark.parametrize(
    "x,exc",
    [
        (lambda: torch.zeros(2, 3, dtype=torch.int32), TypeError),
        (lambda: torch.zeros(3, 2).t(), ValueError),
        (lambda: torch.zeros(2, 0), ValueError),
        (lambda: torch.zeros(4), ValueError),
    ],
    ids=["int", "column-stride", "empty-rows", "1d"],
)
def test_argmax_cpu_bad_arguments(x, exc) -> None:
    with pytest.raises(exc):
        argmax_cpu(x())
