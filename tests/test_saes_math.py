"""Properties of CEALC and ACES on explicit activations (float64, small sizes)."""

import math

import pytest
import torch

from saes import aces_select_beta, cealc_factors
from saes.core.linalg import FactorizationError, all_finite, damped_cholesky, truncated_svd
from saes.saes import aces_coefficients, select_beta, whitened_targets

F64 = torch.float64


def layer(m=12, n=10, N=400, seed=0, drift=0.3, cond=1.0):
    """W, X (compressed stream, [n, N]) and X^f (FP stream) with a correlated drift."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=F64)
    scales = torch.logspace(0, math.log10(cond), n, dtype=F64) if cond > 1 else torch.ones(n, dtype=F64)
    Xf = torch.randn(n, N, generator=g, dtype=F64) * scales[:, None]
    X = Xf + drift * (torch.randn(n, n, generator=g, dtype=F64) / math.sqrt(n)) @ Xf + 0.05 * torch.randn(n, N, generator=g, dtype=F64)
    return W, X, Xf


def stats(X, Xf):
    return X @ X.T, (Xf - X) @ X.T


def objective(AB, W, X, Xf, alpha):
    """Eq. 3: ||(AB - W) X||^2 + alpha ||AB X - W X^f||^2."""
    return ((AB - W) @ X).square().sum() + alpha * (AB @ X - W @ Xf).square().sum()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 3.0])
def test_cealc_beats_every_other_rank_r_factorisation_of_its_objective(alpha):
    W, X, Xf = layer()
    H, D = stats(X, Xf)
    r, beta = 4, alpha / (1 + alpha)
    A, B = cealc_factors(W, H, D, r, beta)
    best = objective(A @ B, W, X, Xf, alpha)
    g = torch.Generator().manual_seed(1)
    rivals = [truncated_svd(W, r).factors()]  # plain SVD
    rivals.append(cealc_factors(W, H, D, r, 0.0))  # the local-only solution
    rivals += [(A + 1e-3 * torch.randn(A.shape, generator=g, dtype=F64), B + 1e-3 * torch.randn(B.shape, generator=g, dtype=F64)) for _ in range(200)]
    rivals += [(torch.randn(12, r, generator=g, dtype=F64), torch.randn(r, 10, generator=g, dtype=F64)) for _ in range(20)]
    for A2, B2 in rivals:
        assert best <= objective(A2 @ B2, W, X, Xf, alpha) * (1 + 1e-10)
    assert torch.linalg.matrix_rank(A @ B) == r


def test_cealc_at_beta_zero_equals_truncation_aware_whitening_with_a_symmetric_root():
    W, X, Xf = layer(cond=100.0)
    H, D = stats(X, Xf)
    A, B = cealc_factors(W, H, D, 3, 0.0)
    evals, evecs = torch.linalg.eigh(H)
    root, inv_root = (evecs * evals.sqrt()) @ evecs.T, (evecs / evals.sqrt()) @ evecs.T
    svd = truncated_svd(W @ root, 3)  # SVD-LLM: truncate W H^{1/2}, map back with H^{-1/2}
    ref = (svd.U * svd.S) @ svd.Vh @ inv_root
    torch.testing.assert_close(A @ B, ref, rtol=1e-7, atol=1e-9)


def test_full_rank_reconstructs_w():
    W, X, Xf = layer()
    H, D = stats(X, Xf)
    A, B = cealc_factors(W, H, D, 10, 0.0)
    torch.testing.assert_close(A @ B, W, rtol=1e-9, atol=1e-9)
    A, B = truncated_svd(W, 10).factors()
    torch.testing.assert_close(A @ B, W, rtol=1e-9, atol=1e-9)


def test_whitening_beats_plain_svd_on_ill_conditioned_inputs():
    """Guards the triangular solves: C^{-T} where C^{-1} is meant still runs but loses to plain SVD."""
    W, X, Xf = layer(m=16, n=16, N=2000, cond=1e4, drift=0.0)
    H, D = stats(X, Xf)
    A, B = cealc_factors(W, H, D, 5, 0.0, damp=1e-6)
    As, Bs = truncated_svd(W, 5).factors()
    err = lambda AB: ((AB - W) @ X).norm()  # noqa: E731
    assert err(A @ B) < 0.5 * err(As @ Bs)


def test_dtype_is_preserved():
    W, X, Xf = layer()
    H, D = stats(X, Xf)
    A, B = cealc_factors(W.float(), H.float(), D.float(), 4, 0.5, damp=1e-4)
    assert A.dtype == B.dtype == torch.float32 and A.shape == (12, 4) and B.shape == (4, 10)
    beta = aces_select_beta(W.float(), H.float(), D.float(), 4)
    assert isinstance(beta, float)


def test_singular_covariance_escalates_damping_instead_of_failing():
    W, X, Xf = layer(N=6)  # 6 tokens, 10 input features: H is rank 6
    H, _ = stats(X, Xf)
    H[0, 0] -= 1e-3 * H.diagonal().mean()  # make it indefinite, as fp32 rounding does
    wh = damped_cholesky(H, 0.0)
    assert wh.escalations > 0 and wh.damp > 0 and torch.isfinite(wh.C).all()
    with pytest.raises(FactorizationError, match="max_damp"):
        damped_cholesky(torch.diag(torch.tensor([10.0, -5.0], dtype=F64)), 0.0, max_damp=1e-2)  # needs damp > 2
    with pytest.raises(FactorizationError, match="non-finite"):
        damped_cholesky(torch.full((3, 3), float("nan"), dtype=F64))


def _reference_cholesky(H: torch.Tensor, damp: float, max_damp: float = 1.0) -> tuple[torch.Tensor, float, int]:
    """The textbook form the in-place damped_cholesky must equal bit for bit: Cholesky of 0.5 (H + H^T) + lam I."""
    Hs = 0.5 * (H + H.mT)
    scale, eye = Hs.diagonal().mean(), torch.eye(H.shape[0], dtype=H.dtype)
    d, k = damp, 0
    while d <= max_damp:
        C, info = torch.linalg.cholesky_ex(Hs + (d * scale) * eye if d > 0 else Hs)
        if int(info) == 0:
            return C, d, k
        d, k = max(d * 10.0, 1e-8), k + 1
    raise AssertionError("reference never factorised")


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("damp", [0.0, 0.01])
@pytest.mark.parametrize("indefinite", [False, True])
def test_in_place_damped_cholesky_equals_the_textbook_form_bit_for_bit(damp, indefinite, dtype):
    _, X, _ = layer(n=64, N=40 if indefinite else 400)  # 40 tokens for 64 inputs: singular
    H = (X @ X.mT).float().double()  # a float32 Gram: not exactly symmetric after rounding in general
    H = H + 1e-9 * torch.randn(H.shape, generator=torch.Generator().manual_seed(3), dtype=F64)  # and asymmetric
    H = H.to(dtype)  # float32: method.compute_dtype=float32, where lam = d * scale rounds in float32
    if indefinite:
        H[0, 0] -= 1e-3 * H.diagonal().mean()
    before = H.clone()
    wh = damped_cholesky(H, damp)
    C, d, k = _reference_cholesky(H, damp)
    assert torch.equal(wh.C, C) and wh.damp == d and wh.escalations == k
    assert torch.equal(H, before)  # the caller's statistics are not touched
    assert k > 0 if indefinite and damp == 0 else k == 0


def test_beta_out_of_range_is_rejected():
    W, X, Xf = layer()
    H, D = stats(X, Xf)
    with pytest.raises(ValueError, match="beta"):
        cealc_factors(W, H, D, 4, 1.5)


# ----------------------------------------------------------------------------- ACES
def interior_layer():
    """A whitened layer (H = I) whose tail ratio has an interior minimum near beta = 0.5.

    S = W = diag(5, 4, 1, 1, 1, 1); D removes the tail twice as fast as beta grows and
    perturbs the head slightly, so the fixed-subspace surrogate is not exact.
    """
    W = torch.diag(torch.tensor([5.0, 4.0, 1.0, 1.0, 1.0, 1.0], dtype=F64))
    D = torch.diag(torch.tensor([0.3, -0.2, -2.0, -2.2, -1.8, -2.0], dtype=F64))
    D[0, 3] = D[4, 1] = 0.15
    H = torch.eye(6, dtype=F64)
    Delta = torch.linalg.solve(W, D)  # W Delta = D, so D = W Delta C^{-T} with C = I
    return W, H, Delta, D


def true_tail_ratio(G, r):
    s2 = torch.linalg.svdvals(G).square()
    return float(s2[r:].sum() / s2.sum())


def test_aces_picks_the_minimiser_of_its_surrogate_on_a_fine_grid():
    W, H, Delta, D = interior_layer()
    coef = aces_coefficients(*whitened_targets(W, damped_cholesky(H, 0.0), Delta), 2)
    grid = torch.linspace(0, 1, 10001, dtype=F64).tolist()
    scores = [coef.surrogate(b, "ratio") for b in grid]
    b_grid = grid[min(range(len(grid)), key=scores.__getitem__)]
    assert 0.2 < b_grid < 0.8, "the test layer must have an interior optimum"
    beta = aces_select_beta(W, H, Delta, 2, 0.0, 1.0, "ratio")
    assert abs(beta - b_grid) < 2e-4
    assert coef.surrogate(beta, "ratio") <= min(scores) + 1e-12
    # and the surrogate's choice is near-optimal for the true retained-energy ratio
    true = [true_tail_ratio(W + b * D, 2) for b in grid[::100]]
    assert true_tail_ratio(W + beta * D, 2) <= min(true) + 0.02


def true_tail_energy(G: torch.Tensor, r: int) -> float:
    """Energy of ``G`` beyond its best rank-``r`` approximation: the sum of its discarded squared singular values."""
    return float(torch.linalg.svdvals(G).square()[r:].sum())


def test_aces_energy_objective_minimises_the_tail_energy():
    """With objective=energy, ACES's beta minimises the true tail energy of G(beta) = S + beta D (from svdvals)."""
    W, H, Delta, D = interior_layer()  # H = I: S = W and G(beta) = W + beta D
    coef = aces_coefficients(*whitened_targets(W, damped_cholesky(H, 0.0), Delta), 2)
    assert coef.surrogate(0.0, "energy") == pytest.approx(true_tail_energy(W, 2), rel=1e-12)  # exact at beta = 0
    beta = aces_select_beta(W, H, Delta, 2, 0.0, 1.0, "energy")
    grid = torch.linspace(0, 1, 2001, dtype=F64).tolist()
    tails = [true_tail_energy(W + b * D, 2) for b in grid]
    best = min(range(len(grid)), key=tails.__getitem__)
    assert 0.2 < grid[best] < 0.8, "the test layer must have an interior optimum"
    assert abs(beta - grid[best]) < 1e-3
    assert true_tail_energy(W + beta * D, 2) <= tails[best] + 1e-6


