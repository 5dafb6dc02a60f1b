"""ASVD (Yuan et al. 2023, arXiv 2312.05821): activation-aware scaling before the SVD.

``S = diag(mean_t |x_j|)^alpha`` from FP-stream activations (``alpha = 0.5`` by
default, as the paper); truncate ``W S`` by SVD and undo the scaling:
``A = U_r Sigma_r^{1/2}``, ``B = Sigma_r^{1/2} V_r^T S^{-1}``. ``alpha = 0`` is plain SVD.
Channels that never fire would make ``S`` singular: their scale is floored at
``floor * max_j S_jj`` (our choice; the paper does not say).

Ranks are uniform (``rank_alloc=uniform``) or found by the paper's sensitivity-based
truncation rank search (``rank_alloc=strs``, Sec. 3.3): for every projection alone and
every candidate fraction of parameters kept, the calibration perplexity of the model
with only that projection truncated; then a binary search over a perplexity threshold,
each projection taking the smallest candidate whose perplexity stays under it, to the
largest set that fits the global parameter budget. Our choices where the paper is
silent: the candidates are the kept fractions ``0.1, 0.2, ..., 0.9`` (configurable); the
sensitivity is measured on the first ``strs.nsamples`` calibration sequences, cut to
their first ``strs.seqlen`` tokens if set (the
perplexity of the whole model, re-running only the blocks from the truncated
projection's block onwards on cached dense inputs); the scaling uses the whole
calibration set's ``mean|x|``; because the candidates are discrete, the budget the search
leaves unused is handed out afterwards rank by rank, most sensitive projections first,
without passing their next candidate, so the plan lands within one rank of the target.
The sensitivity table depends on the model, the calibration tokens, ``alpha``, the
floor, the candidates and the sensitivity tokens only (not the ratio): it is cached under
``<results_dir>/cache/asvd_strs/`` keyed by all of them and reused across a ratio sweep.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from saes.core.linalg import check_finite, truncated_svd
from saes.core.lowrank import rank_for_ratio
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats, StreamingStats
from saes.engine.config import EngineConfig
from saes.engine.layout import BlockLayout, plan_ranks, projections
from saes.engine.propagate import dense_blocks, replaced
from saes.io import digest, read_json, token_digest, write_json_atomic

log = logging.getLogger(__name__)
RANK_ALLOCS = ("uniform", "strs")


class ASVD(Method):
    needs = frozenset({"absmean"})
    stream = "fp"

    def __init__(self, name: str = "asvd", alpha: float = 0.5, floor: float = 1e-6, rank_alloc: str = "uniform",
                 strs: dict | None = None, compute_dtype: str = "float64") -> None:
        super().__init__(name, compute_dtype)
        if alpha < 0 or not 0 < floor < 1:
            raise ValueError(f"need method.alpha >= 0 and 0 < method.floor < 1; got {alpha}, {floor}")
        if rank_alloc not in RANK_ALLOCS:
            raise ValueError(f"method.rank_alloc must be one of {RANK_ALLOCS}; got {rank_alloc!r}")
        strs = dict(strs or {})
        self.candidates = tuple(float(c) for c in strs.get("candidates", [0.1 * k for k in range(1, 10)]))
        self.strs_nsamples = int(strs.get("nsamples", 8))
        self.strs_seqlen = strs.get("seqlen")  # tokens of each sensitivity sequence (null: the calibration seqlen)
        if self.strs_seqlen is not None and int(self.strs_seqlen) < 2:
            raise ValueError(f"method.strs.seqlen must be >= 2 or null; got {self.strs_seqlen}")
        if not self.candidates or any(not 0 < c < 1 for c in self.candidates) or sorted(set(self.candidates)) != list(self.candidates):
            raise ValueError(f"method.strs.candidates must be increasing kept fractions in (0, 1); got {self.candidates}")
        if self.strs_nsamples < 1:
            raise ValueError(f"method.strs.nsamples must be >= 1; got {self.strs_nsamples}")
        self.alpha, self.floor, self.rank_alloc = float(alpha), float(floor), rank_alloc

    def scale(self, stats: SiteStats) -> torch.Tensor:
        s = stats.absmean.pow(self.alpha)
        return s.clamp_min(self.floor * float(s.max()))

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        s = self.scale(stats)  # [n], the diagonal of S
        svd = truncated_svd(W * s, rank)  # W S
        A, B = svd.factors()
        B = B / s  # B S^{-1}
        check_finite(A=A, B=B)
        return Factors(A, B, {"rer": svd.retained_energy_ratio})

    # ---- STRS (Sec. 3.3) -------------------------------------------------------------------------------------

    def allocate(self, model: nn.Module, layout: BlockLayout, ratio: float, calib_ids: torch.Tensor | None,
                 cfg: EngineConfig) -> dict[str, int] | None:
        if self.rank_alloc == "uniform":
            return None
        if calib_ids is None:
            raise ValueError("asvd with rank_alloc=strs needs calibration tokens")
        table = self.sensitivity(model, layout, calib_ids, cfg)
        shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in table}
        uniform = plan_ranks(model, layout, ratio)
        budget = sum(r * sum(shapes[name]) for name, r in uniform.items())
        return strs_ranks(table, shapes, self.candidates, budget)

    def sensitivity(self, model: nn.Module, layout: BlockLayout, calib_ids: torch.Tensor,
                    cfg: EngineConfig) -> dict[str, list[float]]:
        """``table[name][k]``: calibration perplexity with only ``name`` kept at ``candidates[k]`` (cached)."""
        sens_ids = calib_ids[: self.strs_nsamples, : self.strs_seqlen]
        key = {"model": cfg.model_identity, "calib": token_digest(calib_ids), "sens": token_digest(sens_ids),
               "alpha": self.alpha, "floor": self.floor, "candidates": self.candidates,
               "dtype": str(self.compute_dtype), "layers": layout.layers}
        path = None if cfg.cache_dir is None else Path(cfg.cache_dir) / "asvd_strs" / f"{digest(key, 16)}.json"
        if path is not None and path.is_file():
            log.info("ASVD-STRS: sensitivity table from %s", path)
            return read_json(path)["table"]
        table = strs_sensitivity(model, layout, calib_ids, sens_ids, self, cfg)
        if path is not None:
            write_json_atomic(path, {"key": key, "table": table})
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
                     method: ASVD, cfg: EngineConfig) -> dict[str, list[float]]:
    """``table[name][k]``: the sensitivity set's perplexity with only ``name`` truncated to ``candidates[k]``,
    its ``W S`` truncated and ``S`` undone; the model itself is left as it was."""
    absmean, inputs = _absmean_and_block_inputs(model, layout, calib_ids, sens_ids, cfg)
    model.to(cfg.device)  # the tail forwards run the model's own code from block i on
    table: dict[str, list[float]] = {}
    names = [(i, name) for i in range(len(inputs)) for name in layout.projections]
    for i, proj in tqdm(names, desc="asvd strs", unit="layer"):
        name = f"{layout.layers}.{i}.{proj}"
        lin: nn.Linear = model.get_submodule(name)
        W = lin.weight
        s = method.scale(SiteStats(0, absmean=absmean[name])).to(method.compute_dtype)
        full = truncated_svd(W.to(method.compute_dtype) * s, min(W.shape))
        m, n = W.shape
        row = []
        for kept in method.candidates:
            r = rank_for_ratio(m, n, 1.0 - kept)
            approx = ((full.U[:, :r] * full.S[:r]) @ full.Vh[:r]) / s
            with replaced(model, name, _fixed_linear(approx.to(W.dtype).to(W.device), lin.bias)):
                row.append(math.exp(_tail_nll(model, layout, i, inputs[i], sens_ids, cfg)))
        table[name] = row
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
        raise ValueError("ASVD-STRS: even the smallest candidates exceed the parameter budget; add smaller candidates")
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
