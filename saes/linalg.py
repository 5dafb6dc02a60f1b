"""Guarded dense linear algebra shared by the whitening methods (SAES-SVD, SVD-LLM).

Everything here is exact (``torch.linalg``), never randomised, and fails loudly:
a factorisation that cannot be computed raises :class:`FactorizationError`
rather than returning a random or zero layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class FactorizationError(RuntimeError):
    """A Cholesky/SVD could not be computed or produced non-finite values."""


@dataclass(frozen=True)
class Whitener:
    """Lower Cholesky factor ``C`` of the damped covariance ``H_l = H + lam I = C C^T``."""

    C: torch.Tensor  # [n, n], lower triangular
    damp: float  # relative damping actually used: lam = damp * mean(diag(H))
    escalations: int  # how many times damping had to be raised for Cholesky to succeed

    def diagnostics(self) -> dict[str, float | int]:
        """What the record keeps per layer about the whitening."""
        return {"damp": self.damp, "damp_escalations": self.escalations}

    def right_inv_T(self, M: torch.Tensor) -> torch.Tensor:
        """``M C^{-T}`` (whitening from the right), by a triangular solve."""
        return torch.linalg.solve_triangular(self.C.mT, M, upper=True, left=False)

    def right_inv(self, M: torch.Tensor) -> torch.Tensor:
        """``M C^{-1}`` (undoing the whitening), by a triangular solve."""
        return torch.linalg.solve_triangular(self.C, M, upper=False, left=False)


def check_damping(damp: float, max_damp: float) -> None:
    """Constructor-time check of a whitening method's damping hyper-parameters."""
    if not 0.0 <= damp <= max_damp:
        raise ValueError(f"need 0 <= method.damp <= method.max_damp; got {damp}, {max_damp}")


def damped_cholesky(H: torch.Tensor, damp: float = 0.0, *, max_damp: float = 1.0,
                    growth: float = 10.0, floor: float = 1e-8) -> Whitener:
    """Cholesky of ``H + lam I`` with ``lam = damp * mean(diag(H))`` (relative damping,
    so the scale of ``H`` never changes a solution).

    If the factorisation fails (``H`` from fp32 accumulation can be indefinite by
    rounding: the embedded SmolLM2 has condition numbers near 1e9), the relative
    damping is raised geometrically (from ``floor`` when ``damp`` is 0) up to
    ``max_damp``; the number of escalations is returned for the record.
    """
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise FactorizationError(f"H must be square, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise FactorizationError("H contains non-finite values; check the calibration activations")
    H = 0.5 * (H + H.mT)
    scale = H.diagonal().mean()
    if not scale > 0:
        raise FactorizationError(f"H has non-positive mean diagonal ({float(scale):.3e}): no input energy to whiten")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    d, escalations = float(damp), 0
    while True:
        Hl = H + (d * scale) * eye if d > 0 else H
        C, info = torch.linalg.cholesky_ex(Hl)
        if int(info) == 0 and torch.isfinite(C).all():
            return Whitener(C=C, damp=d, escalations=escalations)
        nxt = max(d * growth, floor)
        if nxt > max_damp:
            raise FactorizationError(
                f"Cholesky of H failed even with relative damping {d:.1e} (max_damp={max_damp}); "
                "the statistics are degenerate (too few calibration tokens, or dead inputs)"
            )
        d, escalations = nxt, escalations + 1


@dataclass(frozen=True)
class TruncatedSVD:
    U: torch.Tensor  # [m, r]
    S: torch.Tensor  # [r]
    Vh: torch.Tensor  # [r, n]
    energy_total: float  # sum of all squared singular values
    energy_kept: float  # sum of the top-r squared singular values

    @property
    def retained_energy_ratio(self) -> float:
        return self.energy_kept / self.energy_total if self.energy_total > 0 else 1.0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = U_r S_r^{1/2}``, ``B = S_r^{1/2} V_r^T`` (balanced split, Eq. 12)."""
        root = self.S.sqrt()
        return self.U * root, root[:, None] * self.Vh


def truncated_svd(G: torch.Tensor, rank: int) -> TruncatedSVD:
    """Exact SVD (``torch.linalg.svd``) truncated to ``rank``."""
    if not torch.isfinite(G).all():
        raise FactorizationError("matrix to decompose contains non-finite values")
    try:
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    except RuntimeError as exc:  # LAPACK non-convergence
        raise FactorizationError(f"SVD did not converge for a {tuple(G.shape)} matrix: {exc}") from exc
    if rank > S.numel():
        raise FactorizationError(f"rank {rank} exceeds min(m, n) = {S.numel()}")
    sq = S.square()
    return TruncatedSVD(U=U[:, :rank], S=S[:rank], Vh=Vh[:rank], energy_total=float(sq.sum()),
                        energy_kept=float(sq[:rank].sum()))


def check_finite(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise FactorizationError(f"{name} has non-finite entries")