def test_aces_respects_bounds_cap_and_shrink():
    """Bounds clip, cap limits and shrink scales every candidate before the surrogate picks one."""
    W, H, Delta, _ = interior_layer()
    free = aces_select_beta(W, H, Delta, 2)
    assert free == pytest.approx(0.4975, abs=1e-3)  # the surrogate falls on [0, free] and rises after it
    assert aces_select_beta(W, H, Delta, 2, beta_min=0.6, beta_max=0.9) == pytest.approx(0.6)
    assert aces_select_beta(W, H, Delta, 2, beta_min=0.0, beta_max=0.3) == pytest.approx(0.3)
    assert aces_select_beta(W, H, Delta, 2, cap=0.2) == pytest.approx(0.2)
    # shrunk candidates {0, 0.5 * 0.6, 0.5 * free}: the largest, 0.3, is lowest on the falling part
    assert aces_select_beta(W, H, Delta, 2, beta_max=0.6, shrink=0.5) == pytest.approx(0.3, abs=1e-12)
    # shrunk candidates {0, 0.9, 0.9 * free}: 0.9 is past the minimum, 0.9 * free is nearest to it
    assert aces_select_beta(W, H, Delta, 2, shrink=0.9) == pytest.approx(0.9 * free, abs=1e-12)
    for bad in (dict(beta_min=0.8, beta_max=0.2), dict(cap=1.0), dict(shrink=0.0), dict(objective="tail")):
        with pytest.raises(ValueError):
            aces_select_beta(W, H, Delta, 2, **bad)


