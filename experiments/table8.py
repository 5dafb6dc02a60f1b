"""Table 8: mixed ranks for any method (``experiment=table8``): SAES-SVD and SVD-LLM with uniform ranks, with ASVD's
rank distribution (STRS) and with AdaSVD's layer ratios (adaCR), beside ASVD with its own STRS."""

from __future__ import annotations

from experiments.paper import ref_value, reference
from experiments.records import gap_closed, ppl_of
from experiments.render import MISSING, Document, Table, dense_record, fnum, fpct, prepare
from experiments.sweeps import Context, Job, cell, label, unique_rows

NAME, TITLE = "table8", "Table 8: SAES-SVD and SVD-LLM with mixed ranks (STRS, adaCR)"
EXPERIMENTS = ("table8",)
PAPER_ROWS = {"asvd_strs": "ASVD", "saes": "SAES-SVD", "saes+strs": "SAES+mixrank"}  # our row -> the paper's


def build(ctx: Context) -> Document:
    def blocks(js: list[Job], _: list[str]) -> list[str | Table]:
        src = js[0].config["eval"]["ppl"]["sources"][0]
        dense = dense_record(js)
        paper = reference("table8_llama7b.csv")
        table = Table(["ratio", "method", "ranks", f"PPL {src}", "gap closed vs SVD-LLM", "removed (linears)",
                       "paper: Wiki PPL (LLaMA-7B)", "paper: ZeroShot7"],
                      caption="Ours (perplexity only) beside the paper's Table 8 (LLaMA-7B, its rows only)")
        if dense is not None:
            table.rows.append(["0.0", "dense", "-", fnum(ppl_of(dense, src, "dense")), "-", "-", "-", "-"])
        for ratio in sorted({j.ratio for j in js}):
            base = cell(js, "svdllm", ratio)
            base_ppl = ppl_of(base.record if base else None, src)
            for row in unique_rows(js):
                j = cell(js, row, ratio)
                if j is None:
                    continue
                name = PAPER_ROWS.get(row)
                ref = [ref_value(paper, name, m, str(ratio)) or "-" if name else "-"
                       for m in ("ppl_wikitext2", "acc_average7")]
                if j.record is None:
                    table.rows.append([str(ratio), label(j), "-", MISSING, "", "", *ref])
                    continue
                p = ppl_of(j.record, src)
                gap = gap_closed(base_ppl, p, ppl_of(j.record, src, "dense")) if row != "svdllm" else None
                table.rows.append([str(ratio), label(j), j.record["params"].get("rank_alloc", "uniform"), fnum(p),
                                   "-" if gap is None else fpct(gap), f"{j.record['params']['linears_ratio']:.4f}",
                                   *ref])
        text = ("STRS: ASVD's sensitivity-based rank search, its table measured once with ASVD's truncation on one "
                "256-token calibration sequence and shared by every STRS row (the paper's \"SAES+mixrank\" reuses the "
                "rank distribution ASVD discovers); adaCR: AdaSVD's layer ratios from the cosine of each block's input "
                "and output (`conf/rank_alloc/shared.yaml`). Every plan keeps the uniform plan's parameters (removed "
                "fraction of the projections' parameters in the column; short of the target by less than one rank). "
                "Gap closed: (PPL SVD-LLM - PPL row) / (PPL SVD-LLM - PPL dense) at the same ratio, SVD-LLM with "
                "uniform ranks. The paper reports zero-shot accuracy too; these runs are perplexity only "
                "(compare_baselines' protocol).")
        return [table, text]

    return prepare(ctx, NAME, TITLE, EXPERIMENTS, blocks)
