"""Defining properties of the baselines (float64, explicit activations)."""

import torch

from baselines.asvd import ASVD
from baselines.svd import SVD
from baselines.svdllm import SVDLLM
from saes.linalg import truncated_svd
from saes.stats import SiteStats

F64 = torch.float64


def data(m=14, n=10, N=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=F64)
    X = torch.randn(n, N, generator=g, dtype=F64) * torch.logspace(0, 2, n, dtype=F64)[:, None]
    return W, X


def test_svdllm_truncation_loss_is_the_discarded_whitened_spectrum():
    W, X = data()
    H = X @ X.T
    f = SVDLLM(damp=0.0).factorize(W, SiteStats(X.shape[1], H=H), 4)
    C = torch.linalg.cholesky(H)
    s = torch.linalg.svdvals(W @ C)
    loss = ((f.A @ f.B - W) @ X).norm()
    torch.testing.assert_close(loss, s[4:].square().sum().sqrt(), rtol=1e-9, atol=1e-9)


def test_asvd_with_alpha_zero_is_plain_svd():
    W, X = data()
    stats = SiteStats(X.shape[1], absmean=X.abs().mean(1))
    f = ASVD(alpha=0.0).factorize(W, stats, 3)
    g = SVD("svd").factorize(W, stats, 3)
    torch.testing.assert_close(f.A @ f.B, g.A @ g.B, rtol=1e-10, atol=1e-10)


def test_asvd_scaling_is_exactly_undone():
    W, X = data()
    stats = SiteStats(X.shape[1], absmean=X.abs().mean(1))
    method = ASVD(alpha=0.5)
    full = method.factorize(W, stats, 10)
    torch.testing.assert_close(full.A @ full.B, W, rtol=1e-10, atol=1e-10)  # full rank: W back
    f = method.factorize(W, stats, 3)
    s = method.scale(stats)
    svd = truncated_svd(W * s, 3)
    torch.testing.assert_close((f.A @ f.B) * s, (svd.U * svd.S) @ svd.Vh, rtol=1e-10, atol=1e-10)  # = [W S]_r
