"""Table 10: low rank plus GPTQ at equal memory (``experiment=table10``): GPTQ of the dense model against SAES-SVD and
SVD-LLM whose factors are quantized with GPTQ, compared at the bits stored per dense linear weight."""

from __future__ import annotations

from experiments.paper import ref_value, reference
from experiments.records import ppl_of
from experiments.render import MISSING, Document, Table, dense_record, fnum, prepare
from experiments.sweeps import Context, Job, display

NAME, TITLE = "table10", "Table 10: low rank plus GPTQ at equal memory"
EXPERIMENTS = ("table10",)


def name(j: Job) -> str:
    q = j.config["quant"]
    tag = f"{q['method'].upper()} ({q['bits']}-bit)"  # GPTQ or AWQ
    return tag if j.ratio == 0 else f"{display(j.config)} @{j.ratio:g} + {tag}"


def build(ctx: Context) -> Document:
    def blocks(js: list[Job], _: list[str]) -> list[str | Table]:
        src = js[0].config["eval"]["ppl"]["sources"][0]
        dense = dense_record(js)
        table = Table(["configuration", "bits per dense linear weight", "model MB", f"PPL {src}"],
                      caption="Ours (fake-quantized; memory as a GPTQ checkpoint stores it), most bits first")
        if dense is not None:
            table.rows.append(["dense (fp16 storage)", "16.00", "-", fnum(ppl_of(dense, src, "dense"))])
        done = sorted((j for j in js if j.record is not None),
                      key=lambda j: -j.record["quant"]["bits_per_dense_linear_weight"])
        for j in done:
            q = j.record["quant"]
            table.rows.append([name(j), f"{q['bits_per_dense_linear_weight']:.2f}", f"{q['model_megabytes']:.1f}",
                               fnum(ppl_of(j.record, src))])
        for j in js:
            if j.record is None:
                table.rows.append([name(j), MISSING, "", ""])
        paper = reference("table10_gptq.csv")
        ptable = Table(["model", "configuration", "WikiText2 PPL", "ZeroShot7"], caption="Table 10 (the paper's numbers)")
        for model in dict.fromkeys(r["model"] for r in paper):
            rows = [r for r in paper if r["model"] == model]
            for m in dict.fromkeys(r["method"] for r in rows):
                ptable.rows.append([model, m, ref_value(rows, m, "ppl_wikitext2") or "n/a",
                                    ref_value(rows, m, "acc_average7") or "n/a"])
        text = ("Equal memory: bits per dense linear weight = the bits a GPTQ checkpoint stores for the decoder "
                "blocks' linears (b per weight, a 16-bit scale and a b-bit zero point per row and group of 128 "
                "columns, both factors of a low-rank projection) over the dense model's linear parameters. Ratio "
                "0.25 at 4 bits stores about as much as dense GPTQ at 3 bits (the paper's \"equal 3bit\"; it does "
                "not state its ratio and bits), ratio 0.5 at 4 bits about as much as 2 bits. Model MB adds "
                "embeddings, norms and the head at 16 bits. The weights are fake-quantized (dequantized onto the "
                "grid): the perplexity is the quantized model's; packed low-bit kernels are not part of this harness.")
        return [table, text, ptable if paper else "(reference table10_gptq.csv not found)"]

    return prepare(ctx, NAME, TITLE, EXPERIMENTS, blocks)
