"""Retained-energy ratio of one projection's CEALC target against beta (the paper's Figures 1c and 5).

    python -m experiments.rer_curve                                       # k_proj of the middle block, table1's SAES run at 0.2
    python -m experiments.rer_curve --layer 3 --proj self_attn.k_proj     # another projection
    python -m experiments.rer_curve --experiment table1 method=saes ratio=0.4 scale=paper model=llama7b

A record keeps only the beta ACES chose per projection; the curve needs that projection's statistics,
which depend on every block compressed before it (the compressed stream). So the run is replayed by the
engine itself, with the same config (by default the job of ``experiment=table1`` with ``method=saes
ratio=0.2``), up to the chosen projection, where the statistics are taken and the replay stops: an exact
route, at the cost of the calibration forwards of the blocks before it. For each beta on a grid in [0, 1]:
the true retained-energy ratio ``sum_{i<=r} s_i^2 / sum s_i^2`` of ``G(beta) = S + beta D`` (Eq. 13), and
ACES's fixed-subspace estimate ``1 - (a + 2b beta + c beta^2) / (A + 2B beta + C beta^2)`` (Eq. 17); the
beta ACES picks is recomputed with the run's own bounds and guardrails, and the record's beta for that
projection (when the run is recorded) is read for comparison. Writes
``<results_dir>/curves/<model>/rer-<projection>-<run key>.json``, which ``python -m experiments.tables``
plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from saes.core.linalg import damped_cholesky
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats
from saes.engine.layout import layout_for, plan_ranks
from saes.engine.loop import compress_model
from saes.inputs import data as data_mod
from saes.inputs.models import load_model, resolve_device
from saes.io import read_json, token_digest, write_json_atomic
from saes.runs.records import config_key, environment, record_path
from saes.saes import SAES, aces_coefficients, select_beta, whitened_targets


def retained_energy(G: torch.Tensor, rank: int) -> float:
    """``sum_{i<=rank} s_i^2 / sum_i s_i^2`` of ``G`` (singular values only, exact)."""
    s2 = torch.linalg.svdvals(G).square()
    total = float(s2.sum())
    return float(s2[:rank].sum()) / total if total > 0 else 1.0


def curve(method: SAES, W: torch.Tensor, stats: SiteStats, rank: int, points: int) -> dict[str, Any]:
    """The curve of one projection from its statistics, with the damping and guardrails of ``method``."""
    if stats.H is None or stats.Delta is None:
        raise ValueError("the curve needs H and Delta (the compressed stream's statistics)")
    wh = damped_cholesky(stats.H.double(), method.damp, max_damp=method.max_damp)
    S, D = whitened_targets(W.double(), wh, stats.Delta.double())
    coef = aces_coefficients(S, D, rank)
    beta, surrogate = select_beta(coef, method.beta_min, method.beta_max, method.objective, method.cap, method.shrink)
    betas = [i / (points - 1) for i in range(points)]
    return {
        "rank": rank, "shape": list(W.shape), "damp_used": wh.damp, "betas": betas,
        "rer": [retained_energy(S + b * D, rank) for b in betas],
        "rer_surrogate": [1.0 - coef.surrogate(b, "ratio") for b in betas],
        "aces": {"beta": beta, "surrogate": surrogate, "objective": method.objective,
                 "interval": [method.beta_min, method.beta_max], "rer_at_beta": retained_energy(S + beta * D, rank)},
        "coefficients": dataclasses.asdict(coef),
    }


class _Reached(Exception):
    """Raised by the probe once the wanted projection's curve is computed: the replay stops there."""


class CurveProbe(Method):
    """Wraps the run's SAES method: every projection is compressed as in the run, until ``target``."""

    def __init__(self, inner: SAES, target: str, points: int) -> None:
        super().__init__(inner.name)
        self.inner, self.target, self.points = inner, target, points
        self.needs, self.stream, self.compute_dtype = inner.needs, inner.stream, inner.compute_dtype
        self.result: dict[str, Any] | None = None

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        if layer == self.target:
            self.result = curve(self.inner, W, stats, rank, self.points)
            raise _Reached
        return self.inner.factorize(W, stats, rank, layer)


