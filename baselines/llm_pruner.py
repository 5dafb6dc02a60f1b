"""LLM-Pruner (Ma et al., NeurIPS 2023, arXiv 2305.11627; horseee/LLM-Pruner ``hf_prune.py``), without its LoRA
recovery.

* Coupled structures: an attention group (a key/value head with its query heads: rows of ``q, k, v``, columns of
  ``o``) and an MLP channel (rows of ``gate, up``, a column of ``down``), as every pruner here
  (:mod:`saes.engine.structure`; the paper's head and channel groups, with grouped-query attention kept whole).
* Importance, first order (the paper's Eq. 4-5; its code's ``taylor`` with ``param_first``, "element1"):
  ``I = |W * dL/dW|`` per weight from one forward and backward of the dense model on the calibration tokens,
  summed over each structure (its code's ``sum`` aggregation): :func:`saes.core.pruning.taylor_scores`.
* Block-wise structure: blocks ``first .. L - last - 1`` are pruned, the first ``first`` and last ``last`` blocks
  stay whole (its LLaMA-7B recipe: layers 4 to 29 of 32, ``--block_*_layer_start 4 --block_*_layer_end 30``), each
  pruned block by one ratio of its heads and channels (:func:`saes.core.pruning.blockwise_plan`).

Our readings: the calibration tokens are the harness's shared ones (its code draws 10 Bookcorpus sequences of
64 tokens); the per-block ratio is solved so the pruned blocks give the SVD plan's parameter count (its code
takes the ratio as given); attention groups go ``floor(rho * groups)`` per block and MLP channels take the rest of
the budget (at SmolLM2's three key/value heads a head-wise ratio cannot be met exactly).
"""

from __future__ import annotations

import torch

from saes.core.pruning import BlockShape, Kind, Pruner, StructurePlan, blockwise_plan, top_structures
from saes.core.stats import SiteStats


class LLMPruner(Pruner):
    stream = "fp"
    scores_first = True
    scores_from = "gradients"
    needs = frozenset()  # the loop's statistics are not read: the structures are chosen before it

    def __init__(self, name: str = "llm_pruner", first: int = 4, last: int = 2,
                 compute_dtype: str = "float64") -> None:
        super().__init__(name, compute_dtype)
        for key, value in (("first", first), ("last", last)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"method.{key} must be an integer >= 0 (blocks kept whole); got {value!r}")
        self.first, self.last = first, last

    @property
    def needs_data(self) -> bool:
        return True  # the gradients are taken on the calibration tokens

    def pruned_blocks(self, blocks: int) -> range:
        return range(self.first, blocks - self.last)

    def check_setting(self, blocks: int, ratio: float) -> None:
        if len(self.pruned_blocks(blocks)) < 1:
            raise ValueError(f"method.first={self.first} and method.last={self.last} keep all {blocks} blocks whole: "
                             "lower them")

    def check_budget(self, shapes: list[BlockShape], ratio: float, target: int) -> None:
        try:
            blockwise_plan(shapes, target, self.pruned_blocks(len(shapes)))
        except ValueError as exc:
            raise ValueError(f"ratio={ratio}: {exc}") from None

    def plan(self, shapes: list[BlockShape], ratio: float, target: int,
             scores: list[dict[str, torch.Tensor]] | None) -> StructurePlan:
        if scores is None:
            raise ValueError("LLM-Pruner's plan needs every block's gradient scores")
        plan = blockwise_plan(shapes, target, self.pruned_blocks(len(shapes)))
        kinds: tuple[Kind, ...] = ("attention", "mlp")
        plan.keep = [{k: top_structures(per[k], r[k]) for k in kinds} for per, r in zip(scores, plan.remove)]
        self.structure = plan
        return plan

    def scores(self, kind: Kind, W: torch.Tensor, stats: SiteStats, groups: int) -> torch.Tensor:
        raise TypeError("LLM-Pruner scores structures from gradients (saes.engine.prune.gradient_scores)")
