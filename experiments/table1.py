"""Table 1 (with Tables 5/6 and Figure 1b): every method at four ratios, beside the paper's rows.

Sweeps ``experiment=table1``, ``table1_lora``, ``table1_dip``, ``table1_strs``, ``table1_dobi`` and
``table1_dobi_grid``; built by
``python -m experiments.tables``.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from experiments.paper import TABLE3_TASKS, as_float, marks, ref_value, reference
from experiments.records import acc_of, gap_closed, mean_acc, mean_acc_stderr, ppl_of, rel_drop, tasks_run
from experiments.render import MISSING, Document, Table, avg_head, dense_record, facc, fnum, found, fpct, prepare
from experiments.sweeps import Context, Job, cell, label, unique_rows

NAME, TITLE = "table1", "Table 1: every method at four ratios (with Tables 5/6 and Figure 1b)"
EXPERIMENTS = ("table1", "table1_lora", "table1_dip", "table1_strs", "table1_dobi", "table1_dobi_grid")
TASKS = {"openbookqa": "OpenbookQA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "winogrande": "WinoG.",
         "hellaswag": "HellaS.", "piqa": "PIQA", "mathqa": "MathQA", "boolq": "BoolQ", "lambada_openai": "LAMBADA"}
MATCH: dict[str, dict[str, str | None]] = {  # our row id per paper row name, per reference table (our reading)
    "table1_llama7b.csv": {"Baseline": "dense", "FWSVD": "fwsvd", "ASVD": "asvd_strs", "SVD-LLM": "svdllm+lora",
                           "Dobi-SVD": "dobisvd", "Dip-SVD": "dipsvd+dip", "Ours": "saes"},  # None: not reimplemented
    "table5_llama2_7b.csv": {"Original": "dense", "SVD": "svd", "FWSVD": "fwsvd", "ASVD": "asvd_strs",
                             "SVD-LLM": "svdllm", "AdaSVD": "adasvd", "Ours": "saes"},
    "table6_llama3_8b.csv": {"SVD-LLM": "svdllm", "Ours": "saes"},
}
SUBJECT = "saes"  # the row whose gap to each baseline the comparison measures


def build(ctx: Context) -> Document:
    def blocks(js: list[Job], _: list[str]) -> list[str | Table]:
        recs = found(js)
        sources = list(js[0].config["eval"]["ppl"]["sources"])
        tasks = tasks_run(recs)
        asked = list(js[0].config["eval"].get("zeroshot", {}).get("tasks") or [])
        dense = dense_record(js)
        ratios = sorted({j.ratio for j in js})
        table = Table(["ratio", "method", *[f"PPL {s}" for s in sources], *[TASKS.get(t, t) for t in tasks],
                       avg_head(tasks), "Drop"], caption="Ours: perplexity and zero-shot accuracy")
        if dense is not None:
            d_avg = mean_acc(dense, tasks, "dense")
            table.rows.append(["0.0", "dense", *[fnum(ppl_of(dense, s, "dense")) for s in sources],
                               *[facc(acc_of(dense, t, "dense")) for t in tasks],
                               pm(d_avg, mean_acc_stderr(dense, tasks, "dense")), "-"])
        for ratio in ratios:
            for row in unique_rows(js):
                j = cell(js, row, ratio)
                if j is None:
                    continue
                if j.record is None:
                    table.rows.append([str(ratio), label(j), *[MISSING] * (len(table.header) - 2)])
                    continue
                avg = mean_acc(j.record, tasks)
                table.rows.append([str(ratio), label(j), *[fnum(ppl_of(j.record, s)) for s in sources],
                                   *[facc(acc_of(j.record, t)) for t in tasks],
                                   pm(avg, mean_acc_stderr(j.record, tasks)),
                                   fpct(rel_drop(mean_acc(j.record, tasks, "dense"), avg))])
        notes = ["Avg: mean accuracy (lm-eval's `acc`, or the metric the runs averaged) over the tasks every run "
                 "scored, ± its standard error (lm-eval's per-task errors, sqrt(sum se²) / tasks); two averages "
                 "differ beyond sampling noise when their difference exceeds 2 sqrt(se_a² + se_b²) (conservative: "
                 "both runs answer the same questions); Drop: its relative "
                 "drop from the dense model's. * mixed ranks, † LoRA fine-tuning after "
                 "compression."]
        notes += strs_notes([j for j in js if j.row == "asvd_strs"])
        notes += dobi_notes([j for j in js if j.row == "dobisvd"])
        lost = [t for t in asked if t not in tasks]
        if lost:
            notes.append(f"Tasks asked for but not scored in every run: {', '.join(lost)} "
                         "(see each record's `metrics.zeroshot.missing`; offline, MathQA has no local copy).")
        out: list[str | Table] = [table, " ".join(notes)]
        for j in (j for j in js if j.row == "dobisvd" and j.record is not None):
            out.append(rank_profile(j.record, f"Dobi-SVD*'s learned ranks at {j.ratio:g}"))
        for ref in MATCH:
            out += beside_paper(js, ref, sources[0], tasks)
        return out

    return prepare(ctx, NAME, TITLE, EXPERIMENTS, blocks)


def pm(value: float | None, se: float | None) -> str:
    """An average with its standard error (the error left out where the record has none)."""
    return facc(value) + ("" if value is None or se is None else f" ± {se:.3f}")


def strs_notes(js: list[Job]) -> list[str]:
    """What ASVD (STRS)*'s cells rest on: the size of the sensitivity set its records used (read from them, with the
    experiment that sets it), and why a cell is missing where one is."""
    out = []
    sizes = sorted({(int(j.record["config"]["method"]["strs"]["nsamples"]),
                     int(j.record["config"]["method"]["strs"]["seqlen"] or j.record["config"]["calib"]["seqlen"]))
                    for j in js if j.record is not None})
    if sizes:
        presets = "".join(sorted({f"; `conf/experiment/{j.experiment}.yaml`" for j in js}))
        out.append("ASVD (STRS)*: its sensitivity table (one calibration perplexity per projection and candidate kept "
                   f"fraction) measured on {' / '.join(f'{n} x {t}' for n, t in sizes)} calibration tokens "
                   f"(`method.strs`{presets}; the method's default is 8 sequences, `conf/rank_alloc/shared.yaml`).")
    if any(j.record is None for j in js):
        out.append("ASVD (STRS)* missing: not run; its sensitivity table is most of its cost (one calibration "
                   "perplexity per projection and candidate fraction; cached after the first ratio, resumed if stopped).")
    return out


def dobi_notes(js: list[Job]) -> list[str]:
    """What Dobi-SVD*'s cells rest on: its stage-1 preset (read from the records' config) and the kept fraction its
    learned ranks reached before their projection onto the budget."""
    out = []
    presets = sorted({(d["windows"], d["seqlen"], d["epochs"], d["accum"], str(d["lam"])) for d in
                      (j.record["config"]["method"]["dobi"] for j in js if j.record is not None)})
    if presets:
        out.append("Dobi-SVD*: ranks learned on " + " / ".join(f"{w} windows x {L} tokens, {e} epochs, accumulation "
                                                             f"{a}, lambda {lam}" for w, L, e, a, lam in presets)
                   + " (`method.dobi`; `conf/experiment/table1_dobi.yaml`), its code's 256 x 2048, 20-50 epochs, 8; "
                   "equal parameters (no remapping); kept fraction before the projection onto the budget: "
                   + ", ".join(f"{a['kept_before_projection']:.4f} (target {a['target_kept']:.4f}, lambda "
                               f"{a['lam']:.3g}) at {j.ratio}" for j in js if j.record is not None
                               for a in [j.record["params"].get("allocation", {})] if a) + ".")
    if any(j.record is None for j in js):
        out.append("Dobi-SVD* missing: not run here yet (`python run.py experiment=table1_dobi`, about 2 h of "
                   "stage-1 training per ratio on 2 CPU cores; the training is cached, resumed if stopped).")
    return out


def rank_profile(rec: dict[str, Any], what: str, bands: int = 3) -> Table:
    """Kept parameters per projection type and depth band: ``sum_l k_l (m_l + n_l) / sum_l m_l n_l`` over the
    record's ``layers`` of that type in that band (a uniform plan at ratio r keeps 1 - r in every cell)."""
    rows = []
    for name, v in rec["layers"].items():
        m = re.search(r"layers\.(\d+)\..*?(\w+)$", name)
        if m and "rank" in v:
            rows.append({"block": int(m[1]), "type": m[2], "kept": v["rank"] * (v["m"] + v["n"]), "dense": v["m"] * v["n"]})
    if not rows:
        return Table(["projection"], caption=f"{what}: the record has no per-projection ranks")
    df = pd.DataFrame(rows)
    depth = int(df["block"].max()) + 1
    bands = min(bands, depth)
    edges = [round(i * depth / bands) for i in range(bands + 1)]
    df["band"] = pd.cut(df["block"], edges, right=False, labels=[f"blocks {a}-{b - 1}" for a, b in zip(edges, edges[1:])])
    by = df.groupby(["type", "band"], observed=True)[["kept", "dense"]].sum()
    frac = (by["kept"] / by["dense"]).unstack("band")
    frac["all"] = df.groupby("type")["kept"].sum() / df.groupby("type")["dense"].sum()
    order = [t for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj") if t in frac.index]
    frac = frac.loc[order + sorted(set(frac.index) - set(order))]
    t = Table(["projection", *map(str, frac.columns)], caption=f"{what}: kept parameter fraction by type and depth "
              f"(overall {df['kept'].sum() / df['dense'].sum():.3f})")
    t.rows = [[str(i), *[f"{x:.3f}" for x in r]] for i, r in frac.iterrows()]
    return t


def beside_paper(js: list[Job], ref_file: str, src: str, tasks: list[str]) -> list[str | Table]:
    """Our rows beside one reference table's matching rows: PPL, gap closed by SAES-SVD, average accuracy, drop."""
    rows = reference(ref_file)
    if not rows:
        return [f"(reference `{ref_file}` not found: no paper numbers beside ours)"]
    match = MATCH[ref_file]
    source, model = rows[0]["source"], rows[0]["model"]
    dense = dense_record(js)
    four = "acc_average4" in {r["metric"] for r in rows}
    our_tasks = [t for t in (TABLE3_TASKS if four else tasks) if t in tasks]
    paper_subject = next(m for m, rid in match.items() if rid == SUBJECT)
    paper_dense_ppl = next((as_float(ref_value(rows, m, "ppl_wikitext2")) for m, rid in match.items()
                            if rid == "dense"), None)
    table = Table(["ratio", "paper row", "ours", f"PPL {src}", "gap closed by SAES-SVD", "Avg", "Drop",
                   "paper Wiki2 PPL", "paper gap closed", "paper Avg", "paper Drop"],
                  caption=f"Beside {source} ({model}, the paper's numbers)")
    orders = []
    ours_ratios = {j.ratio for j in js}
    paper_ratios = sorted({float(r["ratio"]) for r in rows if r["ratio"] and float(r["ratio"]) > 0})
    for ratio in (r for r in paper_ratios if r in ours_ratios):
        ours_subject = cell(js, SUBJECT, ratio)
        subject_ppl = ppl_of(ours_subject.record if ours_subject else None, src)
        paper_subject_ppl = as_float(ref_value(rows, paper_subject, "ppl_wikitext2", str(ratio)))
        ours_ppl, paper_ppl = {}, {}
        for paper_name, rid in match.items():
            if rid == "dense" or ref_value(rows, paper_name, "ppl_wikitext2", str(ratio)) is None:
                continue
            j = cell(js, rid, ratio)
            rec = j.record if j else None
            p = ppl_of(rec, src)
            pp = as_float(ref_value(rows, paper_name, "ppl_wikitext2", str(ratio)))
            if p is not None:
                ours_ppl[paper_name] = p
            if pp is not None:
                paper_ppl[paper_name] = pp
            is_subject = rid == SUBJECT
            avg = mean_acc(rec, our_tasks)
            p_avg = ref_value(rows, paper_name, "acc_average4" if four else "acc_average", str(ratio))
            p_drop = ref_value(rows, paper_name, "drop", str(ratio))
            table.rows.append([
                str(ratio), paper_name + marks(rows, paper_name),
                label(j) if j else ("not reimplemented" if rid is None else "not run here"),
                (fnum(p) if rec else MISSING) if j else "-",
                "-" if is_subject or not j else (fpct(gap_closed(p, subject_ppl, ppl_of(dense, src, "dense")))
                                                 if rec else MISSING),
                (facc(avg) if rec else MISSING) if j else "-",
                (fpct(rel_drop(mean_acc(rec, our_tasks, "dense"), avg)) if rec else MISSING) if j else "-",
                ref_value(rows, paper_name, "ppl_wikitext2", str(ratio)) or "n/a",
                "-" if is_subject else fpct(gap_closed(pp, paper_subject_ppl, paper_dense_ppl)),
                p_avg or "n/a", (p_drop + "%") if p_drop else "n/a"])
        common = [n for n in paper_ppl if n in ours_ppl]
        if len(common) > 1:
            ours_order = sorted(common, key=lambda n: ours_ppl[n])
            paper_order = sorted(common, key=lambda n: paper_ppl[n])
            orders.append(f"ratio {ratio}: ours {' < '.join(ours_order)}; paper {' < '.join(paper_order)}"
                          f" ({'same order' if ours_order == paper_order else 'different order'})")
    notes = [f"Rows: the paper's {source} rows with a counterpart here (our reading: "
             + ", ".join(f"{k} = {v}" for k, v in match.items()) + "). Gap closed = (PPL_baseline - PPL_SAES) / "
             "(PPL_baseline - PPL_dense); ours on "
             f"{src}, the paper's on WikiText-2 from its printed numbers. Avg: ours over "
             f"{', '.join(our_tasks) or 'no task'}"
             + (" (the paper's four)" if four else "") + f"; the paper's as printed ({'%' if four else 'fraction'})."]
    if orders:
        notes.append("Ordering by perplexity (paper row names), " + "; ".join(orders) + ".")
    skipped = [str(r) for r in paper_ratios if r not in ours_ratios]
    if skipped:
        notes.append(f"The paper's ratios {', '.join(skipped)} are not in our sweep.")
    return [table, " ".join(notes)]
