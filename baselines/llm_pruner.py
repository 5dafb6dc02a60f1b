"""LLM-Pruner (Ma et al., NeurIPS 2023, arXiv 2305.11627; horseee/LLM-Pruner ``hf_prune.py``), without its LoRA
recovery.

* Coupled structures: an attention group (a key/value head with its query heads: rows of ``q, k, v``, columns of
  ``o``) and an MLP channel (rows of ``gate, up``, a column of ``down``), as every pruner here
  (:mod:`saes.engine.structure`; the paper's head and channel groups, with grouped-query attention kept whole).
* Importance, first order (the paper's Eq. 4-5; its code's ``taylor`` with ``param_first``, "element1"):
  ``I = |W * dL/dW|`` per weight from one forward and backward of the dense model on the calibration tokens,
  summed over each structure (its code's ``sum`` aggregation): :func:`saes.core.pruning.taylor_scores`.
* Block-wise structure: blocks ``first .. L - last - 1`` are pruned, the first ``first`` and last ``last`` blocks
  stay whole (its LLaMA-7B recipe, ``scripts/llama_prune.sh``: layers 4 to 29 of 32), each pruned block losing the
  same share ``rho`` of its parameters (:func:`saes.core.pruning.blockwise_plan`).

Our readings, where the reference differs:
- the calibration tokens are the harness's shared ones (its code draws 10 Bookcorpus sequences of 64 tokens), and
  the gradient is the mean over sequences of each one's mean loss (the reference's one batch, for windows of one
  length), from per-sequence backward passes;
- ``rho`` is solved so the pruned blocks give the SVD plan's parameter count (its code takes the ratio as given),
  and it is not applied to heads and channels alike: a block loses ``floor(rho * groups)`` attention groups and
  the MLP channels give the rest (at 0.2 on SmolLM2, with its three key/value heads, no group and 33% of the
  channels; at 0.4 one group and 56%), as in Wanda-sp's uniform plan;
- grouped-query attention: a query head ``h`` belongs to key/value head ``h // g`` as transformers' ``repeat_kv``
  shares them (its LLaMA-3 code folds the query scores as heads ``j, j + n_kv, ...``, an interleaving that does
  not match ``repeat_kv``);
- ``first``/``last`` stay 4 and 2 whatever the depth (on Gemma-3-270M's 18 blocks a third stays whole); scale
  them with ``method.first`` / ``method.last``;
- the reference scores in float32 on the CPU; a float16 model's per-sequence gradients lose bits below 6e-5 (as
  FWSVD's Fisher pass here), and a score that is not finite stops the run.
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
