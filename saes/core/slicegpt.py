"""SliceGPT (Ashkboos et al., ICLR 2024, arXiv 2401.15024): the maths and the budget rule, on tensors only.

A pre-norm transformer whose RMSNorms carry no scale (each scale folded into the linears it feeds) is invariant
under an orthogonal change of basis ``Q`` of its residual stream: ``RMSNorm(x Q) = RMSNorm(x) Q``. SliceGPT
picks, at every position of the residual stream, ``Q`` = the principal directions of the signal there
(eigenvectors of ``H = sum_n x_n^T x_n`` over the calibration tokens, in float64, eigenvalues descending), writes
the weights in that basis and deletes the last ``d - d'`` directions:

* input-side linears (``q, k, v``; ``gate, up``; the head) become ``W Q[:, :d']`` (:func:`rotate_input`);
* output-side linears (``o``; ``down``) and the embeddings become ``Q[:, :d']^T W`` (:func:`rotate_output`;
  the embedding table ``E Q[:, :d']``);
* where two positions have different bases the residual connection carries the ``d'_a x d'_b`` shortcut
  ``Q_a[:, :d'_a]^T Q_b[:, :d'_b]`` (:func:`shortcut`): a real linear layer, counted by the budget.

The budget (:func:`solve_width`): the harness's pruning methods remove the linear parameters of the decoder
blocks' projections that the uniform SVD plan at ``ratio`` removes (:func:`saes.core.pruning.svd_removal`).
A sliced block keeps its projections at the sliced width plus its two shortcut matrices; the width ``d'`` (the
same at every position, as the reference's ``ConstSlicingScheduler``) is the largest whose removal reaches the
target, so it overshoots by less than one hidden dimension's worth of parameters (:meth:`SliceShape.dim_cost`).
The embeddings and the head are not projections of the blocks and stay outside that count for every method; a
tied model's head is untied (its two ends sit in different bases), which the record's whole-model count shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from saes.core.method import Factors, Method
from saes.core.stats import SiteStats


# ------------------------------------------------------------------ PCA and the change of basis
def principal_directions(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues, Q)`` of the symmetric ``H`` in float64, eigenvalues descending and ``Q``'s columns the
    matching unit eigenvectors (``H = Q diag(eigenvalues) Q^T``, ``Q`` orthogonal)."""
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square; got {tuple(H.shape)}")
    H = H.to(torch.float64)
    vals, vecs = torch.linalg.eigh((H + H.T) / 2)
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order]


def kept_variance(eigenvalues: torch.Tensor, width: int) -> float:
    """Fraction of the signal's energy (``trace H``) in its top ``width`` principal directions."""
    total = float(eigenvalues.clamp_min(0).sum())
    return 1.0 if total == 0 else float(eigenvalues[:width].clamp_min(0).sum()) / total


