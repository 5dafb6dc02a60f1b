"""``strs``: ASVD's sensitivity-based truncation rank search (Yuan et al. 2023, Sec. 3.3)
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
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from saes.core.linalg import truncated_svd
from saes.core.lowrank import rank_for_ratio
from saes.core.stats import StreamingStats
from saes.engine.allocators.base import Allocator, Plan, uniform_budget
from saes.engine.config import EngineConfig
from saes.engine.layout import BlockLayout, projections
from saes.engine.propagate import dense_blocks, replaced
from saes.io import digest, read_json, token_digest, write_json_atomic

if TYPE_CHECKING:
    from saes.core.method import Method

log = logging.getLogger(__name__)


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
    try:
        table: dict[str, list[float]] = {}
        names = [(i, name) for i in range(len(inputs)) for name in layout.projections]
        for i, proj in tqdm(names, desc="strs sensitivity", unit="layer"):
            name = f"{layout.layers}.{i}.{proj}"
            if done is not None and name in done:
                table[name] = list(done[name])
                continue
            lin: nn.Linear = model.get_submodule(name)
            W = lin.weight
            s = activation_scale(absmean[name], alpha, floor).to(device=W.device, dtype=dtype)  # absmean: CPU
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
    finally:  # the engine moves one block at a time from where the model is kept
        model.to(cfg.offload_device)
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
