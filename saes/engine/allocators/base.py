"""What every rank allocator shares: the :class:`Plan` it returns, the :class:`Allocator` interface, and the
uniform plan's budget (:mod:`saes.engine.allocation`'s rule) with the per-block shapes the layer-ratio
allocators (adaCR, Dip-SVD) hand to :func:`ranks_for_layer_ratios`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from saes.engine.config import EngineConfig
from saes.engine.layout import BlockLayout, plan_ranks

if TYPE_CHECKING:
    from saes.core.method import Method


@dataclass(frozen=True)
class Plan:
    """Ranks per projection (``None``: it stays dense) and what the allocator records per projection."""
    ranks: dict[str, int | None]
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # the whole plan's numbers (the record's params.allocation)
    # Weight rank per activation rank (Dobi-SVD's RR, ``method.dobi.rr=true``): a window of L tokens spans at most L
    # output directions, so a plan learned on such windows holds activation ranks k / RR; absent: 1.
    rank_ratio: dict[str, float] = field(default_factory=dict)


class Allocator(ABC):
    name: str

    def check(self, ratio: float) -> None:
        """Named errors for a ratio the settings cannot meet, before the model loads (none by default)."""

    def check_shapes(self, shapes: Mapping[str, tuple[int, int]], ratio: float) -> None:
        """Named errors for settings the projections' shapes ``name -> (m, n)`` (from the model's config alone)
        cannot meet, before the weights load (none by default)."""

    def use_text(self, sample: Callable[[int, int], torch.Tensor]) -> None:
        """Receives the calibration source's seeded sampler ``sample(nsamples, seqlen)`` before :meth:`plan`, for
        an allocator that trains on windows of its own length (Dobi-SVD); ignored by default."""

    @abstractmethod
    def plan(self, model: nn.Module, layout: BlockLayout, ratio: float, calib_ids: torch.Tensor,
             cfg: EngineConfig, method: "Method") -> Plan:
        """Ranks for the global ``ratio`` on the dense model (left unchanged), within the uniform plan's total."""



def block_of(layout: BlockLayout, name: str) -> int:
    """The decoder block index of a projection's full name (``model.layers.3.mlp.up_proj`` -> 3)."""
    return int(name[len(layout.layers) + 1:].split(".")[0])


def uniform_budget(model: nn.Module, layout: BlockLayout, ratio: float) -> tuple[dict[str, int], int]:
    """The uniform plan (it also rejects a bad ratio) and its parameter total, every allocator's budget."""
    uniform = plan_ranks(model, layout, ratio)
    return uniform, sum(r * sum(model.get_submodule(p).weight.shape) for p, r in uniform.items())



def block_shapes(model: nn.Module, layout: BlockLayout, names: Iterable[str]
                 ) -> tuple[dict[str, tuple[int, int, int]], list[float]]:
    """``name -> (m, n, block)`` for :func:`ranks_for_layer_ratios`, and each block's dense parameters."""
    shapes = {p: (*model.get_submodule(p).weight.shape, block_of(layout, p)) for p in names}
    sizes = [0.0] * len(model.get_submodule(layout.layers))
    for m, n, i in shapes.values():
        sizes[i] += m * n
    return shapes, sizes

