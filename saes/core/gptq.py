"""GPTQ (Frantar et al. 2022, arXiv 2210.17323, Algorithm 1): one layer's weight quantized column by column with
the second-order error feedback of Optimal Brain Quantization.

For ``W: [m, n]`` and ``H = X X^T`` of the layer's calibration inputs ``X: [n, tokens]`` (any positive scale:
the result does not depend on it), GPTQ minimises ``||W X - Q X||_F^2`` over ``Q`` on the quantization grid,
greedily and in column order: column ``j`` is rounded to the grid, and its error, divided by ``[H^{-1}]_{jj}``
(the Cholesky form of the inverse restricted to the columns not yet quantized), is spread over the columns
``> j`` through row ``j`` of the upper Cholesky factor of ``H^{-1}``. Columns are processed in blocks of
``block`` (the paper's lazy batch updates: the same result, fewer memory passes).

Grid (the paper's and its reference code's min-max grid): per output row and per group of ``group_size``
consecutive input columns (``None``: one group per row), ``scale = (max - min) / (2^b - 1)`` over the group's
values with ``min <= 0 <= max`` enforced, ``zero = round(-min / scale)``, ``q = clamp(round(w / scale) + zero,
0, 2^b - 1)``, dequantized ``scale (q - zero)``; ``sym=True`` uses ``max = -min = max|w|`` and the middle zero
``(2^b - 1 + 1) / 2``. Every group's grid is fixed before the first column is quantized, from the original
weights ("static groups", as llm-compressor's GPTQ modifier does; the paper's reference code instead sets a group's
grid when its first column is reached, from weights updated only up to the last 128-column block). Damping:
``H + damp mean(diag H) I``; inputs that never fire (``H_jj = 0``) get ``H_jj = 1`` and a zero weight column.
Everything is computed in ``dtype`` (float32 like the field's implementations unless asked otherwise).

Checked against llm-compressor 0.14.0.1's ``quantize_weight`` (CPU, separate environment; the same ``W`` and ``H``):
the same quantized weights, bit for bit, at 4 bits / groups of 128, 3 bits / 32 and 4 bits per row
(``tests/data/gptq_reference.pt``, ``tests/test_quant.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Quantized:
    weight: torch.Tensor  # [m, n], dequantized (on the grid), in W's dtype
    scale: torch.Tensor  # [m, groups]
    zero: torch.Tensor  # [m, groups], integers in [0, 2^b - 1]
    loss: float  # sum over columns of (w - q)^2 / [H^{-1}]_jj / 2: the OBS estimate of the added output error


def check_grid(bits: int, group_size: int | None) -> None:
    """The grid's settings (shared by GPTQ and AWQ), named by their config keys."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"quant.bits must be one of {BITS}; got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"quant.group_size must be a positive int or null (one group per row); got {group_size!r}")


def check_settings(bits: int, group_size: int | None, damp: float, block: int) -> None:
    check_grid(bits, group_size)
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not 0.0 < damp < 1.0:
        raise ValueError(f"quant.damp must lie in (0, 1) (a fraction of mean(diag H)); got {damp}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"quant.block must be a positive int; got {block!r}")


def grid(w: torch.Tensor, bits: int, sym: bool, span_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` per row of ``w: [m, k]`` (the min-max grid above).

    ``span_zero=False`` is AutoAWQ's grid (``pseudo_quantize_tensor`` with a zero point, used by ``quant=awq``):
    the range is the row's own ``[min, max]`` (zero need not lie in it), ``scale = max(max - min, 1e-5) / (2^b - 1)``
    and ``zero = clamp(round(-min / scale), 0, 2^b - 1)``; asymmetric only."""
    maxq = 2 ** bits - 1
    if not span_zero:
        if sym:
            raise ValueError("the grid without zero in its range (AWQ's) has a zero point: sym must be false")
        lo, hi = w.min(dim=1).values, w.max(dim=1).values
        scale = (hi - lo).clamp(min=1e-5) / maxq
        return scale, torch.clamp(torch.round(-lo / scale), 0, maxq)
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    flat = (lo == 0) & (hi == 0)  # an all-zero group: any grid holds it exactly
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``w`` (a column ``[m]`` or ``[m, k]`` with per-row ``scale``/``zero``) rounded to the grid, dequantized."""
    if w.ndim == 2:
        scale, zero = scale[:, None], zero[:, None]
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)
    return scale * (q - zero)


@torch.no_grad()
def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None = 128, sym: bool = False,
         damp: float = 0.01, block: int = 128, dtype: torch.dtype = torch.float32) -> Quantized:
    """``W: [m, n]`` quantized against ``H: [n, n]`` (module docstring)."""
    check_settings(bits, group_size, damp, block)
    m, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"H must be [{n}, {n}] for a weight [{m}, {n}]; got {tuple(H.shape)}")
    W = W.to(dtype).clone()
    H = H.to(dtype).clone()
    size = n if group_size is None else group_size
    grids = [grid(W[:, c:c + size], bits, sym) for c in range(0, n, size)]  # static: from the original weights
    scales = torch.stack([g[0] for g in grids], dim=1)
    zeros = torch.stack([g[1] for g in grids], dim=1)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * float(torch.diag(H).mean()))
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper Cholesky factor of H^{-1}

    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=dtype, device=W.device)  # accumulated in place: on W's device
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize(w, scales[:, j // size], zeros[:, j // size], bits)
            Q[:, j] = q
            loss += ((w - q) ** 2).sum() / d ** 2 / 2
            err = (w - q) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Quantized(Q, scales, zeros, float(loss))
