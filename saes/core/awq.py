"""AWQ (Lin et al., MLSys 2024, arXiv 2306.00978): activation-aware weight quantization, the per-group math.

AWQ keeps the salient input channels of a weight (those with large activations) accurate by scaling them up
before rounding and the activations down by the same factor: for linears ``W_1 .. W_k`` sharing an input ``x``
(a *scale group*), ``W x = (W diag(s)) (diag(s)^{-1} x)``, and ``diag(s)^{-1}`` is folded into the op that
produces ``x`` (a norm's weight, or the rows of the linear before), so the model is unchanged until the weights
are rounded. The paper's Eq. 5 searches ``s`` on a grid::

    s(a) = x_mean^a / w_mean^(1 - a),   a in {0, 1/n, ..., (n - 1)/n}   (n = 20)
    a*   = argmin_a || f(Q(W diag(s(a))) diag(s(a))^{-1}; x) - f(W; x) ||^2 / numel

with ``x_mean`` the mean ``|x|`` per input channel over the calibration tokens, ``w_mean`` the mean over output
rows of ``|W|`` normalised by its quantization group's max (``W`` the group's linears stacked by rows), and
``f`` the smallest module whose output the group determines (the attention for ``q,k,v``, the MLP for
``gate,up``, the projection itself otherwise). As AutoAWQ 0.2.9 computes it (``awq/quantize/quantizer.py``,
``duo_scaling``): ``s = clamp(x_mean^a / (w_mean^(1-a) + 1e-4), min=1e-4)``, then ``s / sqrt(max s * min s)``
(scales centred on 1 in log space); non-finite scales set to 1; the first grid point wins ties.

After the scales are applied, the *clip search* shrinks each quantization group's range (AutoAWQ's
``_compute_best_clip``): for every output row and group, ``max_val = (1 - i/n) max|w|`` for
``i = 0 .. max_shrink n - 1``, the weight clamped to ``[-max_val, max_val]`` and quantized; the ``max_val`` with
the lowest mean squared error of the group's partial output ``w_g . x_g`` over (a subsample of at most
``tokens``) calibration inputs ``x / s`` is kept.

The grid is AutoAWQ's (:func:`saes.core.gptq.grid` with ``span_zero=False``): asymmetric min-max per output row
and group of ``group_size`` input columns (a last partial group where the width is not a multiple: this
harness's GPTQ does the same; AutoAWQ refuses such widths).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from saes.core.gptq import grid, quantize


@dataclass(frozen=True)
class ScaleChoice:
    """One scale group's search result: the chosen grid point, its scales, and every grid point's loss."""
    index: int  # a* = index / n
    scales: torch.Tensor  # [n_in]
    losses: list[float]


def groups_of(n: int, group_size: int | None) -> list[slice]:
    size = n if group_size is None else group_size
    return [slice(c, min(c + size, n)) for c in range(0, n, size)]


def fake_quantize(W: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """``W: [m, n]`` on AWQ's grid (per row and group of columns), dequantized, in ``W``'s dtype."""
    out = torch.empty_like(W)
    for cols in groups_of(W.shape[1], group_size):
        scale, zero = grid(W[:, cols], bits, sym=False, span_zero=False)
        out[:, cols] = quantize(W[:, cols], scale, zero, bits)
    return out


def weight_mean(weights: Sequence[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """``w_mean``: per input channel, the mean over the stacked rows of ``|w| / (max_group |w| + 1e-6)``."""
    W = torch.cat(list(weights), dim=0).abs()
    normed = torch.empty_like(W)
    for cols in groups_of(W.shape[1], group_size):
        normed[:, cols] = W[:, cols] / (W[:, cols].amax(dim=1, keepdim=True) + 1e-6)
    return normed.mean(0)


def input_mean(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x_mean``: per input channel, the mean ``|x|`` over every calibration token (summed in float32)."""
    total = sum(x.abs().reshape(-1, x.shape[-1]).float().sum(0) for x in xs)
    count = sum(x.numel() // x.shape[-1] for x in xs)
    return (total / count).to(xs[0].dtype)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, a: float) -> torch.Tensor:
    """``s(a)`` (module docstring), centred so that ``max s * min s = 1``."""
    s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    s[~torch.isfinite(s)] = 1
    return s


@torch.no_grad()
def search_scale(weights: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
                 outputs: Callable[[list[torch.Tensor]], list[torch.Tensor]], bits: int, group_size: int | None,
                 n_grid: int = 20) -> ScaleChoice:
    """The grid search of Eq. 5 for one scale group.

    ``weights``: the group's linears' weights ``[m_i, n]``; ``xs``: their shared input, per batch;
    ``outputs(ws)``: the inspected module's output per batch with the linears' weights replaced by ``ws``.
    """
    reference = outputs(list(weights))
    x_mean, w_mean = input_mean(xs), weight_mean(weights, group_size)
    numel = sum(r.numel() for r in reference)
    losses: list[float] = []
    best = (float("inf"), -1, None)
    for k in range(n_grid):
        s = candidate_scales(x_mean, w_mean, k / n_grid)
        trial = [fake_quantize(W * s[None, :], bits, group_size) / s[None, :] for W in weights]
        err = sum(float((r - o).float().pow(2).sum()) for r, o in zip(reference, outputs(trial))) / numel
        losses.append(err)
        if err < best[0]:
            best = (err, k, s)
    if best[2] is None:
        raise FloatingPointError(f"every grid point of the AWQ scale search gave a non-finite loss: {losses}")
    return ScaleChoice(best[1], best[2].clone(), losses)


@torch.no_grad()
def search_clip(W: torch.Tensor, x: torch.Tensor, bits: int, group_size: int | None, n_grid: int = 20,
                max_shrink: float = 0.5, tokens: int = 512) -> torch.Tensor:
    """Per output row and group, the clip value ``max_val`` of the weight ``W: [m, n]`` (module docstring);
    ``x: [T, n]`` its (scaled) calibration inputs, subsampled every ``max(1, T // tokens)`` tokens.
    Returns ``[m, groups]``."""
    x = x[:: max(1, x.shape[0] // tokens)]
    best_all = []
    for cols in groups_of(W.shape[1], group_size):
        w, xg = W[:, cols], x[:, cols]
        top = w.abs().amax(dim=1, keepdim=True)  # [m, 1]
        reference = w @ xg.T  # [m, T]
        # AutoAWQ's start, 1e9 by a product: float32 and bfloat16 hold it, float16 overflows to inf (a fill with
        # 1e9 would raise there)
        best, least = top.clone(), torch.ones_like(top) * 1e9
        for i in range(int(max_shrink * n_grid)):
            max_val = top * (1 - i / n_grid)
            q = fake_quantize(torch.clamp(w, -max_val, max_val), bits, None)
            err = (q @ xg.T - reference).pow(2).mean(dim=1, keepdim=True)
            better = err < least
            least[better], best[better] = err[better], max_val[better]
        best_all.append(best)
    return torch.cat(best_all, dim=1)


@torch.no_grad()
def clip_(W: torch.Tensor, max_val: torch.Tensor, group_size: int | None) -> None:
    """Clamp ``W`` in place to ``[-max_val, max_val]`` per row and group (``max_val: [m, groups]``)."""
    for k, cols in enumerate(groups_of(W.shape[1], group_size)):
        bound = max_val[:, k:k + 1].to(W.dtype)
        W[:, cols] = torch.clamp(W[:, cols], -bound, bound)
