"""Streaming second-order statistics per input site (Algorithm 1, without storing activations).

Rows are tokens here: ``x: [N, n]``. In the paper's column layout ``X = x^T``, so
``H = X X^T = x^T x`` and ``Delta = (X^f - X) X^T = (x^f - x)^T x``. Sums are
normalised by the token count ``N`` at the end; the normalisation changes no
solution because damping is relative (method spec). The paper's running
reweighting by ``sqrt(2/n)`` is the same estimator up to the factor 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saes.core.linalg import all_finite


class StatisticsError(RuntimeError):
    """Statistics are missing, empty or non-finite."""


@dataclass(frozen=True)
class SiteStats:
    """Normalised statistics of one input site (shared by e.g. q, k, v)."""

    tokens: int
    H: torch.Tensor | None = None  # [n, n] = X X^T / N on the method's stream
    Delta: torch.Tensor | None = None  # [n, n] = (X^f - X) X^T / N
    absmean: torch.Tensor | None = None  # [n] = mean over tokens of |x_j| (ASVD's scaling)
    mean: torch.Tensor | None = None  # [n] = mean over tokens of x_j (FLAP's bias compensation)
    var: torch.Tensor | None = None  # [n] = population variance over tokens of x_j (FLAP's fluctuation)

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> "SiteStats":
        cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
        return SiteStats(tokens=self.tokens, H=cast(self.H), Delta=cast(self.Delta), absmean=cast(self.absmean),
                         mean=cast(self.mean), var=cast(self.var))

    @property
    def sqnorm(self) -> torch.Tensor:
        """``||X_j||^2 / N`` per channel (Wanda's activation norm, squared and per token), from ``mean`` and ``var``."""
        if self.mean is None or self.var is None:
            raise StatisticsError("the channel norms need the statistics mean and var")
        return self.var + self.mean**2


def block_rows(n: int) -> list[tuple[int, int]]:
    """The block rows ``[lo, hi)`` in which ``H`` (``n x n``) is accumulated: only the upper block triangle is
    computed, ``(k + 1) / 2k`` of the full product's flops for ``k`` rows, each wide enough (about 384
    columns) to keep the products efficient; tiny sites use one block."""
    k = max(2, min(8, n // 384)) if n >= 256 else 1
    edges = [round(i * n / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


class StreamingStats:
    """Accumulates the statistics in ``needs`` (``H``, ``Delta``, ``absmean``, ``mean``, ``var``) batch by batch.

    ``mean`` and ``var`` (per channel) are merged batch by batch with Chan et al.'s pairwise update (the batch's
    own mean and centred sum of squares, then combined), in float64 whatever ``dtype``: a variance taken as
    ``E[x^2] - E[x]^2`` in float32 loses its digits on channels whose mean dwarfs their spread."""

    KNOWN = frozenset({"H", "Delta", "absmean", "mean", "var"})

    def __init__(self, n: int, needs: frozenset[str] | set[str], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        unknown = set(needs) - self.KNOWN
        if unknown:
            raise StatisticsError(f"unknown statistics {sorted(unknown)}; known: {sorted(self.KNOWN)}")
        self.n, self.dtype, self.device, self.tokens = n, dtype, torch.device(device), 0
        zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self._H = zeros(n, n) if "H" in needs else None
        self._D = zeros(n, n) if "Delta" in needs else None
        self._abs = zeros(n) if "absmean" in needs else None
        moments = bool({"mean", "var"} & set(needs))
        self._mean = torch.zeros(n, dtype=torch.float64, device=device) if moments else None
        self._m2 = torch.zeros(n, dtype=torch.float64, device=device) if moments else None  # centred sum of squares
        self._slabs = block_rows(n)

    def update(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        """Add a batch: ``x`` on the method's stream, ``x_fp`` on the FP stream (for Delta)."""
        x = x.reshape(-1, self.n).to(device=self.device, dtype=self.dtype)  # (N, n)
        if self._H is not None:
            for lo, hi in self._slabs:  # the upper block triangle of x^T x, by block rows (symmetry: ~40 % fewer flops)
                self._H[lo:hi, lo:].addmm_(x[:, lo:hi].mT, x[:, lo:])
        if self._D is not None:
            if x_fp is None:
                raise StatisticsError("Delta needs the FP-stream input of the same tokens")
            dx = x_fp.reshape(-1, self.n).to(device=self.device, dtype=self.dtype) - x
            self._D.addmm_(dx.mT, x)
        if self._abs is not None:
            self._abs += x.abs().sum(0)
        if self._mean is not None and self._m2 is not None:
            xd = x.double()
            k, t = x.shape[0], self.tokens
            mean_b = xd.mean(0)
            delta = mean_b - self._mean
            self._m2 += ((xd - mean_b) ** 2).sum(0) + delta**2 * (t * k / (t + k))
            self._mean += delta * (k / (t + k))
        self.tokens += x.shape[0]

    def finalize(self, where: str = "") -> SiteStats:
        if self.tokens == 0:
            raise StatisticsError(f"no tokens reached input site {where}")
        H = None
        if self._H is not None:  # mirror the upper off-diagonal blocks into the lower ones
            H = self._H.clone()
            for lo, hi in self._slabs:
                H[hi:, lo:hi] = H[lo:hi, hi:].mT
        out = {name: None if t is None else t / self.tokens
               for name, t in (("H", H), ("Delta", self._D), ("absmean", self._abs), ("var", self._m2))}
        out["mean"] = None if self._mean is None else self._mean.clone()
        for name, t in out.items():
            if t is not None and not all_finite(t):
                raise StatisticsError(
                    f"{name} at {where} has non-finite entries (activations overflowed); "
                    "use calib.stats_dtype=float64 or a higher model.dtype"
                )
        return SiteStats(tokens=self.tokens, **out)
