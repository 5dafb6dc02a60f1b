"""Rank allocators any method takes: ``method.rank_alloc=uniform|strs|adacr|dip``.

An allocator turns the global ratio into per-projection ranks on the dense model, before compression,
under the one budget rule of :mod:`saes.engine.allocation` (the uniform plan's total, never exceeded, missed
by less than one rank of one projection). The method then factorises each projection at its planned rank,
so any allocator combines with any method (the paper's Table 8: SAES-SVD with ASVD's rank distribution).
Each allocator's settings sit in the method's config (``conf/rank_alloc/shared.yaml``); the settings of an
allocator not in use do not enter a record's key (``saes.runs.records``).

``uniform`` (no allocator)
    Every projection loses ``ratio`` of its parameters (:func:`saes.engine.layout.plan_ranks`).

``strs``: ASVD's sensitivity-based truncation rank search (Yuan et al. 2023, Sec. 3.3)
    For every projection alone and every candidate fraction of parameters kept, the calibration perplexity
    of the model with only that projection truncated by ASVD's activation-aware SVD (``W S`` truncated, ``S``
    undone, ``S = diag(mean|x|)^alpha``); then a binary search over a perplexity threshold, each projection
    taking the smallest candidate whose perplexity stays under it, to the largest set that fits the budget.
    Our choices where the paper is silent: candidates ``0.1 .. 0.9`` (``method.strs.candidates``); the
    sensitivity is measured on the first ``strs.nsamples`` calibration sequences, cut to their first
    ``strs.seqlen`` tokens if set (the whole model's perplexity, re-running only the blocks from the truncated
    projection's block on cached dense inputs); the scaling uses the whole calibration set's ``mean|x|``; the
    budget the discrete candidates leave unused is handed out rank by rank, most sensitive projections first,
    without passing their next candidate. The truncation is ASVD's with ASVD's ``alpha``/``floor`` when the
    method is ASVD, and with ASVD's defaults (0.5, 1e-6) otherwise (:meth:`Method.sensitivity_scaling`), so a
    method with ``rank_alloc=strs`` reuses the rank distribution ASVD discovers, as the paper's Table 8 does.
    The table depends on the model, the calibration tokens, the scaling, the candidates and the sensitivity
    tokens only (not the ratio, not the method): it is cached under ``<results_dir>/cache/asvd_strs/``, and its
    rows land in a ``.partial.json`` beside it as they are measured, so a stopped run resumes mid-table.

``adacr``: AdaSVD's adaptive compression ratios (Li et al. 2025; its README's overview figure)
    Layer importance on the dense model, ``c_l = mean_t cos(x_t, y_t)`` over all calibration tokens with
    ``x``/``y`` the input/output hidden states of decoder block ``l``: ``I_l = c_l`` (``importance=cos``, the
    figure's reading) or ``1 - c_l`` (``one_minus_cos``, ShortGPT's Block Influence). Then
    ``I~_l = I_l / mean(I)``, ``keep_l = mrr + I~_l (trr - mrr)``, ``ratio_l = 1 - keep_l`` with
    ``trr = 1 - ratio`` and ``mrr = min_keep trr`` (no default is stated; ours keeps every ratio valid).
    ``keep_l`` is clipped to ``[mrr, max_keep]``; if anything clips, the slope is re-solved by bisection so
    that the mean (weighted by the blocks' dense parameters) is still ``trr``. All projections of a block share
    ``ratio_l``. Tokens whose input or output hidden state is exactly zero are left out (cosine undefined).

``dip``: Dip-SVD's global protection, the heuristic its code ships (Ding et al. 2025; repository
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

import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from saes.core.linalg import truncated_svd
from saes.core.lowrank import check_ratio, rank_for_ratio
from saes.core.stats import StreamingStats
from saes.engine.allocation import ranks_for_layer_ratios
from saes.engine.config import EngineConfig
from saes.engine.layout import BlockLayout, plan_ranks, projections
from saes.engine.propagate import BlockPass, dense_blocks, replaced, sequence_gradients
from saes.io import digest, read_json, token_digest, write_json_atomic

if TYPE_CHECKING:
    from saes.core.method import Method

log = logging.getLogger(__name__)

RANK_ALLOCS = ("uniform", "strs", "adacr", "dip")
# Each allocator's settings: keys of the method config (conf/rank_alloc/shared.yaml).
SETTINGS: dict[str, tuple[str, ...]] = {"strs": ("strs",), "adacr": ("min_keep", "max_keep", "importance"),
                                        "dip": ("dip",)}
ALLOCATOR_KEYS = ("rank_alloc", *(k for keys in SETTINGS.values() for k in keys))
IMPORTANCE = ("cos", "one_minus_cos")


@dataclass(frozen=True)
class Plan:
    """Ranks per projection (``None``: it stays dense) and what the allocator records per projection."""
    ranks: dict[str, int | None]
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)


class Allocator(ABC):
    name: str

    def check(self, ratio: float) -> None:
        """Named errors for a ratio the settings cannot meet, before the model loads (none by default)."""

    @abstractmethod
    def plan(self, model: nn.Module, layout: BlockLayout, ratio: float, calib_ids: torch.Tensor,
             cfg: EngineConfig, method: "Method") -> Plan:
        """Ranks for the global ``ratio`` on the dense model (left unchanged), within the uniform plan's total."""


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


