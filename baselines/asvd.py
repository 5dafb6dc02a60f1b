"""ASVD (Yuan et al. 2023, arXiv 2312.05821): activation-aware scaling before the SVD.

``S = diag(mean_t |x_j|)^alpha`` from FP-stream activations (``alpha = 0.5`` by
default, as the paper); truncate ``W S`` by SVD and undo the scaling:
``A = U_r Sigma_r^{1/2}``, ``B = Sigma_r^{1/2} V_r^T S^{-1}``. ``alpha = 0`` is plain SVD.
Channels that never fire would make ``S`` singular: their scale is floored at
``floor * max_j S_jj`` (our choice; the paper does not say).

Ranks: any shared allocator (``method.rank_alloc``, :mod:`saes.engine.allocators`); ``asvd_strs`` is ASVD
with its own sensitivity-based truncation rank search (Sec. 3.3), ``strs``, whose sensitivity is measured
with this method's ``alpha`` and ``floor`` (:meth:`ASVD.sensitivity_scaling`).
"""

from __future__ import annotations

import torch

from saes.core.linalg import check_finite, truncated_svd
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats
from saes.engine.allocators import activation_scale


class ASVD(Method):
    needs = frozenset({"absmean"})
    stream = "fp"

    def __init__(self, name: str = "asvd", alpha: float = 0.5, floor: float = 1e-6,
                 compute_dtype: str = "float64") -> None:
        super().__init__(name, compute_dtype)
        if alpha < 0 or not 0 < floor < 1:
            raise ValueError(f"need method.alpha >= 0 and 0 < method.floor < 1; got {alpha}, {floor}")
        self.alpha, self.floor = float(alpha), float(floor)

    def sensitivity_scaling(self) -> tuple[float, float]:
        return self.alpha, self.floor

    def scale(self, stats: SiteStats) -> torch.Tensor:
        return activation_scale(stats.absmean, self.alpha, self.floor)

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        s = self.scale(stats)  # [n], the diagonal of S
        svd = truncated_svd(W * s, rank)  # W S
        A, B = svd.factors()
        B = B / s  # B S^{-1}
        check_finite(A=A, B=B)
        return Factors(A, B, {"rer": svd.retained_energy_ratio})
