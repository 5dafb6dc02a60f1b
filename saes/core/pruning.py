"""Structured pruning at the SVD plan's parameter count: the interface, the importance scores and the budget rule.

A pruner removes whole structures of a decoder block instead of factorising its projections:

* an **attention group**: one key/value head with the ``g`` query heads that share it (grouped-query attention
  stays consistent: query heads = key/value heads x ``g`` in every block), i.e. its rows of ``q, k, v`` and its
  ``g * head_dim`` input channels of ``o``;
* an **MLP channel**: one row of ``gate`` and ``up`` and the matching input channel of ``down``.

Both are scored on the input of the coupled output projection (``o_proj``, ``down_proj``), where the engine's
statistics ``mean`` and ``var`` per input channel are taken. With ``W`` that projection's weight ``[m, n]``:

* Wanda-sp (structured Wanda as FLAP's code defines it, ``lib/prune.py: prune_wanda_sp``):
  ``S_ij = |W_ij| ||X_j||_2``, channel score ``s_j = mean_i S_ij``, head score = sum over its channels;
* FLAP (An et al., AAAI 2024, Eq. 6 "WIFV"): fluctuation ``f_j = Var_n(X_nj) ||W_:,j||^2`` (squared again for
  attention channels), z-scored within each module over its channels (``torch.std``'s unbiased estimate, as
  FLAP's ``standarlization``), a head scored by the mean of its channels' z-scores;
* LLM-Pruner (Ma et al., NeurIPS 2023, Eq. 4-5, first order, "element1" with the "sum" aggregation of its code):
  ``I_W = |W * dL/dW|`` elementwise from the dense model's language-modelling loss on the calibration tokens, a
  structure scored by the sum over every weight it owns in its block (:func:`taylor_scores`; these are the whole
  coupled group, not one projection's input, so they are computed before the loop, :func:`saes.engine.prune.gradient_scores`).

The budget (:func:`svd_removal`) is the number of linear parameters the uniform SVD plan at ``ratio`` removes,
``sum m n - r (m + n)`` with ``r = floor((1 - ratio) m n / (m + n))``; every plan here removes at least that many
and overshoots by less than one structure (the harness's budget rule: keep at most what the SVD plan keeps).
Every block keeps at least one attention group and one MLP channel (a block without heads cannot run here).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch

from saes.core.lowrank import rank_for_ratio
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats

Kind = Literal["attention", "mlp"]


@dataclass(frozen=True)
class BlockShape:
    """A decoder block's prunable structures and what each costs in linear parameters (weights only)."""

    groups: int  # key/value heads (attention groups)
    heads_per_group: int  # query heads per key/value head (g)
    head_dim: int
    group_params: int  # one group's rows of q, k, v plus its columns of o
    channels: int  # MLP intermediate channels
    channel_params: int  # one channel's rows of gate, up plus its column of down

    def count(self, kind: Kind) -> int:
        return self.groups if kind == "attention" else self.channels

    def cost(self, kind: Kind) -> int:
        return self.group_params if kind == "attention" else self.channel_params


@dataclass
class StructurePlan:
    """What a pruner removes per block: how many structures of each kind (``remove``), and for a plan decided
    before the loop (FLAP's global threshold) which ones it keeps (``keep``, sorted indices)."""

    remove: list[dict[str, int]]  # per block: {"attention": groups removed, "mlp": channels removed}
    target: int  # linear parameters the uniform SVD plan removes
    keep: list[dict[str, torch.Tensor]] | None = None
    diagnostics: dict[str, float | int] = field(default_factory=dict)

    def removed(self, shapes: list[BlockShape]) -> int:
        return sum(r[k] * s.cost(k) for r, s in zip(self.remove, shapes) for k in ("attention", "mlp"))


def svd_removal(shapes: list[tuple[int, int]], ratio: float) -> int:
    """Linear parameters the uniform SVD plan at ``ratio`` removes from projections of shapes ``(m, n)``."""
    return sum(m * n - rank_for_ratio(m, n, ratio) * (m + n) for m, n in shapes)


# ------------------------------------------------------------------ importance scores
def channel_groups(scores: torch.Tensor, groups: int, reduce: Literal["sum", "mean"]) -> torch.Tensor:
    """Per-channel scores of ``o_proj``'s input ``[groups * g * head_dim]`` pooled per attention group
    (channels are head-major and key/value head ``j`` serves query heads ``j g .. j g + g - 1``)."""
    per_group = scores.reshape(groups, -1)
    return per_group.sum(1) if reduce == "sum" else per_group.mean(1)


def wanda_sp_scores(W: torch.Tensor, stats: SiteStats) -> torch.Tensor:
    """Wanda-sp's channel scores ``s_j = mean_i |W_ij| ||X_j||_2`` (the norm over the calibration tokens)."""
    norm = torch.sqrt(stats.sqnorm * stats.tokens)
    return (W.abs() * norm[None, :]).mean(0)


