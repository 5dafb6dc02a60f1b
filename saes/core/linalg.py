"""Guarded dense linear algebra shared by the whitening methods (SAES-SVD, SVD-LLM).

Everything here is exact (``torch.linalg``), never randomised, and fails loudly:
a factorisation that cannot be computed raises :class:`FactorizationError`
rather than returning a random or zero layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

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


def all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()`` without its temporaries (about 1.4 copies of ``t`` in float64: at a 70B down_proj
    that was 8.6 GB at the whitening's peak). ``aminmax`` propagates NaN and puts any infinity at an end."""
    if t.numel() == 0:
        return True
    if t.ndim >= 2 and not t.is_contiguous() and t.mT.is_contiguous():
        t = t.mT  # a column-major matrix (a Cholesky factor): aminmax would copy it to row-major first
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


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
    if not all_finite(H):
        raise FactorizationError("H contains non-finite values; check the calibration activations")
    # One n x n copy beside C (the peak of a down_proj factorisation at 7B-70B widths): symmetrise in place
    # (fp32 sums of X X^T need not be exactly symmetric) and damp its diagonal in place, from a saved copy of the
    # undamped diagonal on each escalation. Elementwise the same operations as 0.5 (H + H^T) + lam I.
    Hl = H + H.mT
    Hl.mul_(0.5)
    diag = Hl.diagonal()
    scale = diag.mean()
    base = diag.clone()
    if not scale > 0:
        raise FactorizationError(f"H has non-positive mean diagonal ({float(scale):.3e}): no input energy to whiten")
    d, escalations = float(damp), 0
    while True:
        if d > 0:
            torch.add(base, d * scale, out=diag)
        C, info = torch.linalg.cholesky_ex(Hl)
        if int(info) == 0 and all_finite(C):
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
    next_sigma: float = 0.0  # sigma_{r+1} (0 at full rank): the spectral gap at the rank is S[-1] / next_sigma

    @property
    def retained_energy_ratio(self) -> float:
        return self.energy_kept / self.energy_total if self.energy_total > 0 else 1.0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = U_r S_r^{1/2}``, ``B = S_r^{1/2} V_r^T`` (balanced split, Eq. 12)."""
        root = self.S.sqrt()
        return self.U * root, root[:, None] * self.Vh


GRAM_FLOOR = 1e-12  # smallest kept sigma_r^2 / sigma_1^2 the Gram path trusts in float64 (sigma_r / sigma_1 >= 1e-6)


def gram_floor(dtype: torch.dtype) -> float:
    """:data:`GRAM_FLOOR` scaled to ``dtype``'s precision: the same margin above rounding (about 4500 units of
    ``eps * sigma_1^2``), so float32 trusts ``sigma_r / sigma_1 >= 0.023`` and takes the full SVD below."""
    return GRAM_FLOOR * torch.finfo(dtype).eps / torch.finfo(torch.float64).eps


_FULL_SVD: ContextVar[bool] = ContextVar("full_svd", default=False)


@contextmanager
def full_svd() -> Iterator[None]:
    """Every :func:`truncated_svd` inside takes ``torch.linalg.svd`` (the reference: tests, benchmarks)."""
    token = _FULL_SVD.set(True)
    try:
        yield
    finally:
        _FULL_SVD.reset(token)


def truncated_svd(G: torch.Tensor, rank: int, gram: bool = True) -> TruncatedSVD:
    """The top-``rank`` singular triplets of ``G``, exactly (never randomised).

    By default from the eigendecomposition of the smaller Gram matrix (``G G^T`` when ``m <= n``, else
    ``G^T G``): with ``G G^T = U Sigma^2 U^T``, ``V_r^T = Sigma_r^{-1} U_r^T G``, so ``U_r Sigma_r V_r^T =
    U_r U_r^T G`` is the same projection the SVD gives. In float64 this is 2-5x faster than
    ``torch.linalg.svd`` on the projections' shapes and agrees with it to rounding while the kept spectrum
    stands clear of it: squaring the singular values costs ``sigma_r / sigma_1`` its digits below about
    ``1e-8`` (in float32, below about ``3e-4``), so when ``sigma_r^2 < gram_floor(dtype) * sigma_1^2`` (or the
    eigensolver fails) the full SVD is used instead. ``gram=False`` (or :func:`full_svd`) always takes the full
    SVD (the reference)."""
    if not all_finite(G):
        raise FactorizationError("matrix to decompose contains non-finite values")
    if rank > min(G.shape):
        raise FactorizationError(f"rank {rank} exceeds min(m, n) = {min(G.shape)}")
    if gram and not _FULL_SVD.get():
        out = _gram_svd(G, rank)
        if out is not None:
            return out
    try:
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    except RuntimeError as exc:  # LAPACK non-convergence
        raise FactorizationError(f"SVD did not converge for a {tuple(G.shape)} matrix: {exc}") from exc
    sq = S.square()
    return TruncatedSVD(U=U[:, :rank], S=S[:rank], Vh=Vh[:rank], energy_total=float(sq.sum()),
                        energy_kept=float(sq[:rank].sum()), next_sigma=float(S[rank]) if rank < len(S) else 0.0)


def _gram_svd(G: torch.Tensor, rank: int) -> TruncatedSVD | None:
    """:func:`truncated_svd` from the smaller Gram matrix, or None where that would not be exact."""
    wide = G.shape[0] <= G.shape[1]
    M = G if wide else G.mT  # [k, l] with k <= l: the Gram matrix M M^T is k x k
    try:
        lam, Q = torch.linalg.eigh(M @ M.mT)
    except RuntimeError:
        return None
    nxt = float(lam[-rank - 1].clamp(min=0).sqrt()) if rank < lam.numel() else 0.0  # sigma_{r+1}
    lam, Q = lam.flip(0)[:rank], Q.flip(1)[:, :rank]  # descending
    if not lam[-1] > gram_floor(M.dtype) * lam[0]:
        return None
    S = lam.sqrt()
    other = (Q.mT @ M) / S[:, None]  # [r, l]: the other side's singular vectors, as rows
    energy_total = float(M.square().sum())
    if wide:
        return TruncatedSVD(U=Q, S=S, Vh=other, energy_total=energy_total, energy_kept=float(lam.sum()), next_sigma=nxt)
    return TruncatedSVD(U=other.mT, S=S, Vh=Q.mT, energy_total=energy_total, energy_kept=float(lam.sum()),
                        next_sigma=nxt)


def check_finite(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not all_finite(t):
            raise FactorizationError(f"{name} has non-finite entries")
