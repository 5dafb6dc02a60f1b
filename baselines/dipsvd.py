"""Dip-SVD's local protection (Ding et al. 2025; public code: repository 920927/DipSVD, ``dipsvd.py``).

What its code does, restated in this harness's notation (``H = X X^T`` on the FP stream, ``W: [m, n]``):

1. rank the ``n`` input channels by the column norms ``||H[:, j]||_2`` and mark the top
   ``floor(channel_bar * n)`` as protected;
2. weight the protected columns: ``M = H D`` with ``D = diag(d)``, ``d_j = channel_weight`` if
   protected, else 1;
3. whiten with ``C = U S^{1/2}`` from the SVD ``M = U S V^T`` (its code: "Cholesky2SVD"), then truncate
   ``W C`` to rank ``r`` and map back, ``A = U_r S_r^{1/2}``, ``B = S_r^{1/2} V_r^T C^{-1}``, as SVD-LLM.

Since ``C C^T = U S U^T = (M M^T)^{1/2} = (H D^2 H)^{1/2}``, the factors minimise
``||(W - A B) C||_F`` — the SVD-LLM loss with the Gram ``H`` replaced by ``(H D^2 H)^{1/2}``, which
equals ``H`` when every weight is 1 (then this is SVD-LLM; ``tests/test_dipsvd.py`` checks both
facts). The truncation depends on ``C`` only through ``C C^T``, so the orthogonal factor ``U`` is
immaterial and ``C^{-1} = S^{-1/2} U^T`` needs no solve.

Defaults are the values its script runs with: ``channel_bar = 0.03`` (the profiling call and the saved
file name ``..._weight30_bar0.03_...``; the function's own default is 0.05) and ``channel_weight = 30``.
Our choices: float64 throughout, and the ridge of SVD-LLM in this harness (relative damping, raised
only if ``H`` is not positive definite) applied to ``H`` before weighting, so that weight 1 reproduces
``method=svdllm`` exactly; its code adds ``1e-6 I`` only when an inverse fails.

Dip-SVD's global protection (per-block ratios) is a rank allocator any method can take,
``method.rank_alloc=dip`` (the gradient-and-effective-rank heuristic its code ships;
:mod:`saes.engine.allocators`); this method alone runs with uniform ranks, and Table 1's Dip-SVD* row is
both together (``experiment=table1_dip``).
"""

from __future__ import annotations

import math

import torch

from saes.core.linalg import check_damping, check_finite, damped_cholesky, truncated_svd
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats


def protected_channels(H: torch.Tensor, channel_bar: float) -> torch.Tensor:
    """Indices of the top ``floor(channel_bar * n)`` input channels by the column norm of ``H``."""
    k = math.floor(channel_bar * H.shape[1])
    return torch.argsort(torch.linalg.vector_norm(H, dim=0), descending=True)[:k]


def weighted_whitener(H: torch.Tensor, channel_bar: float, channel_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, C^{-1})`` with ``C = U S^{1/2}`` from the SVD of ``H D`` (step 2-3 above); ``H`` positive definite."""
    d = torch.ones(H.shape[1], dtype=H.dtype, device=H.device)
    d[protected_channels(H, channel_bar)] = channel_weight
    U, S, _ = torch.linalg.svd(H * d[None, :])
    root = S.sqrt()
    return U * root, (U / root).mT


class DipSVD(Method):
    needs = frozenset({"H"})
    stream = "fp"

    def __init__(self, name: str = "dipsvd", channel_bar: float = 0.03, channel_weight: float = 30.0,
                 damp: float = 0.0, max_damp: float = 1.0, compute_dtype: str = "float64") -> None:
        super().__init__(name, compute_dtype)
        if not 0.0 < channel_bar < 1.0:
            raise ValueError(f"method.channel_bar must lie in (0, 1) (a fraction of input channels); got {channel_bar}")
        if not channel_weight >= 1.0:
            raise ValueError(f"method.channel_weight must be >= 1 (1: no protection, SVD-LLM); got {channel_weight}")
        check_damping(damp, max_damp)
        self.channel_bar, self.channel_weight = float(channel_bar), float(channel_weight)
        self.damp, self.max_damp = float(damp), float(max_damp)

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        H = 0.5 * (stats.H + stats.H.mT)
        wh = damped_cholesky(H, self.damp, max_damp=self.max_damp)  # the ridge SVD-LLM would use, no more
        if wh.damp > 0:
            H = H + wh.damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        C, C_inv = weighted_whitener(H, self.channel_bar, self.channel_weight)
        svd = truncated_svd(W @ C, rank)
        A, B = svd.factors()
        B = B @ C_inv
        check_finite(A=A, B=B)
        return Factors(A, B, {"rer": svd.retained_energy_ratio, **wh.diagnostics(),
                              "protected": math.floor(self.channel_bar * H.shape[1])})