def flap_fluctuation(W: torch.Tensor, stats: SiteStats) -> torch.Tensor:
    """FLAP's fluctuation metric ``f_j = Var_n(X_nj) ||W_:,j||^2`` (WIFV)."""
    if stats.var is None:
        raise ValueError("FLAP's fluctuation needs the statistic var")
    return stats.var * W.pow(2).sum(0)


def zscore(v: torch.Tensor) -> torch.Tensor:
    """``(v - mean v) / std v`` with the unbiased standard deviation; constant ``v`` scores all zero."""
    std = v.std()
    return torch.zeros_like(v) if std == 0 else (v - v.mean()) / std


def flap_scores(kind: Kind, W: torch.Tensor, stats: SiteStats, groups: int) -> torch.Tensor:
    """FLAP's standardised structure scores of one module: per attention group or per MLP channel."""
    f = flap_fluctuation(W, stats)
    if kind == "mlp":
        return zscore(f)
    return channel_groups(zscore(f**2), groups, "mean")


def taylor_scores(kind: Kind, products: dict[str, torch.Tensor], groups: int) -> torch.Tensor:
    """LLM-Pruner's first-order importance of a block's structures from ``products[p] = |W_p * dL/dW_p|`` of its
    projections (keys ``q, k, v, o`` or ``gate, up, down``): the sum over each structure's rows of the projections
    it feeds and its columns of the output projection (rows and columns as :mod:`saes.engine.structure` owns them)."""
    if kind == "mlp":
        return products["gate"].sum(1) + products["up"].sum(1) + products["down"].sum(0)
    rows = sum(products[p].sum(1).reshape(groups, -1).sum(1) for p in ("q", "k", "v"))
    return rows + products["o"].sum(0).reshape(groups, -1).sum(1)


