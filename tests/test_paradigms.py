"""The paradigms table (experiments/paradigms.py): memory per run as stored, the Pareto front, and a table and
figure built from records alone."""

from __future__ import annotations

import json
import math

from experiments import paradigms, sweeps
from experiments.sweeps import Context

from .test_experiments import TINY, has_cells, synthetic_record, write


def P(bits: float, ppl: float, name: str = "x") -> paradigms.Point:
    return paradigms.Point(f"{name}{bits}-{ppl}", "low rank", bits, ppl)


def test_the_front_keeps_exactly_the_points_nothing_beats():
    a, b, c, d, e = P(16, 10), P(12, 20), P(12, 15), P(4, 40), P(8, 50)
    # b loses to c (same bits, lower PPL); e loses to d (fewer bits, lower PPL); a, c, d trade bits for PPL
    assert paradigms.pareto([a, b, c, d, e]) == {a, c, d}
    assert paradigms.pareto([P(4, 40), P(4, 40, "y")]) == {P(4, 40), P(4, 40, "y")}  # ties both stay


def test_memory_is_sixteen_bits_per_kept_weight_unless_a_checkpoint_says_otherwise():
    rec = {"params": {"linears_ratio": 0.25}}
    assert paradigms.bits(rec) == 12.0
    assert paradigms.bits({**rec, "quant": {"bits_per_dense_linear_weight": 3.13}}) == 3.13


def test_table_and_figure_from_records(tmp_path):
    ppl = {"svdllm": 100.0, "saes": 70.0, "wanda_sp": 55.0, "flap": 48.0, "llm_pruner": 65.0, "slicegpt": 60.0}
    js = sweeps.jobs(paradigms.PARAMS, TINY, tmp_path)
    for j in js:
        rec = synthetic_record(j.config, ppl[j.config["method"]["name"]] * (1 + j.ratio), dense_ppl=30.0)
        if j.config["method"]["name"] in ("wanda_sp", "flap", "llm_pruner"):
            rec["params"]["rank_alloc"] = "structured"
        if j.config["method"]["name"] == "slicegpt":
            rec["params"]["rank_alloc"] = "sliced"
        write(j, rec)
    q = next(j for j in sweeps.jobs(paradigms.MEMORY, TINY, tmp_path) if j.ratio == 0)
    rec = synthetic_record(q.config, 40.0, dense_ppl=30.0)
    rec["quant"] = {"bits_per_dense_linear_weight": 4.17}
    write(q, rec)
    doc = paradigms.build(Context(tmp_path, TINY))
    md = doc.markdown()
    assert not doc.refused, md
    assert has_cells(md, "| 0.2 | FLAP | pruning | 0.2000 | 57.60 |")
    assert has_cells(md, "| 0.2 | LLM-Pruner | pruning | 0.2000 | 78.00 |")
    assert has_cells(md, "| 0.4 | SliceGPT | rotation + slicing | 0.2000 | 84.00 |")
    assert has_cells(md, "| SAES-SVD @0.4 | low rank | 12.80 | 98.00 | |")  # FLAP @0.4 (67.2) beats it at 12.8 bits
    assert has_cells(md, f"| {paradigms.name(q)} | quantization | 4.17 | 40.00 | yes |")
    assert "Not run yet (equal memory)" in md
    all_jobs = [*sweeps.jobs(paradigms.PARAMS, TINY, tmp_path), *sweeps.jobs(paradigms.MEMORY, TINY, tmp_path)]
    assert paradigms.figure(all_jobs, tmp_path / "f.png").is_file()


def test_versus_calls_a_difference_only_beyond_twice_its_standard_error():
    assert paradigms.versus(0.40, 0.01, 0.37, 0.01) == "+0.030 (better)"  # 0.030 > 2 * 0.0141
    assert paradigms.versus(0.37, 0.01, 0.40, 0.01) == "-0.030 (worse)"
    assert paradigms.versus(0.39, 0.01, 0.37, 0.01) == "+0.020 (tie)"
    assert paradigms.versus(0.39, None, 0.37, 0.01) == "+0.020"
    assert paradigms.versus(None, 0.01, 0.37, 0.01) == "n/a"


def test_accuracy_table_reads_the_pruners_beside_table1s_low_rank_runs(tmp_path):
    acc = {"saes": 0.40, "svdllm": 0.36, "wanda_sp": 0.39, "flap": 0.45, "llm_pruner": 0.30, "slicegpt": 0.33}
    pruners = sweeps.jobs(paradigms.ACCURACY, TINY, tmp_path)
    table1 = [j for j in sweeps.jobs("table1", TINY, tmp_path) if j.row in paradigms.LOW_RANK]
    for j in [*pruners, *table1]:
        if j.ratio not in (0.2, 0.4) or (j.row == "llm_pruner" and j.ratio == 0.4):
            continue  # one pruner run left missing; table1's other ratios are not read
        a = acc[j.config["method"]["name"]] - j.ratio / 10
        rec = synthetic_record(j.config, 50.0, {"arc_easy": a, "piqa": a})
        for t in rec["metrics"]["zeroshot"]["tasks"].values():
            t["compressed"]["acc_stderr"] = t["dense"]["acc_stderr"] = 0.01 * math.sqrt(2)  # mean's se: 0.01
        if j.experiment == paradigms.ACCURACY:
            rec["params"]["rank_alloc"] = "sliced" if j.row == "slicegpt" else "structured"
        write(j, rec)
    md = paradigms.build(Context(tmp_path, TINY)).markdown()
    assert has_cells(md, "| 0.2 | SAES-SVD | low rank | 50.00 | 0.380 ± 0.010 | 24.0% | - |")
    assert has_cells(md, "| 0.2 | SVD-LLM | low rank | 50.00 | 0.340 ± 0.010 | 32.0% | -0.040 (worse) |")
    assert has_cells(md, "| 0.2 | Wanda-sp | pruning | 50.00 | 0.370 ± 0.010 | 26.0% | -0.010 (tie) |")
    assert has_cells(md, "| 0.4 | FLAP | pruning | 50.00 | 0.410 ± 0.010 | 18.0% | +0.050 (better) |")
    assert has_cells(md, "| 0.4 | LLM-Pruner | | missing | missing | missing | missing |")
    assert has_cells(md, "| 0.2 | SliceGPT | rotation + slicing | 50.00 | 0.310 ± 0.010 | 38.0% | -0.070 (worse) |")
    assert "11 of 12 runs recorded" in md
    for j in table1:  # a record from another protocol (here: another calibration text) refuses the accuracy table
        if j.ratio == 0.2 and j.row == "saes":
            rec = json.loads(j.path.read_text())
            rec["calibration"]["tokens_sha256"] = "d" * 64
            write(j, rec)
    md = paradigms.build(Context(tmp_path, TINY)).markdown()
    assert "**Accuracy: REFUSED**" in md and "0.380 ± 0.010" not in md
