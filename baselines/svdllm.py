"""SVD-LLM (Wang et al. 2024, arXiv 2403.07378): truncation-aware data whitening.

With ``H = X X^T = C C^T`` (Cholesky) on the FP stream, as published: truncate
``W C`` by SVD and map back with ``C^{-1}``. Then the whitened truncation loss
``||(AB - W) X||_F`` equals the root of the sum of the discarded squared singular
values of ``W C`` (the paper's Theorem). This is CEALC at ``beta = 0`` on FP-stream
statistics, so it shares CEALC's code and damping (relative, escalated on failure).
"""

from __future__ import annotations

import torch

from saes.linalg import check_damping, damped_cholesky
from saes.method import Factors, Method
from saes.saes import factor_target, whitened_targets
from saes.stats import SiteStats


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
