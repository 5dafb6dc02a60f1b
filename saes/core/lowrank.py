"""Ranks, the low-rank layer that replaces a dense projection, and layer surgery.

Convention (method spec): a linear ``y = W x + bias`` with ``W: [m, n]`` (out, in)
becomes ``y = A (B x) + bias`` with ``A: [m, r]``, ``B: [r, n]``. ``ratio`` is the
fraction of the layer's parameters that is removed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from saes.core.linalg import FactorizationError, all_finite


class FactorOverflow(FactorizationError):
    """A factor that is finite in its compute dtype is not finite once cast to the model's dtype."""


# What to set when a cast to the key's dtype overflows: a dtype with a wider exponent range.
WIDER = {torch.float16: "model.dtype=bfloat16 (float32's range at half the memory) or model.dtype=float32",
         torch.bfloat16: "model.dtype=float32", torch.float32: "model.dtype=float64"}


def cast_factors(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``B`` cast to the model's ``dtype``, checked finite *after* the cast: float16 ends at 65504,
    and a float64 factor that is finite can become inf there. Non-finite values are never installed."""
    cast = A.to(dtype), B.to(dtype)
    for name, src, out in (("A", A, cast[0]), ("B", B, cast[1])):
        if all_finite(out):
            continue
        if not all_finite(src):
            raise FactorizationError(f"{layer}: {name} has non-finite entries in {src.dtype}, before the cast")
        big = src.abs().max().item()
        raise FactorOverflow(
            f"{layer}: {name} has non-finite entries in the model's {dtype} (largest |entry| {big:.6g} in "
            f"{src.dtype}; {dtype} ends at {torch.finfo(dtype).max:.6g}): set {WIDER.get(dtype, 'a wider model.dtype')}")
    return cast


def check_installed(model: nn.Module, dtype: torch.dtype) -> None:
    """Every :class:`LowRankLinear` of ``model`` finite after the model was cast to ``dtype`` (``load=``)."""
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankLinear):
            for factor in ("A", "B"):
                if not all_finite(getattr(mod, factor).weight):
                    raise FactorOverflow(f"{name}: {factor} has non-finite entries in {dtype} after loading: "
                                         f"set {WIDER.get(dtype, 'a wider model.dtype')}")


def check_ratio(ratio: object) -> float:
    """``ratio`` as a float, or ``ValueError`` if it is not in the open interval (0, 1)."""
    if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) < 1.0):
        raise ValueError(f"ratio must lie in (0, 1) (the fraction of parameters removed); got {ratio!r}")
    return float(ratio)


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Largest rank whose two factors keep at most ``(1 - ratio)`` of ``m * n``.

    ``r = floor((1 - ratio) * m * n / (m + n))`` (SVD-LLM's and the SAES paper's
    uniform-rank convention). Raises ``ValueError`` if ``ratio`` is outside
    (0, 1) or the rank would round to 0.
    """
    ratio = check_ratio(ratio)
    if m < 1 or n < 1:
        raise ValueError(f"matrix shape must be positive; got {m}x{n}")
    # The small epsilon keeps exact products (e.g. 0.5 * 64 * 64 / 128 = 16) from
    # flooring to 15 through binary rounding of (1 - ratio).
    r = math.floor((1.0 - ratio) * m * n / (m + n) + 1e-9)
    if r < 1:
        raise ValueError(
            f"ratio {ratio} leaves rank 0 for a {m}x{n} projection "
            f"(needs (1-ratio)*m*n/(m+n) >= 1); use a smaller ratio"
        )
    return r


class LowRankLinear(nn.Module):
    """``y = A (B x) + bias``: two ``nn.Linear`` layers, ``B`` (in -> rank) then ``A`` (rank -> out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.A = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        """Build from ``A: [m, r]``, ``B: [r, n]`` (and the dense layer's bias, kept as is)."""
        m, r = A.shape
        r2, n = B.shape
        if r != r2:
            raise ValueError(f"factor shapes do not chain: A {tuple(A.shape)}, B {tuple(B.shape)}")
        layer = cls(n, m, r, bias=bias is not None, dtype=A.dtype, device=A.device)
        with torch.no_grad():
            layer.A.weight.copy_(A)
            layer.B.weight.copy_(B)
            if bias is not None:
                layer.A.bias.copy_(bias.to(A.dtype))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., n) -> (..., m)
        return self.A(self.B(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (e.g. ``self_attn.q_proj``)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
