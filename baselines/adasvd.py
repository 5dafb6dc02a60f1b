"""AdaSVD (Li et al. 2025, arXiv 2502.01403): adaComp (alternating factor refit) + adaCR (layer ratios).

Sources, and what each settles (``../shared/papers/baselines-notes.md``, read 2026-11-29)
---------------------------------------------------------------------------------------
The paper's method section is still unreadable from this workplace (its stored copies hold the abstract
and the start of the introduction). Two sources now show the details:

* the overview figure of the authors' README (ZHITENGLI/AdaSVD, ``figs/overview.png``; its formulas are
  readable): the U-step, the V-step ``V_k^T = U_k^+ W`` and adaCR's ``CR = mrr + I_n (trr - mrr)`` with
  ``I`` the similarity of a block's input and output, normalised ``I_n = I / mean(I)``;
* the same group's code that reuses the update (XIANGLONGYAN/ReCalKV, ``from_linear_adasvd``): the same
  V-step without activations, one iteration by default.

Verified (both sources agree): the V-step ``B = A^+ W`` (``method.adacomp=published``, the default) and
one iteration (``method.iters=1``, the default). A reading (the figure alone): the sign of adaCR's
importance, ``I = cos`` (a block whose output is more similar to its input keeps MORE parameters;
``method.importance=cos``, the default). Two reviews note that this V-step does not minimise the stated
loss; that is what the sources do, and what the default does.

Our first implementation, written without these sources, stays as named variants and as the records
made with it (their keys are unchanged: ``saes.runs.records`` hashes these two keys as absent when they
hold the first implementation's values): ``method.adacomp=activations`` (the V-step also a least-squares
fit on the calibration statistics), ``method.importance=one_minus_cos`` (ShortGPT's Block Influence: the
opposite ordering), ``method.iters=3``.

adaComp
-------
SVD-LLM's whitened truncation ``W ~ U V^T`` (the singular values split over both factors) is refined by
alternately re-solving the factors. With the engine's statistics ``H = X X^T / N`` and
``Delta = (X^f - X) X^T / N`` (so ``X^f X^T / N = H + Delta``), the U-step minimises

    ||W X^f - A B X||_F^2 / N + lam ||W - A B||_F^2,     lam = damp * mean(diag(H)),

i.e. the layer's output on the inputs ``X`` of the compressed model is fitted to the original output,
plus a ridge towards ``W``. With ``H_l = H + lam I = C C^T`` (Cholesky), ``Bt = B C``, ``S = W C`` and
``G = W (H_l + Delta) C^{-T}`` (``= S + D`` of ``saes.saes.whitened_targets``) it equals
``||A Bt - G||_F^2`` plus a constant:

    U-step:  A  = G Bt^T (Bt Bt^T)^{-1}
    V-step:  published:   B = A^+ W, i.e. Bt = A^+ S        activations:  Bt = A^+ G,  B = Bt C^{-1}

The ``activations`` V-step is the exact minimiser in its factor, so that variant never increases the
objective; the published one fits the weight instead. Both are computed through orthonormal bases
(``A Bt = G P_row(Bt)``, resp. ``P_col(A) S`` or ``P_col(A) G``).

What the ``activations`` variant makes of adaComp. On one fixed ``G`` the alternation is block subspace
(orthogonal) iteration: it converges to the top-``r`` SVD of ``G``, the closed-form optimum
of the same objective (CEALC at ``beta = 1`` in ``saes.saes``). ``iters`` therefore interpolates
between the whitened truncation (``iters = 0``) and pure alignment with the FP output.

Stream: ``compressed``. On the FP stream ``Delta = 0``, ``G = W C``, and the initial whitened
truncation is already its Eckart-Young optimum: adaComp provably changes nothing (the
diagnostics show it; ``calib.propagate=fp`` is therefore the "no adaComp" ablation). The paper
builds on SVD-LLM's code, whose update stage feeds each layer the inputs of the already
compressed upstream [unverified that AdaSVD keeps that stage]; that, and the fact that its
reported adaComp gains are impossible on the whitening's own statistics, fix the stream.
Because the engine keeps one stream's ``H`` per site, the initial whitening uses the
compressed-stream ``H`` (SVD-LLM profiles the FP model); ``baselines/svdllm.py``'s update
variant makes the same choice.

Calibration schedule. To fit GPU memory the paper groups the calibration samples into buckets
and averages the samples inside a bucket ("stack-of-batch") before the least-squares updates
[unverified details]. That cannot be expressed with the streamed Gram statistics: the Gram of
an average of ``k`` sequences, ``(1/k^2) sum_i sum_j X_i X_j^T``, needs the cross-sample
products ``X_i X_j^T`` (``i != j``) that ``H = sum_i X_i X_i^T`` does not keep, and feeding
different buckets to different iterations would need per-bucket statistics. Every update here
uses the full statistics (every token, equal weight): the least-squares problem the bucketing
stands in for under a memory limit.

adaCR
-----
The layer ratios are the shared allocator ``method.rank_alloc=adacr`` (:mod:`saes.engine.allocators`, where
its formula and our choices are written), AdaSVD's default here; any other method can take it too.

Diagnostics per projection: ``calib_err_before`` / ``calib_err_after`` = ``||A Bt - G||_F /
||G||_F`` before and after adaComp. With ``damp = 0`` this is ``||(A B - M) X||_F / ||M X||_F``,
``M = W (H + Delta) H^{-1}`` the best unconstrained map: the calibration error
``||W X^f - A B X||_F`` above its irreducible part ``||W X^f - M X||_F`` (Pythagoras), relative.
Also ``adacomp_iters``, ``rer`` (retained energy of the initial truncation), the damping used,
and, with adaCR, ``layer_importance`` and ``layer_ratio`` of the projection's block.

Choices the paper leaves open (ours)
------------------------------------
* ``damp = 0.01`` (relative ridge, escalated like every whitening here when Cholesky fails).
  The U-step multiplies by ``H_l^{-1}``; the undamped inverse of SmolLM2's covariances
  (condition numbers near 1e9) amplifies ``Delta``. 0.01 is also the damping this project
  measured best for the same alignment objective (CEALC, docs/method.md).
* ``iters``: one iteration is one U-step then one V-step; ``iters = 0`` is adaCR alone on the whitened
  truncation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import torch

from saes.core.linalg import check_damping, check_finite, damped_cholesky, truncated_svd
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats
from saes.saes import whitened_targets

ADACOMP = ("published", "activations")  # V-step: B = U^+ W (README figure, ReCalKV code) | least squares on X


# --------------------------------------------------------------------------- adaComp
def als_steps(G: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
              G_v: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Alternating least squares for ``min ||A Bt - G||_F``: yields ``(A, Bt)`` after every half-step.

    U-step first (``A`` re-solved for the row space of ``Bt``), then V-step (``Bt`` for the
    column space of ``A``), forever; the caller takes as many steps as it wants. ``G_v``: the V-step's
    target when it is not ``G`` (the published V-step ``B = A^+ W`` is ``Bt = A^+ S``, ``S = W C``).
    """
    G_v = G if G_v is None else G_v
    while True:
        Qb = torch.linalg.qr(Bt.mT).Q.mT  # [r, n], orthonormal rows spanning Bt's row space
        A, Bt = G @ Qb.mT, Qb
        yield A, Bt
        Qa = torch.linalg.qr(A).Q  # [m, r]
        A, Bt = Qa, Qa.mT @ G_v
        yield A, Bt


