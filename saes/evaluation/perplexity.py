"""Perplexity by the papers' protocol.

The evaluation text is joined and tokenised once; the token stream is cut into
non-overlapping windows of ``seqlen`` tokens (the last partial window dropped,
at most ``max_windows`` kept); each window is scored independently and the
perplexity is ``exp(mean token NLL)`` over all predicted tokens. (GPTQ and SVD-LLM
average per-window mean NLLs; with equal windows the two are identical.)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from saes.core.lowrank import WIDER


class NonFiniteLogits(FloatingPointError):
    """The model's logits on a window are inf or NaN: its activations overflowed (float16 ends at 65504), which
    is no perplexity. A finite NLL too large for ``exp`` is a measurement (``ppl = inf``, the NLL recorded)."""

    def __init__(self, where: str, dtype: torch.dtype) -> None:
        fix = f"; set {WIDER[dtype]}" if dtype in WIDER and dtype != torch.float32 else ""
        super().__init__(f"{where}: the logits are not finite in the model's {dtype}: its activations overflowed "
                         f"or a weight is not finite{fix}")


def model_dtype(model: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype the model computes in (its first parameter's; under offload they sit on ``meta`` with it)."""
    return next((p.dtype for p in model.parameters()), default)


@contextmanager
def finite_logits(model: nn.Module, where: str) -> Iterator[None]:
    """Every forward of ``model`` inside checks its logits (:class:`NonFiniteLogits` on a NaN or a ``+inf``), for
    evaluations that read them elsewhere: lm-eval would score NaN log-likelihoods. A ``-inf`` logit (a token a
    model masks) is allowed. One ``aminmax`` per forward: no ``[b, T, V]`` temporary. Outputs without
    ``.logits`` are not checked (lm-eval reads ``.logits``)."""
    def check(_: nn.Module, __: Any, out: Any) -> None:
        logits = getattr(out, "logits", None)
        if logits is None or logits.numel() == 0:
            return
        lo, hi = torch.aminmax(logits.detach())  # NaN propagates into both
        if bool(torch.isnan(lo) | ~torch.isfinite(hi)):
            raise NonFiniteLogits(where, model_dtype(model, logits.dtype))

    handle = model.register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    windows: int

    def as_dict(self) -> dict:
        return asdict(self)


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """``[W, seqlen]`` non-overlapping windows of a ``[L]`` stream; the partial tail is dropped."""
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


@dataclass(frozen=True)
class PplSettings:
    """The protocol of ``eval.ppl``: window length, at most this many windows, windows per forward."""
    seqlen: int
    max_windows: int | None = None
    batch_size: int = 1


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               batch_size: int = 1, device: torch.device | str = "cpu", desc: str = "ppl") -> Perplexity:
    win = windows(ids, seqlen, max_windows)
    total, count = 0.0, 0
    for start in tqdm(range(0, win.shape[0], batch_size), desc=desc, unit="batch"):
        batch = win[start:start + batch_size].to(device)  # (b, T)
        logits = model(input_ids=batch, use_cache=False).logits  # (b, T, V), the model's full vocabulary
        nll = float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"))
        if not math.isfinite(nll):
            last = start + batch.shape[0] - 1
            span = f"windows {start}..{last}" if last > start else f"window {start}"
            raise NonFiniteLogits(f"{desc}, {span}", model_dtype(model, logits.dtype))
        total += nll
        count += batch[:, 1:].numel()
    mean = total / count
    return Perplexity(ppl=math.exp(mean) if mean < 700 else math.inf, nll=mean, tokens=count, windows=win.shape[0])


def perplexities(model: nn.Module, eval_ids: dict[str, torch.Tensor], ppl: PplSettings, device: torch.device | str,
                 label: str) -> dict[str, Perplexity]:
    """:func:`perplexity` of ``model`` (already placed for ``device``) on each source's tokens."""
    out = {}
    for src, ids in eval_ids.items():
        out[src] = perplexity(model, ids, ppl.seqlen, ppl.max_windows, ppl.batch_size, device, desc=f"ppl {label} {src}")
    return out