def test_aces_without_upstream_error_keeps_the_lower_bound():
    W, X, Xf = layer(drift=0.0)
    H, _ = stats(X, X)
    beta = aces_select_beta(W, H, torch.zeros_like(H), 4, beta_min=0.25, beta_max=0.75)
    assert beta == 0.25


def test_select_beta_scores_every_candidate_after_the_guardrails():
    """With cap and shrink active, the winner and its reported score are those of the guardrailed beta."""
    W, H, Delta, _ = interior_layer()
    coef = aces_coefficients(*whitened_targets(W, damped_cholesky(H, 0.0), Delta), 2)
    beta, score = select_beta(coef, 0.0, 1.0, "ratio", cap=0.3, shrink=0.5)
    # candidates 0, 1 and the interior minimum (about 0.5) become 0, 0.15 and 0.15; 0.15 scores lower than 0
    assert beta == pytest.approx(0.15, abs=1e-12)
    assert score == pytest.approx(coef.surrogate(0.15, "ratio"), rel=1e-12)
    assert score < coef.surrogate(0.0, "ratio")
    assert score > 10 * coef.surrogate(aces_select_beta(W, H, Delta, 2), "ratio")  # not the unguarded minimum's


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_agrees_with_isfinite_all(dtype, device):
    """The copy-free check every factorisation and statistic goes through: NaN and either infinity anywhere, in
    row- or column-major matrices (Cholesky factors are column-major), strided views, and the empty tensor."""
    base = torch.randn(37, 23, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    cases = [base, base.mT, base[:, ::2], torch.empty(0, 5, dtype=dtype, device=device)]
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i, j in ((0, 0), (36, 22), (17, 5), (4, 6)):
            t = base.clone()
            t[i, j] = bad
            cases += [t, t.mT, t.mT.contiguous().mT, t[:, ::2]]
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all())
