"""Dip-SVD's local protection against its defining properties (baselines/dipsvd.py)."""

from __future__ import annotations

import pytest
import torch

from baselines.dipsvd import DipSVD, protected_channels, weighted_whitener
from baselines.svdllm import SVDLLM
from saes.core.stats import SiteStats

from .conftest import layer_problem


def _problem(m: int = 24, n: int = 32, tokens: int = 256, seed: int = 0) -> tuple[torch.Tensor, SiteStats]:
    return layer_problem(m, n, tokens, seed, spread=2)


def _loss(W: torch.Tensor, AB: torch.Tensor, P: torch.Tensor) -> float:
    """``tr((W - AB) P (W - AB)^T)``: the whitened truncation loss for the Gram ``P``."""
    E = W - AB
    return float((E @ P * E).sum())


def test_weight_one_is_svdllm() -> None:
    W, stats = _problem()
    for rank in (1, 5, 12):
        dip = DipSVD(channel_weight=1.0).factorize(W, stats, rank)
        ref = SVDLLM().factorize(W, stats, rank)
        torch.testing.assert_close(dip.A @ dip.B, ref.A @ ref.B, rtol=1e-9, atol=1e-9)


def test_whitener_squares_to_the_weighted_gram_and_inverts() -> None:
    _, stats = _problem()
    C, C_inv = weighted_whitener(stats.H, 0.1, 30.0)
    d = torch.ones(stats.H.shape[0], dtype=torch.float64)
    d[protected_channels(stats.H, 0.1)] = 30.0
    M = stats.H * d[None, :]
    P = C @ C.mT  # = (M M^T)^{1/2}
    torch.testing.assert_close(P @ P, M @ M.mT, rtol=1e-8, atol=1e-6)
    torch.testing.assert_close(C @ C_inv, torch.eye(C.shape[0], dtype=torch.float64), rtol=0, atol=1e-8)


def test_each_method_wins_its_own_loss() -> None:
    """Dip-SVD is the exact minimiser of the protected loss, SVD-LLM of the plain one: neither beats the other there."""
    W, stats = _problem(seed=1)
    rank = 6
    dip = DipSVD(channel_bar=0.1, channel_weight=30.0).factorize(W, stats, rank)
    ref = SVDLLM().factorize(W, stats, rank)
    C, _ = weighted_whitener(stats.H, 0.1, 30.0)
    P = C @ C.mT
    assert _loss(W, dip.A @ dip.B, P) < _loss(W, ref.A @ ref.B, P)
    assert _loss(W, ref.A @ ref.B, stats.H) < _loss(W, dip.A @ dip.B, stats.H)
    # and no other rank-r factor beats the closed form on its own loss
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        AB = (dip.A + 0.01 * torch.randn(dip.A.shape, generator=g, dtype=torch.float64)) @ dip.B
        assert _loss(W, dip.A @ dip.B, P) <= _loss(W, AB, P)


def test_protected_channels_are_the_largest_columns() -> None:
    _, stats = _problem(n=40)
    idx = protected_channels(stats.H, 0.1)
    assert len(idx) == 4  # floor(0.1 * 40)
    norms = torch.linalg.vector_norm(stats.H, dim=0)
    assert norms[idx].min() >= norms[[j for j in range(40) if j not in set(idx.tolist())]].max()


@pytest.mark.parametrize("kw, key", [({"channel_bar": 0.0}, "channel_bar"), ({"channel_bar": 1.0}, "channel_bar"),
                                     ({"channel_weight": 0.5}, "channel_weight")])
def test_bad_hyper_parameters_are_named(kw: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"method.{key}"):
        DipSVD(**kw)