def run_curve(overrides: list[str], layer: int | None, proj: str, points: int) -> tuple[Path, dict[str, Any]]:
    """Replay the run of ``overrides`` up to the projection, write and return the curve's JSON."""
    from omegaconf import OmegaConf

    from experiments.sweeps import compose
    from saes.runs.job import build_method, model_spec
    from saes.runs.pipeline import engine_config

    cfg = compose(overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    method = build_method(cfg)
    if not isinstance(method, SAES) or not method.aces_enabled:
        raise SystemExit("rer_curve needs method=saes with ACES on (the curve marks the beta ACES picks)")
    key = config_key(resolved)
    loaded = load_model(model_spec(cfg.model))
    model, layout = loaded.model, layout_for(loaded.model)
    n_blocks = len(model.get_submodule(layout.layers))
    index = n_blocks // 2 if layer is None else layer
    if not 0 <= index < n_blocks or proj not in layout.projections:
        raise SystemExit(f"--layer must be in [0, {n_blocks}) and --proj one of {layout.projections}")
    target = f"{layout.layers}.{index}.{proj}"
    device = resolve_device(cfg.device)
    calib = cfg.calib
    ids = data_mod.calibration_ids(loaded.tokenizer, calib.source, calib.nsamples, calib.seqlen, calib.seed,
                                   calib.get("path"), calib.get("split"))
    probe = CurveProbe(method, target, points)
    ecfg = dataclasses.replace(engine_config(cfg, device, loaded.identity, key), resume_dir=None, reuse_stats=False)
    t0 = time.perf_counter()
    try:
        compress_model(model, probe, plan_ranks(model, layout, float(cfg.ratio)), ids, ecfg)
    except _Reached:
        pass
    if probe.result is None:
        raise RuntimeError(f"the replay never reached {target}")
    run_rec = record_path(cfg.results_dir, resolved)
    recorded = read_json(run_rec)["layers"].get(target, {}).get("beta") if run_rec.is_file() else None
    out = {
        "kind": "rer_curve", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "overrides": overrides,
        "config": resolved, "run_key": key, "run_record": str(run_rec) if run_rec.is_file() else None,
        "recorded_beta": recorded, "layer": target, "block": index, "projection": proj,
        "model": {"identity": loaded.identity},
        "calibration": {"source": calib.source, "nsamples": calib.nsamples, "seqlen": calib.seqlen,
                        "seed": calib.seed, "tokens_sha256": token_digest(ids)},
        **probe.result, "seconds": time.perf_counter() - t0, "env": environment(),
    }
    path = Path(cfg.results_dir) / "curves" / str(cfg.model.name) / f"rer-{target}-{key}.json"
    write_json_atomic(path, out)
    return path, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the run to replay (default: method=saes ratio=0.2)")
    ap.add_argument("--experiment", default="table1", help="compose the job of this experiment ('' for none)")
    ap.add_argument("--layer", type=int, default=None, help="block index (default: the middle block)")
    ap.add_argument("--proj", default="self_attn.k_proj", help="projection inside the block")
    ap.add_argument("--points", type=int, default=41, help="betas on an even grid over [0, 1]")
    args = ap.parse_args(argv)
    if args.points < 2:
        raise SystemExit("--points must be >= 2")
    given = {o.split("=", 1)[0] for o in args.overrides}
    overrides = [o for o in ("method=saes", "ratio=0.2") if o.split("=")[0] not in given] + list(args.overrides)
    if args.experiment:
        overrides.insert(0, f"experiment={args.experiment}")
    path, out = run_curve(overrides, args.layer, args.proj, args.points)
    a = out["aces"]
    print(f"{out['layer']} (rank {out['rank']} of {out['shape']}): ACES beta {a['beta']:.3f} in "
          f"[{a['interval'][0]:.3f}, {a['interval'][1]:.3f}], RER there {a['rer_at_beta']:.5f}; "
          f"RER at beta 0 {out['rer'][0]:.5f}, at beta 1 {out['rer'][-1]:.5f}; recorded beta {out['recorded_beta']}")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