def block_of(layout: BlockLayout, name: str) -> int:
    """The decoder block index of a projection's full name (``model.layers.3.mlp.up_proj`` -> 3)."""
    return int(name[len(layout.layers) + 1:].split(".")[0])


def uniform_budget(model: nn.Module, layout: BlockLayout, ratio: float) -> tuple[dict[str, int], int]:
    """The uniform plan (it also rejects a bad ratio) and its parameter total, every allocator's budget."""
    uniform = plan_ranks(model, layout, ratio)
    return uniform, sum(r * sum(model.get_submodule(p).weight.shape) for p, r in uniform.items())


# ----------------------------------------------------------------------------- adaCR
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


def block_shapes(model: nn.Module, layout: BlockLayout, names: Iterable[str]
                 ) -> tuple[dict[str, tuple[int, int, int]], list[float]]:
    """``name -> (m, n, block)`` for :func:`ranks_for_layer_ratios`, and each block's dense parameters."""
    shapes = {p: (*model.get_submodule(p).weight.shape, block_of(layout, p)) for p in names}
    sizes = [0.0] * len(model.get_submodule(layout.layers))
    for m, n, i in shapes.values():
        sizes[i] += m * n
    return shapes, sizes


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
    if imp.ndim != 1 or imp.numel() == 0 or w.shape != imp.shape or not torch.isfinite(imp).all() or (imp < 0).any():
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


# ----------------------------------------------------------------------------- Dip-SVD's global protection
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
    if not (torch.isfinite(g).all() and (g > 0).all()):
        raise ValueError(f"dip_keep: gradient sensitivities must be finite and > 0 (a block with no gradient?); got "
                         f"{grad_sensitivity}")
    if not torch.isfinite(e).all():
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
    if w.shape != keep.shape or not (torch.isfinite(w).all() and (w > 0).all()):
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


# ----------------------------------------------------------------------------- STRS
def activation_scale(absmean: torch.Tensor, alpha: float, floor: float) -> torch.Tensor:
    """ASVD's diagonal ``S = diag(mean|x|)^alpha``, floored at ``floor * max S`` (channels that never fire)."""
    s = absmean.pow(alpha)
    return s.clamp_min(floor * float(s.max()))