def compensation_bias(W: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """FLAP's bias ``b = W[:, pruned] mean(X[:, pruned])`` that the pruned output projection adds, so its mean
    output on the calibration inputs equals the dense one's (``keep``: the input channels kept)."""
    pruned = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    pruned[keep] = False
    return W[:, pruned] @ mean[pruned].to(W.dtype)


def top_structures(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Sorted indices of the ``len(scores) - remove`` highest scores (ties: the earlier index stays)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[: scores.numel() - remove]).values


# ------------------------------------------------------------------ budget rules
def uniform_plan(shapes: list[BlockShape], ratio: float, target: int) -> StructurePlan:
    """Wanda-sp's uniform structure: every block removes ``floor(ratio * groups)`` attention groups (FLAP's code:
    ``int(pruning_ratio * num_heads)`` heads; at most all but one), and the MLP channels take the rest of the
    budget, ``ceil((target - heads' parameters) / channel cost)`` channels spread evenly over the blocks (the
    first blocks take the remainder). Removes ``target`` to within one MLP channel."""
    costs = {s.channel_params for s in shapes}
    if len(costs) != 1:
        raise ValueError("the uniform pruning plan needs every block's MLP channel to cost the same")
    remove = [{"attention": min(math.floor(ratio * s.groups + 1e-9), s.groups - 1), "mlp": 0} for s in shapes]
    rest = target - sum(r["attention"] * s.group_params for r, s in zip(remove, shapes))
    channels = max(0, -(-rest // costs.pop()))
    base, extra = divmod(channels, len(shapes))
    for i, (r, s) in enumerate(zip(remove, shapes)):
        r["mlp"] = base + (i < extra)
        if r["mlp"] >= s.channels:
            raise ValueError(f"ratio={ratio}: the pruning budget needs {r['mlp']} of block {i}'s {s.channels} MLP "
                             "channels; every block keeps at least one: lower ratio")
    return StructurePlan(remove, target)


def blockwise_plan(shapes: list[BlockShape], target: int, pruned: range) -> StructurePlan:
    """LLM-Pruner's block-wise structure: only the blocks in ``pruned`` lose structures (its LLaMA-7B recipe keeps
    the first 4 and last 2 of 32 whole), each by the same ratio ``rho`` of its heads and channels, ``rho`` chosen so
    the pruned blocks give ``target``: :func:`uniform_plan` over those blocks (attention groups
    ``floor(rho * groups)``, the MLP channels the rest, to within one channel)."""
    inside = [shapes[i] for i in pruned]
    prunable = sum(s.groups * s.group_params + s.channels * s.channel_params for s in inside)
    if not inside or target >= prunable:
        raise ValueError(f"the pruning budget ({target:,} parameters) needs more than blocks {pruned.start}.."
                         f"{pruned.stop - 1} hold: prune more blocks (method.first, method.last) or lower ratio")
    try:
        plan = uniform_plan(inside, target / prunable, target)
    except ValueError:
        raise ValueError(f"the pruning budget ({target:,} parameters) would take every MLP channel of a block in "
                         f"{pruned.start}..{pruned.stop - 1}: prune more blocks (method.first, method.last) or lower "
                         "ratio") from None
    remove = [{"attention": 0, "mlp": 0} for _ in shapes]
    for i, r in zip(pruned, plan.remove):
        remove[i] = r
    return StructurePlan(remove, target)


def global_plan(scores: list[dict[str, torch.Tensor]], shapes: list[BlockShape], target: int) -> StructurePlan:
    """FLAP's adaptive structure search: every structure of every block in one pool, removed in order of
    ascending (standardised) score, each counted by the parameters it holds, until ``target`` is reached; a
    structure that would leave its block without heads or channels stays. FLAP sets one threshold where the
    kept parameters come closest to the target; here the removal stops as soon as it reaches the target, so it
    overshoots by less than the last structure removed."""
    pool = [(float(v), b, kind, j) for b, per in enumerate(scores) for kind in ("attention", "mlp")
            for j, v in enumerate(per[kind].tolist())]
    pool.sort(key=lambda e: e[0])
    left = [{k: s.count(k) for k in ("attention", "mlp")} for s in shapes]
    gone: list[dict[str, list[int]]] = [{"attention": [], "mlp": []} for _ in shapes]
    removed = 0
    for _, b, kind, j in pool:
        if removed >= target:
            break
        if left[b][kind] == 1:
            continue
        left[b][kind] -= 1
        gone[b][kind].append(j)
        removed += shapes[b].cost(kind)
    if removed < target:
        raise ValueError(f"the pruning budget ({target:,} parameters) exceeds what the blocks can give while each "
                         "keeps one head group and one MLP channel: lower ratio")
    keep = []
    for g, s in zip(gone, shapes):
        keep.append({k: torch.tensor(sorted(set(range(s.count(k))) - set(g[k])), dtype=torch.long)
                     for k in ("attention", "mlp")})
    remove = [{k: len(g[k]) for k in ("attention", "mlp")} for g in gone]
    return StructurePlan(remove, target, keep)


# ------------------------------------------------------------------ the interface
class Pruner(Method):
    """A structured-pruning method. The engine's block loop gives it the statistics ``mean`` and ``var`` at the
    input of ``o_proj`` and ``down_proj`` (on the method's stream) and asks :meth:`select` which structures stay;
    the engine removes the others (:mod:`saes.engine.prune`). :meth:`plan` decides the structure counts (or the
    structures themselves) before the loop, from the budget."""

    needs = frozenset({"mean", "var"})
    compensate = False  # add FLAP's bias to o_proj / down_proj

    def __init__(self, name: str, compute_dtype: str = "float64") -> None:
        super().__init__(name, compute_dtype)
        self.structure: StructurePlan | None = None

    @property
    def plans_ranks(self) -> bool:
        return True  # its own structure plan: no shared rank allocator

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        raise TypeError(f"{self.name} prunes structures; it has no low-rank factors")

    @abstractmethod
    def plan(self, shapes: list[BlockShape], ratio: float, target: int,
             scores: list[dict[str, torch.Tensor]] | None) -> StructurePlan:
        """The structure plan for the budget ``target``; ``scores`` (per block and kind) are given when
        :attr:`scores_first` says the plan needs every block's scores on the FP stream before the loop."""

    def check_budget(self, shapes: list[BlockShape], ratio: float, target: int) -> None:
        """A ``ValueError`` naming ``ratio`` when the blocks cannot give ``target`` parameters while each keeps one
        attention group and one MLP channel (checked on the model's skeleton, before the weights load)."""
        most = sum((s.groups - 1) * s.group_params + (s.channels - 1) * s.channel_params for s in shapes)
        if target > most:
            raise ValueError(f"ratio={ratio}: the SVD plan removes {target:,} linear parameters, more than "
                             f"{self.name} can prune ({most:,}) while every block keeps one head group and one "
                             "MLP channel: lower ratio")

    scores_first = False  # FLAP: the global threshold needs every block's scores before any block is pruned
    # where those scores come from: the statistics of the FP stream (:meth:`scores`), or the dense model's
    # gradients on the calibration tokens (LLM-Pruner: :func:`saes.engine.prune.gradient_scores`)
    scores_from: Literal["activations", "gradients"] = "activations"

    def scores(self, kind: Kind, W: torch.Tensor, stats: SiteStats, groups: int) -> torch.Tensor:
        """Importance per structure of one module (higher: more important)."""
        raise NotImplementedError

    def select(self, block: int, kind: Kind, W: torch.Tensor, stats: SiteStats, groups: int) -> torch.Tensor:
        """Sorted indices of the structures of ``kind`` that block ``block`` keeps; ``W`` is the output
        projection's weight, ``stats`` its input statistics on the method's stream."""
        if self.structure is None:
            raise RuntimeError(f"{self.name}: plan() must run before the block loop")
        if self.structure.keep is not None:
            return self.structure.keep[block][kind]
        return top_structures(self.scores(kind, W, stats, groups), self.structure.remove[block][kind])
