"""ERC-SVD (Bai et al., arXiv 2505.20112; CPAL 2026): residual compensation (REC) on SVD-LLM's whitening.

Sources and what they settle (``../shared/papers/baselines-notes.md``; no public code was found): the
OpenReview reviews of the ICLR 2026 submission quote its Eq. 5, the effective size ``s = m n / (m + n)``,
the layer rank ``r = (1 - R_l) s`` and the residual rank ``r_res = beta s`` with ``beta = 0.05`` for
every layer; the first stage keeps ``r_1 = r - r_res``. Third-party summaries describe the stages:
truncate to ``r_1``, form the residual, truncate it to ``r_res``, concatenate the two factor pairs
(total rank ``r``). Not settled by anything we could read: in which space the residual is formed.
Both readings are here (``rec_space``):

* ``weight`` (default; the summaries write the residual without the whitening): stage 1 is SVD-LLM's
  whitened truncation ``W_1 = [W C]_{r_1} C^{-1}``; the residual ``W - W_1`` is truncated by plain SVD.
* ``whitened``: the residual ``W C - [W C]_{r_1}`` is truncated in the whitened space. Its top
  ``r_res`` triplets are the next triplets of ``W C``, so REC is exactly SVD-LLM at rank ``r``
  (a reviewer's objection; ``tests/test_ercsvd.py`` confirms it to rounding). Kept as the check.

In both readings the result cannot beat SVD-LLM at rank ``r`` on the whitened loss ``||(W - A B) X||``
(SVD-LLM is its exact minimiser); ``weight`` trades some of it for a smaller plain ``||W - A B||_F``.

``rec=false`` gives SVD-LLM's truncation at the same ranks (to measure what partial-layer compression,
``method.plc``, contributes alone). Statistics: FP stream, as SVD-LLM.
"""

from __future__ import annotations

import math

import torch

from saes.core.linalg import check_damping, check_finite, damped_cholesky, truncated_svd
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats

REC_SPACES = ("weight", "whitened")


def rec_ranks(m: int, n: int, rank: int, beta: float) -> tuple[int, int]:
    """``(r_1, r_res)``: ``r_res = floor(beta m n / (m + n))``, at most ``rank - 1`` so that ``r_1 >= 1``."""
    r_res = min(math.floor(beta * m * n / (m + n)), rank - 1)
    return rank - r_res, r_res


class ERCSVD(Method):
    needs = frozenset({"H"})
    stream = "fp"

    def __init__(self, name: str = "ercsvd", rec: bool = True, beta: float = 0.05, rec_space: str = "weight",
                 damp: float = 0.0, max_damp: float = 1.0, compute_dtype: str = "float64") -> None:
        super().__init__(name, compute_dtype)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"method.beta (REC's residual share of the effective size) must lie in (0, 1); got {beta}")
        if rec_space not in REC_SPACES:
            raise ValueError(f"method.rec_space={rec_space!r}; choose one of {list(REC_SPACES)}")
        check_damping(damp, max_damp)
        self.rec, self.beta, self.rec_space = bool(rec), float(beta), rec_space
        self.damp, self.max_damp = float(damp), float(max_damp)

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        wh = damped_cholesky(stats.H, self.damp, max_damp=self.max_damp)
        S = W @ wh.C  # the whitened weight (SVD-LLM)
        r1, r_res = rec_ranks(*W.shape, rank, self.beta) if self.rec else (rank, 0)
        first = truncated_svd(S, r1)
        A1, Bw1 = first.factors()
        diag = {"rer": first.retained_energy_ratio, "r1": r1, "r_res": r_res, **wh.diagnostics()}
        if r_res == 0:
            A, B = A1, wh.right_inv(Bw1)
        elif self.rec_space == "whitened":
            A2, Bw2 = truncated_svd(S - A1 @ Bw1, r_res).factors()
            A, B = torch.cat([A1, A2], 1), wh.right_inv(torch.cat([Bw1, Bw2], 0))
        else:
            B1 = wh.right_inv(Bw1)
            A2, B2 = truncated_svd(W - A1 @ B1, r_res).factors()
            A, B = torch.cat([A1, A2], 1), torch.cat([B1, B2], 0)
        check_finite(A=A, B=B)
        return Factors(A, B, diag)
