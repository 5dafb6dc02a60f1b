"""``record``: the ranks of an earlier run, read from its record (``method.ranks_from=<record.json>``).

Two methods compared at one rank plan must factorise at the same ranks. An allocator that decides on data
(Dobi-SVD's training, STRS's sensitivities, adaCR's importances) decides again in every run, and a retraining
on another machine can land elsewhere; this one takes the plan a record holds (``layers[name].rank``), so the
pairing is exact: ``method=saes method.rank_alloc=record method.ranks_from=results/runs/.../seed0-<key>.json``
runs SAES-SVD at exactly that run's ranks. The record must be of this model (its projections and shapes), at
this ratio, and its plan must keep the budget rule every plan here obeys (the uniform plan's total, never
exceeded); all of that is checked before the weights load. The run's key holds the ranks, not the path
(:func:`ranks_identity`): two spellings of one record are one run, and a source rewritten with other ranks
(``force=true``) makes the runs that take them new runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from saes.core.lowrank import rank_for_ratio
from saes.engine.allocators.base import Allocator, Plan
from saes.engine.config import EngineConfig
from saes.engine.layout import BlockLayout, plan_parameters, projections
from saes.io import digest, read_json

if TYPE_CHECKING:
    from saes.core.method import Method


def record_ranks(rec: dict) -> dict[str, int | None]:
    """A record's plan: ``name -> rank`` of every projection in ``layers`` (``None``: it stayed dense)."""
    return {name: d["rank"] for name, d in rec["layers"].items()}


def ranks_identity(ranks_from: str) -> str:
    """What a run's key holds for ``method.ranks_from``: ``ranks:<digest of name -> rank>`` of the record there, or
    the path unchanged when it is not a readable record (the run then stops, naming it, before any work)."""
    try:
        return "ranks:" + digest(record_ranks(read_json(Path(ranks_from))), 16)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ranks_from


class FromRecord(Allocator):
    name = "record"

    def __init__(self, ranks_from: str | None) -> None:
        if not isinstance(ranks_from, str) or not ranks_from:
            raise ValueError("method.rank_alloc=record takes its ranks from a run record: set method.ranks_from="
                             f"<results/runs/.../seed0-<key>.json>; got {ranks_from!r}")
        path = Path(ranks_from)
        if not path.is_file():
            raise ValueError(f"method.ranks_from={ranks_from}: no such file")
        try:
            rec = read_json(path)
            self.ranks = record_ranks(rec)
            self.shapes = {name: (int(d["m"]), int(d["n"])) for name, d in rec["layers"].items()}
            self.ratio = float(rec["config"]["ratio"])
            source = rec["config"]["method"]["name"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"method.ranks_from={ranks_from} is not a run record with per-layer ranks "
                             f"({type(exc).__name__}: {exc})") from None
        if not self.ranks:
            raise ValueError(f"method.ranks_from={ranks_from}: the record holds no layers (a dense or pruned run)")
        self.path, self.source = ranks_from, {"ranks_from": ranks_from, "key": rec.get("key"), "method": source,
                                              "rank_alloc": rec.get("params", {}).get("rank_alloc")}

    def check(self, ratio: float) -> None:
        if abs(ratio - self.ratio) > 1e-12:
            raise ValueError(f"method.ranks_from={self.path} holds the ranks of ratio {self.ratio:g}: set "
                             f"ratio={self.ratio:g} (this run's is {ratio:g})")

    def check_shapes(self, shapes: Mapping[str, tuple[int, int]], ratio: float) -> None:
        if set(shapes) != set(self.shapes):
            missing, extra = sorted(set(shapes) - set(self.shapes)), sorted(set(self.shapes) - set(shapes))
            what = [f"it lacks {missing[:3]}"] * bool(missing) + [f"it names {extra[:3]}, not here"] * bool(extra)
            raise ValueError(f"method.ranks_from={self.path} is not a record of this model's projections: "
                             + " and ".join(what))
        for name, shape in shapes.items():
            if tuple(shape) != self.shapes[name]:
                raise ValueError(f"method.ranks_from={self.path}: {name} is {self.shapes[name]} there and "
                                 f"{tuple(shape)} here (another model)")
            r = self.ranks[name]
            if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(shape)):
                raise ValueError(f"method.ranks_from={self.path}: {name} has rank {r!r}, outside [1, {min(shape)}]")
        budget = sum(rank_for_ratio(m, n, ratio) * (m + n) for m, n in shapes.values())
        kept = plan_parameters(dict(shapes), self.ranks)
        if kept > budget:
            raise ValueError(f"method.ranks_from={self.path}: its plan keeps {kept:,} parameters, above the "
                             f"{budget:,} of the uniform plan at ratio {ratio:g} (the budget every plan here keeps)")

    def plan(self, model: nn.Module, layout: BlockLayout, ratio: float, calib_ids: torch.Tensor,
             cfg: EngineConfig, method: "Method") -> Plan:
        self.check(ratio)
        self.check_shapes({p: tuple(model.get_submodule(p).weight.shape) for p in projections(model, layout)}, ratio)
        return Plan(dict(self.ranks), summary=dict(self.source))
