"""Wanda-sp: structured Wanda as FLAP's code defines it (An et al., AAAI 2024; ``lib/prune.py: prune_wanda_sp``).

Per decoder block, on the inputs of ``o_proj`` and ``down_proj``: ``S_ij = |W_ij| ||X_j||_2``, a channel's score
is its mean over the output rows, an attention group's the sum over its channels. Every block removes the same
number of attention groups (``floor(ratio * groups)``, as the reference removes ``int(ratio * num_heads)``
heads); the MLP channels take the rest of the SVD plan's parameter count (:func:`saes.core.pruning.uniform_plan`;
the reference prunes the same ratio of channels instead, which at equal parameters it cannot). Blocks are
pruned sequentially: a block's scores come from the outputs of the blocks already pruned (the compressed
stream). No weight update. Inside a block the engine's true-sequential order scores ``down_proj`` on inputs
that see the block's pruned attention; the reference scores both modules from one forward of the unpruned
block (the same thing where no head group goes, as at ratio 0.2 on SmolLM2's three groups).
"""

from __future__ import annotations

import torch

from saes.core.pruning import BlockShape, Kind, Pruner, StructurePlan, channel_groups, uniform_plan, wanda_sp_scores
from saes.core.stats import SiteStats


class WandaSP(Pruner):
    stream = "compressed"

    def __init__(self, name: str = "wanda_sp", compute_dtype: str = "float64") -> None:
        super().__init__(name, compute_dtype)

    def plan(self, shapes: list[BlockShape], ratio: float, target: int,
             scores: list[dict[str, torch.Tensor]] | None) -> StructurePlan:
        self.structure = uniform_plan(shapes, ratio, target)
        return self.structure

    def check_budget(self, shapes: list[BlockShape], ratio: float, target: int) -> None:
        uniform_plan(shapes, ratio, target)  # raises naming ratio when a block would lose every MLP channel

    def scores(self, kind: Kind, W: torch.Tensor, stats: SiteStats, groups: int) -> torch.Tensor:
        s = wanda_sp_scores(W, stats)
        return s if kind == "mlp" else channel_groups(s, groups, "sum")
