"""Dobi-SVD's stage 1 as its code runs it (``svd_trainer.py``), resumable: one continuous truncation position per
projection, learned through the activation-truncated model (:mod:`saes.core.dobi`).

The parameters are ``rho_l = k_l / min(m_l, n_l)`` (the weight rank as a fraction of its range) so that one Adam
learning rate moves every projection by the same fraction of its range (the code's ``lr = 5`` over its range
``L = 2048`` is 0.24% per step); ``gamma_l = rho_l min(m_l, n_l) / RR_l`` is the activation rank the mask sits at.
Per optimiser step: ``accum`` windows, each one forward and backward of ``exp(NLL) / accum``, then the
window-independent ``lambda |kept - target| + range`` once (the same gradient as the code's per-window sum divided by
``accum``, as the HF Trainer does), the gradient norm clipped at ``clip``, one Adam step at the cosine learning rate
(period: one epoch of steps).

``lam="auto"`` (our tuning rule) sets ``lambda`` from the first step's perplexity gradient: at the optimum of
``exp(NLL)`` under the budget every projection's marginal perplexity per parameter equals one multiplier
``mu / sum mn``; the median over projections of ``|d exp(NLL) / d rho_l| / c_l`` (``c_l = d kept / d rho_l``) at the
uniform start estimates ``mu``, and an L1 penalty holds the budget exactly once ``lambda > mu`` (an exact penalty),
so ``lambda = 2 x`` that median. Recorded with the run. Windows are shuffled
per epoch with a seeded generator and every randomized SVD draws from a generator seeded by (seed, epoch,
window), so a run stopped after any step and resumed from its checkpoint (``rho``, Adam's state, the best
snapshot and the history, JSON after every step) ends exactly as an uninterrupted one.

Snapshot selection departs from the code: its ``best_gamma.json`` is the snapshot with the lowest loss on one
training batch, and its evaluation batches (the test text) can select it; here every ``select_every`` steps (and
after the last) the same objective is measured on held-out calibration windows (never the evaluation text), and
the best snapshot wins.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from saes.core.dobi import SVDGuard, cosine_lr, kept_fraction, range_penalty, truncate_activation
from saes.core.linalg import all_finite
from saes.core.lowrank import set_submodule
from saes.io import read_json, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DobiTraining:
    """Stage 1's settings (``method.dobi.*``); checked by :class:`saes.engine.allocators.dobi.Dobi`."""
    lam: float | str = "auto"
    beta: float = 10.0
    lr: float = 5 / 2048
    min_lr: float = 4 / 2048
    epochs: int = 8
    accum: int = 4
    select_every: int = 8
    niter: int = 2
    clip: float = 1.0
    seed: int = 0


class Truncated(nn.Module):
    """A projection whose output is truncated per sequence at ``gamma = scale * rho[index]`` (the stage-1 and
    stage-2 stream): ``y = lin(x)`` then :func:`truncate_activation` of each sequence's ``[L, m]`` output."""

    def __init__(self, lin: nn.Linear, gamma: Callable[[], torch.Tensor], beta: float, niter: int,
                 generator: Callable[[], torch.Generator], dtype: torch.dtype,
                 guard: SVDGuard | None = SVDGuard()) -> None:
        super().__init__()
        self.lin, self.gamma, self.beta, self.niter = lin, gamma, beta, niter
        self.generator, self.dtype, self.guard = generator, dtype, guard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        flat = y.reshape(-1, y.shape[-2], y.shape[-1])
        gamma = self.gamma()
        outs = []
        for A in flat.to(self.dtype):
            outs.append(truncate_activation(A, gamma, self.beta, self.niter, self.generator(), self.guard))
        return torch.stack(outs).reshape(y.shape).to(y.dtype)


