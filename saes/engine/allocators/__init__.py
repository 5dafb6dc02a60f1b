"""Rank allocators any method takes: ``method.rank_alloc=uniform|strs|adacr|dip``.

An allocator turns the global ratio into per-projection ranks on the dense model, before compression,
under the one budget rule of :mod:`saes.engine.allocation` (the uniform plan's total, never exceeded, missed
by less than one rank of one projection). The method then factorises each projection at its planned rank,
so any allocator combines with any method (the paper's Table 8: SAES-SVD with ASVD's rank distribution).
Each allocator's settings sit in the method's config (``conf/rank_alloc/shared.yaml``); the settings of an
allocator not in use do not enter a record's key (``saes.runs.records``).

``uniform`` (no allocator)
The allocators, one module each behind :class:`Allocator` (:mod:`.base`, with the budget helpers they share):

``uniform`` (no allocator)
    Every projection loses ``ratio`` of its parameters (:func:`saes.engine.layout.plan_ranks`).
``strs`` (:mod:`.strs`)
    ASVD's sensitivity-based truncation rank search.
``adacr`` (:mod:`.adacr`)
    AdaSVD's adaptive compression ratios per block.
``dip`` (:mod:`.dip`)
    Dip-SVD's global protection per block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from saes.engine.allocators.adacr import IMPORTANCE, AdaCR, adacr_keep, adacr_ratios, layer_importance
from saes.engine.allocators.base import Allocator, Plan, block_of, block_shapes, uniform_budget
from saes.engine.allocators.dip import (DipGlobal, block_effective_ranks, block_gradient_sensitivity, dip_keep,
                                        dip_spread, effective_rank)
from saes.engine.allocators.strs import STRS, activation_scale, strs_ranks, strs_sensitivity

__all__ = ["ALLOCATOR_KEYS", "IMPORTANCE", "RANK_ALLOCS", "SETTINGS", "STRS", "AdaCR", "Allocator", "DipGlobal",
           "Plan", "activation_scale", "adacr_keep", "adacr_ratios", "block_effective_ranks",
           "block_gradient_sensitivity", "block_of", "block_shapes", "build_allocator", "dip_keep", "dip_spread",
           "effective_rank", "layer_importance", "strs_ranks", "strs_sensitivity", "uniform_budget"]

RANK_ALLOCS = ("uniform", "strs", "adacr", "dip")
# Each allocator's settings: keys of the method config (conf/rank_alloc/shared.yaml).
SETTINGS: dict[str, tuple[str, ...]] = {"strs": ("strs",), "adacr": ("min_keep", "max_keep", "importance"),
                                        "dip": ("dip",)}
ALLOCATOR_KEYS = ("rank_alloc", *(k for keys in SETTINGS.values() for k in keys))


def build_allocator(method_cfg: Mapping[str, Any]) -> Allocator | None:
    """The allocator ``method_cfg["rank_alloc"]`` names with its settings (``None`` for uniform ranks);
    a bad name or setting is a ``ValueError`` naming the key."""
    name = method_cfg.get("rank_alloc", "uniform")
    if name not in RANK_ALLOCS:
        raise ValueError(f"method.rank_alloc must be one of {RANK_ALLOCS}; got {name!r}")
    try:
        if name == "strs":
            return STRS(**dict(method_cfg.get("strs") or {}))
        if name == "adacr":
            return AdaCR(**{k: method_cfg[k] for k in SETTINGS["adacr"] if k in method_cfg})
        if name == "dip":
            return DipGlobal(**dict(method_cfg.get("dip") or {}))
    except TypeError as exc:  # an unknown key under method.strs / method.dip
        raise ValueError(f"method.rank_alloc={name}: {exc}") from exc
    return None

