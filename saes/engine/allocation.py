"""Rank plans beyond the uniform one, under the one budget rule.

Every plan keeps at most the parameters of the uniform plan at the run's ratio (its total is the budget)
and misses it by less than one rank of one projection; a projection may stay dense (rank ``None``, cost
``m n``). :func:`ranks_for_layer_ratios` turns per-block ratios into such a plan (AdaSVD's adaCR, ERC-SVD's
partial-layer compression); ASVD's STRS fills the same budget from its sensitivity table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import nn

from saes.engine.layout import BlockLayout, plan_parameters, plan_ranks


def ranks_for_layer_ratios(shapes: Mapping[str, tuple[int, int, int]], ratios: Sequence[float],
                           budget: int) -> dict[str, int]:
    """Ranks for projections ``name -> (m, n, layer)`` at their layer's ratio: :func:`fit_ranks` of the targets
    ``r* = (1 - ratios[layer]) m n / (m + n)``."""
    target = {p: (1.0 - ratios[l]) * m * n / (m + n) for p, (m, n, l) in shapes.items()}
    return fit_ranks(target, {p: (m, n) for p, (m, n, _) in shapes.items()}, budget)


def fit_ranks(target: Mapping[str, float], shapes: Mapping[str, tuple[int, int]], budget: int) -> dict[str, int]:
    """Integer ranks near continuous targets ``r*`` (``name -> r*``, shapes ``name -> (m, n)``) within ``budget``.

    The targets are floored (at least 1, at most ``min(m, n)``); then, one rank at a time, the projection
    furthest above its target loses a rank while the total ``sum r (m + n)`` exceeds ``budget``, and the one
    furthest below gains a rank while that still fits. The result never exceeds ``budget`` and misses it by
    less than one rank of one projection (the rule of every plan: AdaSVD's, Dip-SVD's and Dobi-SVD's ranks).
    """
    cost = {p: m + n for p, (m, n) in shapes.items()}
    cap = {p: min(m, n) for p, (m, n) in shapes.items()}
    ranks = {p: min(cap[p], max(1, math.floor(target[p] + 1e-9))) for p in shapes}
    total = sum(ranks[p] * cost[p] for p in shapes)
    while total > budget:
        over = [p for p in ranks if ranks[p] > 1]
        if not over:
            raise ValueError(f"a budget of {budget} parameters is below one rank per projection")
        p = max(over, key=lambda q: ranks[q] - target[q])
        ranks[p] -= 1
        total -= cost[p]
    while True:
        fits = [p for p in ranks if ranks[p] < cap[p] and total + cost[p] <= budget]
        if not fits:
            return ranks
        p = max(fits, key=lambda q: target[q] - ranks[q])
        ranks[p] += 1
        total += cost[p]


def check_partial_layers(blocks: int, ratio: float, k: object) -> None:
    """``k`` compressed blocks of ``blocks`` at the model ratio ``ratio``: an int with ``N R < k <= N``."""
    if isinstance(k, bool) or not (isinstance(k, int) and blocks * ratio < k <= blocks):
        raise ValueError(f"method.plc.k={k!r}: need an int with N R < k <= N, N = {blocks} blocks, R = {ratio} "
                         f"(k = N compresses every block; at k = N R every compressed block would lose everything)")


def partial_layer_plan(model: nn.Module, layout: BlockLayout, ratio: float, k: int) -> dict[str, int | None]:
    """ERC-SVD's partial-layer compression: blocks ``0 .. N-k-1`` stay dense, the last ``k`` are compressed at
    ``R_l = N R / k``, so the model keeps the uniform plan's parameters (the budget rule above)."""
    blocks = len(model.get_submodule(layout.layers))
    check_partial_layers(blocks, ratio, k)
    uniform = plan_ranks(model, layout, ratio)
    shapes = {p: tuple(model.get_submodule(p).weight.shape) for p in uniform}
    first = blocks - k
    dense = [p for p in uniform if int(p[len(layout.layers) + 1:].split(".")[0]) < first]
    budget = plan_parameters(shapes, uniform) - sum(shapes[p][0] * shapes[p][1] for p in dense)
    compressed = {p: (*shapes[p], int(p[len(layout.layers) + 1:].split(".")[0])) for p in uniform if p not in dense}
    ranks: dict[str, int | None] = {p: None for p in dense}
    ranks.update(ranks_for_layer_ratios(compressed, [blocks * ratio / k] * blocks, budget))
    return {p: ranks[p] for p in uniform}
