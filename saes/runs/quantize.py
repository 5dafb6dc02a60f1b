"""Quantization after compression (``quant=gptq`` or ``quant=awq``; off by default): the paper's Table 10, low
rank plus quantization, and AWQ beside GPTQ at equal memory (issue 28).

Every linear layer inside the decoder blocks is quantized with :func:`saes.core.gptq.gptq`: the two factors of
each low-rank projection (``B``: in -> rank, then ``A``: rank -> out) and any projection left dense; with
``ratio=0`` nothing is factorised and this is plain GPTQ of the dense model. The order is GPTQ's reference one,
block by block on the run's calibration tokens: each block's linear inputs are collected on the model quantized
so far (one forward of the block per batch, hooks on every linear), every linear of the block is quantized
from those statistics, and the quantized block's outputs feed the next block. ``A``'s inputs are the latent
``B x`` of the unquantized ``B`` (the block's linears are quantized together, as the reference code does for
the linears of a block). ``quant=awq`` quantizes the same linears with AWQ (:mod:`saes.runs.awq`: scale groups,
scale and clip search, on the full-precision model's block inputs as AutoAWQ does) on AutoAWQ's grid.

The weights are fake-quantized (dequantized onto the grid, in the model's dtype): perplexity and accuracy are
those of the quantized model; packed low-bit kernels are not part of this harness (on this CPU they would not
run). Memory is counted as stored by a GPTQ checkpoint (an AWQ one stores the same): ``b`` bits per quantized
weight plus, per group and output row, a 16-bit scale and (asymmetric grid) a ``b``-bit zero point; everything
outside the blocks' linears (embeddings, norms, the head) at 16 bits. ``bits_per_dense_linear_weight`` (the
linears' storage over the dense model's linear parameters) is the number rows compare at: dense GPTQ at 3 bits
vs low rank at ratio ``R`` plus GPTQ at ``b'`` bits with ``(1 - R) b'`` about 3.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from saes.core.gptq import check_grid, check_settings, gptq
from saes.core.lowrank import count_parameters
from saes.core.stats import StreamingStats
from saes.engine.layout import BlockLayout
from saes.engine.propagate import capture_block_inputs, forward_capturing, through
from saes.runs.awq import awq_model

METHODS = ("gptq", "awq")
SCALE_BITS = 16  # a group's scale as stored (fp16), and every parameter outside the quantized linears
ONLY = {"gptq": ("damp", "block"), "awq": ("clip", "grid", "max_shrink", "clip_tokens")}  # each method's own keys


@dataclass(frozen=True)
class QuantSettings:
    """The ``quant`` config group (``conf/quant/gptq.yaml``, ``conf/quant/awq.yaml`` say what each value means)."""
    method: str
    bits: int
    group_size: int | None
    sym: bool
    damp: float | None = None  # gptq
    block: int | None = None  # gptq
    clip: bool | None = None  # awq
    grid: int | None = None  # awq
    max_shrink: float | None = None  # awq
    clip_tokens: int | None = None  # awq

    @classmethod
    def from_config(cls, q: DictConfig) -> "QuantSettings":
        settings = cls(**{f.name: q.get(f.name) for f in fields(cls)})
        settings.check()
        return settings

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quant.method must be one of {METHODS}; got {self.method!r}")
        if not isinstance(self.sym, bool):
            raise ValueError(f"quant.sym must be true or false; got {self.sym!r}")
        for other, keys in ONLY.items():
            if other != self.method and (given := [k for k in keys if getattr(self, k) is not None]):
                raise ValueError(f"quant.{given[0]} is a setting of quant={other}, not of quant={self.method}")
        if self.method == "gptq":
            check_settings(self.bits, self.group_size, self.damp, self.block)
            return
        check_grid(self.bits, self.group_size)
        if self.sym:
            raise ValueError("quant.sym=true with quant=awq: AWQ's grid has a zero point (AutoAWQ's zero_point); "
                             "set quant.sym=false")
        if not isinstance(self.clip, bool):
            raise ValueError(f"quant.clip must be true or false; got {self.clip!r}")
        for key, value in (("grid", self.grid), ("clip_tokens", self.clip_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"quant.{key} must be a positive int; got {value!r}")
        if isinstance(self.max_shrink, bool) or not isinstance(self.max_shrink, (int, float)) \
                or not 0 <= self.max_shrink < 1:
            raise ValueError(f"quant.max_shrink must lie in [0, 1) (the largest fraction of a group's range "
                             f"the clip search removes); got {self.max_shrink!r}")

    def storage_bits(self, m: int, n: int) -> int:
        """Bits a GPTQ or AWQ checkpoint stores for one quantized ``[m, n]`` weight (module docstring)."""
        groups = 1 if self.group_size is None else math.ceil(n / self.group_size)
        return m * n * self.bits + m * groups * (SCALE_BITS + (0 if self.sym else self.bits))


def block_linears(block: nn.Module) -> list[str]:
    """Every ``nn.Linear`` inside a decoder block (factors ``...q_proj.B``, ``...q_proj.A``; dense projections)."""
    return [name for name, mod in block.named_modules() if isinstance(mod, nn.Linear)]


def quantize_model(model: nn.Module, layout: BlockLayout, calib_ids: torch.Tensor, q: QuantSettings,
                   device: torch.device, batch_size: int) -> dict[str, Any]:
    """Quantize every linear of every decoder block in place (``q.method``); returns what the record keeps:
    ``linear_bits``, per-linear ``losses`` (GPTQ's), ``seconds`` and a ``summary`` for the record's quant."""
    if q.method == "awq":
        return awq_quantize(model, layout, calib_ids, q, device, batch_size)
    done = gptq_model(model, layout, calib_ids, q, device, batch_size)
    return {**done, "summary": {"loss_total": sum(done["losses"].values())}}


@torch.no_grad()
def gptq_model(model: nn.Module, layout: BlockLayout, calib_ids: torch.Tensor, q: QuantSettings,
               device: torch.device, batch_size: int) -> dict[str, Any]:
    """GPTQ every linear of every decoder block in place (module docstring)."""
    t0 = time.perf_counter()
    blocks = model.get_submodule(layout.layers)
    xs, block_kws = capture_block_inputs(model, blocks, calib_ids, batch_size, device, device)
    linear_bits = 0
    losses: dict[str, float] = {}
    for i, block in enumerate(tqdm(blocks, desc=f"gptq[{q.bits}b]", unit="block")):
        home = next(block.parameters()).device
        block.to(device)
        sites = block_linears(block)
        acc = {s: StreamingStats(block.get_submodule(s).in_features, {"H"}, dtype=torch.float64, device=device)
               for s in sites}
        for x, kw in zip(xs, block_kws[i]):
            forward_capturing(block, x, kw, sites, lambda site, inp: acc[site].update(inp))
        for s in sites:
            lin: nn.Linear = block.get_submodule(s)
            W = lin.weight
            res = gptq(W.detach(), acc[s].finalize(f"{layout.layers}.{i}.{s}").H, q.bits, q.group_size, q.sym,
                       q.damp, q.block)
            W.copy_(res.weight.to(W.dtype))
            losses[f"{layout.layers}.{i}.{s}"] = res.loss
            linear_bits += q.storage_bits(*W.shape)
        xs = through(block, xs, block_kws[i], device, device)
        block.to(home)
    return {"linear_bits": linear_bits, "losses": losses, "seconds": time.perf_counter() - t0}


def awq_quantize(model: nn.Module, layout: BlockLayout, calib_ids: torch.Tensor, q: QuantSettings,
                 device: torch.device, batch_size: int) -> dict[str, Any]:
    """AWQ (:mod:`saes.runs.awq`) of every linear of every decoder block, in place; the summary names each scale
    group's chosen ``a`` (``ratio``) and its output MSE, and counts the clipped linears."""
    assert q.grid is not None and q.clip is not None and q.max_shrink is not None and q.clip_tokens is not None
    done = awq_model(model, layout, calib_ids, q.bits, q.group_size, device, batch_size, n_grid=q.grid,
                     clip=q.clip, max_shrink=q.max_shrink, clip_tokens=q.clip_tokens)
    blocks = model.get_submodule(layout.layers)
    linear_bits = sum(q.storage_bits(*b.get_submodule(s).weight.shape) for b in blocks for s in block_linears(b))
    groups = {f"{layout.layers}.{i}.{g['prev']}": {"linears": g["linears"], "ratio": g["ratio"], "loss": g["loss"]}
              for i, found in enumerate(done["blocks"]) for g in found["scales"]}
    clipped = sum(len(found["clips"]) for found in done["blocks"])
    return {"linear_bits": linear_bits, "losses": {}, "seconds": done["seconds"],
            "summary": {"scale_groups": groups, "clipped_linears": clipped}}


def memory(model: nn.Module, layout: BlockLayout, q: QuantSettings, linear_bits: int,
           dense_linear_params: int) -> dict[str, float]:
    """Memory of the quantized model (module docstring): the linears' bits, per dense linear weight, and the model's."""
    blocks = model.get_submodule(layout.layers)
    linear_params = sum(mod.weight.numel() for b in blocks for mod in b.modules() if isinstance(mod, nn.Linear))
    other_bits = (count_parameters(model) - linear_params) * SCALE_BITS  # tied embeddings counted once
    return {"bits": q.bits, "group_size": q.group_size, "linear_params": linear_params,
            "bits_per_linear_weight": linear_bits / linear_params,
            "bits_per_dense_linear_weight": linear_bits / dense_linear_params,
            "model_megabytes": (linear_bits + other_bits) / 8 / 2 ** 20}
