"""Plain truncated SVD of the weight (Eckart-Young, Eq. 1): data-free, the weakest baseline."""

from __future__ import annotations

import torch

from saes.core.linalg import truncated_svd
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats


class SVD(Method):
    needs = frozenset()
    stream = "fp"

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        svd = truncated_svd(W, rank)
        A, B = svd.factors()
        return Factors(A, B, {"rer": svd.retained_energy_ratio})
