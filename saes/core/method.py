"""The interface every compression method implements.

A method says which statistics it needs and from which activation stream, and
turns ``(W, stats, rank)`` into ``(A, B)`` with ``W ~ A @ B``. Everything else
(hooks, streams, devices, layer surgery, records) belongs to the engine. A structured-pruning method
(:class:`saes.core.pruning.Pruner`) is a ``Method`` that answers which head groups and MLP channels stay
instead of factorising; the same loop hands it its statistics and removes the rest.

The core imports nothing from the engine: the whole-model hooks (:meth:`Method.allocate`,
:meth:`Method.prepare`) receive the engine's block layout and settings typed as the small
protocols :class:`Blocks` and :class:`PassSettings`, which the engine's ``BlockLayout`` and
``EngineConfig`` satisfy. A method that hands them on to engine functions (ERC-SVD, FWSVD)
annotates its override with the engine's own types.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import nn

from saes.core.stats import SiteStats

Stream = Literal["fp", "compressed"]
Statistic = Literal["H", "Delta", "absmean", "mean", "var"]
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class Blocks(Protocol):
    """Where a model's decoder blocks and their compressible projections are (the engine's ``BlockLayout``)."""

    @property
    def layers(self) -> str: ...  # dotted path from the causal LM to the ModuleList of decoder blocks

    @property
    def projections(self) -> tuple[str, ...]: ...  # a block's projections, relative to the block, in plan order


class PassSettings(Protocol):
    """What a whole-model pass runs under (the engine's ``EngineConfig``): its device, where the weights go
    back to afterwards, its batch size, and where model-level results may be cached under whose identity."""

    @property
    def device(self) -> torch.device: ...

    @property
    def offload_device(self) -> torch.device: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def cache_dir(self) -> Path | None: ...

    @property
    def model_identity(self) -> str: ...


@dataclass
class Factors:
    A: torch.Tensor  # [m, r]
    B: torch.Tensor  # [r, n]
    diagnostics: dict[str, float | int | None] = field(default_factory=dict)  # recorded per layer


class Method(ABC):
    """Base class. Subclasses set ``needs`` and ``stream`` and implement :meth:`factorize`.

    ``needs``: statistics per input site, a subset of ``{"H", "Delta", "absmean", "mean", "var"}``; empty
    means the method is data-free and the engine runs no calibration pass.
    ``stream``: the stream whose inputs ``X`` define ``H`` (the paper of each
    method decides; ``calib.propagate`` may override it for fairness studies).
    """

    needs: frozenset[Statistic] = frozenset()
    stream: Stream = "fp"

    def __init__(self, name: str, compute_dtype: str = "float64") -> None:
        if compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}; got {compute_dtype!r}")
        self.name = name
        self.compute_dtype = DTYPES[compute_dtype]

    @property
    def needs_data(self) -> bool:
        """Whether the method reads calibration tokens at all (statistics, a pre-pass or an allocation)."""
        return bool(self.needs)

    def check_setting(self, blocks: int, ratio: float) -> None:
        """Named errors for settings that depend on the model's depth, before the model loads (none by default)."""

    @property
    def plans_ranks(self) -> bool:
        """Whether :meth:`allocate` gives the method's own rank plan (ERC-SVD's partial layers); such a method
        takes no shared allocator (``method.rank_alloc``, :mod:`saes.engine.allocators`) at the same time."""
        return False

    def allocate(self, model: nn.Module, layout: Blocks, ratio: float, calib_ids: torch.Tensor | None,
                 cfg: PassSettings) -> dict[str, int | None] | None:
        """The method's own per-projection ranks for the global ``ratio`` (``None`` in the plan: the projection
        stays dense), or None; :mod:`saes.engine.allocation` holds the budget rule. Mixed ranks any method
        can take are the shared allocators of :mod:`saes.engine.allocators`.

        Called on the dense model before compression, with the shared calibration tokens
        (``None`` for data-free methods). Must not modify the model."""
        return None

    def sensitivity_scaling(self) -> tuple[float, float]:
        """``(alpha, floor)`` of the activation-aware truncation STRS measures sensitivity with: ASVD's
        defaults (Yuan et al. 2023), so any method reuses the rank distribution ASVD finds; ASVD its own."""
        return 0.5, 1e-6

    def prepare(self, model: nn.Module, layout: Blocks, calib_ids: torch.Tensor | None,
                cfg: PassSettings) -> None:
        """A whole-model pre-pass on the dense model (e.g. FWSVD's gradients); no-op by default."""

    def prepare_ranks(self, model: nn.Module, layout: Blocks, ranks: dict[str, int | None],
                      calib_ids: torch.Tensor | None, cfg: PassSettings,
                      rank_ratio: Mapping[str, float] | None = None) -> None:
        """A whole-model pre-pass on the dense model that needs the final rank plan (Dobi-SVD's stage 2: the
        activations truncated at every projection's rank ``k / rank_ratio``, the plan's weight rank per activation
        rank, 1 where absent); called after the plan, before compression. No-op by default."""

    @abstractmethod
    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        """``W: [m, n]`` and ``stats`` arrive in ``self.compute_dtype``; return factors of rank ``rank``.

        ``layer`` is the projection's full name (``model.layers.3.self_attn.q_proj``) for
        methods that keep per-layer state from :meth:`prepare`. Hyper-parameters are
        checked in ``__init__``, so a bad config fails before any work."""
