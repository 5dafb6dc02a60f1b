"""The Gram-eigendecomposition path of ``truncated_svd`` equals the full float64 SVD (issue 12)."""

from __future__ import annotations

import pytest
import torch

from saes.core.linalg import GRAM_FLOOR, full_svd, truncated_svd


def spectrum_matrix(m: int, n: int, condition: float, seed: int = 0) -> torch.Tensor:
    """``U diag(s) V^T`` with singular values log-spaced from 1 down to ``1 / condition``."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -float(torch.log10(torch.tensor(condition))), k, dtype=torch.float64)
    return (U * s) @ V.mT


def tail(G: torch.Tensor, rank: int, gram: bool) -> tuple[float, torch.Tensor]:
    svd = truncated_svd(G, rank, gram=gram)
    A, B = svd.factors()
    return float((G - A @ B).square().sum()), A @ B


@pytest.mark.parametrize("shape", [(96, 96), (32, 96), (160, 64), (64, 160)])
@pytest.mark.parametrize("condition", [1e3, 1e9])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9])
def test_the_gram_path_gives_the_svd_s_rank_r_product_and_objective(shape, condition, fraction):
    """The layer objective (tail energy) within 1e-6 relative, the product within 1e-9 of ||G||, also at
    condition 1e9; where sigma_r / sigma_1 falls below the floor the full SVD is taken (identical)."""
    G = spectrum_matrix(*shape, condition)
    rank = max(1, int(fraction * min(shape)))
    fast, prod_fast = tail(G, rank, gram=True)
    ref, prod_ref = tail(G, rank, gram=False)
    assert abs(fast - ref) <= 1e-6 * ref
    assert float((prod_fast - prod_ref).norm()) <= 1e-9 * float(G.norm())
    svd, reference = truncated_svd(G, rank), truncated_svd(G, rank, gram=False)
    assert svd.retained_energy_ratio == pytest.approx(reference.retained_energy_ratio, rel=1e-12)
    if float(reference.S[-1] / reference.S[0]) ** 2 <= GRAM_FLOOR:  # fell back: the very same decomposition
        assert torch.equal(svd.S, reference.S) and torch.equal(svd.U, reference.U)


def test_the_gram_path_is_the_optimal_rank_r_factor():
    """Eckart-Young: no other rank-r product (perturbed, or another subspace) has a smaller tail."""
    G = spectrum_matrix(80, 120, 1e6, seed=3)
    best, _ = tail(G, 20, gram=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        A = torch.randn(80, 20, generator=g, dtype=torch.float64)
        B = torch.linalg.lstsq(A, G).solution  # the best B for a random A
        assert best < float((G - A @ B).square().sum())
    assert best == pytest.approx(float(torch.linalg.svdvals(G)[20:].square().sum()), rel=1e-9)


def test_full_svd_switches_every_call_to_the_reference():
    G = spectrum_matrix(64, 48, 1e2)
    with full_svd():
        inside = truncated_svd(G, 10)
    assert torch.equal(inside.S, truncated_svd(G, 10, gram=False).S)


def test_rank_above_the_smaller_dimension_is_refused():
    from saes.core.linalg import FactorizationError

    with pytest.raises(FactorizationError, match="exceeds"):
        truncated_svd(torch.randn(4, 6, dtype=torch.float64), 5)


def test_an_eigensolver_failure_falls_back_to_the_full_svd(monkeypatch):
    G = spectrum_matrix(48, 64, 1e2)
    reference = truncated_svd(G, 12, gram=False)

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("eigh: the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    got = truncated_svd(G, 12)
    assert torch.equal(got.S, reference.S) and torch.equal(got.Vh, reference.Vh)


@pytest.mark.parametrize("condition", [1e1, 1e4])
def test_in_float32_the_gram_path_keeps_float32_accuracy_or_falls_back_to_the_svd(condition):
    """The floor scales with the dtype: above it (condition 1e1: sigma_r / sigma_1 = 0.32) the float32 Gram product
    is about as close to the float64 truth as the float32 SVD's; below it (1e4: 0.011 < 0.023) the float32 SVD
    itself is taken."""
    from saes.core.linalg import gram_floor

    G64 = spectrum_matrix(96, 160, condition, seed=2)
    G = G64.float()
    rank = 48
    truth = truncated_svd(G64, rank, gram=False)
    A, B = truth.factors()
    best = A @ B
    svd32, gram32 = truncated_svd(G, rank, gram=False), truncated_svd(G, rank)

    def err(t) -> float:  # distance of the rank-r product from the float64 truth, relative to ||G||
        A_, B_ = t.factors()
        return float((A_.double() @ B_.double() - best).norm() / G64.norm())

    floor = gram_floor(torch.float32)
    assert floor == pytest.approx(GRAM_FLOOR * torch.finfo(torch.float32).eps / torch.finfo(torch.float64).eps)
    if float(truth.S[-1] / truth.S[0]) ** 2 <= floor:
        assert torch.equal(gram32.S, svd32.S) and torch.equal(gram32.U, svd32.U)
    else:
        assert err(gram32) <= max(10 * err(svd32), 50 * torch.finfo(torch.float32).eps)