def balance(A: torch.Tensor, Bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product ``A Bt`` split as ``U s^{1/2}``, ``s^{1/2} V^T`` (the whitened truncation's split)."""
    Qa, Ra = torch.linalg.qr(A)
    Qb, Rb = torch.linalg.qr(Bt.mT)
    u, s, vh = torch.linalg.svd(Ra @ Rb.mT)
    root = s.sqrt()
    return Qa @ (u * root), (root[:, None] * vh) @ Qb.mT


def residual(G: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor) -> float:
    """``||A Bt - G||_F``: the calibration error above its irreducible part (module docstring)."""
    return float(torch.linalg.matrix_norm(A @ Bt - G))


@dataclass(frozen=True)
class AdaComp:
    A: torch.Tensor  # [m, r]
    Bt: torch.Tensor  # [r, n], whitened right factor: B = Bt C^{-1}
    errors: list[float]  # residual() before and after every half-step (2 * iters + 1 values)


def adacomp(G: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, iters: int,
            G_v: torch.Tensor | None = None) -> AdaComp:
    """``iters`` U-then-V iterations of :func:`als_steps` from ``(A, Bt)``; returns balanced factors."""
    errors = [residual(G, A, Bt)]
    for A, Bt in islice(als_steps(G, A, Bt, G_v), 2 * iters):
        errors.append(residual(G, A, Bt))
    if iters:
        A, Bt = balance(A, Bt)
    return AdaComp(A, Bt, errors)


# ---------------------------------------------------------------------------- method
class AdaSVD(Method):
    """AdaSVD: whitened truncation refined by adaComp, ranks from adaCR (module docstring)."""

    needs = frozenset({"H", "Delta"})
    stream = "compressed"

    def __init__(self, name: str = "adasvd", iters: int = 3, damp: float = 0.01, max_damp: float = 1.0,
                 adacomp: str = "activations", compute_dtype: str = "float64") -> None:
        super().__init__(name, compute_dtype)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"method.iters (adaComp iterations) must be an int >= 0; got {iters!r}")
        check_damping(damp, max_damp)
        if adacomp not in ADACOMP:
            raise ValueError(f"method.adacomp must be one of {ADACOMP}; got {adacomp!r}")
        self.adacomp = adacomp
        self.iters, self.damp, self.max_damp = iters, float(damp), float(max_damp)

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        wh = damped_cholesky(stats.H, self.damp, max_damp=self.max_damp)
        S, D = whitened_targets(W, wh, stats.Delta)  # S = W C, D = W Delta C^{-T}
        G = S if D is None else S + D
        svd = truncated_svd(S, rank)  # SVD-LLM's whitened truncation: the starting point
        A0, Bt0 = svd.factors()
        comp = adacomp(G, A0, Bt0, self.iters, S if self.adacomp == "published" else None)
        B = wh.right_inv(comp.Bt)
        check_finite(A=comp.A, B=B)
        scale = float(torch.linalg.matrix_norm(G)) or 1.0
        diag: dict[str, float | int | None] = {
            **wh.diagnostics(), "rer": svd.retained_energy_ratio, "adacomp_iters": self.iters,
            "calib_err_before": comp.errors[0] / scale, "calib_err_after": comp.errors[-1] / scale,
        }
        return Factors(comp.A, B, diag)
