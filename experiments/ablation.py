"""Table 3 and Figure 1d: SAES-SVD's components (CEALC, ACES), fixed β against adaptive (``experiment=ablation``)."""

from __future__ import annotations

from experiments.paper import TABLE3_TASKS, as_float, ref_value, reference
from experiments.records import mean_acc, ppl_of, tasks_run
from experiments.render import MISSING, Document, Table, avg_head, dense_record, facc, fnum, found, fpct, prepare
from experiments.sweeps import Context, Job, cell, label, unique_rows

NAME, TITLE = "ablation", "Table 3 and Figure 1d: CEALC and ACES, fixed β against adaptive"
EXPERIMENTS = ("ablation",)
BASE = "saes:beta=0.000"  # the row "PPL reduction" is measured against: neither CEALC nor ACES
COMPONENTS = {BASE: ("no", "no"), "saes:beta=0.500": ("yes (β = 0.5)", "no"), "saes": ("yes", "yes")}  # CEALC, ACES


def build(ctx: Context) -> Document:
    def blocks(js: list[Job], _: list[str]) -> list[str | Table]:
        recs = found(js)
        src = js[0].config["eval"]["ppl"]["sources"][0]
        tasks = tasks_run(recs)
        four = [t for t in TABLE3_TASKS if t in tasks]
        dense = dense_record(js)
        table = Table(["ratio", "variant", "CEALC", "ACES", f"PPL {src}", avg_head(four, f"Table 3's {len(four)}"),
                       avg_head(tasks, f"all {len(tasks)}"), "PPL reduction vs β = 0"],
                      caption="Ours: SAES-SVD's components (Table 3) and fixed β against ACES (Figure 1d)")
        if dense is not None:
            table.rows.append(["0.0", "dense", "-", "-", fnum(ppl_of(dense, src, "dense")),
                               facc(mean_acc(dense, four, "dense")), facc(mean_acc(dense, tasks, "dense")), "-"])
        for ratio in sorted({j.ratio for j in js}):
            base = cell(js, BASE, ratio)
            base_ppl = ppl_of(base.record if base else None, src)
            for row in unique_rows(js):
                j = cell(js, row, ratio)
                if j is None:
                    continue
                cealc, aces = COMPONENTS.get(row, ("yes (β = %s)" % row.split("=")[-1][:4], "no"))
                if j.record is None:
                    table.rows.append([str(ratio), label(j), cealc, aces, *[MISSING] * 4])
                    continue
                p = ppl_of(j.record, src)
                red = (base_ppl - p) / base_ppl if base_ppl and p is not None and row != BASE else None
                table.rows.append([str(ratio), label(j), cealc, aces, fnum(p), facc(mean_acc(j.record, four)),
                                   facc(mean_acc(j.record, tasks)), "-" if red is None else fpct(red)])
        paper = reference("table3_ablation.csv")
        ptable = Table(["model", "ratio", "CEALC", "ACES", "Wiki PPL", "Avg Acc (4 tasks, %)", "PPL reduction vs neither"],
                       caption="Table 3 (the paper's numbers)")
        for model in dict.fromkeys(r["model"] for r in paper):
            rows = [r for r in paper if r["model"] == model]
            neither = as_float(ref_value(rows, "neither", "ppl_wikitext2"))
            for meth, (c, a) in (("neither", ("no", "no")), ("CEALC", ("yes", "no")), ("CEALC+ACES", ("yes", "yes"))):
                p = as_float(ref_value(rows, meth, "ppl_wikitext2"))
                red = (neither - p) / neither if neither and p is not None and meth != "neither" else None
                ptable.rows.append([model, rows[0]["ratio"] or "n/a", c, a, ref_value(rows, meth, "ppl_wikitext2") or "n/a",
                                    ref_value(rows, meth, "acc_average4") or "n/a", "-" if red is None else fpct(red)])
        text = ("Variants: β = 0 is truncation-aware whitening on compressed-stream statistics (neither component); "
                "CEALC with a fixed β (α = β / (1 - β)); SAES-SVD adds ACES's per-layer β in [0.25, 0.75]. "
                f"The four-task average is Table 3's (PIQA, ARC-e, HellaSwag, WinoGrande; here: {', '.join(four) or 'none'}). "
                "The paper states no ratio for Table 3 (its LLaMA2-7B CEALC+ACES row is Table 4's, at 0.2).")
        return [table, text, ptable if paper else "(reference table3_ablation.csv not found)"]

    return prepare(ctx, NAME, TITLE, EXPERIMENTS, blocks)
