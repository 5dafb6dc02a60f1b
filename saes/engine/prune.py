"""Structured pruning through the engine's block loop (:func:`saes.engine.loop.compress_model`).

:func:`prune_model` sets the budget (the uniform SVD plan's removed parameters, :func:`saes.core.pruning.svd_removal`),
lets the pruner plan its structures (FLAP first scores every block on the FP stream, :func:`fp_scores`; LLM-Pruner
on the dense model's gradients, :func:`gradient_scores`), then
runs the same sequential loop as every low-rank method, which hands the pruner the statistics at the input of
``o_proj`` / ``down_proj`` on its stream and removes what it does not keep (:mod:`saes.engine.structure`).
Per-block checkpoints and the FP-statistics cache hold low-rank factors and ``H``: a pruning run uses neither.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from saes.core.linalg import all_finite
from saes.core.pruning import Kind, Pruner, StructurePlan, svd_removal, taylor_scores
from saes.core.stats import StreamingStats
from saes.engine.config import CompressionReport, EngineConfig
from saes.engine.layout import BlockLayout, layout_for, plan_ranks, projections
from saes.engine.loop import compress_model
from saes.engine.propagate import BlockPass, dense_blocks, sequence_gradients
from saes.engine.structure import ATTENTION, MLP, OUTPUT, block_shape


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


def gradient_scores(model: nn.Module, layout: BlockLayout, method: Pruner, calib_ids: torch.Tensor,
                    cfg: EngineConfig) -> list[dict[str, torch.Tensor]]:
    """LLM-Pruner's first-order scores of every block's structures (:func:`saes.core.pruning.taylor_scores`) on the
    dense model: ``G = mean_d dL(d)/dW`` over the calibration sequences ``d`` (each one's mean next-token loss; with
    windows of one length this is the gradient of the mean loss over all of them, as the reference's one batch),
    from the harness's one whole-model backward pass (:func:`saes.engine.propagate.sequence_gradients`: one
    projection's gradient on the device at a time), summed in float32 on ``cfg.stats_device``; then ``|W * G|``.
    The whole model runs on ``cfg.device`` and goes back where it was. In float16, per-sequence gradients below
    6e-5 are subnormal and lose bits, as for FWSVD's Fisher pass (the reference scores in float32 on the CPU);
    a score that is not finite is a ``FloatingPointError`` naming the dtype."""
    names = projections(model, layout)
    acc_device = cfg.stats_device or cfg.device
    sums = {name: torch.zeros(model.get_submodule(name).weight.shape, dtype=torch.float32, device=acc_device)
            for name in names}

    def add(name: str, grad: torch.Tensor) -> None:
        sums[name] += grad.to(acc_device, torch.float32)

    home = next(model.parameters()).device
    try:
        sequence_gradients(model, names, calib_ids, cfg.device, add, f"gradients[{method.name}]")
    finally:
        model.to(home)
    dtype = method.compute_dtype
    out: list[dict[str, torch.Tensor]] = []
    for i, block in enumerate(model.get_submodule(layout.layers)):
        groups = block_shape(block).groups
        per: dict[str, torch.Tensor] = {}
        for kind, sites in (("attention", ATTENTION), ("mlp", MLP)):
            products = {}
            for site in sites:  # q, k, v, o / gate, up, down
                name = f"{layout.layers}.{i}.{site}"
                W = model.get_submodule(name).weight.detach().to(acc_device, dtype)
                products[site.split(".")[-1].split("_")[0]] = (W * sums.pop(name).to(dtype) / len(calib_ids)).abs()
            per[kind] = taylor_scores(kind, products, groups).cpu()  # type: ignore[arg-type]
            if not all_finite(per[kind]):
                raise FloatingPointError(f"{method.name}: block {i}'s {kind} scores are not finite in "
                                         f"{next(model.parameters()).dtype}; run the model in a wider dtype "
                                         "(model.dtype=bfloat16 or float32)")
        out.append(per)
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
        scorer = gradient_scores if method.scores_from == "gradients" else fp_scores
        scores = scorer(model, layout, method, calib_ids, cfg)
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
