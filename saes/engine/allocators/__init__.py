"""Rank allocators any method takes: ``method.rank_alloc=uniform|strs|adacr|dip|dobi|record``.

An allocator turns the global ratio into per-projection ranks on the dense model, before compression,
under the one budget rule of :mod:`saes.engine.allocation` (the uniform plan's total, never exceeded, missed
by less than one rank of one projection). The method then factorises each projection at its planned rank,
so any allocator combines with any method (the paper's Table 8: SAES-SVD with ASVD's rank distribution).
Each allocator's settings sit in the method's config (``conf/rank_alloc/shared.yaml``); the settings of an
allocator not in use do not enter a record's key (``saes.runs.records``); ``saes.runs.job.build_allocator``
reads them and builds the allocator.

The allocators, one module each behind :class:`Allocator` (:mod:`.base`, with the budget helpers they share):

``uniform`` (no allocator)
    Every projection loses ``ratio`` of its parameters (:func:`saes.engine.layout.plan_ranks`).
``strs`` (:mod:`.strs`)
    ASVD's sensitivity-based truncation rank search.
``adacr`` (:mod:`.adacr`)
    AdaSVD's adaptive compression ratios per block.
``dip`` (:mod:`.dip`)
    Dip-SVD's global protection per block.
``dobi`` (:mod:`.dobi`, training in :mod:`.dobi_train`)
    Dobi-SVD's learned truncation positions (its stage 1), projected onto the budget.
``record`` (:mod:`.record`)
    The ranks an earlier run's record holds (``method.ranks_from``): two methods at exactly one plan.
"""

from __future__ import annotations

from saes.engine.allocators.adacr import IMPORTANCE, AdaCR, adacr_keep, adacr_ratios, layer_importance
from saes.engine.allocators.base import Allocator, Plan, block_of, block_shapes, uniform_budget
from saes.engine.allocators.dip import (DipGlobal, block_effective_ranks, block_gradient_sensitivity, dip_keep,
                                        dip_spread, effective_rank)
from saes.engine.allocators.dobi import Dobi
from saes.engine.allocators.record import FromRecord
from saes.engine.allocators.strs import STRS, activation_scale, strs_ranks, strs_sensitivity

__all__ = ["IMPORTANCE", "RANK_ALLOCS", "STRS", "AdaCR", "Allocator", "DipGlobal", "Dobi", "FromRecord", "Plan",
           "activation_scale",
           "adacr_keep", "adacr_ratios", "block_effective_ranks", "block_gradient_sensitivity", "block_of",
           "block_shapes", "dip_keep", "dip_spread", "effective_rank", "layer_importance", "strs_ranks",
           "strs_sensitivity", "uniform_budget"]

# method.rank_alloc (built from the config in saes.runs.job)
RANK_ALLOCS = ("uniform", "strs", "adacr", "dip", "dobi", "record")
