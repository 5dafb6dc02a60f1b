"""FWSVD (Hsu et al. 2022, arXiv 2207.00112): Fisher-weighted SVD.

The Fisher information of each weight is estimated from squared gradients of the LM
loss on the calibration data, ``F_w = 1/|D| sum_d (dL(d)/dw)^2`` (the paper's empirical
Fisher, one gradient per calibration sequence). The paper approximates it by one
importance per *row* of the weight in its layout, ``W in R^{N x M}`` applied as
``y = x W`` (rows are input features); in ``nn.Linear``'s ``[out, in]`` layout that is
one importance per input *column*: ``I_j = sum_i F_ij``. With ``D = diag(sqrt(I))``
the factorisation is ``[W D]_r = U_r S_r V_r^T`` and ``A = U_r S_r^{1/2}``,
``B = S_r^{1/2} V_r^T D^{-1}``, which minimises ``||(W - AB) D||_F`` over rank-r ``AB``.
(A public re-implementation by Moskovskiy et al., which transposes the PyTorch weight to
``[in, out]`` and sums over ``out``, reads the paper the same way.) Uniform ``I`` is
plain SVD.

Choices the paper leaves open (ours): gradients w.r.t. the projection weights only (no
gradients for embeddings and norms, which FWSVD never factorises), accumulated per
sequence and reduced to the column sums as soon as each gradient is produced, so at
most one projection's gradient exists at a time; a relative floor ``floor * max_j I_j``
keeps ``D`` invertible for columns with zero gradient; the Fisher pass runs on the
dense model, before any compression (FWSVD compresses a trained model in one shot).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from saes.core.linalg import check_finite, truncated_svd
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats
from saes.engine.config import EngineConfig
from saes.engine.layout import BlockLayout, projections
from saes.engine.propagate import sequence_gradients

log = logging.getLogger(__name__)


def fisher_column_importance(model: nn.Module, names: list[str], ids: torch.Tensor,
                             device: torch.device) -> dict[str, torch.Tensor]:
    """``I_j = mean_d sum_i (dL(d)/dW_ij)^2`` for each named ``nn.Linear``, one sequence ``d`` at a time."""
    acc = {name: torch.zeros(model.get_submodule(name).in_features, dtype=torch.float64) for name in names}

    def reduce(name: str, grad: torch.Tensor) -> None:
        acc[name] += grad.double().square().sum(0).cpu()

    sequence_gradients(model, names, ids, device, reduce, "fwsvd fisher")
    return {name: a / ids.shape[0] for name, a in acc.items()}


class FWSVD(Method):
    needs = frozenset()  # no activation statistics: the Fisher pre-pass is all it reads
    stream = "fp"

    def __init__(self, name: str = "fwsvd", floor: float = 1e-6, compute_dtype: str = "float64") -> None:
        super().__init__(name, compute_dtype)
        if not 0 < floor < 1:
            raise ValueError(f"method.floor must lie in (0, 1); got {floor}")
        self.floor = float(floor)
        self.importance: dict[str, torch.Tensor] = {}

    @property
    def needs_data(self) -> bool:
        return True

    def prepare(self, model: nn.Module, layout: BlockLayout, calib_ids: torch.Tensor | None,
                cfg: EngineConfig) -> None:
        if calib_ids is None:
            raise ValueError("fwsvd needs calibration tokens for its Fisher pass")
        self.importance = fisher_column_importance(model, projections(model, layout), calib_ids, cfg.device)
        model.to(cfg.offload_device)

    def weight(self, I: torch.Tensor) -> torch.Tensor:
        """The diagonal of ``D = diag(sqrt(I))``, floored relative to its largest entry."""
        d = I.clamp_min(0).sqrt()
        if float(d.max()) == 0.0:
            raise ValueError("FWSVD: all Fisher importances are zero (no gradient reached this layer)")
        return d.clamp_min(self.floor * float(d.max()))

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        if layer not in self.importance:
            raise KeyError(f"FWSVD has no Fisher importance for {layer!r}; prepare() must run first")
        d = self.weight(self.importance[layer]).to(W)
        svd = truncated_svd(W * d, rank)  # W D
        A, B = svd.factors()
        B = B / d  # B D^{-1}
        check_finite(A=A, B=B)
        return Factors(A, B, {"rer": svd.retained_energy_ratio,
                              "fisher_spread": float(d.max() / d.min())})
