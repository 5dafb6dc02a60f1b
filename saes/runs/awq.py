"""AWQ of a decoder model (``quant=awq``), dense or low rank: scale groups, search, apply.

Scale groups (AutoAWQ 0.2.9's ``LlamaAWQForCausalLM.get_layers_for_scaling``, extended to factors): the
linears that read one input, the op whose output that input is (the scales ``1/s`` are folded into it) and the
module whose output measures the search's loss:

=================================  ==========================  ============================
linears (input side)               previous op                 inspected module
=================================  ==========================  ============================
q, k, v                            the attention's input norm  the attention
o (when v and o have one shape)    v (its output side)         o
gate, up                           the MLP's input norm        the MLP
down                               up (its output side)        down
A of every low-rank projection     its B                       A (the projection's output)
=================================  ==========================  ============================

A low-rank projection ``A (B x)`` has an input side ``B`` (it reads what the dense projection read, so it takes
the dense projection's place in its group) and an output side ``A`` (whose output the next op reads, so it is
the previous op where the dense projection was). ``A``'s input is the rank-``r`` latent ``B x``: a scale group
of its own, folded exactly into ``B``'s rows (no nonlinearity between them), inspected at ``A``'s output (the
projection's). Under grouped-query attention ``o`` is not scaled (AutoAWQ's rule: the shapes of v and o differ).
The clip search skips q and k (both factors of low-rank ones), whose errors the ``q k^T`` product multiplies.

Order (AutoAWQ's): block by block, each block's inputs are the full-precision model's (the calibration tokens
through the unquantized blocks); within a block every group is searched on the block as it was, then all
scales are applied, then every clip is searched on the scaled weights and inputs ``x / s``, then applied, then
every linear is rounded. :func:`search_block` returns a plain dict (:func:`apply_block` re-applies it; it
saves with ``torch.save``); searching leaves the block unchanged.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from saes.core import awq
from saes.core.lowrank import LowRankLinear
from saes.engine.layout import BlockLayout
from saes.engine.propagate import capture_block_inputs, first_output, forward_capturing


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # the op whose output the linears read (a norm or a linear), within the block
    linears: tuple[str, ...]
    inspect: str  # the module whose output the search compares


def input_side(block: nn.Module, proj: str) -> str:
    return f"{proj}.B" if isinstance(block.get_submodule(proj), LowRankLinear) else proj


def output_side(block: nn.Module, proj: str) -> str:
    return f"{proj}.A" if isinstance(block.get_submodule(proj), LowRankLinear) else proj


def shape(block: nn.Module, proj: str) -> tuple[int, int]:
    mod = block.get_submodule(proj)
    return mod.out_features, mod.in_features


def scale_groups(block: nn.Module, layout: BlockLayout) -> list[ScaleGroup]:
    """The block's scale groups (module docstring), in AutoAWQ's order, then one per low-rank projection."""
    if layout.stages is None or len(layout.groups) != 4:
        raise ValueError("AWQ needs a layout with the q,k,v / o / gate,up / down groups and its norms' names")
    (q, k, v), (o,), (gate, up), (down,) = layout.groups
    attn = q.rpartition(".")[0]
    mlp = gate.rpartition(".")[0]
    groups = [ScaleGroup(layout.stages.attn_in_norm, tuple(input_side(block, p) for p in (q, k, v)), attn)]
    if shape(block, v) == shape(block, o):
        groups.append(ScaleGroup(output_side(block, v), (input_side(block, o),), o))
    groups.append(ScaleGroup(layout.stages.mlp_in_norm, (input_side(block, gate), input_side(block, up)), mlp))
    groups.append(ScaleGroup(output_side(block, up), (input_side(block, down),), down))
    groups += [ScaleGroup(f"{p}.B", (f"{p}.A",), f"{p}.A") for p in layout.projections
               if isinstance(block.get_submodule(p), LowRankLinear)]
    return groups


def block_linears(block: nn.Module) -> list[str]:
    return [name for name, mod in block.named_modules() if isinstance(mod, nn.Linear)]


def unclipped(layout: BlockLayout) -> tuple[str, ...]:
    """q and k (and their factors): AutoAWQ does not clip them."""
    return layout.groups[0][:2]


# ------------------------------------------------------------------ folding the scales (exact: no rounding)
def is_offset_norm(norm: nn.Module) -> bool:
    """Whether the norm multiplies by ``1 + weight`` (Gemma's) rather than ``weight``: a zero weight tells."""
    probe = torch.ones(1, norm.weight.shape[0], dtype=norm.weight.dtype, device=norm.weight.device)
    zeroed = functional_call(norm, {"weight": torch.zeros_like(norm.weight)}, (probe,))
    return bool(zeroed.abs().max() > 0)


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """``W diag(s)`` for the group's linears, ``diag(s)^{-1}`` into the previous op's output."""
    prev = block.get_submodule(group.prev)
    s = s.to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight[-s.numel():].div_(s.view(-1, 1))
    elif is_offset_norm(prev):
        prev.weight.add_(1).div_(s).sub_(1)
    else:
        prev.weight.div_(s)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for name in group.linears:
        block.get_submodule(name).weight.mul_(s.view(1, -1))


def apply_block(block: nn.Module, found: dict[str, Any], bits: int | None, group_size: int | None) -> None:
    """Apply a :func:`search_block` result: fold every group's scales, clamp to the clips, round every linear
    (``bits=None``: scales and clips only, no rounding)."""
    for g in found["scales"]:
        fold_scales(block, ScaleGroup(g["prev"], tuple(g["linears"]), g["inspect"]), g["scales"])
    with torch.no_grad():
        for name, max_val in found["clips"].items():
            awq.clip_(block.get_submodule(name).weight, max_val, group_size)
        if bits is not None:
            for name in block_linears(block):
                W = block.get_submodule(name).weight
                W.copy_(awq.fake_quantize(W, bits, group_size))


# ------------------------------------------------------------------ the search
def module_kwargs(module: nn.Module, kw: dict) -> dict:
    """The block call's kwargs the module's ``forward`` names (masks, rotary embeddings for the attention)."""
    params = inspect.signature(module.forward).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return {k: v for k, v in kw.items() if k in named}


@torch.no_grad()
def search_block(block: nn.Module, layout: BlockLayout, xs: list[torch.Tensor], kws: list[dict], bits: int,
                 group_size: int | None, n_grid: int = 20, clip: bool = True, max_shrink: float = 0.5,
                 clip_tokens: int = 512) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """AWQ's search on one block (inputs ``xs`` per batch, the block's call kwargs ``kws``); returns the result
    (``{"scales": [...], "clips": {...}}``) and the block's full-precision outputs (the next block's inputs)."""
    sites = block_linears(block)
    inputs: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    outs = [forward_capturing(block, x, kw, sites, lambda site, inp: inputs[site].append(inp.detach()))
            for x, kw in zip(xs, kws)]
    found: dict[str, Any] = {"scales": [], "clips": {}}
    for group in scale_groups(block, layout):
        module = block.get_submodule(group.inspect)
        rel = [name[len(group.inspect) + 1:] + ".weight" if name != group.inspect else "weight"
               for name in group.linears]
        kwargs = [module_kwargs(module, kw) for kw in kws]

        def outputs(ws: list[torch.Tensor], module=module, rel=rel, kwargs=kwargs, xin=inputs[group.linears[0]]):
            return [first_output(functional_call(module, dict(zip(rel, ws)), (x,), kw)) for x, kw in zip(xin, kwargs)]

        choice = awq.search_scale([block.get_submodule(n).weight for n in group.linears], inputs[group.linears[0]],
                                  outputs, bits, group_size, n_grid)
        found["scales"].append({"prev": group.prev, "linears": list(group.linears), "inspect": group.inspect,
                                "ratio": choice.index / n_grid, "scales": choice.scales,
                                "loss": choice.losses[choice.index], "losses": choice.losses})
    if clip:
        scaled = copy.deepcopy(block)
        apply_block(scaled, found, None, group_size)
        scale_of = {name: g["scales"] for g in found["scales"] for name in g["linears"]}
        skip = unclipped(layout)
        for name in sites:
            if any(name == p or name.startswith(p + ".") for p in skip):
                continue
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]])
            if name in scale_of:
                x = x / scale_of[name].to(x.dtype).view(1, -1)
            found["clips"][name] = awq.search_clip(scaled.get_submodule(name).weight, x, bits, group_size, n_grid,
                                                   max_shrink, clip_tokens)
        del scaled
    return found, outs


@torch.no_grad()
def awq_model(model: nn.Module, layout: BlockLayout, calib_ids: torch.Tensor, bits: int, group_size: int | None,
              device: torch.device, batch_size: int, apply: bool = True, **search: Any) -> dict[str, Any]:
    """Search (and, ``apply``, apply) AWQ on every decoder block; returns ``{"blocks": [result per block],
    "seconds": ...}``. The blocks' inputs are the full-precision model's (module docstring)."""
    t0 = time.perf_counter()
    blocks = model.get_submodule(layout.layers)
    xs, block_kws = capture_block_inputs(model, blocks, calib_ids, batch_size, device, device)
    results = []
    for i, block in enumerate(tqdm(blocks, desc=f"awq[{bits}b]", unit="block")):
        home = next(block.parameters()).device
        block.to(device)
        found, xs = search_block(block, layout, xs, block_kws[i], bits, group_size, **search)
        if apply:
            apply_block(block, found, bits, group_size)
        results.append(found)
        block.to(home)
    return {"blocks": results, "seconds": time.perf_counter() - t0}