def fold_scale(W: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W diag(scale)``: a norm's per-channel scale moved into the linear ``W [m, d]`` that reads its output."""
    return W * scale.to(W.dtype)[None, :]


def rotate_input(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``W Q``: a linear ``W [m, d]`` reading the residual stream, made to read it in the basis ``Q [d, d']``."""
    return (W.to(torch.float64) @ Q.to(torch.float64)).to(W.dtype)


def rotate_output(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``Q^T W``: a linear ``W [d, n]`` (or a bias ``[d]``) writing the residual stream, made to write it in the
    basis ``Q [d, d']``."""
    return (Q.to(torch.float64).T @ W.to(torch.float64)).to(W.dtype)


def shortcut(Q_from: torch.Tensor, Q_to: torch.Tensor) -> torch.Tensor:
    """``S = Q_from^T Q_to`` ``[d'_from, d'_to]``: the residual in the basis ``Q_from`` moved to ``Q_to``
    (``x_to = x_from S``; an ``nn.Linear`` holds ``S^T``)."""
    return Q_from.to(torch.float64).T @ Q_to.to(torch.float64)


def norm_correction(hidden: int, width: int, eps: float) -> tuple[float, float]:
    """``(scale, eps')`` that make a scale-free RMSNorm over ``width`` channels normalise by the mean square over
    the ``hidden`` channels the sliced signal came from (the reference's ``RMSN(mean_dim=d)``):
    ``scale x / sqrt(sum x^2 / width + eps') = x / sqrt(sum x^2 / hidden + eps)``."""
    return math.sqrt(hidden / width), eps * hidden / width


# ------------------------------------------------------------------ the budget
@dataclass(frozen=True)
class SliceShape:
    """The widths of a LLaMA-like model's blocks that slicing leaves alone, and how many blocks there are."""

    hidden: int  # d: the residual stream's width
    qkv_rows: int  # outputs of q, k, v together (their inputs are the sliced width)
    o_in: int  # inputs of o_proj (its outputs are the sliced width)
    mlp: int  # MLP intermediate channels (gate, up outputs; down inputs)
    blocks: int

    @property
    def dense(self) -> int:
        """The blocks' projection parameters before slicing (weights only)."""
        return self.blocks * (self.qkv_rows + self.o_in + 3 * self.mlp) * self.hidden

    def kept(self, width: int, head_width: int | None = None) -> int:
        """Projection plus shortcut parameters of the blocks sliced to ``width`` at every position but the last
        block's output, which keeps ``head_width`` (default ``hidden``: the head is not sliced, as the reference's
        default ``do_slice_head=False``)."""
        out_last = self.hidden if head_width is None else head_width
        per = (self.qkv_rows + self.o_in + 2 * self.mlp) * width + width * width  # q,k,v,o,gate,up; attn shortcut
        inner = self.mlp * width + width * width  # down and the MLP shortcut of blocks 0 .. L-2
        last = self.mlp * out_last + width * out_last
        return self.blocks * per + (self.blocks - 1) * inner + last

    def removed(self, width: int) -> int:
        return self.dense - self.kept(width)

    def dim_cost(self, width: int) -> int:
        """Parameters one more hidden dimension costs at ``width`` (the budget's structure)."""
        return self.kept(width + 1) - self.kept(width)


def solve_width(shape: SliceShape, target: int, ratio: float) -> int:
    """The largest width ``d'`` whose sliced blocks remove at least ``target`` parameters (so they remove it to
    within :meth:`SliceShape.dim_cost`); a ``ValueError`` naming ``ratio`` when not even ``d' = 1`` does."""
    if shape.removed(1) < target:
        raise ValueError(f"ratio={ratio}: the SVD plan removes {target:,} linear parameters; SliceGPT removes at most "
                         f"{shape.removed(1):,} (width 1 of {shape.hidden}, the last block's output and the head kept "
                         "whole): lower ratio")
    lo, hi = 1, shape.hidden  # removed() falls as the width grows: the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if shape.removed(mid) >= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ------------------------------------------------------------------ the interface
class Slicer(Method):
    """A method that rotates and slices the residual stream (SliceGPT) instead of factorising projections; the
    engine's :func:`saes.engine.slicing.slice_model` runs it. It reads calibration tokens (the PCA) through its
    own sequential pass, not the engine's per-projection statistics."""

    stream = "compressed"
    supported = ("llama",)  # pre-norm RMSNorm blocks with q,k,v,o / gate,up,down (no sandwich norms)

    @property
    def needs_data(self) -> bool:
        return True

    @property
    def plans_ranks(self) -> bool:
        return True  # its own width: no shared rank allocator

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        raise TypeError(f"{self.name} rotates and slices the residual stream; it has no low-rank factors")

    def check_model(self, model_type: str | None) -> None:
        """A named error for an architecture the rotation is not exact for (checked on the config)."""
        if model_type not in self.supported:
            why = " (its sandwich norms act on the block outputs before the residual sum)" \
                if model_type and model_type.startswith("gemma") else ""
            raise ValueError(f"method={self.name} supports model_type {list(self.supported)} (pre-norm RMSNorm "
                             f"blocks); model_type={model_type!r}{why} is not supported: choose another model")