class Installed:
    """Every named projection replaced by a :class:`Truncated` one inside the ``with`` body; put back after."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.model, self.modules = model, modules
        self.originals = {name: model.get_submodule(name) for name in modules}

    def __enter__(self) -> "Installed":
        for name, mod in self.modules.items():
            set_submodule(self.model, name, mod)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, mod in self.originals.items():
            set_submodule(self.model, name, mod)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed % (2 ** 63))


def train_positions(model: nn.Module, names: Sequence[str], shapes: dict[str, tuple[int, int]],
                    rr: dict[str, float], rho0: torch.Tensor, target: float, train_ids: torch.Tensor,
                    select_ids: torch.Tensor, settings: DobiTraining, device: torch.device, dtype: torch.dtype,
                    checkpoint: Path | None, key: dict[str, Any],
                    on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Learn ``rho`` (one per projection of ``names``, from ``rho0``); returns the selected snapshot
    (``rho``, ``step``, ``select_loss``), its kept fraction and the history. ``checkpoint``: the per-step state,
    resumed when its ``key`` matches. ``on_step(step)`` runs after each saved step (tests stop a run there)."""
    m = torch.tensor([shapes[p][0] for p in names], dtype=torch.float64)
    n = torch.tensor([shapes[p][1] for p in names], dtype=torch.float64)
    scale = torch.minimum(m, n) / torch.tensor([rr[p] for p in names], dtype=torch.float64)  # gamma = scale rho
    rho = nn.Parameter(rho0.to(torch.float64).clone())
    opt = torch.optim.Adam([rho], lr=settings.lr)
    per_epoch = math.ceil(train_ids.shape[0] / settings.accum)
    total = settings.epochs * per_epoch
    state: dict[str, Any] = {"step": 0, "best": None, "history": [], "lam": settings.lam}
    if checkpoint is not None and checkpoint.is_file():
        saved = read_json(checkpoint)
        if saved.get("key") == key:
            rho.data = torch.tensor(saved["rho"], dtype=torch.float64)
            opt.load_state_dict(_adam_state(saved["adam"]))
            state = {k: saved[k] for k in ("step", "best", "history", "lam")}
            log.info("Dobi-SVD: resuming stage 1 at step %d of %d from %s", state["step"], total, checkpoint)
    draw = {"seed": 0}

    def generator() -> torch.Generator:
        draw["seed"] += 1
        return _generator(draw["seed"])

    def perplexity(ids: torch.Tensor, stream_seed: int) -> torch.Tensor:
        draw["seed"] = stream_seed * 1_000_003
        return torch.exp(model(input_ids=ids[None].to(device), labels=ids[None].to(device), use_cache=False).loss)

    def budget_terms(lam: float) -> torch.Tensor:
        kept = kept_fraction(rho * torch.minimum(m, n), m, n)
        return lam * (kept - target).abs() + range_penalty(rho * scale, scale)

    def select_loss(lam: float) -> float:
        with torch.no_grad():
            ppl = [float(perplexity(ids, _mix(settings.seed, -1, i))) for i, ids in enumerate(select_ids)]
            return sum(ppl) / len(ppl) + float(budget_terms(lam))

    modules = {p: Truncated(model.get_submodule(p), (lambda i=i: (rho[i] * scale[i]).to(dtype)), settings.beta,
                            settings.niter, generator, dtype) for i, p in enumerate(names)}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval().to(device)
        with Installed(model, modules):
            bar = tqdm(range(state["step"], total), desc="dobi stage 1", unit="step")
            for step in bar:
                epoch, within = divmod(step, per_epoch)
                order = torch.randperm(train_ids.shape[0], generator=_generator(_mix(settings.seed, epoch, -1)))
                batch = order[within * settings.accum:(within + 1) * settings.accum].tolist()
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(step, per_epoch, settings.lr, settings.min_lr)
                opt.zero_grad()
                loss_sum = 0.0
                for w in batch:
                    loss = perplexity(train_ids[w], _mix(settings.seed, epoch, w))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"Dobi-SVD stage 1: the loss on training window {w} at step {step} "
                                                 "is not finite")
                    (loss / len(batch)).backward()
                    loss_sum += float(loss.detach()) / len(batch)
                if state["lam"] == "auto":
                    state["lam"] = auto_lambda(rho.grad, m, n)
                    log.info("Dobi-SVD: lambda = %.4g (lam=auto, from the first step's perplexity gradient)",
                             state["lam"])
                extra = budget_terms(state["lam"])
                extra.backward()
                loss_sum += float(extra.detach())
                if not all_finite(rho.grad):  # before the step: a NaN in rho would be checkpointed, and resumed
                    hint = ("; in float16 the SVD's backward can overflow: model.dtype=bfloat16 or float32"
                            if next(model.parameters()).dtype == torch.float16 else "")
                    raise FloatingPointError(f"Dobi-SVD stage 1: the gradient at step {step} is not finite{hint}")
                clip_in_gamma_units(rho, scale, settings.clip)
                opt.step()
                with torch.no_grad():
                    kept_now = float(kept_fraction(rho * torch.minimum(m, n), m, n))
                entry = {"step": step + 1, "loss": loss_sum, "kept": kept_now, "lr": opt.param_groups[0]["lr"]}
                if (step + 1) % settings.select_every == 0 or step + 1 == total:
                    entry["select_loss"] = select_loss(state["lam"])
                    if state["best"] is None or entry["select_loss"] < state["best"]["select_loss"]:
                        state["best"] = {"step": step + 1, "select_loss": entry["select_loss"], "kept": kept_now,
                                         "rho": rho.detach().tolist()}
                state["history"].append(entry)
                state["step"] = step + 1
                bar.set_postfix(loss=f"{loss_sum:.2f}", kept=f"{kept_now:.4f}")
                if checkpoint is not None:
                    write_json_atomic(checkpoint, {"key": key, "rho": rho.detach().tolist(),
                                                   "adam": _adam_json(opt), **state})
                if on_step is not None:
                    on_step(step + 1)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {"best": state["best"], "history": state["history"], "final_rho": rho.detach().tolist(),
            "steps": total, "target": target, "lam": state["lam"]}


