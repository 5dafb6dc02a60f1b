"""Dense vs SVD vs SAES-SVD's components (``experiment=foundation``, ``experiment=foundation_damp``):
perplexity, phase times, peak memory, one row per record.

    python run.py experiment=foundation          # the runs (finished ones are skipped by run.py)
    python run.py experiment=foundation_damp     # the same at method.damp 1e-3 and 1e-4
    python -m experiments.tables                 # bench_foundation.md, bench_foundation_damp<damp>.md

Row names are each job's ``display`` (``conf/experiment/foundation/*.yaml``).
"""

from __future__ import annotations

from typing import Sequence

from experiments.records import mean_beta
from experiments.render import MISSING, Document, Table, commands, found, sweep_jobs
from experiments.sweeps import Context, Job, display

NAME = "bench_foundation"
HEADER = ["method", "ratio", "PPL", "removed (proj / model)", "calibration s", "factorisation s", "eval s",
          "total s", "peak RSS MB", "mean beta"]


def build(ctx: Context) -> list[Document]:
    """``bench_foundation`` from experiment=foundation, one ``bench_foundation_damp<damp>`` per damping of
    experiment=foundation_damp."""
    docs = []
    js = sweep_jobs(ctx, NAME, None, ("foundation",))
    docs.append(js if isinstance(js, Document) else document(NAME, js, "foundation", ctx.overrides))
    damped = sweep_jobs(ctx, f"{NAME}_damp", None, ("foundation_damp",))
    if isinstance(damped, Document):
        return docs + [damped]
    for damp in dict.fromkeys(j.config["method"]["damp"] for j in damped):
        group = [j for j in damped if j.config["method"]["damp"] == damp]
        docs.append(document(f"{NAME}_damp{damp}", group, "foundation_damp", ctx.overrides))
    return docs


def document(name: str, js: Sequence[Job], experiment: str, overrides: Sequence[str]) -> Document:
    """The records of ``js`` with the protocol they share (or a warning if their calibration tokens differ)."""
    recs = found(js)
    run = ", ".join(f"`{c}`" for c in commands([experiment], overrides))
    if not recs:
        return Document(name, None, [f"no records yet: {run}"], latex_too=False)
    first = recs[0]
    src = next(iter(first["metrics"]["ppl"]))
    cal = next((r["calibration"] for r in recs if r["calibration"]["tokens_sha256"]), first["calibration"])
    blocks: list[str | Table] = [
        f"model {first['config']['model']['name']} ({first['model']['identity'][:24]}...), "
        f"calibration {cal['source']} {cal['nsamples']}x{cal['seqlen']} tokens "
        f"(sha256 {str(cal['tokens_sha256'])[:12]}), eval {src}: "
        f"{first['metrics']['ppl'][src]['windows']} windows x {first['config']['eval']['ppl']['seqlen']} tokens",
        f"dense PPL: {first['metrics']['ppl'][src]['dense']:.3f}", ""]
    if len({r["calibration"]["tokens_sha256"] for r in recs} - {None}) > 1:
        blocks.insert(0, "WARNING: these runs used different calibration tokens")
    blocks.append(Table(HEADER, [row(j, src) for j in js]))
    missing = [j for j in js if j.record is None]
    if missing:
        blocks.append("missing: " + "; ".join(" ".join(j.own_overrides) for j in missing) + f" (run: {run})")
    blocks.append("records: " + ", ".join(str(r["key"]) for r in recs))
    return Document(name, None, blocks, latex_too=False, separator="\n")


def row(j: Job, src: str) -> list[str]:
    r = j.record
    if r is None:
        return [display(j.config), str(j.ratio), *[MISSING] * (len(HEADER) - 2)]
    t, p, beta = r["timings"], r["params"], mean_beta(r)
    return [display(j.config), str(j.ratio), f"{r['metrics']['ppl'][src]['compressed']:.3f}",
            f"{p['linears_ratio']:.3f} / {p['model_ratio']:.3f}", f"{t['calibration']:.1f}",
            f"{t['factorisation']:.1f}", f"{t['eval_compressed']:.1f}", f"{t['total']:.1f}",
            f"{r['memory']['peak_rss_mb']:.0f}", "-" if beta is None else f"{beta:.3f}"]


