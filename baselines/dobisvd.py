"""Dobi-SVD (Wang et al., ICLR 2025, arXiv 2502.02723): learned truncation positions, then the weights projected
onto the subspaces their truncated activations span.

``method=dobisvd`` is the shared allocator ``method.rank_alloc=dobi`` (stage 1, :mod:`saes.engine.allocators.dobi`)
plus this factorisation (stage 2 of its code, ``weight_updater.py``): the calibration windows run through the dense
model with every projection's output replaced by its truncated activation at the activation rank its planned rank
``k`` stands for, ``gamma = k / RR`` (``RR = 1`` unless stage 1 ran with ``method.dobi.rr=true``: the plan's
``rank_ratio``): the top-``ceil(gamma)`` singular triplets of each sequence's ``[L, m]`` output under the stage-1 mask
at ``gamma``, block by block as the engine's FP stream runs; for each projection the right singular vectors of every
sequence (``[m, ceil(gamma)]``, unit norm) are collected, and the top-``k`` principal directions ``V`` of all of them
give ``W_new = V V^T W``, stored as the factors ``A = V``, ``B = V^T W`` (:func:`saes.core.dobi.pca_factors`; the
bias stays on the output, where its code puts it on the wrong factor).

Departures from its code, and why: the principal directions are the exact eigenvectors of the collected vectors'
second moment (its code: scikit-learn's incremental PCA, an approximation of the same), uncentred by default
(singular vectors have no sign, and centring a set of directions depends on the signs its randomized SVD happened
to draw; ``method.centre=true`` centres them as its code does); the update is ``V V^T W`` at the integer rank (its
code weighs the last of ``ceil(gamma)`` directions by the mask, ``V G V^T W``); the stream runs on the shared
calibration windows (``calib.*``, the tokens every method factorises with), each sequence's truncation capped at
its length. Stage 3 (remapping: 8-bit storage of the factors' leading entries) is storage accounting only
(``method.remap=true``): each layer records ``remap_bytes`` (:func:`saes.core.dobi.remap_bytes`) and the record's
``params.remap`` sums them beside the fp16 bytes of the factors and of the dense projections: a memory figure, never
part of the parameter budget or counts; the weights stay the fp32 factors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from saes.core.dobi import BETA, pca_factors, principal_subspace, remap_bytes, tanh_mask, top_svd
from saes.core.linalg import check_finite
from saes.core.method import DTYPES, Factors, Method
from saes.core.stats import SiteStats
from saes.engine.allocators.dobi_train import Installed
from saes.engine.config import EngineConfig
from saes.engine.layout import BlockLayout
from saes.engine.propagate import BlockPass, dense_blocks

log = logging.getLogger(__name__)


class _Collecting(nn.Module):
    """A projection whose output is truncated per sequence at activation rank ``gamma`` (the top ``ceil(gamma)``
    triplets under the stage-1 mask at ``gamma``), the right singular vectors of every sequence added to ``moment``
    (``sum V V^T``), ``total`` and ``count``; ``k`` is the weight rank the PCA keeps."""

    def __init__(self, lin: nn.Linear, k: int, gamma: float, beta: float, niter: int, dtype: torch.dtype,
                 seed: int) -> None:
        super().__init__()
        self.lin, self.k, self.gamma, self.beta, self.niter, self.dtype = lin, k, gamma, beta, niter, dtype
        self.generator = torch.Generator().manual_seed(seed)
        self.moment: torch.Tensor | None = None  # allocated at the first call: one block's at a time
        self.total: torch.Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        flat = y.reshape(-1, y.shape[-2], y.shape[-1])
        outs = []
        for A in flat.to(self.dtype):
            q = min(math.ceil(self.gamma), *A.shape)
            U, S, V = top_svd(A, q, self.niter, self.generator)
            T = tanh_mask(torch.tensor(float(self.gamma), dtype=S.dtype), q, self.beta).to(S.device)
            outs.append((U * (S * T)[None, :]) @ V.T)
            Vd = V.detach().to(torch.float64)  # the moment on the projection's device (one block's at a time)
            if self.moment is None:
                self.moment, self.total = Vd @ Vd.T, Vd.sum(1)
            else:
                self.moment += Vd @ Vd.T
                self.total += Vd.sum(1)
            self.count += q
        return torch.stack(outs).reshape(y.shape).to(y.dtype)


class DobiSVD(Method):
    needs = frozenset()  # no engine statistics: its own stream, run once before compression (prepare_ranks)
    stream = "fp"

    def __init__(self, name: str = "dobisvd", beta: float = BETA, niter: int = 2, centre: bool = False,
                 remap: bool = False, stream_dtype: str = "float32", seed: int = 0,
                 compute_dtype: str = "float64") -> None:
        super().__init__(name, compute_dtype)
        if not float(beta) > 0:
            raise ValueError(f"method.beta (the mask's steepness) must be > 0; got {beta!r}")
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
            raise ValueError(f"method.niter (power iterations) must be an integer >= 0; got {niter!r}")
        if stream_dtype not in DTYPES:
            raise ValueError(f"method.stream_dtype must be one of {sorted(DTYPES)}; got {stream_dtype!r}")
        self.beta, self.niter, self.centre, self.remap = float(beta), niter, bool(centre), bool(remap)
        self.stream_dtype, self.seed = DTYPES[stream_dtype], int(seed)
        self.bases: dict[str, torch.Tensor] = {}

    @property
    def needs_data(self) -> bool:
        return True

    def prepare_ranks(self, model: nn.Module, layout: BlockLayout, ranks: dict[str, int | None],
                      calib_ids: torch.Tensor | None, cfg: EngineConfig,
                      rank_ratio: Mapping[str, float] | None = None) -> None:
        if calib_ids is None:
            raise ValueError("dobisvd needs calibration tokens for its truncated-activation stream")
        self.bases = truncated_stream_subspaces(model, layout, ranks, calib_ids, cfg, self.beta, self.niter,
                                                self.centre, self.stream_dtype, self.seed, rank_ratio)

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        if layer not in self.bases:
            raise KeyError(f"Dobi-SVD has no subspace for {layer!r}; prepare_ranks() must run first")
        V = self.bases[layer][:, :rank].to(W)
        A, B = pca_factors(W, V)
        check_finite(A=A, B=B)
        kept = float((B.norm() / W.norm()) ** 2)  # ||V V^T W||^2 / ||W||^2 (V orthonormal)
        diag: dict[str, float | int | None] = {"retained_energy": kept}
        if self.remap:
            m, n = W.shape
            diag["remap_bytes"] = remap_bytes(m, n, rank)
        return Factors(A, B, diag)


def truncated_stream_subspaces(model: nn.Module, layout: BlockLayout, ranks: dict[str, int | None],
                               calib_ids: torch.Tensor, cfg: EngineConfig, beta: float, niter: int, centre: bool,
                               dtype: torch.dtype, seed: int, rank_ratio: Mapping[str, float] | None = None
                               ) -> dict[str, torch.Tensor]:
    """``V [m, k]`` per projection of ``ranks`` (None: left alone) from the stream truncated at ``k / rank_ratio``
    (1 where absent), block by block; a block's accumulators are reduced to ``V`` and freed once its batches went
    through."""
    rr = rank_ratio or {}
    modules = {p: _Collecting(model.get_submodule(p), k, k / rr.get(p, 1.0), beta, niter, dtype,
                              seed * 1_000_003 + i)
               for i, (p, k) in enumerate(ranks.items()) if k is not None}
    bases: dict[str, torch.Tensor] = {}
    prefix = layout.layers + "."
    bar = tqdm(total=len(model.get_submodule(layout.layers)), desc="dobi stage 2", unit="block")

    def reduce(step: BlockPass) -> None:
        bar.update(1)
        for p, mod in modules.items():
            if p.startswith(f"{prefix}{step.index}.") and p not in bases:
                assert mod.moment is not None, f"{p} saw no calibration token"
                bases[p] = principal_subspace(mod.moment, mod.k, mod.total if centre else None, mod.count
                                              ).to("cpu", torch.float32)  # kept for factorize: off the device
                mod.moment = mod.total = None

    with Installed(model, modules), bar:
        dense_blocks(model, layout, calib_ids, cfg, on_block=reduce)
    return bases
