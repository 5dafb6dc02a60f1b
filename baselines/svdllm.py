"""SVD-LLM (Wang et al. 2024, arXiv 2403.07378): truncation-aware data whitening.

With ``H = X X^T = C C^T`` (Cholesky) on the FP stream, as published: truncate
``W C`` by SVD and map back with ``C^{-1}``. Then the whitened truncation loss
``||(AB - W) X||_F`` equals the root of the sum of the discarded squared singular
values of ``W C`` (the paper's Theorem). This is CEALC at ``beta = 0`` on FP-stream
statistics, so it shares CEALC's code and damping (relative, escalated on failure).
"""

from __future__ import annotations

import torch

from saes.core.linalg import check_damping, damped_cholesky
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats
from saes.saes import factor_target, output_error, whitened_targets


class SVDLLM(Method):
    needs = frozenset({"H"})
    stream = "fp"

    def __init__(self, name: str = "svdllm", damp: float = 0.0, max_damp: float = 1.0,
                 compute_dtype: str = "float64") -> None:
        super().__init__(name, compute_dtype)
        check_damping(damp, max_damp)
        self.damp, self.max_damp = float(damp), float(max_damp)

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        wh = damped_cholesky(stats.H, self.damp, max_damp=self.max_damp)
        S, _ = whitened_targets(W, wh, None)  # S = W C
        A, B, svd = factor_target(S, wh, rank)
        return Factors(A, B, {"rer": svd.retained_energy_ratio, **wh.diagnostics()})


class SVDLLMUpdate(SVDLLM):
    """SVD-LLM with its parameter update (Sec. 3.2): a least-squares refit of the left factor.

    After the whitened truncation ``W ~ A B``, ``B`` is kept and ``A`` is re-solved so that the
    layer's output on the compressed model's inputs ``X`` matches the original output on the
    FP inputs ``X^f``: ``A = argmin ||W X^f - A B X||_F = W (H + Delta) B^T (B H B^T)^{-1}``,
    since ``X^f X^T = H + Delta``. The update needs the compressed-upstream inputs, so both
    the whitening and the update read the compressed stream here (the engine keeps one
    stream's ``H`` per site; ``calib.propagate=fp`` makes ``Delta = 0`` and the update a no-op,
    since then ``A`` is already optimal). Our choice: the Gram ``B H B^T`` is solved by
    Cholesky with the same relative ridge and escalation as the whitening.
    """

    needs = frozenset({"H", "Delta"})
    stream = "compressed"

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        f = super().factorize(W, stats, rank, layer)
        A, B = f.A, f.B
        before = output_error(W, A @ B, stats)
        G = damped_cholesky(B @ stats.H @ B.T, self.damp, max_damp=self.max_damp)
        rhs = W @ (stats.H + stats.Delta) @ B.T  # [m, r]
        A_new = torch.cholesky_solve(rhs.T, G.C).T
        after = output_error(W, A_new @ B, stats)
        return Factors(A_new, B, {**f.diagnostics, "out_err_before": before, "out_err_after": after})
