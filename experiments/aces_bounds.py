"""Table 4: ACES's bounds, read as β and as α (``experiment=aces_bounds``), beside the paper's."""

from __future__ import annotations

from experiments.paper import TABLE3_TASKS, ref_value, reference
from experiments.records import mean_acc, ppl_of, tasks_run
from experiments.render import MISSING, Document, Table, avg_head, facc, fnum, found, prepare
from experiments.sweeps import Context, Job, beta_of

NAME, TITLE = "aces_bounds", "Table 4: ACES's bounds, read as β and as α"
EXPERIMENTS = ("aces_bounds",)


def build(ctx: Context) -> Document:
    def blocks(js: list[Job], _: list[str]) -> list[str | Table]:
        recs = found(js)
        src = js[0].config["eval"]["ppl"]["sources"][0]
        four = [t for t in TABLE3_TASKS if t in tasks_run(recs)]
        paper = reference("table4_aces_bounds.csv")
        table = Table(["bounds", "read as", "β interval", f"PPL {src}", avg_head(four, f"Table 4's {len(four)}"), "mean β",
                       "projections at an end", "paper Wiki PPL", "paper Avg Acc (%)"],
                      caption="Ours beside Table 4 (the paper's numbers: LLaMA2-7B, ratio 0.2, bounds labelled α)")
        for j in js:
            aces = j.config["method"]["aces"]
            lo, hi, space = float(aces["beta_min"]), float(aces["beta_max"]), aces["space"]
            blo, bhi = (beta_of(lo), beta_of(hi)) if space == "alpha" else (lo, hi)
            setting = f"{lo:g}-{hi:g}"
            head = [f"({lo:g}, {hi:g})", space, f"[{blo:.3f}, {bhi:.3f}]"]
            paper_cols = [ref_value(paper, "Ours", "ppl_wikitext2", setting=setting) or "n/a",
                          ref_value(paper, "Ours", "acc_average4", setting=setting) or "n/a"]
            if j.record is None:
                table.rows.append([*head, *[MISSING] * 4, *paper_cols])
                continue
            betas = [d["beta"] for d in j.record["layers"].values() if d.get("beta") is not None]
            ends = sum(1 for b in betas if min(abs(b - blo), abs(b - bhi)) < 1e-9)
            table.rows.append([*head, fnum(ppl_of(j.record, src)), facc(mean_acc(j.record, four)),
                               f"{sum(betas) / len(betas):.3f}" if betas else "n/a",
                               f"{ends} of {len(betas)}" if betas else "n/a", *paper_cols])
        return [table, "β interval: the bounds as ACES clips β (read as α bounds they map through β = α / (1 + α)). "
                       "Mean β and ends: over every compressed projection of the run. The paper's values are printed "
                       "once per bounds pair; which reading the paper used is not stated."]

    return prepare(ctx, NAME, TITLE, EXPERIMENTS, blocks)
