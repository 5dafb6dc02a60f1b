"""FLAP (An et al., AAAI 2024, arXiv 2312.11983; CASIA-IVA-Lab/FLAP ``lib/prune.py: prune_flap``).

* Fluctuation metric (WIFV): ``f_j = Var_n(X_nj) ||W_:,j||^2`` on the inputs of ``o_proj`` and ``down_proj``
  of the dense model (the FP stream: the reference prunes nothing until every block is scored), squared for
  attention channels;
* adaptive structure (AL-AM): z-scored within each module, an attention group scored by the mean of its
  channels, every structure of every block in one pool with one threshold, each structure counted by the
  parameters it removes (:func:`saes.core.pruning.global_plan`);
* bias compensation: ``o_proj`` / ``down_proj`` gain ``b = W[:, pruned] mean(X[:, pruned])`` (a bias is added
  where the architecture has none), so the pruned module's mean output on the calibration inputs is the dense
  one's.

Our readings: the variance is the exact population variance over every calibration token (the reference's
running update skips the first sequence's deviations and scales by the tokens per sequence; a constant scale
is removed by the z-score); the threshold stops at the SVD plan's parameter count (``compensate=false`` turns
the bias off for ablations).
"""

from __future__ import annotations

import torch

from saes.core.pruning import BlockShape, Kind, Pruner, StructurePlan, flap_scores, global_plan
from saes.core.stats import SiteStats


class FLAP(Pruner):
    stream = "fp"
    scores_first = True

    def __init__(self, name: str = "flap", compensate: bool = True, compute_dtype: str = "float64") -> None:
        super().__init__(name, compute_dtype)
        if not isinstance(compensate, bool):
            raise ValueError(f"method.compensate must be true or false; got {compensate!r}")
        self.compensate = compensate

    def plan(self, shapes: list[BlockShape], ratio: float, target: int,
             scores: list[dict[str, torch.Tensor]] | None) -> StructurePlan:
        if scores is None:
            raise ValueError("FLAP's global threshold needs every block's scores")
        self.structure = global_plan(scores, shapes, target)
        return self.structure

    def scores(self, kind: Kind, W: torch.Tensor, stats: SiteStats, groups: int) -> torch.Tensor:
        return flap_scores(kind, W, stats, groups)
