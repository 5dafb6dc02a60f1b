"""What factorising in float32 costs in accuracy, layer by layer, on a real model (issue 25, section 3).

    python -m experiments.bench_precision                          # SmolLM2-135M, saes + svdllm at 0.2
    python -m experiments.bench_precision --overrides model=gemma3_270m

The factorisation runs in float64 by default (``method.compute_dtype``). Datacentre GPUs (A100, H100, H200) do
float64 at half their float32 rate, workstation and consumer GPUs (A6000, L40, RTX 4090) at 1/64 (the vendors'
data sheets), where float32 is the only fast path. This compresses the model once per method as a run does
(the run continues with the float64 factors, so every layer sees the statistics a real run sees) and, for each
layer, factorises again:

* ``float64 svd``: the same maths by the full SVD instead of the Gram eigendecomposition (the reference of
  ``tests/test_linalg_paths.py``);
* ``float32 gram`` / ``float32 svd``: ``W`` and the statistics cast to float32 and factorised there (Cholesky,
  whitening, ACES, truncation) by the default path (the Gram eigendecomposition where ``sigma_r / sigma_1 >=
  0.023``, :func:`saes.core.linalg.gram_floor`) and by the full SVD.

Each is scored by the objective the closed form minimises, in float64: ``||A B C - G(beta)||_F^2`` with
``C C^T = H + lam I`` and ``G(beta) = W (H_l + beta Delta) C^{-T}`` at the float64 run's ``beta`` (SVD-LLM:
``beta = 0``, the whitened output error). The float64 factors are its minimiser (Eckart-Young), so every
variant's relative excess ``(obj - obj_64) / obj_64`` is >= 0 up to rounding. Factorisation seconds per variant
are this CPU's (float32 is faster here too, but the GPU ratios above are what decide). End-to-end perplexity of
a float32 run is a run: ``python run.py method=saes method.compute_dtype=float32``. Writes
``results/bench/precision-<model>-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from saes.core.linalg import damped_cholesky, full_svd
from saes.core.method import DTYPES as PRECISIONS
from saes.core.method import Factors, Method
from saes.core.stats import SiteStats
from saes.engine.config import EngineConfig
from saes.engine.layout import check_plan, layout_for, plan_ranks
from saes.engine.loop import clock, compress_model
from saes.runs.job import build_method
from saes.runs.records import environment
from saes.saes import whitened_targets

from .bench_cost import config, load_calibrated, write_bench

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = (("float64", "svd"), ("float32", "gram"), ("float32", "svd"))


def objective(W: torch.Tensor, stats: SiteStats, f: Factors, damp: float, max_damp: float, beta: float) -> float:
    """``||A B C - G(beta)||_F^2`` in float64 (Eqs. 11-13): the quantity CEALC's closed form minimises."""
    W, A, B = W.double(), f.A.double(), f.B.double()
    wh = damped_cholesky(stats.H.double(), damp, max_damp=max_damp)
    S, D = whitened_targets(W, wh, stats.Delta.double() if beta and stats.Delta is not None else None)
    G = S if D is None else S + beta * D
    return float((A @ (B @ wh.C) - G).square().sum())


