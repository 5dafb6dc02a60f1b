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

from tqdm.auto import tqdm

from saes.core.pruning import Kind, Pruner, StructurePlan, svd_removal, taylor_scores
from saes.core.stats import StreamingStats
from saes.engine.config import CompressionReport, EngineConfig
from saes.engine.layout import BlockLayout, layout_for, plan_ranks, projections
from saes.engine.loop import compress_model
from saes.engine.propagate import BlockPass, dense_blocks
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
    dense model: per batch of ``cfg.batch_size`` calibration sequences one forward and backward of the whole model
    (the mean next-token loss), ``dL/dW`` of every projection summed over the batches in float32 on
    ``cfg.stats_device`` (a half-precision ``.grad`` would round the sum), then ``|W * dL/dW|``. The whole model
    runs on ``cfg.device`` with its projections' gradients (LLaMA-7B in fp16: about 13 GB of weights, 13 GB of
    gradients, 26 GB of float32 sums and the activations of one batch); nothing else gets a gradient."""
    names = projections(model, layout)
    weights = {name: model.get_submodule(name).weight for name in names}
    acc_device = cfg.stats_device or cfg.device
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=acc_device) for name, w in weights.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    home = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        model.to(cfg.device)
        with torch.enable_grad():
            for batch in tqdm(calib_ids.split(cfg.batch_size), desc=f"gradients[{method.name}]", unit="batch"):
                ids = batch.to(cfg.device)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                for name, w in weights.items():
                    assert w.grad is not None, name
                    sums[name] += w.grad.to(acc_device, torch.float32)
                    w.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
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
                W = weights[name].detach().to(acc_device, dtype)
                products[site.split(".")[-1].split("_")[0]] = (W * sums.pop(name).to(dtype)).abs()
            per[kind] = taylor_scores(kind, products, groups).cpu()  # type: ignore[arg-type]
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
