"""ERC-SVD's residual compensation against its defining properties (baselines/ercsvd.py)."""

from __future__ import annotations

import pytest
import torch

from baselines.ercsvd import ERCSVD, rec_ranks
from baselines.svdllm import SVDLLM
from saes.core.stats import SiteStats


def _problem(m: int = 40, n: int = 48, tokens: int = 400, seed: int = 0) -> tuple[torch.Tensor, SiteStats]:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 1.5, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    X = torch.randn(n, tokens, generator=g, dtype=torch.float64) * scales[:, None]
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    return W, SiteStats(tokens, X @ X.T / tokens, None, None)


def _hloss(W: torch.Tensor, AB: torch.Tensor, H: torch.Tensor) -> float:
    E = W - AB
    return float((E @ H * E).sum())


def test_rank_split_follows_the_effective_size() -> None:
    assert rec_ranks(4096, 4096, 1638, 0.05) == (1638 - 102, 102)  # floor(0.05 * 2048)
    assert rec_ranks(40, 48, 5, 0.05) == (4, 1)
    assert rec_ranks(40, 48, 1, 0.05) == (1, 0)  # never below one first-stage rank


def test_rec_in_the_whitened_space_is_one_rank_r_truncation() -> None:
    """The reviewer's claim, for this reading: the residual's top triplets are the next ones of W C."""
    W, stats = _problem()
    for rank in (4, 10, 20):
        rec = ERCSVD(rec_space="whitened", beta=0.2).factorize(W, stats, rank)
        ref = SVDLLM().factorize(W, stats, rank)
        assert rec.A.shape[1] == rank and rec.diagnostics["r_res"] > 0
        torch.testing.assert_close(rec.A @ rec.B, ref.A @ ref.B, rtol=1e-8, atol=1e-8)


def test_rec_in_the_weight_space_differs_and_cannot_beat_svdllm_on_its_loss() -> None:
    W, stats = _problem(seed=1)
    rank = 10
    rec = ERCSVD(rec_space="weight", beta=0.2).factorize(W, stats, rank)
    ref = SVDLLM().factorize(W, stats, rank)
    first = ERCSVD(rec=False).factorize(W, stats, rec.diagnostics["r1"])
    assert rec.A.shape[1] == rank
    assert _hloss(W, ref.A @ ref.B, stats.H) < _hloss(W, rec.A @ rec.B, stats.H)  # SVD-LLM is the minimiser
    # the residual stage can only shrink the plain Frobenius error of stage 1
    assert torch.linalg.norm(W - rec.A @ rec.B) < torch.linalg.norm(W - first.A @ first.B)


def test_rec_off_is_svdllm() -> None:
    W, stats = _problem(seed=2)
    off = ERCSVD(rec=False).factorize(W, stats, 7)
    ref = SVDLLM().factorize(W, stats, 7)
    torch.testing.assert_close(off.A @ off.B, ref.A @ ref.B, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw, key", [({"beta": 0.0}, "method.beta"), ({"beta": 1.0}, "method.beta"),
                                     ({"rec_space": "both"}, "method.rec_space")])
def test_bad_hyper_parameters_are_named(kw: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ERCSVD(**kw)
