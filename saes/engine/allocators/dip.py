"""``dip``: Dip-SVD's global protection, the heuristic its code ships (Ding et al. 2025; repository
920927/DipSVD, ``dx_heuristic.py``), restated on the dense model with ``N`` blocks:
1. gradient sensitivity ``g_l = sum_d sum_W ||dL(d)/dW||_F / (||W||_F + 1e-8)`` over the block's projection
   weights and calibration sequences ``d``; blocks cut into four contiguous segments at ``N//4, N//2,
   3N//4``, ``g`` divided by its sum within each; ``S_l = 1 / g_l``;
2. effective rank ``e_l``: the smallest ``k`` with ``sum_{i<=k} sigma_i >= energy * sum_i sigma_i`` for the
   singular values of block ``l``'s output hidden states (all tokens of the sequences stacked);
   ``E_l = (mean(e) - e_l) / std(e)`` (a block whose output spans fewer directions scores higher);
3. ``Ŝ = (S - min S + 1e-5) / (max S - min S)``, ``Ê`` alike, ``w_l = Ŝ_l^beta Ê_l^(1 - beta)``;
4. ``keep_l = trr + spread (2 (w_l - min w) / (max w - min w) - 1)`` with ``trr = 1 - ratio``, then
   ``keep_l <- clip(t keep_l, min_keep, max_keep)`` with the ``t`` that brings the mean back to ``trr``.
Its code's values: ``beta = 0.3``, ``spread = 0.25``, ``energy = 0.95``, clip ``[0.3, 0.98]``. Its code rescales
and clips up to 25 times (until the sum is within 1e-5), then rescales once more, clipped to ``[0, 1]``; ours
solves for ``t`` by bisection (the same retentions to ~1e-7 where its loop converges; the mean weighted by
the blocks' dense parameters, equal weights for LLaMA). When ``trr`` is not strictly inside
``(min_keep, max_keep)`` (ratio 0.8 with the defaults) its loop drives every block to the clip bound and its
last rescaling to ``trr``: every block keeps ``trr`` (uniform ranks), and so does ours. Its sensitivity texts
are 26 hand-written sentences in batches of 8 (one effective rank per batch, averaged); ours are the first
``dip.nsamples`` calibration sequences (default 8: one batch), one gradient per sequence. Its sensitivity
counts every parameter named ``attn``/``mlp`` (biases too, norms not); ours the projection weights (the same
set for LLaMA). Its last hidden state is after the final norm; ours is each block's own output. Its
Bayesian-optimisation search (GPyOpt over per-block ratios, 180 evaluations of calibration perplexity, each a
full compression) is not reimplemented: it costs two orders of magnitude more than a run here, and its
code's fixed ratio lists come from that search on LLaMA/Vicuna/DeepSeek only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from saes.core.linalg import all_finite
from saes.core.lowrank import check_ratio
from saes.engine.allocation import ranks_for_layer_ratios
from saes.engine.allocators.base import Allocator, Plan, block_of, block_shapes, uniform_budget
from saes.engine.config import EngineConfig
from saes.engine.layout import BlockLayout, projections
from saes.engine.propagate import BlockPass, dense_blocks, sequence_gradients

if TYPE_CHECKING:
    from saes.core.method import Method


class DipGlobal(Allocator):
    name = "dip"

    def __init__(self, beta: float = 0.3, spread: float = 0.25, energy: float = 0.95, min_keep: float = 0.3,
                 max_keep: float = 0.98, nsamples: int = 8) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"method.dip.beta (weight of the gradient sensitivity) must lie in [0, 1]; got {beta}")
        if not 0.0 <= spread < 1.0:
            raise ValueError(f"method.dip.spread must lie in [0, 1); got {spread}")
        if not 0.0 < energy < 1.0:
            raise ValueError(f"method.dip.energy (effective-rank threshold) must lie in (0, 1); got {energy}")
        if not 0.0 <= min_keep < max_keep <= 1.0:
            raise ValueError(f"method.dip.min_keep / max_keep need 0 <= min_keep < max_keep <= 1; "
                             f"got {min_keep}, {max_keep}")
        if isinstance(nsamples, bool) or int(nsamples) < 1:
            raise ValueError(f"method.dip.nsamples must be >= 1; got {nsamples}")
        self.beta, self.spread, self.energy = float(beta), float(spread), float(energy)
        self.min_keep, self.max_keep, self.nsamples = float(min_keep), float(max_keep), int(nsamples)

    def plan(self, model: nn.Module, layout: BlockLayout, ratio: float, calib_ids: torch.Tensor,
             cfg: EngineConfig, method: "Method") -> Plan:
        uniform, budget = uniform_budget(model, layout, ratio)
        shapes, sizes = block_shapes(model, layout, uniform)
        ids = calib_ids[: self.nsamples]
        ranks_e = block_effective_ranks(model, layout, ids, cfg, self.energy)
        grads = block_gradient_sensitivity(model, layout, ids, cfg)
        keep = dip_keep(grads, ranks_e, ratio, self.beta, self.spread, self.min_keep, self.max_keep, sizes)
        ranks = ranks_for_layer_ratios(shapes, [1.0 - k for k in keep], budget)
        return Plan({p: ranks[p] for p in uniform},
                    {p: {"grad_sensitivity": grads[i], "effective_rank": ranks_e[i], "layer_ratio": 1.0 - keep[i]}
                     for p, (_, _, i) in shapes.items()})


def block_gradient_sensitivity(model: nn.Module, layout: BlockLayout, ids: torch.Tensor,
                               cfg: EngineConfig) -> list[float]:
    """``g_l = sum_d sum_W ||dL(d)/dW||_F / ||W||_F`` over block ``l``'s projections and the sequences ``d`` of
    ``ids`` (one gradient per sequence, the dense model on ``cfg.device``, then on ``cfg.offload_device``)."""
    names = projections(model, layout)
    norms = {name: float(model.get_submodule(name).weight.detach().double().norm()) for name in names}
    g = [0.0] * len(model.get_submodule(layout.layers))

    def add(name: str, grad: torch.Tensor) -> None:
        g[block_of(layout, name)] += float(grad.double().norm()) / (norms[name] + 1e-8)  # its code's 1e-8

    try:
        sequence_gradients(model, names, ids, cfg.device, add, "dip sensitivity")
    finally:
        model.to(cfg.offload_device)  # as FWSVD's Fisher pass: the engine moves blocks to the device itself
    return g


def effective_rank(h: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` with ``sum_{i<=k} sigma_i >= energy * sum_i sigma_i`` for the singular values of ``h``
    (``[tokens, d]``)."""
    s = torch.linalg.svdvals(h.double())
    cum = torch.cumsum(s, 0) / s.sum()
    return int(torch.searchsorted(cum, torch.tensor([energy], dtype=cum.dtype))) + 1


