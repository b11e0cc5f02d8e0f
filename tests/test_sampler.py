"""The sampler's distribution: over a small vocabulary, the frequencies of many seeded samples match
softmax(logits / T) restricted by min-p, then top-k and top-p (renormalised), by a chi-square test
at a fixed seed, so that a biased hash of (seed, step, token) cannot hide. Seeds and steps are
varied separately: each is an input of the counter-based noise."""

import math

import numpy as np
import pytest
import torch

from mcl_runtime.engine.sampler import SamplingBatch, sample

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