def auto_lambda(grad: torch.Tensor, m: torch.Tensor, n: torch.Tensor, factor: float = 2.0) -> float:
    """``factor x`` the median over projections of ``|d exp(NLL) / d rho_l| / c_l`` with ``c_l = d kept / d rho_l =
    min(m_l, n_l) (m_l + n_l) / sum mn``: the budget's multiplier estimated at the start (``lam="auto"``)."""
    c = torch.minimum(m, n) * (m + n) / (m * n).sum()
    return factor * float((grad.abs() / c).median())


def clip_in_gamma_units(rho: nn.Parameter, scale: torch.Tensor, clip: float) -> None:
    """The trainer's gradient-norm clipping, on the gradient with respect to ``gamma = scale rho`` (the code's
    parameters), so ``clip`` means what it means there."""
    norm = float((rho.grad / scale).norm())
    if norm > clip:
        rho.grad.mul_(clip / (norm + 1e-6))


def _mix(seed: int, epoch: int, window: int) -> int:
    """One integer per (seed, epoch, window): the seeds of the shuffles and of the randomized SVDs."""
    return (seed * 1_000_003 + (epoch + 2) * 10_007 + window + 2) % (2 ** 62)


def _adam_json(opt: torch.optim.Adam) -> dict[str, Any]:
    sd = opt.state_dict()
    return {"state": {str(k): {name: (v.tolist() if v.dim() else float(v)) for name, v in s.items()}
                      for k, s in sd["state"].items()}, "param_groups": sd["param_groups"]}


def _adam_state(saved: dict[str, Any]) -> dict[str, Any]:
    state = {int(k): {name: torch.tensor(v, dtype=torch.float32 if name == "step" else torch.float64)
                      for name, v in s.items()} for k, s in saved["state"].items()}
    return {"state": state, "param_groups": saved["param_groups"]}
