"""Gaussian baseline R(Y) of the relative gradient rank (issue 18): Bartlett/Wishart sampler vs brute-force draws."""

import math

import pytest
import torch
from scipy import stats

from gradcond.probes import conditioning as C
from gradcond.probes.conditioning import rank as R


def test_deterministic_per_seed_and_seed_matters():
    a = R._gaussian_stable_ranks(50, 8, 20, seed=3)
    assert torch.equal(a, R._gaussian_stable_ranks(50, 8, 20, seed=3))
    assert not torch.equal(a, R._gaussian_stable_ranks(50, 8, 20, seed=4))
    # the public (cached) value is the mean of those draws, and does not depend on the global RNG
    torch.manual_seed(123)
    v = C.gaussian_effective_rank(50, 8, 20, 3)
    C.gaussian_effective_rank.cache_clear()
    torch.manual_seed(456)
    assert C.gaussian_effective_rank(50, 8, 20, 3) == v == float(a.mean())


@pytest.mark.parametrize("b, d", [(8, 20), (8, 200), (3, 40), (16, 60), (8, 5)])
def test_bartlett_matches_bruteforce_in_distribution(b, d):
    # (8, 5): d < b, where the sampler uses the d × d Gram Yᵀ Y (same non-zero spectrum as Y Yᵀ)
    fast = R._gaussian_stable_ranks(d, b, 300, seed=1).numpy()
    slow = R._gaussian_stable_ranks_bruteforce(d, b, 300, seed=2).numpy()
    se = math.sqrt(fast.var(ddof=1) / len(fast) + slow.var(ddof=1) / len(slow))
    assert abs(fast.mean() - slow.mean()) < 3 * se
    assert stats.ks_2samp(fast, slow).pvalue > 0.01
    assert ((fast >= 1 - 1e-12) & (fast <= min(b, d) + 1e-12)).all()  # 1 <= R(Y) <= rank(Y)


@pytest.mark.parametrize("alpha", [0.5, 2.5, 40.0, 5e8])
def test_gamma_sampler_matches_scipy(alpha):
    # the χ² diagonal of the Bartlett factor is 2·Gamma(ν/2): check the sampler against scipy's Gamma CDF,
    # including the huge shapes of χ²(P) for P ~ 10⁹ (where 1 − v + log v cancels catastrophically if done naively)
    g = torch.Generator().manual_seed(7)
    x = R._standard_gamma(torch.full((3000,), alpha, dtype=torch.float64), g)
    assert stats.kstest(x.numpy(), stats.gamma(alpha).cdf).pvalue > 0.01


def test_cost_independent_of_P(monkeypatch):
    # P = 10⁹, b = 64: a b × P draw would be 512 GB (and the chunked brute force hours); record every random draw
    sizes = []
    for name in ("randn", "rand"):
        orig = getattr(torch, name)

        def wrapped(*shape, _orig=orig, **kw):
            out = _orig(*shape, **kw)
            sizes.append(out.numel())
            return out

        monkeypatch.setattr(torch, name, wrapped)
    C.gaussian_effective_rank.cache_clear()
    v = C.gaussian_effective_rank(10 ** 9, 64)
    assert sizes and max(sizes) <= 5 * 64 * 64
    # Marchenko–Pastur: R(Y) ≈ bP/(√b + √P)², fluctuations are O(√(b/P)) here
    mp = 64 * 1e9 / (8 + math.sqrt(1e9)) ** 2
    assert abs(v - mp) < 0.01


def test_symmetric_in_shape():
    # R(Y) = R(Yᵀ): the law only depends on {b, d}; same seed, same draws
    assert torch.equal(R._gaussian_stable_ranks(30, 7, 10, 0), R._gaussian_stable_ranks(7, 30, 10, 0))


@pytest.mark.parametrize("kw, msg", [
    (dict(d=0, b=4), "d must be an int >= 1, got 0."),
    (dict(d=10, b=0), "b must be an int >= 1, got 0."),
    (dict(d=10, b=4, samples=0), "samples must be an int >= 1, got 0."),
    (dict(d=10.0, b=4), "d must be an int >= 1, got 10.0."),
    (dict(d=10, b=4, seed=1.5), "seed must be an int"),
])
def test_bad_input(kw, msg):
    C.gaussian_effective_rank(10, 4)  # a cached valid call must not answer for 10.0
    with pytest.raises(ValueError, match=msg.replace(".", r"\.")):
        C.gaussian_effective_rank(**kw)