class STRS(Allocator):
    name = "strs"

    def __init__(self, candidates: Sequence[float] = tuple(0.1 * k for k in range(1, 10)), nsamples: int = 8,
                 seqlen: int | None = None) -> None:
        self.candidates = tuple(float(c) for c in candidates)
        if not self.candidates or any(not 0 < c < 1 for c in self.candidates) or \
                sorted(set(self.candidates)) != list(self.candidates):
            raise ValueError(f"method.strs.candidates must be increasing kept fractions in (0, 1); got {self.candidates}")
        if isinstance(nsamples, bool) or int(nsamples) < 1:
            raise ValueError(f"method.strs.nsamples must be >= 1; got {nsamples}")
        if seqlen is not None and int(seqlen) < 2:
            raise ValueError(f"method.strs.seqlen must be >= 2 or null; got {seqlen}")
        self.nsamples, self.seqlen = int(nsamples), None if seqlen is None else int(seqlen)

    def plan(self, model: nn.Module, layout: BlockLayout, ratio: float, calib_ids: torch.Tensor,
             cfg: EngineConfig, method: "Method") -> Plan:
        uniform, budget = uniform_budget(model, layout, ratio)
        alpha, floor = method.sensitivity_scaling()
        table = self.sensitivity(model, layout, calib_ids, cfg, alpha, floor, method.compute_dtype)
        shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in table}
        ranks = strs_ranks(table, shapes, self.candidates, budget)
        return Plan({p: ranks[p] for p in uniform})

    def sensitivity(self, model: nn.Module, layout: BlockLayout, calib_ids: torch.Tensor, cfg: EngineConfig,
                    alpha: float, floor: float, dtype: torch.dtype) -> dict[str, list[float]]:
        """``table[name][k]``: calibration perplexity with only ``name`` kept at ``candidates[k]`` (cached)."""
        sens_ids = calib_ids[: self.nsamples, : self.seqlen]
        key = {"model": cfg.model_identity, "calib": token_digest(calib_ids), "sens": token_digest(sens_ids),
               "alpha": alpha, "floor": floor, "candidates": self.candidates,
               "dtype": str(dtype), "layers": layout.layers}
        path = None if cfg.cache_dir is None else Path(cfg.cache_dir) / "asvd_strs" / f"{digest(key, 16)}.json"
        if path is not None and path.is_file():
            log.info("STRS: sensitivity table from %s", path)
            return read_json(path)["table"]
        # Rows land in a partial file as they are measured, so a stopped run resumes where it stopped (the
        # table at the default size is hours of CPU time); the partial file has the same key as the table.
        partial = None if path is None else path.with_name(path.stem + ".partial.json")
        done: dict[str, list[float]] = {}
        if partial is not None and partial.is_file():
            saved = read_json(partial)
            if saved.get("key") == json.loads(json.dumps(key)):
                done = saved["table"]
                log.info("STRS: resuming the sensitivity table, %d projections from %s", len(done), partial)

        def keep(table: dict[str, list[float]]) -> None:
            write_json_atomic(partial, {"key": key, "table": table})

        table = strs_sensitivity(model, layout, calib_ids, sens_ids, cfg, alpha, floor, self.candidates, dtype,
                                 done=done, on_row=None if partial is None else keep)
        if path is not None:
            write_json_atomic(path, {"key": key, "table": table})
            partial.unlink(missing_ok=True)
        return table


@torch.no_grad()
def _absmean_and_block_inputs(model: nn.Module, layout: BlockLayout, calib_ids: torch.Tensor, sens_ids: torch.Tensor,
                              cfg: EngineConfig) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Dense ``mean|x|`` at every projection (whole calibration set) and each block's input (sensitivity set)."""
    acc = {name: StreamingStats(model.get_submodule(name).in_features, {"absmean"}, dtype=torch.float64)
           for name in projections(model, layout)}
    dense_blocks(model, layout, calib_ids, cfg, on_input=lambda name, x: acc[name].update(x))
    inputs: list[torch.Tensor] = []  # per block, on the CPU: the tail forwards' starting points
    dense_blocks(model, layout, sens_ids, cfg,
                 on_block=lambda step: inputs.append(torch.cat([x.cpu() for x in step.inputs])))
    return {k: a.finalize(k).absmean for k, a in acc.items()}, inputs


@torch.no_grad()
def _tail_nll(model: nn.Module, layout: BlockLayout, i: int, h: torch.Tensor, ids: torch.Tensor,
              cfg: EngineConfig) -> float:
    """Mean token NLL of the model run from block ``i`` on its cached input ``h`` (the model's own forward)."""
    total, n = 0.0, 0
    with replaced(model, layout.layers, nn.ModuleList(list(model.get_submodule(layout.layers))[i:])):
        for start in range(0, ids.shape[0], cfg.batch_size):
            x = ids[start:start + cfg.batch_size].to(cfg.device)
            out = model(inputs_embeds=h[start:start + cfg.batch_size].to(cfg.device), labels=x, use_cache=False)
            tokens = x.numel() - x.shape[0]
            total, n = total + float(out.loss) * tokens, n + tokens
    return total / n


