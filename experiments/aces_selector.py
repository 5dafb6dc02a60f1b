"""ACES examined (``experiment=aces_selector``): ACES's surrogate against the exact selector and a fixed β = 0.5,
per calibration text and ratio, with how good the surrogate was at the β each run chose.

One table per text (a table never mixes calibration protocols); rows: ratio x selector. Surrogate error:
the surrogate's tail ratio at the chosen β minus the true one of ``G(β)`` (>= 0: the fixed subspace is never
better than ``G(β)``'s own), over the run's projections; gap: ``s_r / s_{r+1}`` of ``S``.
"""

from __future__ import annotations

import statistics
from typing import Any

from experiments.records import ProtocolMismatch, check_protocol, ppl_of
from experiments.render import MISSING, Document, Table, commands, fnum, found, sweep_jobs
from experiments.sweeps import Context, Job, beta_of

NAME, TITLE = "aces_selector", "ACES examined: surrogate, exact and output selectors, fixed β = 0.5"
EXPERIMENTS = ("aces_selector",)


def selector(j: Job) -> str:
    """The row's β rule, read from the config: a fixed β, or ACES with its selector."""
    method = j.config["method"]
    if not method["aces"]["enabled"]:
        return f"fixed β = {beta_of(float(method['alpha'])):.2f}"
    return f"ACES ({method['aces'].get('selector', 'surrogate')})"


def layer_stats(rec: dict[str, Any]) -> dict[str, str]:
    layers = [d for d in rec["layers"].values() if d.get("beta") is not None]
    betas = [d["beta"] for d in layers]
    out = {"mean β": f"{statistics.fmean(betas):.3f}" if betas else "n/a"}
    errors = [d["surrogate_error"] for d in layers if "surrogate_error" in d]
    gaps = [d["gap"] for d in layers if "gap" in d]
    out["median surrogate error"] = f"{statistics.median(errors):.2e}" if errors else "n/a"
    out["median gap"] = f"{statistics.median(gaps):.3f}" if gaps else "n/a"
    return out


def build(ctx: Context) -> Document:
    js = sweep_jobs(ctx, NAME, TITLE, EXPERIMENTS)
    if isinstance(js, Document):
        return js
    blocks: list[str | Table] = []
    for text in dict.fromkeys(str(j.config["calib"]["source"]) for j in js):
        group = [j for j in js if j.config["calib"]["source"] == text]
        src = str(group[0].config["eval"]["ppl"]["sources"][0])
        try:
            _, warnings = check_protocol(found(group), ctx.allow_mixed)
        except ProtocolMismatch as exc:
            blocks.append(f"Calibration {text}: refused, {exc}")
            continue
        heads = ["ratio", "β rule", f"PPL {src}", "mean β", "median surrogate error", "median gap"]
        table = Table(heads, caption=f"Calibration {text}, evaluation {src}")
        for j in group:
            if j.record is None:
                table.rows.append([f"{j.ratio:g}", selector(j), MISSING, "", "", ""])
                continue
            s = layer_stats(j.record)
            table.rows.append([f"{j.ratio:g}", selector(j), fnum(ppl_of(j.record, src)), s["mean β"],
                               s["median surrogate error"], s["median gap"]])
        blocks += [*warnings, table, ""]
    missing = [j for j in js if j.record is None]
    if missing:
        blocks.append("Missing: " + "; ".join(" ".join(j.own_overrides) for j in missing) + " (run: "
                      + ", ".join(f"`{c}`" for c in commands(EXPERIMENTS, ctx.overrides)) + ").")
    blocks.append("Surrogate error and gap come from records made since ACES's diagnostics exist (n/a before). "
                  "The exact and output selectors score nine β over [0.25, 0.75] and the surrogate's choice, by the "
                  "true tail ratio of G(β) (exact) or by the layer's calibration output error against the FP "
                  "stream with CEALC's factors (output); one SVD per candidate.")
    return Document(NAME, TITLE, blocks, latex_too=False, separator="\n")
