"""Half precision against float32 on a real model (``experiment=half_precision``, issue 25 section 1).

    python run.py experiment=half_precision [model=gemma3_270m]
    python -m experiments.tables [model=gemma3_270m]      # results/tables/half_precision.md

One row per method family, a column pair per half dtype: the perplexity of the run whose model computes in that
dtype, and its relative difference from the float32 run of the same config (the same calibration and evaluation
tokens, checked). Statistics (``calib.stats_dtype``) and factorisation (``method.compute_dtype``) keep their
dtypes in every run, so the difference is the half-precision forwards (the calibration streams, the evaluation)
and the factors' rounding to the model's dtype. A run that stopped with a named error (activations beyond
float16's range: ``NonFiniteLogits``, every float16 run of Gemma-3-270M; a factor beyond it: ``FactorOverflow``)
writes no record and shows as missing.
"""

from __future__ import annotations

import math
import statistics

from experiments.records import ppl_of
from experiments.render import MISSING, Document, Table, fnum, prepare
from experiments.sweeps import Context, Job, display

NAME, TITLE = "half_precision", "Half precision against float32: every method family"
EXPERIMENTS = ("half_precision",)
BASE, HALF = "float32", ("bfloat16", "float16")


def rel(x: float | None, ref: float | None) -> float | None:
    """``(x - ref) / ref``; None unless both are finite (a perplexity that overflowed ``exp`` has no ratio)."""
    if x is None or ref is None or not (math.isfinite(x) and math.isfinite(ref)):
        return None
    return (x - ref) / ref


def fdiff(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}%"


def build(ctx: Context) -> Document:
    def blocks(js: list[Job], _: list[str]) -> list[str | Table]:
        src = js[0].config["eval"]["ppl"]["sources"][0]
        by: dict[tuple[str, str], Job] = {(display(j.config), j.config["model"]["dtype"]): j for j in js}
        methods = list(dict.fromkeys(display(j.config) for j in js))
        table = Table(["method", f"PPL {BASE}", *[h for d in HALF for h in (f"PPL {d}", f"vs {BASE}")]])
        dense = {d: next((j.record for j in js if j.record and j.config["model"]["dtype"] == d), None)
                 for d in (BASE, *HALF)}
        base_dense = ppl_of(dense[BASE], src, "dense")
        table.rows.append(["dense", fnum(base_dense, 3),
                           *[c for d in HALF for c in (fnum(ppl_of(dense[d], src, "dense"), 3),
                                                       fdiff(rel(ppl_of(dense[d], src, "dense"), base_dense)))]])
        diffs: dict[str, list[float]] = {d: [] for d in HALF}
        for m in methods:
            recs = {d: (by[(m, d)].record if (m, d) in by else None) for d in (BASE, *HALF)}
            ref = ppl_of(recs[BASE], src)
            row = [m, fnum(ref) if recs[BASE] else MISSING]
            for d in HALF:
                got = ppl_of(recs[d], src)
                r = rel(got, ref)
                if r is not None:
                    diffs[d].append(r)
                row += [fnum(got) if recs[d] else MISSING, fdiff(r)]
            table.rows.append(row)
        summary = []
        for d in HALF:
            if diffs[d]:
                a = [abs(x) for x in diffs[d]]
                summary.append(f"{d}: compressed PPL within {100 * max(a):.2f}% of float32 over {len(a)} methods "
                               f"(median |difference| {100 * statistics.median(a):.2f}%)")
        text = ("vs float32 = (PPL in the half dtype - PPL in float32) / PPL in float32, the same config otherwise. "
                "Statistics and factorisation keep their own dtypes (float32 / float64) in every run; what differs "
                "is the model's forwards (calibration streams, evaluation) and the factors' rounding to the "
                "model's dtype. No times here: the float32 records may come from another machine, and a half "
                "dtype's speed on a CPU depends on its matrix units (the README gives a measured comparison).")
        return [table, text] + (["; ".join(summary) + "."] if summary else [])

    return prepare(ctx, NAME, TITLE, EXPERIMENTS, blocks, varies=("model dtype",))
