"""SAES-SVD: CEALC (Eqs. 3-12) and ACES (Eqs. 13-19, Appendix A.3, Algorithm 3).

Notation follows the paper and ``shared/design/method-spec.md``. With the damped
covariance ``H_l = H + lam I = C C^T`` (Cholesky):

    CEALC:  G(beta) = W (H_l + beta Delta) C^{-T};  [U_r, S_r, V_r] = top-r SVD of G
            A = U_r S_r^{1/2},  B = S_r^{1/2} V_r^T C^{-1}
    ACES:   S = W H_l C^{-T}, D = W Delta C^{-T}, G(beta) = S + beta D; freeze the top-r
            subspace of S and minimise the fixed-subspace surrogate of the tail ratio
            (a + 2b beta + c beta^2) / (A + 2B beta + C beta^2)  (or the tail energy).

Any square root of ``H_l`` gives the same product ``AB``; the damped ``H_l`` is used
in the target too, so ``beta = 0`` is exactly SVD-LLM's truncation-aware whitening.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from saes.core.linalg import TruncatedSVD, Whitener, check_damping, check_finite, damped_cholesky, truncated_svd
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats

Objective = Literal["ratio", "energy"]


# ----------------------------------------------------------------------------- CEALC
def whitened_targets(W: torch.Tensor, wh: Whitener,
                     Delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eq. 13: ``S = W H_l C^{-T}`` and ``D = W Delta C^{-T}``, so that ``G(beta) = S + beta D``.

    ``H_l C^{-T} = C C^T C^{-T} = C``, so ``S = W C`` needs no solve.
    """
    S = W @ wh.C
    D = None if Delta is None else wh.right_inv_T(W @ Delta)
    return S, D


def factor_target(G: torch.Tensor, wh: Whitener, rank: int) -> tuple[torch.Tensor, torch.Tensor, TruncatedSVD]:
    """Eqs. 11-12: ``[U_r, S_r, V_r] = top-r SVD of G``, ``A = U_r S_r^{1/2}``, ``B = S_r^{1/2} V_r^T C^{-1}``."""
    svd = truncated_svd(G, rank)
    A, B = svd.factors()
    B = wh.right_inv(B)
    check_finite(A=A, B=B)
    return A, B, svd


