"""Structured pruning through the engine's block loop (:func:`saes.engine.loop.compress_model`).

:func:`prune_model` sets the budget (the uniform SVD plan's removed parameters, :func:`saes.core.pruning.svd_removal`),
lets the pruner plan its structures (FLAP first scores every block on the FP stream: :func:`fp_scores`), then
runs the same sequential loop as every low-rank method, which hands the pruner the statistics at the input of
``o_proj`` / ``down_proj`` on its stream and removes what it does not keep (:mod:`saes.engine.structure`).
Per-block checkpoints and the FP-statistics cache hold low-rank factors and ``H``: a pruning run uses neither.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from saes.core.pruning import Kind, Pruner, StructurePlan, svd_removal
from saes.core.stats import StreamingStats
from saes.engine.config import CompressionReport, EngineConfig
from saes.engine.layout import BlockLayout, layout_for, plan_ranks, projections
from saes.engine.loop import compress_model
from saes.engine.propagate import BlockPass, dense_blocks
from saes.engine.structure import OUTPUT, block_shape


def budget(model: nn.Module, layout: BlockLayout, ratio: float) -> int:
    """Linear parameters the uniform SVD plan at ``ratio`` removes from this model."""
    return svd_removal([tuple(model.get_submodule(p).weight.shape) for p in projections(model, layout)], ratio)


@torch.no_grad()
def fp_scores(model: nn.Module, layout: BlockLayout, method: Pruner, calib_ids: torch.Tensor,
              cfg: EngineConfig) -> list[dict[str, torch.Tensor]]:
    """Every block's structure scores on the dense model (the FP stream), before anything is pruned."""
    acc: dict[str, StreamingStats] = {}
    out: list[dict[str, torch.Tensor]] = []

    def seen(name: str, x: torch.Tensor) -> None:
        site = name.split(".", len(layout.layers.split(".")) + 1)[-1]
        if site in OUTPUT:
            if name not in acc:
                acc[name] = StreamingStats(x.shape[-1], method.needs, dtype=cfg.stats_dtype,
                                           device=cfg.stats_device or cfg.device)
            acc[name].update(x)

    def scored(step: BlockPass) -> None:
        shape = block_shape(step.block)
        per: dict[str, torch.Tensor] = {}
        for site, kind in OUTPUT.items():
            name = f"{layout.layers}.{step.index}.{site}"
            stats = acc.pop(name).finalize(name).to(method.compute_dtype, cfg.device)
            W = step.block.get_submodule(site).weight.to(method.compute_dtype)
            k: Kind = "attention" if kind == "attention" else "mlp"
            per[kind] = method.scores(k, W, stats, shape.groups).cpu()
        out.append(per)

    dense_blocks(model, layout, calib_ids, cfg, on_block=scored, on_input=seen)
    return out


def plan_structures(model: nn.Module, method: Pruner, ratio: float, calib_ids: torch.Tensor | None,
                    cfg: EngineConfig) -> StructurePlan:
    """The pruner's plan for the SVD plan's parameter count at ``ratio`` (on the dense model)."""
    layout = layout_for(model)
    shapes = [block_shape(b) for b in model.get_submodule(layout.layers)]
    scores = None
    if method.scores_first:
        if calib_ids is None:
            raise ValueError(f"{method.name} needs calibration data")
        scores = fp_scores(model, layout, method, calib_ids, cfg)
    plan = method.plan(shapes, ratio, budget(model, layout, ratio), scores)
    removed = plan.removed(shapes)
    plan.diagnostics.update(target=plan.target, removed=removed,
                            overshoot=removed - plan.target,
                            max_structure=max(max(s.group_params, s.channel_params) for s in shapes))
    return plan


def prune_model(model: nn.Module, method: Pruner, ratio: float, calib_ids: torch.Tensor | None,
                cfg: EngineConfig, plan: StructurePlan | None = None) -> tuple[CompressionReport, dict[str, Any]]:
    """Prune in place by ``plan`` (:func:`plan_structures`' when None); returns the engine's report and the
    plan's summary for the record."""
    plan = plan if plan is not None else plan_structures(model, method, ratio, calib_ids, cfg)
    layout = layout_for(model)
    # the uniform rank plan is the loop's budget argument; a pruner does not read it
    report = compress_model(model, method, plan_ranks(model, layout, ratio), calib_ids,
                            dataclasses.replace(cfg, resume_dir=None, reuse_stats=False))
    summary = {**plan.diagnostics, "removed_per_block": plan.remove}
    return report, summary
