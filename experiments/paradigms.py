"""Beyond SVD (issue 28): low rank against structured pruning and quantization, at equal parameters and equal memory.

    python run.py experiment=paradigms_params   # SVD-LLM, SAES-SVD, Wanda-sp, FLAP, LLM-Pruner, SliceGPT at 0.2 / 0.4 (PPL only)
    python run.py experiment=quant_memory       # GPTQ and AWQ at 3 / 4 bits; low rank at 0.25 / 0.5 + 4-bit
    python run.py experiment=paradigms_pruning  # the pruners under table1's protocol (perplexity + zero-shot)
    python -m experiments.tables                # results/tables/paradigms.md, results/figures/paradigms_ppl_vs_memory.png

Memory is the bits stored per dense linear weight of the decoder blocks: a quantized run's as its checkpoint
stores them (the record's ``quant.bits_per_dense_linear_weight``: weights, scales and zero points); an unquantized
run's at 16 bits per kept weight, ``16 (1 - linears_ratio)``. A point is on the Pareto front when no other point
stores at most as many bits with a lower perplexity.

Accuracy is a second protocol (table1's: zero-shot through lm-eval), so its table is checked on its own: the
pruners' ``paradigms_pruning`` runs beside table1's SAES-SVD and SVD-LLM runs at the same ratios.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from experiments.paper import reference
import math

from experiments.records import ProtocolMismatch, check_protocol, mean_acc, mean_acc_stderr, ppl_of, rel_drop, tasks_run
from experiments.render import (MISSING, Document, Table, avg_head, commands, dense_record, fnum, found, fpct,
                                prepare)
from experiments.sweeps import Context, Job, display
from experiments.table1 import pm

NAME, TITLE = "paradigms", "Beyond SVD: low rank, structured pruning and quantization at equal parameters and memory"
PARAMS, MEMORY, ACCURACY = "paradigms_params", "quant_memory", "paradigms_pruning"
EXPERIMENTS = (PARAMS, MEMORY)
LOW_RANK = ("saes", "svdllm")  # table1's rows the pruners' accuracy is read beside
SUBJECT, SUBJECT_NAME = "saes", "SAES-SVD"  # the row every accuracy is compared with
FP_BITS = 16.0
PAPER = "paradigms_llama7b.csv"


@dataclass(frozen=True)
class Point:
    """One run as the figure and the front see it."""
    name: str
    family: str  # low rank | pruning | rotation + slicing | quantization | <kind> + quantization
    bits: float  # per dense linear weight
    ppl: float


def name(j: Job) -> str:
    q = j.config.get("quant")
    base = display(j.config) if j.ratio > 0 else ""
    if not q:
        return f"{base} @{j.ratio:g}"
    tag = f"{str(q['method']).upper()} {q['bits']}-bit"
    return tag if j.ratio == 0 else f"{base} @{j.ratio:g} + {tag}"


def family(j: Job) -> str:
    alloc = (j.record or {}).get("params", {}).get("rank_alloc")
    kind = {"structured": "pruning", "sliced": "rotation + slicing"}.get(alloc, "low rank")
    if not j.config.get("quant"):
        return kind
    return "quantization" if j.ratio == 0 else f"{kind} + quantization"


def bits(rec: dict[str, Any]) -> float:
    q = rec.get("quant")
    if q:
        return float(q["bits_per_dense_linear_weight"])
    return FP_BITS * (1.0 - float(rec["params"]["linears_ratio"]))


def points(js: Sequence[Job], src: str) -> list[Point]:
    out = []
    for j in js:
        p = ppl_of(j.record, src)
        if j.record is not None and p is not None:
            out.append(Point(name(j), family(j), bits(j.record), p))
    return out


def pareto(ps: Sequence[Point]) -> set[Point]:
    """Points no other point beats: at most as many bits and a lower perplexity (or fewer bits, no worse)."""
    return {p for p in ps if not any((q.bits <= p.bits and q.ppl < p.ppl) or (q.bits < p.bits and q.ppl <= p.ppl)
                                     for q in ps)}


def build(ctx: Context) -> Document:
    def blocks(js: list[Job], _: list[str]) -> list[str | Table]:
        src = js[0].config["eval"]["ppl"]["sources"][0]
        dense = dense_record(js)
        ps = points(js, src)
        front = pareto(ps)
        eq = Table(["ratio", "method", "kind", "linear parameters removed", f"PPL {src}"],
                   caption="Equal parameters: the linear parameters the uniform SVD plan removes")
        for j in sorted((j for j in js if j.experiment == PARAMS), key=lambda j: j.ratio):
            if j.record is None:
                eq.rows.append([f"{j.ratio:g}", display(j.config), "", MISSING, MISSING])
                continue
            eq.rows.append([f"{j.ratio:g}", display(j.config), family(j), f"{j.record['params']['linears_ratio']:.4f}",
                            fnum(ppl_of(j.record, src))])
        mem = Table(["configuration", "kind", "bits per dense linear weight", f"PPL {src}", "Pareto front"],
                    caption="Every run by memory (most bits first); fp16 storage for the unquantized")
        if dense is not None:
            mem.rows.append(["dense", "-", f"{FP_BITS:.2f}", fnum(ppl_of(dense, src, "dense")), "-"])
        for p in sorted(ps, key=lambda p: (-p.bits, p.ppl)):
            mem.rows.append([p.name, p.family, f"{p.bits:.2f}", fnum(p.ppl), "yes" if p in front else ""])
        lost = [f"{j.experiment}: {' '.join(j.own_overrides)}" for j in js if j.experiment == MEMORY and j.record is None]
        out: list[str | Table] = [eq, "", mem]
        if lost:
            out.append("Not run yet (equal memory): " + "; ".join(lost) + ".")
        out.append("Memory: a quantized run's bits as its checkpoint stores them (b bits per weight, a 16-bit scale "
                   "and a b-bit zero point per row and group of 128); an unquantized run's 16 bits per kept linear "
                   "weight. Pruning keeps dense (smaller) matrices; low rank keeps two factors per projection.")
        out += ["", *accuracy(ctx)]
        paper = reference(PAPER)
        if paper:
            t = Table(["source", "model", "removed", "method", "evaluation", "WikiText-2 PPL", "note"],
                      caption="Published numbers (other models and protocols: read the evaluation column)")
            for r in paper:
                t.rows.append([r["source"], r["model"], r["ratio"], r["method"], r["setting"], r["value"], r["note"]])
            out += ["", t]
        return out

    return prepare(ctx, NAME, TITLE, EXPERIMENTS, blocks)


def accuracy_jobs(ctx: Context) -> list[Job]:
    """The pruners' accuracy-protocol runs and table1's low-rank runs at their ratios."""
    pruners = ctx.jobs(ACCURACY)
    ratios = {j.ratio for j in pruners}
    low_rank = [j for j in ctx.jobs("table1") if j.row in LOW_RANK and j.ratio in ratios]
    return sorted([*low_rank, *pruners], key=lambda j: j.ratio)


def accuracy(ctx: Context) -> list[str | Table]:
    """Zero-shot accuracy at equal parameters, each average against SAES-SVD's at its ratio.

    The difference's error is sqrt(se_a^2 + se_b^2), as if the two runs' answers were independent; they are scored
    on the same examples, so this is conservative (a paired test would find more differences, never fewer)."""
    js = accuracy_jobs(ctx)
    recs = found(js)
    try:
        _, warnings = check_protocol(recs, ctx.allow_mixed)
    except ProtocolMismatch as exc:
        return ["**Accuracy: REFUSED**, the pruners' and table1's records do not share one protocol:",
                "```\n" + str(exc) + "\n```"]
    tasks = tasks_run(recs)
    src = js[0].config["eval"]["ppl"]["sources"][0] if js else "?"
    t = Table(["ratio", "method", "kind", f"PPL {src}", avg_head(tasks), "Drop", f"vs {SUBJECT_NAME}"],
              caption="Equal parameters, accuracy protocol (table1's): zero-shot average ± standard error")
    subject = {k.ratio: (mean_acc(k.record, tasks), mean_acc_stderr(k.record, tasks))
               for k in js if k.row == SUBJECT and k.record is not None}
    for j in js:
        if j.record is None:
            t.rows.append([f"{j.ratio:g}", display(j.config), "", *[MISSING] * 4])
            continue
        avg, se = mean_acc(j.record, tasks), mean_acc_stderr(j.record, tasks)
        t.rows.append([f"{j.ratio:g}", display(j.config), family(j), fnum(ppl_of(j.record, src)), pm(avg, se),
                       fpct(rel_drop(mean_acc(j.record, tasks, "dense"), avg)),
                       "-" if j.row == SUBJECT else versus(avg, se, *subject.get(j.ratio, (None, None)))])
    made = " and ".join(f"`{c}`" for c in commands([ACCURACY, "table1"], ctx.overrides))
    missing = sum(j.record is None for j in js)
    return [*warnings, t, f"Made by {made}; {len(js) - missing} of {len(js)} runs recorded. vs {SUBJECT_NAME}: "
            "the difference of the averages, 'tie' within twice its standard error sqrt(se² + se²) (conservative: "
            "both runs answer the same questions)."]


def versus(a: float | None, se_a: float | None, b: float | None, se_b: float | None) -> str:
    """``a - b`` with 'better' / 'worse' when it exceeds twice its standard error, else 'tie'."""
    if a is None or b is None:
        return "n/a"
    d = a - b
    if se_a is None or se_b is None:
        return f"{d:+.3f}"
    se = math.hypot(se_a, se_b)
    word = "tie" if abs(d) <= 2 * se else ("better" if d > 0 else "worse")
    return f"{d:+.3f} ({word})"


def figure(js: Sequence[Job], path: Path) -> Path | None:
    """Perplexity against memory, every run, the Pareto front joined."""
    import matplotlib.pyplot as plt

    from experiments.figures import _save

    if not js:
        return None
    src = js[0].config["eval"]["ppl"]["sources"][0]
    ps = points(js, src)
    if not ps:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for fam in dict.fromkeys(p.family for p in ps):
        mine = [p for p in ps if p.family == fam]
        ax.scatter([p.bits for p in mine], [p.ppl for p in mine], label=fam, s=22)
        for p in mine:
            ax.annotate(p.name, (p.bits, p.ppl), fontsize=5, xytext=(3, 2), textcoords="offset points")
    front = sorted(pareto(ps), key=lambda p: p.bits)
    ax.plot([p.bits for p in front], [p.ppl for p in front], color="black", lw=0.8, ls="--", label="Pareto front")
    dense = dense_record(js)
    if dense is not None:
        ax.axhline(ppl_of(dense, src, "dense"), color="grey", lw=0.6, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("bits per dense linear weight")
    ax.set_ylabel(f"perplexity ({src})")
    ax.set_title(f"{js[0].config['model']['name']}: low rank, pruning, quantization", fontsize=9)
    ax.legend(fontsize=6)
    return _save(fig, path)