def cealc_factors(W: torch.Tensor, H: torch.Tensor, Delta: torch.Tensor | None, rank: int,
                  beta: float, damp: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form minimiser of ``||(AB - W) X||^2 + alpha ||AB X - W X^f||^2`` over rank-``rank`` ``AB``.

    ``H = X X^T``, ``Delta = (X^f - X) X^T`` (any common normalisation), ``beta = alpha / (1 + alpha)``.
    Returns ``A: [m, rank]``, ``B: [rank, n]`` in ``W``'s dtype; computed in float64.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (beta = alpha/(1+alpha)); got {beta}")
    dt = W.dtype
    W64 = W.double()
    wh = damped_cholesky(H.double(), damp)
    S, D = whitened_targets(W64, wh, None if Delta is None or beta == 0.0 else Delta.double())
    A, B, _ = factor_target(S if D is None else S + beta * D, wh, rank)
    return A.to(dt), B.to(dt)


# ------------------------------------------------------------------------------ ACES
@dataclass(frozen=True)
class AcesCoefficients:
    """Eq. 18: fixed-subspace energies of ``S_perp + beta D_perp`` and ``S + beta D``."""

    a: float
    b: float
    c: float
    A: float
    B: float
    C: float
    gap: float = math.inf  # s_r / s_{r+1} of S: how clearly the fixed subspace stands out (a diagnostic)

    def surrogate(self, beta: float, objective: Objective) -> float:
        tail = self.a + 2 * self.b * beta + self.c * beta * beta
        if objective == "energy":
            return tail
        total = self.A + 2 * self.B * beta + self.C * beta * beta
        return tail / total if total > 0 else math.inf

    def stationary_points(self, objective: Objective) -> list[float]:
        if objective == "energy":  # d/dbeta (a + 2b beta + c beta^2) = 0
            return [-self.b / self.c] if self.c > 0 else []
        # Eq. 19: (cB - bC) beta^2 + (cA - aC) beta + (bA - aB) = 0
        q2 = self.c * self.B - self.b * self.C
        q1 = self.c * self.A - self.a * self.C
        q0 = self.b * self.A - self.a * self.B
        scale = max(abs(q2), abs(q1), abs(q0))
        if scale == 0:
            return []
        q2, q1, q0 = q2 / scale, q1 / scale, q0 / scale
        if abs(q2) < 1e-14:
            return [-q0 / q1] if abs(q1) > 1e-14 else []
        disc = q1 * q1 - 4 * q2 * q0
        if disc < 0:
            return []
        r = math.sqrt(disc)
        return [(-q1 - r) / (2 * q2), (-q1 + r) / (2 * q2)]


def aces_coefficients(S: torch.Tensor, D: torch.Tensor, rank: int) -> AcesCoefficients:
    """Eq. 18 for ``G(beta) = S + beta D`` (whitened, Eq. 13), in the top-``rank`` subspace of ``S``."""
    svd = truncated_svd(S, rank)  # the one extra SVD of ACES

    def perp(X: torch.Tensor) -> torch.Tensor:  # P_L X P_R without forming the m x m / n x n projectors
        X = X - svd.U @ (svd.U.mT @ X)
        return X - (X @ svd.Vh.mT) @ svd.Vh

    Sp, Dp = perp(S), perp(D)
    dot = lambda X, Y: float((X * Y).sum())  # noqa: E731
    gap = float(svd.S[-1]) / svd.next_sigma if svd.next_sigma > 0 else math.inf
    return AcesCoefficients(a=dot(Sp, Sp), b=dot(Sp, Dp), c=dot(Dp, Dp), A=dot(S, S), B=dot(S, D), C=dot(D, D),
                            gap=gap)


def true_tail(svd: TruncatedSVD, objective: Objective) -> float:
    """What the surrogate estimates, exactly: the tail energy of ``G(beta)`` beyond its own top-``r`` subspace
    (``energy``), or that over its total energy (``ratio``, ``1 - RER``)."""
    tail = svd.energy_total - svd.energy_kept
    if objective == "energy":
        return tail
    return tail / svd.energy_total if svd.energy_total > 0 else 0.0


def output_error(W: torch.Tensor, AB: torch.Tensor, stats: SiteStats) -> float:
    """``||W X^f - AB X||_F^2 / N`` up to the constant ``||W X^f||^2 / N``, from the statistics alone:
    ``tr(AB H (AB)^T) - 2 tr(W (H + Delta) (AB)^T)`` (``X^f X^T = H + Delta``); only differences mean anything."""
    delta = stats.Delta if stats.Delta is not None else torch.zeros_like(stats.H)
    return float((AB @ stats.H * AB).sum() - 2 * (W @ (stats.H + delta) * AB).sum())


def best_beta(W: torch.Tensor, S: torch.Tensor, D: torch.Tensor, wh: Whitener, stats: SiteStats, rank: int,
              candidates: list[float], score: str, objective: Objective) -> tuple[float, float]:
    """The candidate beta with the lowest score (one SVD of ``G(beta) = S + beta D`` each; ties: the smaller
    beta); returns ``(beta, score)``. ``exact``: the true tail of ``G(beta)`` (what the surrogate estimates);
    ``output``: the layer's calibration output error against the FP stream with CEALC's factors at beta.
    With the surrogate's choice among the candidates, the result is never worse than it on that score."""
    def of(beta: float) -> float:
        G = S + beta * D if beta else S
        if score == "exact":
            return true_tail(truncated_svd(G, rank), objective)
        A, B, _ = factor_target(G, wh, rank)
        return output_error(W, A @ B, stats)

    value, beta = min((of(beta), beta) for beta in sorted(set(candidates)))
    return beta, value


def select_beta(coef: AcesCoefficients, beta_min: float, beta_max: float, objective: Objective,
                cap: float | None, shrink: float) -> tuple[float, float]:
    """Algorithm 3's selection with guardrails; returns ``(beta*, surrogate(beta*))``.

    Candidates are the stationary points and both interval ends; each is clipped to
    ``[beta_min, beta_max]``, capped at ``cap``, multiplied by ``shrink``; the lowest
    surrogate wins (ties go to the smaller beta, i.e. less alignment).
    """
    cands = [beta_min, beta_max, *coef.stationary_points(objective)]
    scored = []
    for beta in cands:
        beta = min(max(beta, beta_min), beta_max)
        if cap is not None:
            beta = min(beta, cap)
        beta *= shrink
        scored.append((coef.surrogate(beta, objective), beta))
    score, beta = min(scored)
    return beta, score


def _check_aces_args(beta_min: float, beta_max: float, objective: str, cap: float | None, shrink: float) -> None:
    if not 0.0 <= beta_min <= beta_max <= 1.0:
        raise ValueError(f"need 0 <= beta_min <= beta_max <= 1; got [{beta_min}, {beta_max}]")
    if objective not in ("ratio", "energy"):
        raise ValueError(f"objective must be 'ratio' or 'energy'; got {objective!r}")
    if cap is not None and not 0.0 <= cap < 1.0:
        raise ValueError(f"cap must lie in [0, 1); got {cap}")
    if not 0.0 < shrink <= 1.0:
        raise ValueError(f"shrink must lie in (0, 1]; got {shrink}")


def aces_select_beta(W: torch.Tensor, H: torch.Tensor, Delta: torch.Tensor, rank: int,
                     beta_min: float = 0.0, beta_max: float = 1.0, objective: Objective = "ratio",
                     cap: float | None = None, shrink: float = 1.0, damp: float = 0.0) -> float:
    """ACES (Algorithm 3): the beta minimising the fixed-subspace surrogate of the tail ratio."""
    _check_aces_args(beta_min, beta_max, objective, cap, shrink)
    wh = damped_cholesky(H.double(), damp)
    coef = aces_coefficients(*whitened_targets(W.double(), wh, Delta.double()), rank)
    return select_beta(coef, beta_min, beta_max, objective, cap, shrink)[0]


def alpha_to_beta(alpha: float) -> float:
    return alpha / (1.0 + alpha)


def beta_to_alpha(beta: float) -> float | None:
    """``alpha = beta / (1 - beta)``; ``None`` for beta = 1 (pure FP alignment, alpha infinite)."""
    return beta / (1.0 - beta) if beta < 1.0 else None


# ACES's beta: Algorithm 3's surrogate; the true tail on candidates (exact); the calibration output error (output)
SELECTORS = ("surrogate", "exact", "output")


# ---------------------------------------------------------------------------- method
class SAES(Method):
    """SAES-SVD. Statistics ``H`` and ``Delta`` on the compressed stream (error-propagating).

    ``aces.enabled=false`` gives CEALC with the fixed ``alpha`` (``alpha=0``: plain
    truncation-aware whitening on compressed-stream statistics, the ablation's
    "neither CEALC nor ACES"). ``aces.space`` says whether ``beta_min``/``beta_max``
    are read as beta bounds (Algorithm 3) or as alpha bounds (Table 4's labels);
    the paper's text is ambiguous, the default is beta.
    """

    needs = frozenset({"H", "Delta"})
    stream = "compressed"

    def __init__(self, name: str = "saes", alpha: float = 1.0, damp: float = 0.01, max_damp: float = 1.0,
                 aces: dict | None = None, compute_dtype: str = "float64") -> None:
        super().__init__(name, compute_dtype)
        a = dict(enabled=True, objective="ratio", space="beta", beta_min=0.25, beta_max=0.75, cap=None, shrink=1.0,
                 selector="surrogate", grid=None)
        a.update(aces or {})
        unknown = set(a) - {"enabled", "objective", "space", "beta_min", "beta_max", "cap", "shrink", "selector",
                            "grid"}
        if unknown:
            raise ValueError(f"unknown method.aces keys: {sorted(unknown)}")
        self.alpha, self.damp, self.max_damp = float(alpha), float(damp), float(max_damp)
        self.aces_enabled = bool(a["enabled"])
        self.objective: Objective = a["objective"]
        self.space = a["space"]
        self.cap = None if a["cap"] is None else float(a["cap"])
        self.shrink = float(a["shrink"])
        lo, hi = float(a["beta_min"]), float(a["beta_max"])
        if self.space == "alpha":
            if not 0.0 <= lo <= hi:
                raise ValueError(f"alpha bounds need 0 <= min <= max; got [{lo}, {hi}]")
            lo, hi = alpha_to_beta(lo), alpha_to_beta(hi)
        elif self.space != "beta":
            raise ValueError(f"method.aces.space must be 'beta' or 'alpha'; got {self.space!r}")
        self.beta_min, self.beta_max = lo, hi
        if self.alpha < 0:
            raise ValueError(f"method.alpha must be >= 0; got {self.alpha}")
        check_damping(self.damp, self.max_damp)
        if self.aces_enabled:
            _check_aces_args(self.beta_min, self.beta_max, self.objective, self.cap, self.shrink)
        self.selector = a["selector"]
        if self.selector not in SELECTORS:
            raise ValueError(f"method.aces.selector={self.selector!r}; choose one of {list(SELECTORS)}")
        grid = a["grid"]
        if grid is None:  # nine points over the selection interval
            grid = [self.beta_min + (self.beta_max - self.beta_min) * i / 8 for i in range(9)]
        self.grid = [float(b) for b in grid]
        if not all(0.0 <= b <= 1.0 for b in self.grid):
            raise ValueError(f"method.aces.grid must hold betas in [0, 1]; got {list(grid)}")

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        wh = damped_cholesky(stats.H, self.damp, max_damp=self.max_damp)
        diag: dict[str, float | int | None] = dict(wh.diagnostics())
        S, D = whitened_targets(W, wh, stats.Delta)
        if self.aces_enabled:
            coef = aces_coefficients(S, D, rank)
            beta, surrogate = select_beta(coef, self.beta_min, self.beta_max, self.objective, self.cap, self.shrink)
            diag["surrogate"] = surrogate
            diag["surrogate_beta0"] = coef.surrogate(0.0, self.objective)
            if self.selector != "surrogate":
                diag["beta_surrogate"] = beta
                beta, _ = best_beta(W, S, D, wh, stats, rank, [beta, *self.grid], self.selector, self.objective)
        else:
            beta = alpha_to_beta(self.alpha)
        A, B, svd = factor_target(S + beta * D if beta else S, wh, rank)
        diag.update(beta=beta, alpha=beta_to_alpha(beta), rer=svd.retained_energy_ratio)
        if self.aces_enabled:  # how good the surrogate was where it matters (issue: ACES examined)
            tail = true_tail(svd, self.objective)
            diag.update(gap=coef.gap, tail_true=tail, surrogate_error=coef.surrogate(beta, self.objective) - tail)
        return Factors(A, B, diag)
