"""Table 11: the compression cost of SAES-SVD against SVD-LLM, phase by phase (``experiment=cost``)."""

from __future__ import annotations

from experiments.paper import as_float, marks, ref_value, reference
from experiments.render import MISSING, Document, Table, dense_record, prepare
from experiments.sweeps import Context, Job, label

NAME, TITLE = "cost", "Table 11: compression cost of SAES-SVD against SVD-LLM"
EXPERIMENTS = ("cost",)
COMPRESSION = ("prepare", "calibration", "factorisation", "checkpoint", "finetune")  # timings summed
SUBJECT, BASELINE = "saes", "svdllm"  # rows: our cost as a multiple of the baseline's (with and without LoRA)
PAPER_SUBJECT, PAPER_BASELINE = "Ours", "SVD-LLM"


def build(ctx: Context) -> Document:
    def blocks(js: list[Job], _: list[str]) -> list[str | Table]:
        table = Table(["method", "calibration s", "pre-pass s", "factorisation s", "fine-tuning s",
                       "compression s", "end-to-end s", "peak RSS MB", "clean timing"],
                      caption="Ours: time of each phase and peak memory (Table 11)")
        totals: dict[str, tuple[float, str]] = {}  # row -> (compression seconds, label)
        for j in js:
            rec = j.record
            if rec is None:
                table.rows.append([label(j), *[MISSING] * 8])
                continue
            t, cal = rec["timings"], rec.get("calibration") or {}
            comp = sum(t.get(k, 0.0) for k in COMPRESSION)
            totals[j.row] = comp, label(j)
            clean = not cal.get("stats_cached_blocks") and not cal.get("resumed_from_block")
            table.rows.append([label(j), f"{t.get('calibration', 0.0):.1f}", f"{t.get('prepare', 0.0):.1f}",
                               f"{t.get('factorisation', 0.0):.1f}", f"{t['finetune']:.1f}" if "finetune" in t else "0",
                               f"{comp:.1f}", f"{t['total']:.1f}", f"{rec['memory']['peak_rss_mb']:.0f}",
                               "yes" if clean else "no (cached statistics or resumed blocks)"])
        paper = reference("table11_cost.csv")
        ptable = Table(["method", "data collection h", "compression h", "fine-tuning h", "total h"],
                       caption="Table 11 (the paper's numbers: LLaMA-7B, NVIDIA A6000)")
        for meth in dict.fromkeys(r["method"] for r in paper):
            ptable.rows.append([meth + marks(paper, meth), *[ref_value(paper, meth, f"hours_{k}") or "n/a" for k in
                                                             ("data_collection", "compression", "finetune", "total")]])
        shape = []
        subject, tuned, plain = (totals.get(r) for r in (SUBJECT, BASELINE + "+lora", BASELINE))
        if subject and tuned and tuned[0] > 0:
            shape.append(f"ours: {subject[1]}'s compression time is {subject[0] / tuned[0]:.2f} x "
                         f"{tuned[1]}'s (with its LoRA stage)")
        if subject and plain and plain[0] > 0:
            shape.append(f"{subject[0] / plain[0]:.2f} x {plain[1]}'s without it")
        p_subject, p_baseline = (as_float(ref_value(paper, m, "hours_total")) for m in (PAPER_SUBJECT, PAPER_BASELINE))
        if p_subject and p_baseline:
            shape.append(f"the paper: {p_subject / p_baseline:.2f} x (SAES-SVD against SVD-LLM†)")
        rec = dense_record(js)
        env = (rec or {}).get("env") or {}
        hw = env.get("cuda") or f"CPU ({env.get('platform', '?')}, {env.get('torch_threads', '?')} torch threads)"
        text = (f"Measured on {hw}. calibration = forwards of both streams and statistics; pre-pass = a method's "
                "whole-model pass before compression (none for these two); compression = pre-pass + calibration + "
                "factorisation + fine-tuning; end-to-end adds loading and evaluation. Both methods use the same "
                "calibration tokens (the paper's SVD-LLM used 256 samples, SAES-SVD 128). Peak RSS is per job (the "
                "experiment resets the process peak before each job). Clean: no statistics reused from another "
                "run and no resumed blocks (the experiment turns both off). " + ("; ".join(shape) + "." if shape else ""))
        return [table, text, ptable if paper else "(reference table11_cost.csv not found)"]

    return prepare(ctx, NAME, TITLE, EXPERIMENTS, blocks)
