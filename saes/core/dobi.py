"""Dobi-SVD's maths (Wang et al., ICLR 2025, arXiv 2502.02723), as pure functions on tensors.

Restated from the paper and its public code (``wangqinsi1/Dobi-SVD``: ``modules/stable_svd.py``,
``svd_trainer.py``, ``weight_updater.py``; ``docs``: ``../shared/papers/dobi-svd-notes.md``); no code copied.

Stage 1 truncates a projection's OUTPUT ACTIVATION ``A = x W^T`` (``[L, m]``, one sequence) at a learnable,
continuous position ``gamma``: with the top-``q`` singular triplets of ``A`` (``q = floor(gamma) + 5``, a
randomized SVD with 2 power iterations),

    A_hat = U diag(S * T) V^T,     T_i = 0.5 tanh(beta (gamma - i)) + 0.5,   i = 1..q,   beta = 10,

so ``gamma`` receives a gradient through the mask ``T``; the SVD's own backward (to the activations upstream)
is the thin-SVD backward with its guard against ties and zeros (:func:`svd_backward`). The loss is
``exp(NLL) + lambda |kept(k) - target| + sum(relu(-gamma)^2 + relu(gamma - gamma_max)^2)`` with
``kept(k) = sum_l min(k_l (m_l + n_l), m_l n_l) / sum_l m_l n_l`` and the weight rank ``k_l = RR_l gamma_l``
(:func:`kept_fraction`). Adam follows a cosine schedule (:func:`cosine_lr`).

Stage 2 projects each weight onto the output subspace its truncated activations span:
``W_new = V V^T W`` with ``V`` the top-``k`` principal directions of the per-sequence right singular vectors
(:func:`principal_subspace`), i.e. the factors ``A = V``, ``B = V^T W`` (:func:`pca_factors`).

Where this departs from the authors' code (said again in the README): the SVD forward is exact
(``torch.linalg.svd``) when ``q`` reaches the activation's smaller dimension, and the randomized one draws from an
explicit seeded generator (a resumed training repeats the same draws); the PCA is the exact eigenbasis of the
second moment of all collected vectors, uncentred by default (sign-invariant: a singular vector and its negative
are the same direction; the code's scikit-learn incremental PCA centres them), ``centre=True`` centres it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BETA = 10.0  # the mask's steepness, the code's default


def tanh_mask(gamma: torch.Tensor, q: int, beta: float = BETA) -> torch.Tensor:
    """``T_i = 0.5 tanh(beta (gamma - i)) + 0.5`` for ``i = 1..q`` (dtype and device of ``gamma``)."""
    i = torch.arange(1, q + 1, dtype=gamma.dtype, device=gamma.device)
    return 0.5 * torch.tanh(beta * (gamma - i)) + 0.5


@dataclass(frozen=True)
class SVDGuard:
    """The code's protection of the SVD backward (``stable_svd.py``): singular values clamped at ``eps``; a pair
    within ``close`` of each other takes the first ``terms`` terms of the geometric series of
    ``1 / (s_c^2 - s_r^2)`` instead of the quotient (``terms / s^2`` for an exact tie), and a pair of clamped
    zeros the constant ``zero_pair``. Values are the code's."""
    eps: float = 1e-10
    close: float = 1e-10
    terms: int = 11
    zero_pair: float = 100.0


def pair_factors(S: torch.Tensor, guard: SVDGuard | None) -> torch.Tensor:
    """``E[r, c] = 1 / (s_c^2 - s_r^2)`` off the diagonal (0 on it); guarded as :class:`SVDGuard` says, or plain
    (``inf`` at ties) when ``guard`` is None. Antisymmetric: the lower triangle is computed, the upper is minus
    its transpose."""
    q = S.shape[0]
    lower = torch.ones(q, q, dtype=torch.bool, device=S.device).tril(-1)
    if guard is None:
        b, a = S[None, :], S[:, None]  # b = s_c (column), a = s_r (row)
        low = 1.0 / ((b - a) * (b + a))
    else:
        s = S.clamp_min(guard.eps)
        b, a = s[None, :], s[:, None]
        diff = (b - a).abs()
        general = 1.0 / torch.where(diff > 0, (b - a) * (b + a), torch.ones_like(diff))
        r2 = (a / b) ** 2
        series = (1 - r2 ** guard.terms) / torch.where(r2 != 1, 1 - r2, torch.ones_like(r2)) / b ** 2
        tie = diff == 0
        zero = tie & (a <= guard.eps)
        low = torch.where(zero, torch.full_like(b.expand(q, q), guard.zero_pair),
                          torch.where(tie, guard.terms / b ** 2,
                                      torch.where(diff <= guard.close, series, general)))
    low = torch.where(lower, low, torch.zeros_like(low))
    return low - low.T


def svd_backward(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, gU: torch.Tensor, gS: torch.Tensor,
                 gV: torch.Tensor, guard: SVDGuard | None = SVDGuard()) -> torch.Tensor:
    """Gradient of ``A`` (``[L, m]``) from those of its thin SVD ``A = U diag(S) V^T`` (``U: [L, q]``,
    ``V: [m, q]``), the standard formula (e.g. Townsend 2016; PyTorch's ``svd_backward``):

        gA = U (skew(U^T gU) * E S + S skew(V^T gV) * E + diag(gS)) V^T
             + (I - U U^T) gU S^-1 V^T + U S^-1 gV^T (I - V V^T),   skew(X) = X - X^T,

    with ``E`` of :func:`pair_factors` and ``S^-1`` of the clamped values under ``guard`` (None: plain)."""
    E = pair_factors(S, guard)
    Sinv = 1.0 / (S if guard is None else S.clamp_min(guard.eps))
    J = (U.T @ gU - gU.T @ U) * E
    K = (V.T @ gV - gV.T @ V) * E
    core = J * S[None, :] + S[:, None] * K + torch.diag(gS)
    gUS = gU * Sinv[None, :]
    gVS = gV * Sinv[None, :]
    return U @ core @ V.T + (gUS - U @ (U.T @ gUS)) @ V.T + U @ (gVS - V @ (V.T @ gVS)).T