@torch.no_grad()
def block_effective_ranks(model: nn.Module, layout: BlockLayout, ids: torch.Tensor, cfg: EngineConfig,
                          energy: float) -> list[float]:
    """Per block, the effective rank of its output hidden states, every token of ``ids`` stacked."""
    out: list[float] = []

    def measure(step: BlockPass) -> None:
        out.append(float(effective_rank(torch.cat([y.reshape(-1, y.shape[-1]).cpu() for y in step.outputs]), energy)))

    dense_blocks(model, layout, ids, cfg, on_block=measure)
    return out


def _minmax(v: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``(v - min v + eps) / (max v - min v)``; all ones if ``v`` is constant (nothing tells the blocks apart)."""
    span = v.max() - v.min()
    return torch.ones_like(v) if span == 0 else (v - v.min() + eps) / span


def dip_spread(grad_sensitivity: Sequence[float], eff_rank: Sequence[float], ratio: float, beta: float = 0.3,
               spread: float = 0.25) -> list[float]:
    """Dip-SVD's retentions before the rescaling: ``trr + spread (2 minmax(w) - 1)`` (steps 1-4 of the module
    docstring; ``trr`` for every block if the scores cannot tell them apart)."""
    trr = 1.0 - check_ratio(ratio)
    g = torch.as_tensor(grad_sensitivity, dtype=torch.float64)
    e = torch.as_tensor(eff_rank, dtype=torch.float64)
    if g.ndim != 1 or g.numel() == 0 or e.shape != g.shape:
        raise ValueError("dip_keep: one gradient sensitivity and one effective rank per block")
    if not (all_finite(g) and (g > 0).all()):
        raise ValueError(f"dip_keep: gradient sensitivities must be finite and > 0 (a block with no gradient?); got "
                         f"{grad_sensitivity}")
    if not all_finite(e):
        raise ValueError(f"dip_keep: effective ranks must be finite; got {eff_rank}")
    n = g.numel()
    quarters = torch.tensor_split(g, [n // 4, n // 2, 3 * n // 4])  # its code's boundaries (numpy.split)
    S = 1.0 / torch.cat([q / (q.sum() + 1e-8) for q in quarters])  # its code's segment normalisation and 1e-8
    std = e.std(unbiased=False)
    E = torch.zeros_like(e) if std == 0 else (e.mean() - e) / std
    score = _minmax(S, 1e-5).pow(beta) * _minmax(E, 1e-5).pow(1.0 - beta)
    if score.max() == score.min():
        return [trr] * n
    return (trr + spread * (2.0 * _minmax(score) - 1.0)).tolist()


def dip_keep(grad_sensitivity: Sequence[float], eff_rank: Sequence[float], ratio: float, beta: float = 0.3,
             spread: float = 0.25, min_keep: float = 0.3, max_keep: float = 0.98,
             weights: Sequence[float] | None = None) -> list[float]:
    """Dip-SVD's per-block retention (:func:`dip_spread`, then ``clip(t keep, min_keep, max_keep)`` with the mean
    weighted by ``weights``, the blocks' dense parameters, equal by default, brought to ``1 - ratio``)."""
    trr = 1.0 - check_ratio(ratio)
    keep = torch.tensor(dip_spread(grad_sensitivity, eff_rank, ratio, beta, spread), dtype=torch.float64)
    w = torch.ones_like(keep) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != keep.shape or not (all_finite(w) and (w > 0).all()):
        raise ValueError(f"dip_keep: one positive weight per block; got {weights}")
    if not min_keep < trr < max_keep:  # its clipped rescaling drives every block to the bound, then to trr
        return [trr] * keep.numel()
    keep = keep.clamp_min(0.0)
    w = w / w.sum()

    def mean(t: float) -> float:
        return float((w * (t * keep).clamp(min_keep, max_keep)).sum())

    t_lo, t_hi = 0.0, 1.0
    while mean(t_hi) < trr:  # mean(0) = min_keep < trr; a large t puts every block with keep > 0 at max_keep
        t_lo, t_hi = t_hi, 2.0 * t_hi
        if t_hi > 1e12:
            raise ValueError(f"Dip-SVD's ratios cannot keep {trr} of the parameters under "
                             f"max_keep={max_keep} (method.dip.max_keep)")
    for _ in range(200):
        mid = 0.5 * (t_lo + t_hi)
        t_lo, t_hi = (mid, t_hi) if mean(mid) < trr else (t_lo, mid)
    return (t_hi * keep).clamp(min_keep, max_keep).tolist()

