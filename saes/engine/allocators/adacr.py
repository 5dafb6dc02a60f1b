"""``adacr``: AdaSVD's adaptive compression ratios (Li et al. 2025; its README's overview figure)
Layer importance on the dense model, ``c_l = mean_t cos(x_t, y_t)`` over all calibration tokens with
``x``/``y`` the input/output hidden states of decoder block ``l``: ``I_l = c_l`` (``importance=cos``, the
figure's reading) or ``1 - c_l`` (``one_minus_cos``, ShortGPT's Block Influence). Then
``I~_l = I_l / mean(I)``, ``keep_l = mrr + I~_l (trr - mrr)``, ``ratio_l = 1 - keep_l`` with
``trr = 1 - ratio`` and ``mrr = min_keep trr`` (no default is stated; ours keeps every ratio valid).
``keep_l`` is clipped to ``[mrr, max_keep]``; if anything clips, the slope is re-solved by bisection so
that the mean (weighted by the blocks' dense parameters) is still ``trr``. All projections of a block share
``ratio_l``. Tokens whose input or output hidden state is exactly zero are left out (cosine undefined).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from saes.core.linalg import all_finite
from saes.core.lowrank import check_ratio
from saes.engine.allocation import ranks_for_layer_ratios
from saes.engine.allocators.base import Allocator, Plan, block_shapes, uniform_budget
from saes.engine.config import EngineConfig
from saes.engine.layout import BlockLayout
from saes.engine.propagate import BlockPass, dense_blocks

if TYPE_CHECKING:
    from saes.core.method import Method

IMPORTANCE = ("cos", "one_minus_cos")


class AdaCR(Allocator):
    name = "adacr"

    def __init__(self, min_keep: float = 0.5, max_keep: float = 1.0, importance: str = "cos") -> None:
        if not 0.0 < min_keep <= 1.0:
            raise ValueError(f"method.min_keep (adaCR's mrr / trr) must lie in (0, 1]; got {min_keep}")
        if not 0.0 < max_keep <= 1.0:
            raise ValueError(f"method.max_keep (adaCR) must lie in (0, 1]; got {max_keep}")
        if importance not in IMPORTANCE:
            raise ValueError(f"method.importance (adaCR) must be one of {IMPORTANCE}; got {importance!r}")
        self.min_keep, self.max_keep, self.importance = float(min_keep), float(max_keep), importance

    def check(self, ratio: float) -> None:
        adacr_keep([1.0], ratio, self.min_keep, self.max_keep)  # a max_keep below 1 - ratio

    def plan(self, model: nn.Module, layout: BlockLayout, ratio: float, calib_ids: torch.Tensor,
             cfg: EngineConfig, method: "Method") -> Plan:
        uniform, budget = uniform_budget(model, layout, ratio)
        self.check(ratio)
        shapes, sizes = block_shapes(model, layout, uniform)
        importance = layer_importance(model, layout, calib_ids, cfg, self.importance)
        ratios = adacr_ratios(importance, ratio, self.min_keep, self.max_keep, sizes)
        ranks = ranks_for_layer_ratios(shapes, ratios, budget)
        return Plan({p: ranks[p] for p in uniform},
                    {p: {"layer_importance": importance[i], "layer_ratio": ratios[i]} for p, (_, _, i) in shapes.items()})



def adacr_keep(importance: Sequence[float], ratio: float, min_keep: float = 0.5, max_keep: float = 1.0,
               weights: Sequence[float] | None = None) -> list[float]:
    """Retention ratio per layer: ``keep_l = mrr + I~_l (trr - mrr)``, ``I~ = I / mean(I)``, ``mrr = min_keep trr``.

    ``weights`` (the layers' dense parameter counts; equal by default) define the means, so the
    weighted mean of the result is ``trr = 1 - ratio``. Values are clipped to ``[mrr, max_keep]``;
    if any is, the slope is re-solved by bisection to keep that mean.
    """
    trr = 1.0 - check_ratio(ratio)
    if not 0.0 < min_keep <= 1.0 or not trr <= max_keep <= 1.0:
        raise ValueError(f"need 0 < min_keep <= 1 and 1 - ratio <= max_keep <= 1 (method.min_keep, method.max_keep); "
                         f"got {min_keep}, {max_keep} at ratio {ratio}")
    imp = torch.as_tensor(importance, dtype=torch.float64)
    w = torch.ones_like(imp) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if imp.ndim != 1 or imp.numel() == 0 or w.shape != imp.shape or not all_finite(imp) or (imp < 0).any():
        raise ValueError(f"importance must be a non-empty list of finite values >= 0 (one per layer); got {importance}")
    if not (w > 0).all():
        raise ValueError("layer weights must be positive")
    w = w / w.sum()
    mean_imp = float((w * imp).sum())
    if mean_imp == 0.0:  # no layer changes its input: nothing to tell them apart
        return [trr] * imp.numel()
    norm, mrr = imp / mean_imp, min_keep * trr

    def keep(t: float) -> torch.Tensor:
        return (mrr + t * norm).clamp(mrr, max_keep)

    def mean(t: float) -> float:
        return float((w * keep(t)).sum())

    lo, hi = 0.0, trr - mrr  # the paper's slope: exact unless something clips
    if mean(hi) < trr - 1e-12:
        while mean(hi) < trr - 1e-12:  # clipping at max_keep lost mass: a steeper slope is needed
            lo, hi = hi, 2.0 * hi + 1.0
            if hi > 1e12:
                raise ValueError(f"adaCR cannot reach retention {trr} under max_keep={max_keep}")
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if mean(mid) < trr else (lo, mid)
    return keep(hi).tolist()


def adacr_ratios(importance: Sequence[float], ratio: float, min_keep: float = 0.5, max_keep: float = 1.0,
                 weights: Sequence[float] | None = None) -> list[float]:
    """Layer-wise compression ratios (fraction removed), ``1 - keep_l``; see :func:`adacr_keep`."""
    return [1.0 - k for k in adacr_keep(importance, ratio, min_keep, max_keep, weights)]


@torch.no_grad()
def layer_importance(model: nn.Module, layout: BlockLayout, calib_ids: torch.Tensor,
                     cfg: EngineConfig, kind: str = "one_minus_cos") -> list[float]:
    """``I_l = mean_t cos(x_t, y_t)`` (``kind="cos"``) or ``1 - mean_t cos`` (``one_minus_cos``) per decoder
    block on the dense model (FP stream), one block on ``cfg.device`` at a time; the weights are not changed."""
    importance: list[float] = []

    def measure(step: BlockPass) -> None:
        total, count = 0.0, 0
        for x, y in zip(step.inputs, step.outputs):
            x, y = x.to(cfg.device), y.to(cfg.device)
            defined = (x.norm(dim=-1) > 0) & (y.norm(dim=-1) > 0)  # cos of a zero vector means nothing
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)[defined]
            total, count = total + float(cos.double().sum()), count + cos.numel()
        if count == 0:
            raise ValueError(f"block {step.index}: every calibration hidden state is zero")
        cos = total / count
        importance.append(max(0.0, cos if kind == "cos" else 1.0 - cos))  # clamp rounding just below 0

    dense_blocks(model, layout, calib_ids, cfg, on_block=measure)
    return importance

