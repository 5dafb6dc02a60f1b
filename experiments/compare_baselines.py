"""Every method under one calibration protocol (``experiment=compare_baselines``): PPL and compression time.

    python run.py experiment=compare_baselines      # the runs (finished ones are skipped by run.py)
    python -m experiments.tables                    # this table, from the records alone

One row per method, one column per ratio (a pivot of the sweep's records). Differences in protocol
are listed above the table, never refused: the grid was run over several sessions and machines.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from experiments.records import check_protocol
from experiments.render import MISSING, Document, Table, commands, fnum, found, sweep_jobs
from experiments.sweeps import Context, Job

NAME = "compare_baselines"
EXPERIMENTS = ("compare_baselines",)
COMPRESSION = ("prepare", "calibration", "factorisation")  # timings summed into "compress s"


def seconds(rec: dict[str, Any]) -> str:
    """Compression seconds, ``(c)`` when FP statistics came from the cache, ``[Nt]`` torch threads."""
    cached = " (c)" if rec["calibration"].get("stats_cached_blocks") else ""
    return f"{sum(rec['timings'].get(k, 0.0) for k in COMPRESSION):.0f}{cached} [{rec['env'].get('torch_threads', '?')}t]"


def build(ctx: Context) -> Document:
    js = sweep_jobs(ctx, NAME, None, EXPERIMENTS)
    if isinstance(js, Document):
        return js
    recs = found(js)
    if not recs:
        return Document(NAME, None, ["no records yet: " + ", ".join(f"`{c}`" for c in commands(EXPERIMENTS, ctx.overrides))],
                        latex_too=False)
    first = recs[0]
    src = next(iter(first["metrics"]["ppl"]))
    _, warnings = check_protocol(recs, allow_mixed=True)  # an ad-hoc grid: differences are listed, not refused
    calibs = {r["calibration"]["tokens_sha256"] for r in recs} - {None}
    cal = next(r["calibration"] for r in recs if r["calibration"]["tokens_sha256"])
    intro = (f"Model {first['config']['model']['name']} ({first['model']['identity'][:28]}...). "
             f"Calibration: {cal['source']}, {cal['nsamples']} x {cal['seqlen']} tokens, sha256 "
             f"{', '.join(sorted(h[:12] for h in calibs))}. Perplexity on {src}: "
             f"{first['metrics']['ppl'][src]['windows']} windows x {first['config']['eval']['ppl']['seqlen']} tokens; "
             f"dense {first['metrics']['ppl'][src]['dense']:.3f}.")
    cells = pd.DataFrame([cells_of(j, src) for j in js])
    methods = list(dict.fromkeys(cells["method"]))
    ratios = sorted(set(cells["ratio"]))
    wide = cells.pivot(index="method", columns="ratio", values=["ppl", "secs"]).reindex(methods)
    per_method = cells.groupby("method", sort=False)[["stream", "ranks"]].agg(lambda s: next((v for v in s if v), "-"))
    table = Table(["method", "stream", "ranks", *[f"PPL @{r}" for r in ratios], *[f"compress s @{r}" for r in ratios]])
    for m in methods:
        table.rows.append([m, per_method.loc[m, "stream"], per_method.loc[m, "ranks"],
                           *[wide.loc[m, ("ppl", r)] for r in ratios], *[wide.loc[m, ("secs", r)] for r in ratios]])
    missing = [j for j in js if j.record is None]
    blocks: list[str | Table] = [w + "\n" for w in warnings] + [intro, "", table, ""]
    if missing:
        blocks.append("Missing: " + "; ".join(" ".join(j.own_overrides) for j in missing) + " (run: "
                      + ", ".join(f"`{c}`" for c in commands(EXPERIMENTS, ctx.overrides)) + ").")
    blocks += ["compress s = method pre-pass (Fisher / sensitivity / importance) + calibration forwards and "
               "statistics + factorisation, from each record's timings; [Nt] = torch threads of that run; "
               "(c) = FP-stream statistics read from the cache (calib.reuse_stats), so their calibration time is "
               "missing from the figure.",
               "records: " + ", ".join(f"{j.config['method']['name']}@{j.ratio}:{j.record['key']}"
                                       for j in js if j.record)]
    return Document(NAME, None, blocks, latex_too=False, separator="\n")


def cells_of(j: Job, src: str) -> dict[str, Any]:
    r = j.record
    return {"method": str(j.config.get("display") or j.config["method"]["name"]), "ratio": j.ratio,
            "stream": r["calibration"]["stream"] if r else None,
            "ranks": r["params"].get("rank_alloc", "uniform") if r else None,
            "ppl": fnum(r["metrics"]["ppl"][src]["compressed"]) if r else MISSING,
            "secs": seconds(r) if r else "-"}
