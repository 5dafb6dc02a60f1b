"""``dobi``: Dobi-SVD's learned truncation positions (Wang et al., ICLR 2025; stage 1 of its code) as ranks any
method can factorise at.

One continuous position per projection is trained through the activation-truncated model
(:mod:`.dobi_train`, maths in :mod:`saes.core.dobi`) from the uniform plan, on ``windows`` calibration windows of
``seqlen`` tokens, the best snapshot selected on ``select_windows`` further calibration windows (the same seeded
sampler of the calibration source, drawn in one call, so disjoint from each other; never the evaluation text).
The learned weight ranks ``k_l = RR_l gamma_l`` are then projected onto the budget every plan here obeys
(:func:`saes.engine.allocation.fit_ranks`: the uniform plan's total, never exceeded, missed by less than one rank of
one projection); the record keeps the kept fraction before the projection beside the target
(``params.allocation``).

Units: ``gamma`` counts the activation's rank; the weight rank is ``RR gamma``. The code's ``RR = int(min(m, n) /
L)`` is 0 (a crash) for any projection smaller than ``L``; here ``seqlen`` must reach every projection's smaller
dimension (``RR = 1``: ``gamma`` is the weight rank), or ``rr=true`` sets ``RR = max(1, min(m, n) / L)`` exactly
(a float, not the code's integer). The learning rate is in units of ``rho = k / min(m, n)``: the code's 5 over its
range of 2048 is ``5 / 2048`` (0.24% of the range per step). Training runs in ``dtype`` (the code's float32).

The learned positions depend on the model, the training and selection tokens, the target budget, the layout and
every stage-1 setting: they are cached under ``<results_dir>/cache/dobi/`` by a digest of those, so every method
(and ``method=dobisvd``) at the same ratio reuses one training, and the per-step state lands in a
``.partial.json`` beside it, so a stopped training resumes at the step it stopped after.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from saes.core.method import DTYPES
from saes.engine.allocation import fit_ranks
from saes.engine.allocators.base import Allocator, Plan, uniform_budget
from saes.engine.allocators.dobi_train import DobiTraining, train_positions
from saes.engine.config import EngineConfig
from saes.engine.layout import BlockLayout
from saes.io import digest, read_json, token_digest, write_json_atomic

if TYPE_CHECKING:
    from saes.core.method import Method

log = logging.getLogger(__name__)
Sampler = Callable[[int, int], torch.Tensor]  # (nsamples, seqlen) -> [nsamples, seqlen] calibration windows


class Dobi(Allocator):
    name = "dobi"

    def __init__(self, lam: float | str = "auto", beta: float = 10.0, lr: float = 5 / 2048, min_lr: float = 4 / 2048,
                 epochs: int = 8, accum: int = 4, windows: int = 32, seqlen: int = 640, select_windows: int = 4,
                 select_every: int = 8, niter: int = 2, clip: float = 1.0, rr: bool = False,
                 dtype: str = "float32", seed: int = 0) -> None:
        for key, value, low in (("epochs", epochs, 1), ("accum", accum, 1), ("windows", windows, 1),
                                ("select_windows", select_windows, 1), ("select_every", select_every, 1),
                                ("niter", niter, 0), ("seqlen", seqlen, 2), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"method.dobi.{key} must be an integer >= {low}; got {value!r}")
        for key, value in (("lam", lam), ("beta", beta), ("lr", lr), ("clip", clip)):
            if key == "lam" and value == "auto":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0:
                raise ValueError(f"method.dobi.{key} must be > 0" + (" or auto (lambda, the budget's weight)"
                                                                     if key == "lam" else "") + f"; got {value!r}")
        if isinstance(min_lr, bool) or not 0 <= float(min_lr) <= float(lr):
            raise ValueError(f"method.dobi.min_lr must lie in [0, method.dobi.lr]; got {min_lr!r}")
        if dtype not in DTYPES:
            raise ValueError(f"method.dobi.dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
        self.training = DobiTraining(lam if lam == "auto" else float(lam), float(beta), float(lr), float(min_lr),
                                     epochs, accum, select_every,
                                     niter, float(clip), seed)
        self.windows, self.seqlen, self.select_windows = windows, seqlen, select_windows
        self.rr, self.dtype = bool(rr), DTYPES[dtype]
        self.sampler: Sampler | None = None

    def check_shapes(self, shapes: Mapping[str, tuple[int, int]], ratio: float) -> None:
        """``seqlen`` below a projection's smaller dimension needs ``rr=true`` (the code's ``RR`` would be 0)."""
        small = max(min(mn) for mn in shapes.values())
        if not self.rr and self.seqlen < small:
            worst = max(shapes, key=lambda p: min(shapes[p]))
            raise ValueError(f"method.dobi.seqlen={self.seqlen} is below {worst}'s smaller dimension {small}: an "
                             f"activation of {self.seqlen} tokens cannot reach its rank. Set "
                             f"method.dobi.seqlen>={small}, or method.dobi.rr=true (weight rank = max(1, min(m, n) / "
                             "seqlen) x activation rank)")

    def use_text(self, sample: Sampler) -> None:
        self.sampler = sample

    def rank_ratio(self, m: int, n: int) -> float:
        return max(1.0, min(m, n) / self.seqlen) if self.rr else 1.0

    def plan(self, model: nn.Module, layout: BlockLayout, ratio: float, calib_ids: torch.Tensor,
             cfg: EngineConfig, method: "Method") -> Plan:
        uniform, budget = uniform_budget(model, layout, ratio)
        names = list(uniform)
        shapes = {p: tuple(model.get_submodule(p).weight.shape) for p in names}
        self.check_shapes(shapes, ratio)
        rr = {p: self.rank_ratio(*shapes[p]) for p in names}
        learned = self.positions(model, names, shapes, rr, uniform, budget, cfg)
        k = {p: rr[p] * g for p, g in learned["gamma"].items()}
        ranks = fit_ranks(k, shapes, budget)
        total = sum(m * n for m, n in shapes.values())
        summary = {"target_kept": budget / total, "kept_before_projection": learned["kept"],
                   "gap_before_projection": learned["kept"] - budget / total,  # the preset's tolerance: 0.002
                   "kept_after_projection": sum(ranks[p] * sum(shapes[p]) for p in names) / total,
                   "lam": learned["lam"], "selected_step": learned["step"], "steps": learned["steps"],
                   "select_loss": learned["select_loss"],
                   "cache": learned["path"]}
        log.info("Dobi-SVD ranks: kept %.5f before the projection, target %.5f", summary["kept_before_projection"],
                 summary["target_kept"])
        return Plan({p: ranks[p] for p in names},
                    {p: {"dobi_gamma": learned["gamma"][p], "dobi_rank": k[p], "uniform_rank": uniform[p]}
                     for p in names}, summary, rr)

    def windows_for(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Training and selection windows: one seeded draw of ``windows + select_windows`` distinct windows."""
        if self.sampler is None:
            raise RuntimeError("the Dobi-SVD allocator trains on its own calibration windows: the pipeline hands it "
                               "the calibration sampler (use_text) before plan")
        ids = self.sampler(self.windows + self.select_windows, self.seqlen)
        return ids[: self.windows], ids[self.windows:]

    def positions(self, model: nn.Module, names: list[str], shapes: dict[str, tuple[int, int]],
                  rr: dict[str, float], uniform: dict[str, int], budget: int, cfg: EngineConfig) -> dict[str, Any]:
        """The selected snapshot's ``gamma`` per projection (activation ranks: weight rank / ``rr``) and its kept
        fraction (cached; resumable)."""
        train_ids, select_ids = self.windows_for()
        total = sum(m * n for m, n in shapes.values())
        key = {"model": cfg.model_identity, "train": token_digest(train_ids), "select": token_digest(select_ids),
               "budget": budget, "shapes": [[p, *shapes[p]] for p in names],
               "settings": {**self.training.__dict__, "rr": self.rr, "dtype": str(self.dtype)}}
        # The model's precision and device change the forward the positions are learned through. Both entered the
        # key after float32 CPU trainings were cached, so those hash as before (records' ABSENT_IF convention).
        model_dtype = next(model.parameters()).dtype
        if model_dtype != torch.float32:
            key["model_dtype"] = str(model_dtype)
        if cfg.device.type != "cpu":
            key["device"] = cfg.device.type
        key = read_back(key)
        path = None if cfg.cache_dir is None else Path(cfg.cache_dir) / "dobi" / f"{digest(key, 16)}.json"
        if path is not None and path.is_file():
            log.info("Dobi-SVD: learned positions from %s", path)
            return {**read_json(path)["result"], "path": str(path)}
        partial = None if path is None else path.with_name(path.stem + ".partial.json")
        rho0 = torch.tensor([uniform[p] / min(shapes[p]) for p in names], dtype=torch.float64)
        try:
            out = train_positions(model, names, shapes, rr, rho0, budget / total, train_ids, select_ids,
                                  self.training, cfg.device, self.dtype, partial, key)
        finally:
            model.to(cfg.offload_device)
        best = out["best"]
        result = {"gamma": {p: best["rho"][i] * min(shapes[p]) / rr[p] for i, p in enumerate(names)},
                  "kept": best["kept"], "lam": out["lam"], "step": best["step"], "steps": out["steps"],
                  "select_loss": best["select_loss"], "history": out["history"]}
        if path is not None:
            write_json_atomic(path, {"key": key, "result": result})
            partial.unlink(missing_ok=True)
        return {**result, "path": None if path is None else str(path)}


def read_back(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so a saved key compares equal to a fresh one."""
    return json.loads(json.dumps(obj))