class Probe(Method):
    """``inner`` as the run factorises it (float64, returned, so the run goes on unchanged), and each of
    :data:`VARIANTS` beside it, scored by :func:`objective`."""

    def __init__(self, inner: Method) -> None:
        super().__init__(inner.name, "float64")
        self.inner, self.needs, self.stream = inner, inner.needs, inner.stream  # type: ignore[misc]
        self.rows: list[dict[str, Any]] = []

    def factorize(self, W: torch.Tensor, stats: SiteStats, rank: int, layer: str = "") -> Factors:
        inner: Any = self.inner
        t0 = time.perf_counter()
        ref = inner.factorize(W, stats, rank, layer)
        row: dict[str, Any] = {"layer": layer, "shape": list(W.shape), "rank": rank,
                               "seconds": {"float64 gram": clock(W.device) - t0}}
        beta = float(ref.diagnostics.get("beta") or 0.0)
        score = lambda f: objective(W, stats, f, inner.damp, inner.max_damp, beta)  # noqa: E731
        base = score(ref)
        row.update(beta=beta, objective=base, excess={})
        for dtype, path in VARIANTS:
            dt = PRECISIONS[dtype]
            t0 = time.perf_counter()  # the factorisation alone (with its inputs' cast), as the run's time is
            try:
                if path == "svd":
                    with full_svd():
                        f = inner.factorize(W.to(dt), stats.to(dt), rank, layer)
                else:
                    f = inner.factorize(W.to(dt), stats.to(dt), rank, layer)
                row["seconds"][f"{dtype} {path}"] = clock(W.device) - t0
                row["excess"][f"{dtype} {path}"] = (score(f) - base) / base
            except Exception as exc:  # a float32 Cholesky or SVD that fails is a finding, not a crash
                row["seconds"].setdefault(f"{dtype} {path}", clock(W.device) - t0)
                row["excess"][f"{dtype} {path}"] = f"failed: {type(exc).__name__}: {exc}"[:200]
        self.rows.append(row)
        return ref


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ["float64 gram", *(f"{d} {p}" for d, p in VARIANTS)]:
        secs = sum(r["seconds"][name] for r in rows)
        if name == "float64 gram":
            out[name] = {"seconds": secs}
            continue
        vals = [r["excess"][name] for r in rows]
        nums = [v for v in vals if isinstance(v, float)]
        out[name] = {"seconds": secs, "failed": len(vals) - len(nums),
                     "median_excess": statistics.median(nums) if nums else None,
                     "max_excess": max(nums) if nums else None,
                     "worst_layer": max((r for r in rows if isinstance(r["excess"][name], float)),
                                        key=lambda r: r["excess"][name])["layer"] if nums else None}
    return out


def render(result: dict[str, Any]) -> str:
    lines = [f"Factorisation precision on {result['model']} ({result['device']}, {result['threads']} threads), "
             f"ratio {result['ratio']}; calibration {result['calibration']['nsamples']} x "
             f"{result['calibration']['seqlen']} tokens. Excess: (objective - float64's) / float64's, over "
             f"{result['layers']} layers per method; seconds: all layers' factorisations.", "",
             "| method | path | median excess | max excess | worst layer | failed | seconds |",
             "|---|---|---|---|---|---|---|"]
    for method, summ in result["summary"].items():
        for name, s in summ.items():
            if "median_excess" not in s:
                lines.append(f"| {method} | {name} (the run's) | 0 | 0 | - | 0 | {s['seconds']:.1f} |")
                continue
            med, mx = s["median_excess"], s["max_excess"]
            lines.append(f"| {method} | {name} | {'-' if med is None else f'{med:.2e}'} | "
                         f"{'-' if mx is None else f'{mx:.2e}'} | {s['worst_layer'] or '-'} | {s['failed']} | "
                         f"{s['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["saes", "svdllm"])
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides (model=..., calib.nsamples=...)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, device, loaded, ids = load_calibrated(args.overrides)
    calib = cfg.calib
    result: dict[str, Any] = {"model": cfg.model.name, "device": device.type, "threads": args.threads,
                              "ratio": args.ratio, "calibration": {"nsamples": calib.nsamples,
                                                                   "seqlen": calib.seqlen},
                              "rows": {}, "summary": {}}
    for name in args.methods:
        probe = Probe(build_method(config([f"method={name}", *args.overrides])))
        model = copy.deepcopy(loaded.model)
        layout = layout_for(model)
        ranks = plan_ranks(model, layout, args.ratio)
        check_plan(model, layout, ranks)
        ecfg = EngineConfig(device=device, batch_size=calib.batch_size, stats_dtype=PRECISIONS[calib.stats_dtype],
                            stream=calib.propagate, track_fidelity=False, cache_dir=None, model_identity="bench")
        compress_model(model, probe, ranks, ids, ecfg)
        result["rows"][name], result["summary"][name] = probe.rows, summarise(probe.rows)
        result["layers"] = len(probe.rows)
        print(json.dumps({name: result["summary"][name]}, indent=1), flush=True)
        del model
    result["env"] = environment()
    table = render(result)
    print(table)
    write_bench(Path(args.out) / f"precision-{cfg.model.name}-{device.type}", result, table)


if __name__ == "__main__":
    main()
