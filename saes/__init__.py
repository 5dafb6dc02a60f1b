"""SAES-SVD reference harness: the pure functions of the public contract.

    rank_for_ratio(m, n, ratio) -> int
    cealc_factors(W, H, Delta, rank, beta, damp=0.0) -> (A, B)        # A: [m, rank], B: [rank, n]
    aces_select_beta(W, H, Delta, rank, beta_min=0.0, beta_max=1.0, objective="ratio",
                     cap=None, shrink=1.0, damp=0.0) -> float
"""

from saes.core.lowrank import LowRankLinear, rank_for_ratio
from saes.saes import aces_select_beta, cealc_factors

__all__ = ["LowRankLinear", "aces_select_beta", "cealc_factors", "rank_for_ratio"]