def top_svd(A: torch.Tensor, q: int, niter: int = 2, generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``q`` singular triplets ``(U [L, q], S [q], V [m, q])`` of ``A``: exact (``torch.linalg.svd``) when
    ``q`` reaches ``min(L, m)``, else the randomized range finder with ``niter`` power iterations
    (Halko et al. 2011, Alg. 4.4; ``torch.svd_lowrank``'s scheme) drawing from ``generator``."""
    L, m = A.shape
    if q >= min(L, m):
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return U[:, :q], S[:q], Vh[:q].T
    G = torch.randn(m, q, generator=generator, dtype=A.dtype, device="cpu").to(A.device)
    Q = torch.linalg.qr(A @ G).Q
    for _ in range(niter):
        Q = torch.linalg.qr(A.T @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ A, full_matrices=False)
    return Q @ Ub, S, Vh.T


class _GuardedSVD(torch.autograd.Function):
    """Forward: :func:`top_svd`; backward: :func:`svd_backward` as if the triplets were the exact thin SVD (the
    code's ``stable_lowrank_SVD``)."""

    @staticmethod
    def forward(ctx, A, q, niter, generator, guard):  # type: ignore[override]
        U, S, V = top_svd(A.detach(), q, niter, generator)
        ctx.save_for_backward(U, S, V)
        ctx.guard = guard
        return U, S, V

    @staticmethod
    def backward(ctx, gU, gS, gV):  # type: ignore[override]
        U, S, V = ctx.saved_tensors
        return svd_backward(U, S, V, gU, gS, gV, ctx.guard), None, None, None, None


def guarded_svd(A: torch.Tensor, q: int, niter: int = 2, generator: torch.Generator | None = None,
                guard: SVDGuard | None = SVDGuard()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`top_svd` with the guarded backward (``guard=None``: the plain formula)."""
    return _GuardedSVD.apply(A, q, niter, generator, guard)


def truncate_activation(A: torch.Tensor, gamma: torch.Tensor, beta: float = BETA, niter: int = 2,
                        generator: torch.Generator | None = None, guard: SVDGuard | None = SVDGuard(),
                        extra: int = 5) -> torch.Tensor:
    """``U diag(S T) V^T`` of one sequence's activation ``A: [L, m]`` at the continuous position ``gamma``:
    ``q = min(L, m, max(1, floor(gamma) + extra))`` triplets, the mask at ``gamma`` clamped to ``[1, q]``."""
    q = min(min(A.shape), max(1, int(math.floor(float(gamma.detach()))) + extra))
    U, S, V = guarded_svd(A, q, niter, generator, guard)
    T = tanh_mask(gamma.clamp(1.0, float(q)).to(S), q, beta)  # gamma may live elsewhere (the CPU)
    return (U * (S * T)[None, :]) @ V.T


def kept_fraction(k: torch.Tensor, m: torch.Tensor, n: torch.Tensor, remap: bool = False) -> torch.Tensor:
    """``sum_l min(k_l c_l, m_l n_l) / sum_l m_l n_l`` with ``c = m + n`` (parameters) or ``max(m, n)`` (the
    code's remapped storage): the fraction of the projections' parameters a (continuous) plan keeps."""
    c = torch.maximum(m, n) if remap else m + n
    return torch.minimum(k * c, m * n).sum() / (m * n).sum()


def range_penalty(gamma: torch.Tensor, gamma_max: torch.Tensor) -> torch.Tensor:
    """``sum_l relu(-gamma_l)^2 + relu(gamma_l - gamma_max_l)^2`` (the code's upper end is ``L``)."""
    return (torch.relu(-gamma) ** 2 + torch.relu(gamma - gamma_max) ** 2).sum()


def cosine_lr(step: int, period: int, lr: float, min_lr: float) -> float:
    """The code's ``CosineAnnealingLR(T_max=period, eta_min=min_lr)`` in closed form, stepped once per optimiser
    step: ``lr`` at step 0, ``min_lr`` at ``period`` (one epoch), back to ``lr`` at ``2 period``."""
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * step / period)) / 2


def principal_subspace(moment: torch.Tensor, k: int, total: torch.Tensor | None = None, count: int = 0
                       ) -> torch.Tensor:
    """``V [m, k]``: the top-``k`` eigenvectors of the second moment ``sum_i v_i v_i^T`` of the collected
    vectors (uncentred), or of their covariance when ``total = sum_i v_i`` and ``count`` are given (centred,
    as scikit-learn's PCA). Exact: the eigendecomposition of the accumulated moment, in its dtype."""
    C = moment if total is None else moment - torch.outer(total, total) / max(count, 1)
    C = (C + C.T) / 2
    _, vecs = torch.linalg.eigh(C)
    return vecs[:, -k:].flip(1)


def pca_factors(W: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B) = (V, V^T W)``: ``A B = V V^T W``, the stage-2 update as a rank-``k`` factorisation."""
    return V, V.T @ W


def remap_bytes(m: int, n: int, k: int) -> int:
    """Bytes the code's remapping (stage 3) stores for ``k`` triplets of an ``[m, n]`` weight: per triplet the
    first ``min(m, n)`` entries of both vectors in 8 bits, the other ``max - min`` in 16 bits, and one fp32 absmax
    per vector: ``k (2 max(m, n) + 8)``. Storage only: the factors are dequantised to 16 bits on load."""
    return k * (2 * max(m, n) + 8)