def _fixed_linear(weight: torch.Tensor, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` computing with ``weight`` and ``bias`` as given (built on ``meta``: no initialisation)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.bias = bias
    return lin


@torch.no_grad()
def strs_sensitivity(model: nn.Module, layout: BlockLayout, calib_ids: torch.Tensor, sens_ids: torch.Tensor,
                     cfg: EngineConfig, alpha: float, floor: float, candidates: Sequence[float],
                     dtype: torch.dtype, done: Mapping[str, list[float]] | None = None,
                     on_row: Callable[[dict[str, list[float]]], None] | None = None) -> dict[str, list[float]]:
    """``table[name][k]``: the sensitivity set's perplexity with only ``name`` truncated to ``candidates[k]``,
    its ``W S`` truncated and ``S`` undone; the model itself is left as it was. Rows already in ``done`` (a
    resumed table) are taken as they are; ``on_row(table)`` is called after each new row."""
    absmean, inputs = _absmean_and_block_inputs(model, layout, calib_ids, sens_ids, cfg)
    model.to(cfg.device)  # the tail forwards run the model's own code from block i on
    table: dict[str, list[float]] = {}
    names = [(i, name) for i in range(len(inputs)) for name in layout.projections]
    for i, proj in tqdm(names, desc="strs sensitivity", unit="layer"):
        name = f"{layout.layers}.{i}.{proj}"
        if done is not None and name in done:
            table[name] = list(done[name])
            continue
        lin: nn.Linear = model.get_submodule(name)
        W = lin.weight
        s = activation_scale(absmean[name], alpha, floor).to(dtype)
        full = truncated_svd(W.to(dtype) * s, min(W.shape))
        m, n = W.shape
        row = []
        for kept in candidates:
            r = rank_for_ratio(m, n, 1.0 - kept)
            approx = ((full.U[:, :r] * full.S[:r]) @ full.Vh[:r]) / s
            with replaced(model, name, _fixed_linear(approx.to(W.dtype).to(W.device), lin.bias)):
                row.append(math.exp(_tail_nll(model, layout, i, inputs[i], sens_ids, cfg)))
        table[name] = row
        if on_row is not None:
            on_row(table)
    return table


def strs_ranks(table: dict[str, list[float]], shapes: dict[str, tuple[int, int]], candidates: tuple[float, ...],
               budget: int) -> dict[str, int]:
    """Binary search of the perplexity threshold (Sec. 3.3), then the unused budget handed out rank by rank.

    For a threshold ``tau`` each projection keeps the smallest candidate whose perplexity is
    ``<= tau`` (the largest candidate if none is); the parameters kept fall as ``tau`` rises,
    so the smallest ``tau`` whose plan fits ``budget`` is found by bisection over the table's values.
    """
    def rank(name: str, k: int) -> int:
        m, n = shapes[name]
        return rank_for_ratio(m, n, 1.0 - candidates[k])

    def choice(tau: float) -> dict[str, int]:
        return {name: next((k for k, p in enumerate(row) if p <= tau), len(row) - 1) for name, row in table.items()}

    def cost(ks: dict[str, int]) -> int:
        return sum(rank(name, k) * sum(shapes[name]) for name, k in ks.items())

    taus = sorted({p for row in table.values() for p in row if math.isfinite(p)})
    lo, hi = 0, len(taus) - 1
    if not taus or cost(choice(taus[hi])) > budget:
        raise ValueError("STRS: even the smallest candidates exceed the parameter budget; add smaller candidates "
                         "(method.strs.candidates)")
    while lo < hi:  # smallest index whose plan fits
        mid = (lo + hi) // 2
        if cost(choice(taus[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    ks = choice(taus[lo])
    ranks = {name: rank(name, k) for name, k in ks.items()}
    left = budget - cost(ks)
    for name in sorted(ks, key=lambda nm: -table[nm][ks[nm]]):  # most sensitive first
        m, n = shapes[name]
        cap = rank(name, ks[name] + 1) if ks[name] + 1 < len(candidates) else min(m, n)
        extra = min(cap - ranks[name], left // (m + n))
        ranks[name] += extra
        left -= extra * (m + n)
    return ranks
