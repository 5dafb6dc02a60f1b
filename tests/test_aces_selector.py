"""ACES examined: the true-tail selector and the surrogate's diagnostics (saes/saes.py)."""

from __future__ import annotations

import pytest
import torch

from saes import aces_select_beta, cealc_factors
from saes.core.linalg import damped_cholesky, truncated_svd
from saes.core.stats import SiteStats
from saes.saes import SAES, output_error, true_tail, whitened_targets


def _two_streams(m: int = 20, n: int = 24, N: int = 300, seed: int = 0) -> tuple[torch.Tensor, SiteStats]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    Xf = torch.randn(n, N, generator=g, dtype=torch.float64) * torch.logspace(0, 1, n, dtype=torch.float64)[:, None]
    X = Xf + 0.4 * torch.randn(n, n, generator=g, dtype=torch.float64) @ Xf
    return W, SiteStats(N, X @ X.T / N, (Xf - X) @ X.T / N)


def _surrogate_and(selector: str, seed: int, rank: int = 6):
    """``W``, its statistics, and the factors with ACES's surrogate and with ``selector``."""
    W, stats = _two_streams(seed=seed)
    return (W, stats, SAES(damp=0.0).factorize(W, stats, rank),
            SAES(damp=0.0, aces={"selector": selector}).factorize(W, stats, rank))


@pytest.mark.parametrize("seed", range(6))
def test_exact_selector_is_never_worse_than_the_surrogate_on_the_true_tail(seed):
    rank = 6
    W, stats, sur, ex = _surrogate_and("exact", seed, rank)
    assert ex.diagnostics["beta_surrogate"] == sur.diagnostics["beta"]
    assert ex.diagnostics["tail_true"] <= sur.diagnostics["tail_true"] + 1e-15
    wh = damped_cholesky(stats.H, 0.0)
    S, D = whitened_targets(W, wh, stats.Delta)
    for beta in SAES(damp=0.0).grid:  # and it is the best of its grid
        assert ex.diagnostics["tail_true"] <= true_tail(truncated_svd(S + beta * D, rank), "ratio") + 1e-15


def test_surrogate_selector_is_algorithm_3_and_its_diagnostics_hold():
    W, stats = _two_streams(seed=7)
    rank = 5
    f = SAES(damp=0.0).factorize(W, stats, rank)
    beta = aces_select_beta(W, stats.H, stats.Delta, rank, 0.25, 0.75)
    assert f.diagnostics["beta"] == beta
    A, B = cealc_factors(W, stats.H, stats.Delta, rank, beta)
    torch.testing.assert_close(f.A @ f.B, A @ B)
    # the fixed subspace is never better than G(beta)'s own: the surrogate over-estimates the tail ratio
    assert f.diagnostics["surrogate_error"] >= -1e-12
    wh = damped_cholesky(stats.H, 0.0)
    s = torch.linalg.svdvals(W @ wh.C)
    assert f.diagnostics["gap"] == pytest.approx(float(s[rank - 1] / s[rank]), rel=1e-9)


@pytest.mark.parametrize("aces, key", [({"selector": "oracle"}, "method.aces.selector"),
                                       ({"selector": "exact", "grid": [0.5, 1.5]}, "method.aces.grid")])
def test_bad_selector_settings_are_named(aces, key):
    with pytest.raises(ValueError, match=key):
        SAES(aces=aces)


@pytest.mark.parametrize("seed", range(4))
def test_output_selector_never_has_a_larger_calibration_output_error_than_the_surrogate(seed):
    W, stats, sur, out = _surrogate_and("output", seed)
    assert output_error(W, out.A @ out.B, stats) <= output_error(W, sur.A @ sur.B, stats) + 1e-9
